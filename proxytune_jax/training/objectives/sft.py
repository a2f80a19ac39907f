"""``sft``: supervised fine-tuning, the (optionally label-smoothed) cross-entropy of the target tokens."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from proxytune_jax.errors import UserError
from proxytune_jax.training.objectives.base import Objective
from proxytune_jax.training.objectives.common import count, model_logits, shifted, token_cross_entropy


@dataclasses.dataclass(frozen=True)
class SFT(Objective):
    """Cross-entropy on the response tokens, label-smoothed by ``label_smoothing`` ε (0: plain CE).
    Metrics: ``loss``, ``ce`` (the unsmoothed cross-entropy), ``tokens``."""

    name: ClassVar[str] = "sft"
    label_smoothing: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"objective.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def loss_fn(self, student, frozen_graphdefs):
        eps = self.label_smoothing

        def loss_fn(params, frozen, batch, rng, state):
            del frozen, rng, state
            labels, mask = shifted(batch)
            logits = model_logits(student, params, batch)
            loss = token_cross_entropy(logits, labels, mask, label_smoothing=eps)
            ce = token_cross_entropy(logits, labels, mask) if eps else loss
            return loss, {"loss": loss, "ce": ce, "tokens": count(mask)}

        return loss_fn
