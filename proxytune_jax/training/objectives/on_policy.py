"""``on_policy``: generalized knowledge distillation (GKD; Agarwal et al., ICLR 2024, arXiv 2306.13649).

GKD's Algorithm 1, per optimizer step: draw ``u ~ U(0, 1)``; if ``u ≤ λ`` (``student_fraction``) the batch's
outputs are sampled from the *current* student for the batch's prompts, otherwise they are the dataset's
(or, with ``seq_kd``, sampled from the teacher). Teacher and student then score the outputs, and the student
minimizes a divergence ``D(p_T ‖ q_θ)`` on the output tokens; no gradient flows through the sampling.
``λ = 0`` is supervised KD, ``λ = 0`` with ``seq_kd`` sequence-level KD on fresh teacher samples, ``λ = 1``
on-policy KD, values between "mixed".

How, here: sampling runs **inside the jitted train step** (``Objective.make_generate``), by the library's
decoder (``decoding.rollout``: prefill + a ``lax.while_loop`` of cached one-token steps) on the step's
student parameters, so a step stays one XLA program, shards like the rest, and needs no host round trip.
The choice between the sampled and the dataset outputs is a ``lax.cond`` (under the ``vmap`` over seeds of
``training.fit`` both branches run). Each row keeps its prompt (the tokens before its first ``loss_mask``
token, re-aligned to the right edge) and gets ``max_new_tokens`` more columns for the outputs; rows are
sampled at ``temperature`` (GKD: 1; 0 is greedy) until EOS. With per-row selectors (``kd_rows``) only the
distillation rows get new outputs: gold rows keep their targets for the cross-entropy (``ce_rows``), as in
the transfer-set setting.

The divergence is any full-logit entry of ``losses.LOSSES`` (``loss`` / ``loss_params``); the default is
GKD's generalized JSD with β = 0.5. Cost: one rollout of ``max_new_tokens`` cached decode steps per step
in which the student samples (``experiments/toyworld_gkd.py`` reports the measured time per step).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from proxytune_jax.decoding.rollout import append_rollout, prompts_of, rollout
from proxytune_jax.errors import UserError
from proxytune_jax.training.objectives.online import OnlineDistillation

_ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")


def pad_columns(batch: dict, n: int) -> dict:
    """The batch's token rows with ``n`` pad columns appended (masked out); per-row arrays unchanged."""
    out = dict(batch)
    for k in _ROW_KEYS:
        out[k] = jnp.pad(batch[k], ((0, 0), (0, n)))
    return out


@dataclasses.dataclass(frozen=True)
class OnPolicyDistillation(OnlineDistillation):
    """GKD (see the module docstring). ``student_fraction`` is λ, the probability that a step trains on the
    student's own samples."""

    name: ClassVar[str] = "on_policy"
    loss: str = "generalized_jsd"
    student_fraction: float = 0.5
    seq_kd: bool = False
    max_new_tokens: int = 32
    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.student_fraction <= 1.0:
            raise UserError(f"objective.student_fraction must lie in [0, 1], got {self.student_fraction}")
        if self.max_new_tokens < 1:
            raise UserError(f"objective.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"objective.temperature must be >= 0 (0: greedy), got {self.temperature}")

    def make_generate(self, student, frozen_graphdefs):
        lam, n, tau, seq_kd = self.student_fraction, self.max_new_tokens, self.temperature, self.seq_kd
        teacher = frozen_graphdefs["teacher"]
        if lam == 0.0 and not seq_kd:
            return None  # supervised KD: the dataset's outputs every step

        def generate(params, frozen, batch, rng):
            k_u, k_s = jax.random.split(rng)
            pids, pmask = prompts_of(batch)
            fixed = pad_columns(batch, n)

            def sampled_by(graphdef, model_params):
                def make():
                    out = rollout(graphdef, model_params, pids, pmask, k_s, max_new_tokens=n, temperature=tau)
                    return append_rollout(pids, pmask, out)
                return make

            by_student = sampled_by(student, params)
            other = sampled_by(teacher, frozen["teacher"]) if seq_kd else (
                lambda: {k: fixed[k] for k in _ROW_KEYS})
            if lam >= 1.0:
                new = by_student()
            elif lam <= 0.0:
                new = other()
            else:
                new = jax.lax.cond(jax.random.uniform(k_u) < lam, by_student, other)
            regen = (batch["kd_rows"] > 0) if "kd_rows" in batch else jnp.ones(batch["input_ids"].shape[:1], bool)
            for k in _ROW_KEYS:
                fixed[k] = jnp.where(regen[:, None], new[k].astype(fixed[k].dtype), fixed[k])
            return fixed

        return generate
