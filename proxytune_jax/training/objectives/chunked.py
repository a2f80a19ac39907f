"""``online_distillation_chunked``: online distillation that never materializes ``[B, T, V]`` logits."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import nnx

from proxytune_jax.errors import UserError
from proxytune_jax.training.objectives.base import Objective
from proxytune_jax.training.objectives.common import count, shifted


@dataclasses.dataclass(frozen=True)
class OnlineDistillationChunked(Objective):
    """Both models stop at their final hidden states and ``loss`` (an entry of ``losses.LOSSES`` with a
    per-position form and a full-logit teacher) is computed from ``h @ W_lm_head`` in chunks of positions
    (``losses.chunked_loss``: the value and gradient of the plain objective, the teacher a constant).
    ``kd_weight · loss``; to mix in cross-entropy use ``hinton_kd`` or ``uld_kd`` (they receive ``labels``).
    ``chunk_size`` 0: the losses module's default. Metrics: ``loss``, ``<loss name>``, ``tokens``."""

    name: ClassVar[str] = "online_distillation_chunked"
    teacher: str = ""
    loss: str = "forward_kl"
    loss_params: dict = dataclasses.field(default_factory=dict)
    kd_weight: float = 1.0
    chunk_size: int = 0

    def _spec(self):
        from proxytune_jax.losses.registry import get_loss
        spec = get_loss(self.loss, teacher="logits", per_position=True)
        return spec, spec.resolve(self.loss_params)

    def validate(self) -> None:
        if not self.teacher:
            raise UserError("objective online_distillation_chunked needs objective.teacher (a Hugging Face folder)")
        if self.chunk_size < 0:
            raise UserError(f"objective.chunk_size must be >= 0, got {self.chunk_size}")
        self._spec()

    def frozen_models(self):
        return {"teacher": self.teacher}

    def loss_fn(self, student_graphdef, frozen_graphdefs):
        from proxytune_jax.losses.chunked import chunked_loss
        spec, hyper = self._spec()
        teacher_graphdef = frozen_graphdefs["teacher"]
        kd_weight, chunk = self.kd_weight, self.chunk_size or None

        def loss_fn(params, frozen, batch, rng, state):
            del rng, state
            labels, mask = shifted(batch)
            ids, attn = batch["input_ids"], batch["attention_mask"]
            student = nnx.merge(student_graphdef, params)
            teacher = nnx.merge(teacher_graphdef, frozen["teacher"])
            hs, _ = student.hidden_states(ids, attn)  # [B, T, D]
            ht, _ = teacher.hidden_states(ids, attn)  # [B, T, Dt]
            ht, wt = jax.lax.stop_gradient(ht[:, :-1]), jax.lax.stop_gradient(teacher.lm_head_weight())
            ws = student.lm_head_weight()
            pos = {"labels": labels} if spec.uses_labels else None
            kd = chunked_loss(spec.per_position, hs[:, :-1], ws, ht, wt[: ws.shape[0]], mask, chunk_size=chunk,
                              position_args=pos, **hyper)
            total = kd_weight * kd
            return total, {"loss": total, spec.name: kd, "tokens": count(mask)}

        return loss_fn
