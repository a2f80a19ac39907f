"""ROUGE-1/2/L through Google's ``rouge-score`` package (F-measure, averaged over pairs; no stemming by
default, like the package's default)."""
from __future__ import annotations

from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over (prediction, reference) pairs, keys ``rouge1``, ``rouge2``, ``rougeL``."""
    from rouge_score import rouge_scorer

    from proxytune_jax.eval.answers import _check_lengths

    _check_lengths(predictions, references)
    if not predictions:
        return {k: float("nan") for k in ROUGE_TYPES}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = {k: 0.0 for k in ROUGE_TYPES}
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)  # rouge-score's argument order is (target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}
