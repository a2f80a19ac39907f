"""``online_distillation``: the teacher runs inside the step; ``offline_logits``: its logits come with the data.

Both compute ``kd_weight · Σ_terms weight·loss(student, teacher, mask, **params) + ce_weight · CE`` where the
main term is ``loss`` with ``loss_params`` (any full-logit entry of ``losses.LOSSES``; each loss keeps its own
default for every hyperparameter not given, e.g. SinKD's τ = 2) and ``extra_terms`` adds weighted terms
(``LossTerm``), as in SinKD's ``α·KL + (1−α)·CE + β·Sinkhorn``. Per-row selectors ``ce_rows`` / ``kd_rows`` in
the batch restrict the two parts to some rows (``common.row_masks``): the transfer-set setting of Hinton et al.
(2015), CE on gold rows and the teacher term on teacher-labelled rows.
Metrics: ``loss``, one entry per distillation term (by loss name), ``ce``, ``tokens``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from proxytune_jax.errors import UserError
from proxytune_jax.training.objectives.base import DataContext, Objective
from proxytune_jax.training.objectives.common import (LossTerm, count, distillation_loss, frozen_logits,
                                                      model_logits, resolve_terms, row_masks, shifted,
                                                      token_cross_entropy)


def _distill_loss_fn(terms, kd_weight, ce_weight, student, teacher_logits_fn):
    def loss_fn(params, frozen, batch, rng, state):
        del rng, state
        labels, mask = shifted(batch)
        ce_mask, kd_mask = row_masks(batch, mask)
        s = model_logits(student, params, batch)
        t = teacher_logits_fn(frozen, batch, s.shape[-1])
        kd, parts = distillation_loss(terms, s, t, labels, kd_mask)
        ce = token_cross_entropy(s, labels, ce_mask)
        total = kd_weight * kd + ce_weight * ce
        return total, {"loss": total, **parts, "ce": ce, "tokens": count(ce_mask | kd_mask)}

    return loss_fn


@dataclasses.dataclass(frozen=True)
class _Distillation(Objective):
    loss: str = "forward_kl"
    loss_params: dict = dataclasses.field(default_factory=dict)
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    extra_terms: tuple[LossTerm, ...] = ()

    def terms(self):
        return resolve_terms(self.loss, self.loss_params, self.extra_terms, teacher="logits")

    def validate(self) -> None:
        self.terms()
        if self.kd_weight < 0 or self.ce_weight < 0:
            raise UserError("objective.kd_weight and objective.ce_weight must be >= 0")


@dataclasses.dataclass(frozen=True)
class OnlineDistillation(_Distillation):
    """Online distillation: the frozen teacher (``teacher``, a Hugging Face folder with the student's
    tokenizer) runs inside the step under ``stop_gradient``; a teacher with a larger (padded) vocabulary is
    cut to the student's ids."""

    name: ClassVar[str] = "online_distillation"
    teacher: str = ""

    def validate(self) -> None:
        if not self.teacher:
            raise UserError("objective online_distillation needs objective.teacher (a Hugging Face folder)")
        super().validate()

    def frozen_models(self):
        return {"teacher": self.teacher}

    def loss_fn(self, student, frozen_graphdefs):
        tg = frozen_graphdefs["teacher"]
        return _distill_loss_fn(self.terms(), self.kd_weight, self.ce_weight, student,
                                lambda frozen, batch, v: frozen_logits(tg, frozen["teacher"], batch, v))


@dataclasses.dataclass(frozen=True)
class OfflineLogits(_Distillation):
    """Offline distillation from teacher logits stored with the data: the batch carries ``teacher_logits``
    ``[B, T-1, V]`` (entry t: the teacher's logits at position t, predicting token t+1; any float dtype), as
    an in-memory dataset of ``training.fit`` provides them (the toy world computes them once per dataset)."""

    name: ClassVar[str] = "offline_logits"

    def attach(self, data: DataContext):
        if data.path:
            raise UserError(f"objective offline_logits reads teacher logits stored with in-memory data "
                            f"(training.fit); {data.path} is a file: use online_distillation (the teacher runs in "
                            "the step) or offline_topk (a top-k cache of the file)")
        return None

    def loss_fn(self, student, frozen_graphdefs):
        return _distill_loss_fn(self.terms(), self.kd_weight, self.ce_weight, student,
                                lambda frozen, batch, v: batch["teacher_logits"][..., :v].astype(jnp.float32))
