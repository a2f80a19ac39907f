"""The proxy-tuning experiment of the toy world (``docs/methods.md`` §1.1): on held-out questions, compare
base-large, tuned-small, proxy-tuned-large (``log p_base-large + α·(log p_tuned-small − log p_base-small)``,
greedy) and tuned-large, sweep α, and record the share of generated tokens whose top-1 changed vs the base.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from proxytune_jax.eval import gap_closed
from proxytune_jax.toyworld.evaluate import generate

ALPHAS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


@dataclasses.dataclass
class ProxyResults:
    n_questions: int
    accuracy: dict[str, float]  # base-small, base-large, tuned-small, proxy-tuned-large, tuned-large
    gap_closed: float
    top1_changed_share: float  # proxy-tuned vs base-large, over generated tokens
    alpha_sweep: dict[float, float]
    completions: dict[str, list[str]]


def run_proxy_tuning(models: dict, tokenizer, questions: Sequence, *, alphas: Sequence[float] = ALPHAS) -> ProxyResults:
    """``models`` maps the four toy names to loaded models."""
    from proxytune_jax.decoding.pipeline import TextGenerator

    acc, comps = {}, {}
    for name, chat in (("base-small", False), ("base-large", False), ("tuned-small", True), ("tuned-large", True)):
        g = generate([models[name]], tokenizer, questions, chat=[chat])
        acc[name], comps[name] = g.accuracy, g.completions
    gen = TextGenerator([models["base-large"], models["tuned-small"], models["base-small"]], [tokenizer] * 3,
                        "proxy_tuning", chat_template=[False, True, False],
                        names=["base-large", "tuned-small (expert)", "base-small (anti-expert)"])
    sweep = {}
    changed = float("nan")
    for alpha in sorted(set(alphas) | {1.0}):
        g = generate(None, tokenizer, questions, chat=(), fusion_params={"alpha": alpha}, generator=gen,
                     analysis=alpha == 1.0)
        sweep[float(alpha)] = g.accuracy
        if alpha == 1.0:
            acc["proxy-tuned-large"], comps["proxy-tuned-large"] = g.accuracy, g.completions
            changed = g.changed_share
    gap = gap_closed(acc["base-large"], acc["proxy-tuned-large"], acc["tuned-large"])
    return ProxyResults(len(questions), acc, gap, changed, {a: sweep[a] for a in sorted(sweep) if a in alphas},
                        comps)


def plot_alpha_sweep(results: ProxyResults, path) -> None:
    """Accuracy vs α for proxy-tuned-large, with the single models as horizontal references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    a = sorted(results.alpha_sweep)
    ax.plot(a, [results.alpha_sweep[x] for x in a], "o-", color="C3", label="proxy-tuned-large")
    for name, color in (("base-large", "C0"), ("tuned-small", "C1"), ("tuned-large", "C2")):
        ax.axhline(results.accuracy[name], color=color, linestyle="--", label=name)
    ax.set_xlabel("α (strength of the tuned-small − base-small offset)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"Proxy-tuning in the toy world ({results.n_questions} held-out questions)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
