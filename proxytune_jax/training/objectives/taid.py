"""``taid``: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv 2501.16937).

The student is trained on ``H(p_t, q_θ)``, ``p_t = softmax((1 − t)·sg(s) + t·z)``, towards an intermediate
teacher that starts near the student (``t_start``) and reaches the teacher (``t_end``); ``t`` follows the
paper's adaptive schedule (``losses.taid``: a momentum of the loss's relative improvement pushes ``t`` up, a
linear floor ``t_start → t_end`` over the run keeps it moving). The schedule's state (``taid_t``,
``taid_prev_loss``, ``taid_momentum``) lives in the train state, so it is checkpointed and resumed with it.

The teacher is a frozen model run in the step (``teacher``: a Hugging Face folder with the student's
tokenizer) or, with ``teacher = ""``, logits stored with in-memory data (``teacher_logits`` ``[B, T-1, V]``,
as for ``offline_logits``). ``ce_weight`` adds the cross-entropy of the targets; per-row selectors
``ce_rows`` / ``kd_rows`` restrict the two parts as in ``online_distillation``.
Metrics: ``loss``, ``taid`` (the schedule's ``J``), ``ce``, ``taid_t`` (the ``t`` this step used), ``tokens``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from proxytune_jax.errors import UserError
from proxytune_jax.losses.taid import taid_loss, taid_schedule_init, taid_schedule_update
from proxytune_jax.training.objectives.base import DataContext, Objective
from proxytune_jax.training.objectives.common import (count, frozen_logits, model_logits, row_masks, shifted,
                                                      token_cross_entropy)


@dataclasses.dataclass(frozen=True)
class TAID(Objective):
    """TAID with the released defaults (``t_start`` 0.4, ``t_end`` 1, ``alpha`` 5e-4, ``beta`` 0.99).
    ``total_steps`` is ``N`` of the linear floor (0: the run's steps); ``adaptive = False`` keeps the linear
    schedule alone."""

    name: ClassVar[str] = "taid"
    teacher: str = ""
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    total_steps: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.t_start < 1.0:
            raise UserError(f"objective.t_start must lie in [0, 1), got {self.t_start}")
        if not self.t_start < self.t_end <= 1.0:
            raise UserError(f"objective.t_end must lie in (t_start, 1], got {self.t_end}")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.beta < 1.0:
            raise UserError("objective.alpha must lie in [0, 1] and objective.beta in [0, 1)")
        if not self.temperature > 0:
            raise UserError(f"objective.temperature must be > 0, got {self.temperature}")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.total_steps < 0:
            raise UserError("objective.kd_weight, objective.ce_weight and objective.total_steps must be >= 0")

    def bind_run(self, total_steps: int) -> "TAID":
        return self if self.total_steps else dataclasses.replace(self, total_steps=int(total_steps))

    def frozen_models(self):
        return {"teacher": self.teacher} if self.teacher else {}

    def attach(self, data: DataContext):
        if not self.teacher and data.path:
            raise UserError(f"objective taid without objective.teacher reads teacher logits stored with in-memory "
                            f"data (training.fit); {data.path} is a file: set objective.teacher to a Hugging Face "
                            "folder")
        return None

    def init_state(self) -> dict:
        return taid_schedule_init(self.t_start)

    def update_state(self, state, step, metrics):
        return taid_schedule_update(state, metrics["taid"], step, self.total_steps, t_start=self.t_start,
                                    t_end=self.t_end, alpha=self.alpha, beta=self.beta, adaptive=self.adaptive)

    def loss_fn(self, student, frozen_graphdefs):
        tg = frozen_graphdefs.get("teacher")
        tau, kd_w, ce_w = self.temperature, self.kd_weight, self.ce_weight

        def loss_fn(params, frozen, batch, rng, state):
            del rng
            labels, mask = shifted(batch)
            ce_mask, kd_mask = row_masks(batch, mask)
            s = model_logits(student, params, batch)
            v = s.shape[-1]
            t_logits = (frozen_logits(tg, frozen["teacher"], batch, v) if tg is not None
                        else batch["teacher_logits"][..., :v].astype(jnp.float32))
            t = state["taid_t"]
            kd = taid_loss(s, t_logits, kd_mask, t=t, temperature=tau)
            ce = token_cross_entropy(s, labels, ce_mask)
            total = kd_w * kd + ce_w * ce
            return total, {"loss": total, "taid": kd, "ce": ce, "taid_t": t, "tokens": count(ce_mask | kd_mask)}

        return loss_fn
