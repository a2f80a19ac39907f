"""Scoring generated texts against references by metric name: what ``proxytune eval`` and the generation-based
evaluation during training (``training.gen_eval``) both compute.

``accuracy``: GSM-style answers (the number after ``####``, else the last number) compared as numbers;
``exact_match``: whole strings after stripping whitespace; ``rouge``: ROUGE-1/2/L F1 (``rouge-score``).
"""
from __future__ import annotations

from typing import Sequence

METRICS = ("accuracy", "exact_match", "rouge")


def score(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """``{"n": number of pairs, <metric>: value, ...}``; ``rouge`` adds ``rouge1``, ``rouge2``, ``rougeL``."""
    from proxytune_jax.eval.answers import accuracy, string_exact_match
    from proxytune_jax.eval.rouge import rouge

    out: dict[str, float] = {"n": len(predictions)}
    for m in metrics:
        if m == "accuracy":
            out["accuracy"] = accuracy(predictions, references)
        elif m == "exact_match":
            out["exact_match"] = string_exact_match(predictions, references)
        elif m == "rouge":
            out.update(rouge(predictions, references))
        else:
            raise ValueError(f"unknown metric {m!r}; known: {', '.join(METRICS)}")
    return out
