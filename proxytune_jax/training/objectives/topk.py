"""``offline_topk``: distillation from a teacher known by its top-k log-probs per position (FIRST)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from proxytune_jax.errors import UserError
from proxytune_jax.training.objectives.base import DataContext, Objective
from proxytune_jax.training.objectives.common import count, model_logits, row_masks, shifted, token_cross_entropy


@dataclasses.dataclass(frozen=True)
class OfflineTopK(Objective):
    """``kd_weight · topk_kl(student, teacher, mask, temperature=τ, mode) + ce_weight · CE``.

    The batch carries ``topk_ids`` / ``topk_logp`` ``[B, T, k]`` (entry t: the teacher's top-k at input
    position t, predicting token t+1): from an on-disk cache written for the JSONL file (``topk_cache``,
    ``eval_topk_cache``; ``training.topk_cache``) or, for in-memory data, in the arrays themselves. ``τ``
    tempers the teacher only (FIRST's calibration, ``losses.fit_temperature``); ``mode`` is ``renormalize``
    (the paper's) or ``tail_bucket`` (a (k+1)-th bucket for the mass outside the top-k on both sides).
    Per-row selectors ``ce_rows`` / ``kd_rows`` work as in ``online_distillation``.
    Metrics: ``loss``, ``topk_kl``, ``ce``, ``tokens``."""

    name: ClassVar[str] = "offline_topk"
    topk_cache: str = ""
    eval_topk_cache: str = ""
    temperature: float = 1.0
    mode: str = "renormalize"
    kd_weight: float = 1.0
    ce_weight: float = 0.0

    def validate(self) -> None:
        from proxytune_jax.losses.first import MODES
        if self.mode not in MODES:
            raise UserError(f"objective.mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if not self.temperature > 0:
            raise UserError(f"objective.temperature must be > 0, got {self.temperature}")

    def attach(self, data: DataContext):
        if not data.path:
            return None  # in-memory data carry their own top-k arrays
        from proxytune_jax.training.topk_cache import TopKAttacher
        cache = self.topk_cache if data.split == "train" else self.eval_topk_cache
        if not cache:
            field = "topk_cache" if data.split == "train" else "eval_topk_cache"
            raise UserError(f"objective offline_topk needs objective.{field} (the teacher's top-k cache of "
                            f"{data.path})")
        return TopKAttacher(cache, data.examples, name=data.path)

    def loss_fn(self, student, frozen_graphdefs):
        from proxytune_jax.losses.first import TopKTeacher, topk_kl
        tau, mode, kd_w, ce_w = self.temperature, self.mode, self.kd_weight, self.ce_weight

        def loss_fn(params, frozen, batch, rng, state):
            del frozen, rng, state
            labels, mask = shifted(batch)
            ce_mask, kd_mask = row_masks(batch, mask)
            s = model_logits(student, params, batch)
            teacher = TopKTeacher(batch["topk_ids"][:, :-1], batch["topk_logp"][:, :-1].astype(jnp.float32))
            kd = topk_kl(s, teacher, kd_mask, temperature=tau, mode=mode)
            ce = token_cross_entropy(s, labels, ce_mask)
            total = kd_w * kd + ce_w * ce
            return total, {"loss": total, "topk_kl": kd, "ce": ce, "tokens": count(ce_mask | kd_mask)}

        return loss_fn
