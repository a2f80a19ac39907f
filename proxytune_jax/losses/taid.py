"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv 2501.16937).

The student ``q_θ`` is trained towards an *intermediate* teacher that moves from the student to the teacher
``p`` as training goes:

    p_t = softmax((1 − t)·sg(s) + t·z)          s: student logits (no gradient), z: teacher logits

    J_TAID = − Σ_v p_t(v) · log q_θ(v)          (mean over valid positions)

``J`` is the cross-entropy ``H(p_t, q_θ)``, as the released code computes it (its ``forward_kl`` returns
``−Σ p·log q`` without the entropy of ``p``). Its gradient equals that of ``KL(p_t ‖ q_θ)``; its *value*
differs by ``H(p_t)``, and the value is what drives the adaptive schedule, so the schedule below reads this
cross-entropy, as released (SakanaAI/TAID, ``src/distil_losses/taid.py``).

**The adaptive schedule** (the paper's Algorithm 1, as released), after each optimizer step ``n`` with the loss
``J_n`` computed at the current ``t``:

    first step:   prev ← J_n  (t and the momentum unchanged)
    otherwise:    δ_n  = (prev − J_n) / (prev + 1e-15)            relative improvement of the objective
                  m_n  = β·m_{n−1} + (1 − β)·δ_n
                  Δt   = α·sigmoid(m_n)·(1 − t)
                  t    ← min(t_end, max(t_start + (t_end − t_start)·n/N, t + Δt))
                  prev ← J_n

with ``n`` the number of optimizer steps taken before this one and ``N`` the run's steps; ``adaptive=False``
uses the linear term alone. Released defaults: ``t_start`` 0.4, ``t_end`` 1.0, ``α`` 5e-4, ``β`` 0.99.

Tokens: a token that either model rules out (``−inf`` logit) is outside the interpolated support (at ``t = 1``
the released code would form ``0·(−inf)``; here such a token simply gets ``p_t = 0``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from proxytune_jax.losses._common import (as_mask, check_logits, check_positive, log_probs, masked_mean, upcast,
                                          zero_masked)


def taid_interpolated_log_probs(student_logits, teacher_logits, t, *, temperature=1.0) -> jax.Array:
    """``log p_t [..., V]``: ``log_softmax(((1 − t)·sg(s) + t·z) / τ)`` (``t`` a float or a traced scalar)."""
    s = jax.lax.stop_gradient(upcast(student_logits))
    z = upcast(teacher_logits)
    t = jnp.asarray(t, s.dtype)
    out = jnp.isneginf(s) | jnp.isneginf(z)
    mixed = jnp.where(out, -jnp.inf, (1.0 - t) * jnp.where(out, 0.0, s) + t * jnp.where(out, 0.0, z))
    return log_probs(mixed, temperature)


def taid_per_position(student_logits, teacher_logits, *, t=0.4, temperature=1.0) -> jax.Array:
    """``H(p_t, q) = −Σ_v p_t(v)·log q(v)`` per position ``[...]`` (0·log 0 = 0 where ``p_t`` is 0)."""
    check_positive("temperature", temperature)
    lp = taid_interpolated_log_probs(student_logits, teacher_logits, t, temperature=temperature)
    lq = log_probs(student_logits, temperature)
    p = jnp.exp(lp)
    pos = p > 0
    return -jnp.sum(jnp.where(pos, p * jnp.where(pos, lq, 0.0), 0.0), axis=-1)


def taid_loss(student_logits, teacher_logits, mask=None, *, t=0.4, temperature=1.0) -> jax.Array:
    """Mean over valid positions of TAID's ``H(p_t, q_θ)`` at interpolation ``t`` (see the module docstring);
    the ``taid`` objective passes the ``t`` of its schedule."""
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    check_logits(student_logits, teacher_logits)
    m = as_mask(mask, student_logits.shape[:-1])
    per = taid_per_position(zero_masked(student_logits, m), zero_masked(teacher_logits, m), t=t,
                            temperature=temperature)
    return masked_mean(per, m)


def taid_schedule_init(t_start: float = 0.4) -> dict[str, jax.Array]:
    """The schedule's state: ``t``, the previous loss (``+inf``: none yet) and the momentum."""
    return {"taid_t": jnp.asarray(t_start, jnp.float32), "taid_prev_loss": jnp.asarray(jnp.inf, jnp.float32),
            "taid_momentum": jnp.zeros((), jnp.float32)}


def taid_schedule_update(state: dict, loss, step, total_steps: int, *, t_start: float = 0.4, t_end: float = 1.0,
                         alpha: float = 5e-4, beta: float = 0.99, adaptive: bool = True) -> dict:
    """One update of the schedule after an optimizer step (see the module docstring). ``loss``: this step's
    ``J`` at the current ``t``; ``step``: optimizer steps taken before this one; jittable (``step`` and
    ``loss`` may be traced)."""
    t, prev, mom = state["taid_t"], state["taid_prev_loss"], state["taid_momentum"]
    loss = jnp.asarray(loss, jnp.float32)
    first = jnp.isinf(prev)
    safe_prev = jnp.where(first, 1.0, prev)
    rel = (safe_prev - loss) / (safe_prev + 1e-15)
    new_mom = beta * mom + (1.0 - beta) * rel
    progress = jnp.asarray(step, jnp.float32) / max(int(total_steps), 1)
    target = t_start + (t_end - t_start) * progress
    if adaptive:
        new_t = jnp.minimum(t_end, jnp.maximum(target, t + alpha * jax.nn.sigmoid(new_mom) * (1.0 - t)))
    else:
        new_t = target
    return {"taid_t": jnp.where(first, t, jnp.asarray(new_t, jnp.float32)),
            "taid_prev_loss": loss,
            "taid_momentum": jnp.where(first, mom, new_mom)}


__all__ = ["taid_interpolated_log_probs", "taid_loss", "taid_per_position", "taid_schedule_init",
           "taid_schedule_update"]
