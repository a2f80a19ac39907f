"""Evaluation metrics (``docs/methods.md`` §3): GSM-style answers and exact match, multiple choice by
log-likelihood, ECE with reliability diagrams, response NLL / perplexity, ROUGE, gap closed, and the share
of top-1 tokens changed by a decoding-time rule."""
from proxytune_jax.eval.answers import (accuracy, exact_match, extract_answer, normalize_number,
                                        string_exact_match)
from proxytune_jax.eval.calibration import (ReliabilityBins, expected_calibration_error, plot_reliability_diagram,
                                            reliability_bins, top1_confidence_and_correct)
from proxytune_jax.eval.likelihood import (mean_nll, multiple_choice_accuracy, multiple_choice_scores, perplexity,
                                           response_nll, sequence_logprob, token_logprobs)
from proxytune_jax.eval.rouge import rouge
from proxytune_jax.eval.tuning import gap_closed, gap_closed_one, top1_changed_share

__all__ = [
    "accuracy", "exact_match", "extract_answer", "normalize_number", "string_exact_match",
    "ReliabilityBins", "expected_calibration_error", "plot_reliability_diagram", "reliability_bins",
    "top1_confidence_and_correct", "mean_nll", "multiple_choice_accuracy", "multiple_choice_scores",
    "perplexity", "response_nll", "sequence_logprob", "token_logprobs", "rouge", "gap_closed",
    "gap_closed_one", "top1_changed_share",
]
