"""``proxy_tuned_teacher``: distill the proxy-tuned distribution into one model.

The teacher is the distribution proxy-tuning decodes from (Liu et al. 2024, arXiv 2401.08565): a large base
``M`` steered by a small tuned expert ``M+`` and its untuned version ``M−``,

    log p̃(x_t | x_<t) = log p_M + α·(log p_M+ − log p_M−)   (normalized by a softmax),

or any other per-token fusion rule of ``decoding.fusion`` over the same three roles. The three frozen models
run inside the step (teacher-forced on the batch, under ``stop_gradient``), their logits cut to the student's
ids (all four share one tokenizer), and the student minimizes ``loss`` (any full-logit entry of
``losses.LOSSES``, forward KL by default) against the fused distribution, plus ``ce_weight`` × the targets'
cross-entropy. A student that matches it gets proxy-tuning's behaviour at one model's decoding cost.

Prompt formats: by default every role reads the batch's rows. As in proxy-tuning, where the base and the
anti-expert read the plain prompt and the expert its chat template, in-memory data may give a role its own
rows: ``<role>_input_ids`` / ``<role>_attention_mask`` ``[B, T]`` (e.g. ``base_input_ids``) holding the same
response in the same columns (left padding to one width), so that column t predicts the same token for
every model.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from proxytune_jax.errors import UserError
from proxytune_jax.training.objectives.common import frozen_logits
from proxytune_jax.training.objectives.online import _Distillation, _distill_loss_fn

ROLES = ("base", "expert", "anti_expert")


def fused_teacher_logits(rule: str, logits: list[jax.Array], params: dict) -> jax.Array:
    """The fused scores ``[..., V]`` of a fusion rule applied position by position to per-model logits."""
    from proxytune_jax.decoding import fusion

    shape = logits[0].shape
    flat = [x.reshape(-1, shape[-1]) for x in logits]
    return fusion.combine(rule, flat, params).reshape(shape)


@dataclasses.dataclass(frozen=True)
class ProxyTunedTeacher(_Distillation):
    """Online distillation from a fused (base, expert, anti-expert) teacher; ``rule_params`` are the rule's
    hyperparameters (``{"alpha": 1.0}`` for proxy-tuning; defaults of the rule otherwise)."""

    name: ClassVar[str] = "proxy_tuned_teacher"
    base: str = ""
    expert: str = ""
    anti_expert: str = ""
    rule: str = "proxy_tuning"
    rule_params: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        from proxytune_jax.decoding import fusion

        missing = [r for r in ROLES if not getattr(self, r)]
        if missing:
            raise UserError(f"objective proxy_tuned_teacher needs objective.{', objective.'.join(missing)} "
                            "(Hugging Face folders sharing the student's tokenizer)")
        rule = fusion.get_rule(self.rule)
        if tuple(rule.roles) != ROLES or rule.variadic:
            raise UserError(f"fusion rule {self.rule!r} takes models {rule.roles}; proxy_tuned_teacher needs a "
                            f"rule over {ROLES}, e.g. proxy_tuning")
        fusion.resolve_params(rule, self.rule_params)
        super().validate()

    def frozen_models(self):
        return {r: getattr(self, r) for r in ROLES}

    def loss_fn(self, student, frozen_graphdefs):
        rule, params = self.rule, dict(self.rule_params)

        def rows_of(batch, role):
            return {"input_ids": batch.get(f"{role}_input_ids", batch["input_ids"]),
                    "attention_mask": batch.get(f"{role}_attention_mask", batch["attention_mask"])}

        def teacher(frozen, batch, v):
            logits = [frozen_logits(frozen_graphdefs[r], frozen[r], rows_of(batch, r), v) for r in ROLES]
            return jax.lax.stop_gradient(fused_teacher_logits(rule, logits, params)).astype(jnp.float32)

        return _distill_loss_fn(self.terms(), self.kd_weight, self.ce_weight, student, teacher)
