"""Expected calibration error and reliability diagrams (Guo et al. 2017; ``docs/methods.md`` §3.1).

Equal-width bins on the top-1 confidence over [0, 1]. Bin ``b`` of ``n_bins`` holds confidences in
``(b/n_bins, (b+1)/n_bins]``; a confidence of exactly 0 goes to the first bin. Then
``ECE = Σ_b |B_b|/n · |acc(B_b) − conf(B_b)|`` with empty bins contributing 0.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics; ``accuracy``/``confidence`` are NaN for empty bins."""

    edges: np.ndarray  # [n_bins + 1]
    counts: np.ndarray  # [n_bins] int
    accuracy: np.ndarray  # [n_bins]
    confidence: np.ndarray  # [n_bins]

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        if n == 0:
            return float("nan")
        nonempty = self.counts > 0
        gaps = np.abs(self.accuracy[nonempty] - self.confidence[nonempty])
        return float(np.sum(self.counts[nonempty] / n * gaps))


def reliability_bins(confidences, correct, n_bins: int = 10) -> ReliabilityBins:
    """Bin top-1 confidences (any shape, flattened) and 0/1 correctness into ``n_bins`` equal-width bins."""
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != corr.shape:
        from proxytune_jax.errors import UserError

        raise UserError(f"confidences {conf.shape} and correct {corr.shape} must have the same number of items")
    if n_bins < 1:
        from proxytune_jax.errors import UserError

        raise UserError(f"n_bins must be >= 1, got {n_bins}")
    conf = np.clip(conf, 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # (lo, hi] bins: index = ceil(conf * n) - 1, with conf == 0 in bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_corr = np.bincount(idx, weights=corr, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, sum_corr / np.maximum(counts, 1), np.nan)
        mean_conf = np.where(counts > 0, sum_conf / np.maximum(counts, 1), np.nan)
    return ReliabilityBins(edges=edges, counts=counts, accuracy=acc, confidence=mean_conf)


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE with ``n_bins`` equal-width bins (see module docstring for the bin convention)."""
    return reliability_bins(confidences, correct, n_bins).ece


def top1_confidence_and_correct(logits, labels, mask=None):
    """From logits [..., V] and labels [...]: top-1 probabilities and 0/1 correctness at valid positions
    (flattened NumPy arrays). The softmax is computed in float64 with the max subtracted."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    conf = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        return conf[m], correct[m].astype(np.float64)
    return conf.reshape(-1), correct.reshape(-1).astype(np.float64)


def plot_reliability_diagram(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path, *,
                             n_bins: int = 10, title: str = "Reliability diagram") -> None:
    """Save a PNG with one reliability curve per name: ``curves[name] = (confidences, correct)``.

    Bars per bin show accuracy, the diagonal is perfect calibration; the legend gives each curve's ECE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    width = 1.0 / n_bins
    k = max(len(curves), 1)
    for i, (name, (conf, corr)) in enumerate(curves.items()):
        bins = reliability_bins(conf, corr, n_bins)
        centers = bins.edges[:-1] + width * (i + 0.5) / k
        acc = np.nan_to_num(bins.accuracy, nan=0.0)
        ax.bar(centers, acc, width=width / k, alpha=0.75, label=f"{name} (ECE {bins.ece:.3f})", edgecolor="black",
               linewidth=0.4)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
