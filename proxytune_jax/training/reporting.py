"""Metric writers: where a training run's numbers go.

``metrics.jsonl`` is always written (one line per logged step, the record resume truncates and
``proxytune plot`` reads); ``ReportConfig.to`` adds writers from ``WRITERS``:

  ``tensorboard``  event files in ``WORKDIR/tensorboard`` (``tensorboardX``: no TensorFlow);
                   ``tensorboard --logdir WORKDIR`` (or a parent of several workdirs) shows them
  ``wandb``        a Weights & Biases run (``pip install proxytune_jax[wandb]``; ``WANDB_MODE=offline`` keeps it
                   in ``WORKDIR/wandb``); its id is kept in ``WORKDIR/wandb_run_id`` so a resumed run continues it

A writer is anything with ``write_scalars(step, scalars)``, ``write_run_info(info)`` and ``close()``
(``MetricWriter``); ``register_writer(name, factory)`` adds one, ``factory(workdir, report_config, resumed_from)``.

Names: metrics.jsonl keeps the trainer's keys (``loss``, ``learning_rate``, ``grad_norm``, ``tokens_per_s``,
every objective term, ``eval_<x>`` for held-out losses, ``gen_eval_<x>`` for generation-based evaluation);
the other writers get them as tags ``train/<x>``, ``eval/<x>``, ``gen_eval/<x>`` (``metric_tag``).

Once per run (and per resume) ``run_info`` -- the resolved config, the git commit of the library's checkout,
package versions, the devices -- goes to ``WORKDIR/run_info.json`` (written atomically) and to every writer.
"""
from __future__ import annotations

import datetime
import json
import platform
import secrets
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol

from proxytune_jax.errors import UserError
from proxytune_jax.atomic import append_line, write_json_atomic

PREFIXES = (("gen_eval_", "gen_eval/"), ("eval_", "eval/"))
VERSIONED_PACKAGES = ("proxytune_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
                      "tokenizers", "numpy", "ott-jax", "tensorboardX", "wandb")


def metric_tag(key: str) -> str:
    """The TensorBoard / W&B tag of a metrics.jsonl key: ``eval_loss`` -> ``eval/loss``,
    ``gen_eval_accuracy`` -> ``gen_eval/accuracy``, ``loss`` -> ``train/loss``."""
    for prefix, group in PREFIXES:
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return "train/" + key


def numeric_scalars(metrics: dict) -> dict[str, float]:
    """The finite-or-not real numbers of a metrics line, without ``step`` (bools and strings dropped)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricWriter(Protocol):
    def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def write_run_info(self, info: dict) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------ run info
def git_commit(path: str | Path | None = None) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``path`` (default: this
    package's source; an installed wheel has none)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip()) if not status.returncode
                else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names=VERSIONED_PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_info(config_dict: dict, *, resumed_from: int | None = None) -> dict:
    """What a run records once: the resolved config, git commit, package versions, devices, command line."""
    import jax
    devices = jax.devices()
    return {
        "config": config_dict,
        "git": git_commit(),
        "versions": {"python": platform.python_version(), **package_versions()},
        "devices": {"platform": devices[0].platform, "count": len(devices), "kind": devices[0].device_kind,
                    "processes": jax.process_count()},
        "argv": list(sys.argv),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": resumed_from,
    }


# ------------------------------------------------------------------------------------------ writers
class JsonlWriter:
    """``metrics.jsonl``: ``{"step": step, **metrics}`` per call, appended, flushed and fsynced (a crash leaves
    whole lines; a resume truncates the rest)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, step: int, metrics: dict) -> None:
        append_line(self.path, json.dumps({"step": step, **metrics}))


class TensorBoardWriter:
    """Event files in ``WORKDIR/tensorboard`` through ``tensorboardX``. A resumed run starts its file with
    ``purge_step`` = the checkpoint's step + 1, so TensorBoard drops the killed run's points after it."""

    def __init__(self, workdir: Path, report, resumed_from: int | None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError("TensorBoard event files need tensorboardX: pip install tensorboardX (or drop "
                            "tensorboard from --report-to)") from None
        self.logdir = Path(workdir) / "tensorboard"
        self._w = SummaryWriter(logdir=str(self.logdir),
                                purge_step=None if resumed_from is None else resumed_from + 1, flush_secs=30)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._w.add_scalar(metric_tag(key), value, global_step=step)

    def write_run_info(self, info: dict) -> None:
        for part in ("config", "git", "versions", "devices"):
            text = json.dumps(info.get(part), indent=2)
            self._w.add_text(f"run_info/{part}", "    " + text.replace("\n", "\n    "), global_step=0)

    def close(self) -> None:
        self._w.flush()
        self._w.close()


class WandbWriter:
    """A Weights & Biases run (``wandb`` imported only here). Config: the run's resolved ``TrainConfig``; the
    git commit, versions and devices under ``run_info``. Files in ``WORKDIR/wandb``."""

    def __init__(self, workdir: Path, report, resumed_from: int | None):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs Weights & Biases: pip install 'proxytune_jax[wandb]' "
                            "(or drop wandb from --report-to)") from None
        self._wandb = wandb
        workdir = Path(workdir)
        id_file = workdir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=report.wandb_project, entity=report.wandb_entity or None,
                               name=report.wandb_name or workdir.resolve().name, dir=str(workdir), id=run_id,
                               resume="allow")

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({metric_tag(k): v for k, v in scalars.items()}, step=step)

    def write_run_info(self, info: dict) -> None:
        self._run.config.update(info["config"], allow_val_change=True)
        self._run.config.update({"run_info": {k: info.get(k) for k in ("git", "versions", "devices")}},
                                allow_val_change=True)

    def close(self) -> None:
        self._run.finish()


WRITERS: dict[str, Callable[[Path, object, int | None], MetricWriter]] = {
    "tensorboard": TensorBoardWriter,
    "wandb": WandbWriter,
}


def register_writer(name: str, factory: Callable[[Path, object, int | None], MetricWriter]) -> None:
    """Add a writer for ``--report-to NAME``: ``factory(workdir, report_config, resumed_from)``."""
    WRITERS[name] = factory


class Reporter:
    """Fans every logged line out to metrics.jsonl and the configured writers. ``enabled=False`` (processes
    other than 0 of a multi-host run) writes nothing."""

    def __init__(self, workdir: Path, report, *, resumed_from: int | None = None, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.jsonl = JsonlWriter(self.workdir / "metrics.jsonl")
        self.writers: list[MetricWriter] = []
        if enabled:
            try:
                for name in report.to:
                    if name.strip() != "none":
                        self.writers.append(WRITERS[name.strip()](self.workdir, report, resumed_from))
            except BaseException:
                self.close()
                raise

    def log(self, step: int, metrics: dict) -> None:
        """One metrics.jsonl line ``{"step": step, **metrics}``; its numbers to every writer."""
        if not self.enabled:
            return
        self.jsonl.write(step, metrics)
        scalars = numeric_scalars(metrics)
        for w in self.writers:
            w.write_scalars(step, scalars)

    def log_run_info(self, info: dict) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.workdir / "run_info.json", info)
        for w in self.writers:
            w.write_run_info(info)

    def close(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
