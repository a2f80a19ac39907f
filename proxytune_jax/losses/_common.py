"""Shared conventions of every distillation loss (``docs/methods.md`` §2.1).

- Inputs: logits ``[..., V]`` in any float dtype; all math is done in float32 (bf16 inputs are upcast first).
- ``mask [...]`` marks valid positions (bool or 0/1). ``None`` means every position is valid. Masked positions
  have their logits replaced by zeros *before* any exp/log, so padding rows full of ``-inf`` can neither poison
  the value nor the gradient.
- Reduction: ``Σ m·ℓ / max(Σ m, 1)`` (mean over valid positions; an all-masked batch gives exactly 0).
- ``temperature`` divides the logits (both sets, unless a loss says otherwise) before the softmax.
- Log-space everywhere; ``p·(log p − log r)`` terms are evaluated with a double ``where`` so entries with
  ``p = 0`` (``-inf`` logits, zero teacher probabilities) contribute exactly 0 to the value *and* the gradient.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from proxytune_jax.errors import UserError

F32 = jnp.float32


def upcast(x) -> jax.Array:
    """At least float32 (bf16/fp16 -> fp32; float64 stays float64, for finite-difference checks under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.float64) if x.dtype == jnp.float64 else x.astype(F32)


def check_positive(name: str, value) -> None:
    """Raise UserError for a non-positive Python number (traced values are not checked)."""
    if isinstance(value, numbers.Number) and not value > 0:
        raise UserError(f"{name} must be > 0, got {value!r}; pass a positive {name}.")


def check_unit_interval(name: str, value) -> None:
    """Raise UserError unless a Python number lies in [0, 1] (traced values are not checked)."""
    if isinstance(value, numbers.Number) and not 0.0 <= value <= 1.0:
        raise UserError(f"{name} must lie in [0, 1], got {value!r}; pass a value between 0 and 1.")


def as_mask(mask, shape) -> jax.Array:
    """Boolean position mask of ``shape`` (all True for None)."""
    if mask is None:
        return jnp.ones(shape, dtype=bool)
    mask = jnp.asarray(mask)
    if mask.shape != tuple(shape):
        raise UserError(
            f"mask has shape {mask.shape} but the logits have positions {tuple(shape)}; "
            "pass a mask shaped like the logits without their last (vocabulary) axis."
        )
    return mask.astype(bool)


def check_logits(student_logits, teacher_logits, *, same_vocab: bool = True) -> None:
    """Shape checks shared by the full-logit losses."""
    if student_logits.ndim < 1 or teacher_logits.ndim < 1:
        raise UserError("logits need at least one (vocabulary) axis; pass arrays shaped [..., V].")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise UserError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} disagree on the "
            "position axes; pass logits for the same positions."
        )
    if same_vocab and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise UserError(
            f"student vocab {student_logits.shape[-1]} != teacher vocab {teacher_logits.shape[-1]}; slice both to "
            "the shared id range first (or use `uld`, which works across vocabularies)."
        )


def zero_masked(logits, mask) -> jax.Array:
    """Replace the logits of masked positions by 0 (before any exp/log)."""
    return jnp.where(mask[..., None], logits, jnp.zeros((), logits.dtype))


def log_probs(logits, temperature=1.0) -> jax.Array:
    """float32 ``log_softmax(logits / temperature)`` over the last axis; ``-inf`` logits give ``-inf``."""
    x = upcast(logits) / temperature
    return jax.nn.log_softmax(x, axis=-1)


def kl_terms(lp, lr) -> jax.Array:
    """Elementwise ``p·(log p − log r)`` with ``p = exp(lp)``; exactly 0 (value and gradient) where p = 0.

    Entries with p > 0 but r = 0 give +inf: the divergence really is infinite there. Their gradient is that of
    ``p·(log p − log r_min)`` with ``r_min`` the smallest normal float (finite: it moves p's mass off the entry,
    as the divergence asks), instead of the NaN that differentiating through the infinity would give.
    """
    p = jnp.exp(lp)
    pos = p > 0
    lost = pos & jnp.isneginf(lr)
    floor = jnp.log(jnp.finfo(jnp.result_type(lr)).tiny)
    lp_s = jnp.where(pos, lp, 0.0)
    lr_s = jnp.where(pos & ~lost, lr, jnp.where(lost, floor, 0.0))
    finite = jnp.where(pos, p * (lp_s - lr_s), 0.0)
    return jnp.where(lost, finite + jnp.inf, finite)


def kl_from_log_probs(lp, lr) -> jax.Array:
    """``KL(p ‖ r)`` per position from log-probabilities ``[..., V] -> [...]``."""
    return jnp.sum(kl_terms(lp, lr), axis=-1)


def masked_mean(per_position, mask) -> jax.Array:
    """``Σ m·ℓ / max(Σ m, 1)`` with masked entries excluded by ``where`` (NaN-proof)."""
    per_position = upcast(per_position)
    mask = as_mask(mask, per_position.shape)
    total = jnp.sum(jnp.where(mask, per_position, 0.0))
    count = jnp.sum(mask.astype(per_position.dtype))
    return total / jnp.maximum(count, 1.0)


def reduce_loss(per_position_fn, student_logits, teacher_logits, mask=None, *, same_vocab=True, **kwargs):
    """Apply a per-position loss ``fn(student_logits, teacher_logits, **kwargs) -> [...]`` with the house
    conventions: shape checks, masked rows zeroed before exp/log, masked mean over valid positions."""
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    check_logits(student_logits, teacher_logits, same_vocab=same_vocab)
    m = as_mask(mask, student_logits.shape[:-1])
    per = per_position_fn(zero_masked(student_logits, m), zero_masked(teacher_logits, m), **kwargs)
    return masked_mean(per, m)
