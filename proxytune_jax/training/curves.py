"""Loss curves without TensorBoard: the series of one or several runs' ``metrics.jsonl``, drawn to a PNG
(``proxytune plot WORKDIR... -o curves.png``).

``read_curves(workdir)`` -> ``{tag: (steps, values)}`` with the tags of ``training.reporting.metric_tag``
(``train/loss``, ``eval/loss``, ``gen_eval/accuracy``, ...), steps ascending. ``plot_curves(workdirs, out)``
draws one panel per metric and one line per run (labelled by the run directory's name; several runs overlay,
e.g. the arms of an ablation) and returns the series it drew, ``{tag: {label: (steps, values)}}``.
Default metrics: ``train/loss``, then every ``eval/*`` loss term and every ``gen_eval/*`` score any run has.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.training.reporting import metric_tag, numeric_scalars

DEFAULT_TRAIN = ("train/loss",)


def read_curves(workdir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every numeric key of ``WORKDIR/metrics.jsonl`` as ``tag -> (steps int64 [n], values float64 [n])``; a
    step logged twice (a resumed run) keeps its last value."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{workdir} has no metrics.jsonl; pass the --workdir of a `proxytune train` run")
    points: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{lineno} is not valid JSON; metrics.jsonl is written by `proxytune train` "
                            "(rerun the training to rewrite it)") from None
        if not isinstance(obj, dict) or "step" not in obj:
            continue
        for key, value in numeric_scalars(obj).items():
            points.setdefault(metric_tag(key), {})[int(obj["step"])] = value
    out = {}
    for tag, by_step in points.items():
        steps = np.array(sorted(by_step), np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], np.float64))
    return out


def default_metrics(curves: Sequence[dict]) -> list[str]:
    tags = set().union(*(c.keys() for c in curves))
    chosen = [t for t in DEFAULT_TRAIN if t in tags]
    chosen += sorted(t for t in tags if t.startswith("eval/") and t != "eval/tokens")
    chosen += sorted(t for t in tags if t.startswith("gen_eval/"))
    return chosen


def run_labels(workdirs: Sequence[str | Path]) -> list[str]:
    """Each run's directory name; the whole path where two runs share a name."""
    names = [Path(w).resolve().name for w in workdirs]
    return [str(w) if names.count(n) > 1 else n for w, n in zip(workdirs, names)]


def plot_curves(workdirs: Sequence[str | Path], out: str | Path, metrics: Sequence[str] | None = None, *,
                dpi: int = 120) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Draw ``metrics`` (tags; default ``default_metrics``) of every run to the PNG ``out``; return the
    series drawn, ``{tag: {run label: (steps, values)}}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not workdirs:
        raise UserError("name at least one WORKDIR of a `proxytune train` run")
    curves = [read_curves(w) for w in workdirs]
    labels = run_labels(workdirs)
    available = sorted(set().union(*(c.keys() for c in curves)))
    metrics = list(metrics) if metrics else default_metrics(curves)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise UserError(f"no run logged {unknown[0]!r}; the metrics logged are: {', '.join(available)}")
    if not metrics:
        raise UserError("the runs logged no metrics yet; train longer than log_every steps, or name --metrics")

    drawn: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    try:
        for ax, tag in zip(axes.flat, metrics):
            drawn[tag] = {}
            for label, c in zip(labels, curves):
                if tag in c:
                    steps, values = c[tag]
                    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
                    drawn[tag][label] = (steps, values)
            ax.set_title(tag)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(workdirs) > 1:
                ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(metrics):]:
            ax.set_visible(False)
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.png")
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(out)  # atomic: a reader never sees half a PNG
    finally:
        plt.close(fig)
    return drawn
