"""Divergences between a student ``q`` and a teacher ``p`` on full logits (formulas and paper references: docs/methods.md §2).

Every loss here has the uniform signature

    loss(student_logits [..., V], teacher_logits [..., V], mask [...] = None, *, temperature=1.0, ...) -> scalar

and returns the mean over valid positions ``Σ m·ℓ / max(Σ m, 1)`` (see ``_common``). ``temperature`` divides
both logit sets; no ``τ²`` factor is applied anywhere except in ``hinton_kd`` (which says so).
Each loss also has a ``<name>_per_position(student_logits, teacher_logits, *, ...) -> [...]`` twin without mask
or reduction; those are what the memory-lean path (``chunked.py``) evaluates chunk by chunk.

Direction convention: ``p = softmax(teacher/τ)``, ``q = softmax(student/τ)``;
``forward_kl = KL(p ‖ q)`` (mean-seeking, classic KD), ``reverse_kl = KL(q ‖ p)`` (mode-seeking, MiniLLM).
Hence ``forward_kl(a, b) == reverse_kl(b, a)`` for any logits ``a, b``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from proxytune_jax.errors import UserError
from proxytune_jax.losses._common import (
    F32,
    as_mask,
    check_positive,
    check_unit_interval,
    kl_from_log_probs,
    log_probs,
    masked_mean,
    reduce_loss,
    zero_masked,
)

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------- per position
def forward_kl_per_position(student_logits, teacher_logits, *, temperature=1.0):
    """``KL(p ‖ q)`` per position ``[...]``."""
    check_positive("temperature", temperature)
    return kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl_per_position(student_logits, teacher_logits, *, temperature=1.0):
    """``KL(q ‖ p)`` per position ``[...]``."""
    check_positive("temperature", temperature)
    return kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def _log_mixture(lp, lq, weight_p):
    """``log(w·p + (1−w)·q)`` via logaddexp, for a Python ``w`` strictly inside (0, 1)."""
    both_zero = jnp.isneginf(lp) & jnp.isneginf(lq)  # keep logaddexp away from (-inf, -inf)
    lm = jnp.logaddexp(jnp.where(both_zero, 0.0, lp) + math.log(weight_p),
                       jnp.where(both_zero, 0.0, lq) + math.log1p(-weight_p))
    return jnp.where(both_zero, -jnp.inf, lm)


def js_divergence_per_position(student_logits, teacher_logits, *, temperature=1.0):
    """``½KL(p‖M) + ½KL(q‖M)``, ``M = (p+q)/2`` (mixture in log space); bounded by ``log 2``."""
    check_positive("temperature", temperature)
    lp = log_probs(teacher_logits, temperature)
    lq = log_probs(student_logits, temperature)
    lm = _log_mixture(lp, lq, 0.5)
    return 0.5 * kl_from_log_probs(lp, lm) + 0.5 * kl_from_log_probs(lq, lm)


def tv_distance_per_position(student_logits, teacher_logits, *, temperature=1.0):
    """Total variation ``½ Σ |p − q|`` in [0, 1]."""
    check_positive("temperature", temperature)
    p = jnp.exp(log_probs(teacher_logits, temperature))
    q = jnp.exp(log_probs(student_logits, temperature))
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def skew_forward_kl_per_position(student_logits, teacher_logits, *, temperature=1.0, alpha=0.1):
    """DistiLLM skew forward KL ``KL(p ‖ α·p + (1−α)·q)``; α = 0 is forward KL, α = 1 gives 0."""
    check_positive("temperature", temperature)
    check_unit_interval("alpha", alpha)
    lp = log_probs(teacher_logits, temperature)
    lq = log_probs(student_logits, temperature)
    if alpha == 0:
        return kl_from_log_probs(lp, lq)
    if alpha == 1:
        return jnp.zeros(lp.shape[:-1], lp.dtype)
    return kl_from_log_probs(lp, _log_mixture(lp, lq, alpha))


def skew_reverse_kl_per_position(student_logits, teacher_logits, *, temperature=1.0, alpha=0.1):
    """DistiLLM skew reverse KL ``KL(q ‖ (1−α)·p + α·q)``; α = 0 is reverse KL, α = 1 gives 0.

    It is the skew forward KL with the two distributions' roles swapped."""
    return skew_forward_kl_per_position(teacher_logits, student_logits, temperature=temperature, alpha=alpha)


def generalized_jsd_per_position(student_logits, teacher_logits, *, temperature=1.0, beta=0.5):
    """GKD/TRL generalized JSD ``β·KL(p‖M) + (1−β)·KL(q‖M)``, ``M = β·p + (1−β)·q``.

    Endpoints are special-cased exactly as TRL does: ``β = 0`` returns forward ``KL(p ‖ q)`` and ``β = 1``
    returns reverse ``KL(q ‖ p)`` (the general formula would give 0 at both ends, so the function is
    discontinuous there by convention). ``β = 0.5`` is ``js_divergence``. ``beta`` must be a Python number.
    """
    check_positive("temperature", temperature)
    check_unit_interval("beta", beta)
    lp = log_probs(teacher_logits, temperature)
    lq = log_probs(student_logits, temperature)
    if beta == 0:
        return kl_from_log_probs(lp, lq)
    if beta == 1:
        return kl_from_log_probs(lq, lp)
    lm = _log_mixture(lp, lq, beta)
    return beta * kl_from_log_probs(lp, lm) + (1.0 - beta) * kl_from_log_probs(lq, lm)


