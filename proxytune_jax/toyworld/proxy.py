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


def plot_alpha_sweep(results: ProxyResults, path, *, sweep_std: dict | None = None,
                     per_token: dict[str, tuple[float, float]] | None = None, title_suffix: str = "") -> None:
    """Accuracy vs α for proxy-tuned-large, with the single models as horizontal references. ``sweep_std``
    (α -> std) adds error bars; ``per_token`` (setting label -> (mean, std)) adds a second panel: per-token α
    schedules and gates (``decoding.alpha_control``) at α = 1 against constant α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if per_token:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, max(4, 0.3 * len(per_token) + 1)),
                                      gridspec_kw={"width_ratios": [1, 1.1]})
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    a = sorted(results.alpha_sweep)
    ys = [results.alpha_sweep[x] for x in a]
    if sweep_std:
        ax.errorbar(a, ys, yerr=[sweep_std.get(x, 0.0) for x in a], fmt="o-", color="C3", capsize=3,
                    label="proxy-tuned-large")
    else:
        ax.plot(a, ys, "o-", color="C3", label="proxy-tuned-large")
    for name, color in (("base-large", "C0"), ("tuned-small", "C1"), ("tuned-large", "C2")):
        ax.axhline(results.accuracy[name], color=color, linestyle="--", label=name)
    ax.set_xlabel("α (strength of the tuned-small − base-small offset)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"Proxy-tuning in the toy world ({results.n_questions} held-out questions){title_suffix}",
                 fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    if per_token:
        names = list(per_token)
        y = list(range(len(names)))[::-1]
        ax2.barh(y, [per_token[n][0] for n in names], xerr=[per_token[n][1] for n in names], color="C3",
                 alpha=0.7, capsize=3)
        ax2.set_yticks(y, names, fontsize=8)
        if "constant" in per_token:
            ax2.axvline(per_token["constant"][0], color="k", linestyle=":", label="constant α = 1")
        ax2.axvline(results.accuracy["base-large"], color="C0", linestyle="--", label="base-large")
        ax2.set_xlim(0, 1)
        ax2.set_xlabel("exact-match accuracy (α = 1)")
        ax2.set_title("per-token α: schedules over generated tokens, gates on the small pair", fontsize=9)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