def adaptive_kl_per_position(student_logits, teacher_logits, *, temperature=1.0, mu=0.5):
    """Adaptive KL (AKL, Wu et al. 2024): ``g_head/(g_head+g_tail)·FKL + g_tail/(g_head+g_tail)·RKL``.

    Teacher probabilities are sorted ascending; a token belongs to the *tail* when the cumulative teacher mass
    up to and including it (ascending order) is ``< mu``, else to the *head* (the released AKL rule; for
    ``mu = 0.5`` the head is the smallest set of top tokens covering at least half of the teacher mass).
    ``g = Σ |p − q|`` over each part; the weights are constants for the gradient (``stop_gradient``, as
    released). When ``p == q`` (both gaps 0) the weights are ½/½ (the loss is 0 anyway).
    Cost: one full sort of the vocabulary per position.
    """
    check_positive("temperature", temperature)
    lp = log_probs(teacher_logits, temperature)
    lq = log_probs(student_logits, temperature)
    p = jnp.exp(lp)
    q = jnp.exp(lq)
    order = jnp.argsort(p, axis=-1)  # ascending
    p_sorted = jnp.take_along_axis(p, order, axis=-1)
    q_sorted = jnp.take_along_axis(q, order, axis=-1)
    tail = jnp.cumsum(p_sorted, axis=-1) < mu
    gap = jnp.abs(p_sorted - q_sorted)
    g_head = jax.lax.stop_gradient(jnp.sum(jnp.where(tail, 0.0, gap), axis=-1))
    g_tail = jax.lax.stop_gradient(jnp.sum(jnp.where(tail, gap, 0.0), axis=-1))
    denom = g_head + g_tail
    safe = denom > 0
    w_head = jnp.where(safe, g_head / jnp.where(safe, denom, 1.0), 0.5)
    w_tail = jnp.where(safe, g_tail / jnp.where(safe, denom, 1.0), 0.5)
    return w_head * kl_from_log_probs(lp, lq) + w_tail * kl_from_log_probs(lq, lp)


def cross_entropy_per_position(logits, labels, *, temperature=1.0):
    """``−log softmax(logits/τ)[label]`` per position; entries with a negative label (ignore index) give 0."""
    check_positive("temperature", temperature)
    lq = log_probs(logits, temperature)
    labels = jnp.asarray(labels)
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(lq, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0)


def hinton_kd_per_position(student_logits, teacher_logits, *, labels, temperature=1.0, alpha=0.5):
    """Hinton KD ``α·τ²·KL(p_τ ‖ q_τ) + (1−α)·CE(q_1, label)``; the CE uses the student at τ = 1.

    The ``τ²`` keeps the soft-target gradient on the scale of the hard-target one (Hinton et al. 2015).
    """
    check_unit_interval("alpha", alpha)
    kd = forward_kl_per_position(student_logits, teacher_logits, temperature=temperature)
    ce = cross_entropy_per_position(student_logits, labels)
    tau = jnp.asarray(temperature, F32)
    return alpha * tau * tau * kd + (1.0 - alpha) * ce


def _sorted_desc_probs(logits, temperature, width):
    p = jnp.exp(log_probs(logits, temperature))
    p = -jnp.sort(-p, axis=-1)
    pad = width - p.shape[-1]
    if pad:
        p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, pad)])
    return p


def uld_per_position(student_logits, teacher_logits, *, temperature=1.0):
    """Universal Logit Distillation: ``Σ_i |sort↓(q)_i − sort↓(p)_i|``, the shorter vocabulary zero-padded.

    Works across tokenizers (``V_student != V_teacher`` allowed); invariant to permutations of either
    vocabulary. Cost: one full sort of each vocabulary per position.
    """
    check_positive("temperature", temperature)
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    q = _sorted_desc_probs(student_logits, temperature, width)
    p = _sorted_desc_probs(teacher_logits, temperature, width)
    return jnp.sum(jnp.abs(q - p), axis=-1)


def uld_kd_per_position(student_logits, teacher_logits, *, labels, temperature=1.0, weight=1.5):
    """``CE(q_1, label) + weight·ULD_τ`` (ULD paper's λ = 1.5)."""
    ce = cross_entropy_per_position(student_logits, labels)
    return ce + weight * uld_per_position(student_logits, teacher_logits, temperature=temperature)


# --------------------------------------------------------------------------------------------- reduced losses
def forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Mean over valid positions of ``KL(p ‖ q)``, ``p = softmax(teacher/τ)``, ``q = softmax(student/τ)``.

    No ``τ²`` factor (see ``hinton_kd`` for the τ²-scaled, CE-mixed objective).
    """
    return reduce_loss(forward_kl_per_position, student_logits, teacher_logits, mask, temperature=temperature)


def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Mean over valid positions of ``KL(q ‖ p)`` (MiniLLM's divergence). No τ² factor."""
    return reduce_loss(reverse_kl_per_position, student_logits, teacher_logits, mask, temperature=temperature)


def js_divergence(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Mean Jensen–Shannon divergence ``½KL(p‖M) + ½KL(q‖M)``, ``M = (p+q)/2``; in ``[0, log 2]``."""
    return reduce_loss(js_divergence_per_position, student_logits, teacher_logits, mask, temperature=temperature)


def tv_distance(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Mean total variation distance ``½ Σ |p − q|``; in ``[0, 1]``."""
    return reduce_loss(tv_distance_per_position, student_logits, teacher_logits, mask, temperature=temperature)


def skew_forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, alpha=0.1):
    """Mean DistiLLM skew forward KL ``KL(p ‖ α·p + (1−α)·q)`` (α 0.1; mixture via logaddexp)."""
    return reduce_loss(skew_forward_kl_per_position, student_logits, teacher_logits, mask,
                       temperature=temperature, alpha=alpha)


def skew_reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, alpha=0.1):
    """Mean DistiLLM skew reverse KL ``KL(q ‖ (1−α)·p + α·q)`` (α 0.1; mixture via logaddexp)."""
    return reduce_loss(skew_reverse_kl_per_position, student_logits, teacher_logits, mask,
                       temperature=temperature, alpha=alpha)


def generalized_jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, beta=0.5):
    """Mean GKD/TRL generalized JSD (see ``generalized_jsd_per_position``; exact KL endpoints at β ∈ {0, 1})."""
    return reduce_loss(generalized_jsd_per_position, student_logits, teacher_logits, mask,
                       temperature=temperature, beta=beta)


def adaptive_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, mu=0.5):
    """Mean adaptive KL (AKL) with head/tail split at cumulative teacher mass ``mu`` (0.5)."""
    return reduce_loss(adaptive_kl_per_position, student_logits, teacher_logits, mask,
                       temperature=temperature, mu=mu)


def _label_mask(labels, mask, shape):
    labels = jnp.asarray(labels)
    if labels.shape != tuple(shape):
        raise UserError(f"labels have shape {labels.shape}, expected the position shape {tuple(shape)}.")
    return as_mask(mask, shape) & (labels >= 0)


def cross_entropy(logits, labels, mask=None, *, temperature=1.0):
    """Mean token cross-entropy ``−log softmax(logits/τ)[label]`` over valid positions.

    Positions with a negative label (e.g. the ``-100`` ignore index) count as masked.
    """
    logits = jnp.asarray(logits)
    m = _label_mask(labels, mask, logits.shape[:-1])
    per = cross_entropy_per_position(zero_masked(logits, m), labels, temperature=temperature)
    return masked_mean(per, m)


def hinton_kd(student_logits, teacher_logits, mask=None, *, labels, temperature=1.0, alpha=0.5):
    """Hinton KD: mean of ``α·τ²·KL(p_τ ‖ q_τ) + (1−α)·CE(q_1, label)``.

    ``temperature`` (τ) applies to the KD term only; the CE term uses the student at τ = 1. Positions with a
    negative label count as masked (for both terms, so the two share one denominator).
    """
    m = _label_mask(labels, mask, jnp.shape(student_logits)[:-1])
    return reduce_loss(hinton_kd_per_position, student_logits, teacher_logits, m,
                       labels=labels, temperature=temperature, alpha=alpha)


def uld(student_logits, teacher_logits, mask=None, *, temperature=1.0):
    """Mean ULD distance ``Σ_i |sort↓(q)_i − sort↓(p)_i|`` (vocabularies may differ; shorter one zero-padded)."""
    return reduce_loss(uld_per_position, student_logits, teacher_logits, mask, same_vocab=False,
                       temperature=temperature)


def uld_kd(student_logits, teacher_logits, mask=None, *, labels, temperature=1.0, weight=1.5):
    """ULD objective of Boizard et al.: mean of ``CE(q_1, label) + weight·ULD_τ`` (λ = 1.5)."""
    m = _label_mask(labels, mask, jnp.shape(student_logits)[:-1])
    return reduce_loss(uld_kd_per_position, student_logits, teacher_logits, m, same_vocab=False,
                       labels=labels, temperature=temperature, weight=weight)


__all__ = sorted({"forward_kl", "reverse_kl", "js_divergence", "tv_distance", "skew_forward_kl", "skew_reverse_kl",
                  "generalized_jsd", "adaptive_kl", "hinton_kd", "uld", "uld_kd", "cross_entropy"}
                 | {f"{k}_per_position" for k in ("forward_kl", "reverse_kl", "js_divergence", "tv_distance",
                                                 "skew_forward_kl", "skew_reverse_kl", "generalized_jsd",
                                                 "adaptive_kl", "hinton_kd", "uld", "uld_kd", "cross_entropy")})
