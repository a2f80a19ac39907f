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
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.losses._common import (
    F32,
    as_mask,
    check_positive,
    check_unit_interval,
    kl_from_log_probs,
    kl_terms,
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
    """``log(w·p + (1−w)·q)`` via logaddexp, for ``w`` in [0, 1] (a Python number or a traced scalar)."""
    both_zero = jnp.isneginf(lp) & jnp.isneginf(lq)  # keep logaddexp away from (-inf, -inf)
    w = jnp.asarray(weight_p, lp.dtype)
    lw, l1w = jnp.log(w), jnp.log1p(-w)  # -inf at the ends: that side's term drops out of logaddexp
    lm = jnp.logaddexp(jnp.where(both_zero, 0.0, lp) + lw, jnp.where(both_zero, 0.0, lq) + l1w)
    return jnp.where(both_zero, -jnp.inf, lm)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Number)


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
    if _is_number(alpha) and alpha == 0:
        return kl_from_log_probs(lp, lq)
    if _is_number(alpha) and alpha == 1:
        return jnp.zeros(lp.shape[:-1], lp.dtype)
    return kl_from_log_probs(lp, _log_mixture(lp, lq, alpha))  # also exact at traced 0 and 1


def skew_reverse_kl_per_position(student_logits, teacher_logits, *, temperature=1.0, alpha=0.1):
    """DistiLLM skew reverse KL ``KL(q ‖ (1−α)·p + α·q)``; α = 0 is reverse KL, α = 1 gives 0.

    It is the skew forward KL with the two distributions' roles swapped."""
    return skew_forward_kl_per_position(teacher_logits, student_logits, temperature=temperature, alpha=alpha)


def generalized_jsd_per_position(student_logits, teacher_logits, *, temperature=1.0, beta=0.5):
    """GKD/TRL generalized JSD ``β·KL(p‖M) + (1−β)·KL(q‖M)``, ``M = β·p + (1−β)·q``.

    Endpoints are special-cased exactly as TRL does: ``β = 0`` returns forward ``KL(p ‖ q)`` and ``β = 1``
    returns reverse ``KL(q ‖ p)`` (the general formula would give 0 at both ends, so the function is
    discontinuous there by convention). ``β = 0.5`` is ``js_divergence``. ``beta`` may be traced (``jit``,
    ``vmap`` over β): the endpoints are then selected with ``where``.
    """
    check_positive("temperature", temperature)
    check_unit_interval("beta", beta)
    lp = log_probs(teacher_logits, temperature)
    lq = log_probs(student_logits, temperature)
    if _is_number(beta) and beta == 0:
        return kl_from_log_probs(lp, lq)
    if _is_number(beta) and beta == 1:
        return kl_from_log_probs(lq, lp)
    lm = _log_mixture(lp, lq, beta)
    general = beta * kl_from_log_probs(lp, lm) + (1.0 - beta) * kl_from_log_probs(lq, lm)
    if _is_number(beta):
        return general
    return jnp.where(beta == 0, kl_from_log_probs(lp, lq), jnp.where(beta == 1, kl_from_log_probs(lq, lp), general))


# AKL head/tail split (released rule, without a sort) ------------------------------------------------------
_AKL_CPU_BLOCK = 32  # rows per CPU search block: 32 rows at V = 32000 (4 MiB float32) stay in cache across passes


def _akl_gaps_block(p, q, mu):
    """``(g_head, g_tail)`` for rows ``p, q [N, V]`` (probabilities; not differentiated) by the released rule.

    Released rule (Wu et al. 2024, ``AKL.py`` of github.com/wutaiqiang/LLM_KD_AKL, ``get_ratio``): sort the
    teacher probabilities in descending order, take the inclusive cumulative sum ``C``; a token is *tail*
    when ``C > mu``, except that the first (top) token is always *head*. Ties are ordered by token id (lower
    id first, a stable sort). Since ``C`` never decreases, the head is the longest prefix of that order with
    ``C <= mu`` (at least the top token).

    Sort-free: with ``F(b) = Σ_j p_j·[key_j >= b]`` (``key`` = the float's bit pattern, which orders
    non-negative floats), the smallest ``b0`` with ``F(b0) <= mu`` is found by a bisection over the integer
    keys (a fixed number of vectorized O(V) passes: 30 in float32, 62 in float64). Every token with
    ``key >= b0`` is head (its ``C <= F(b0) <= mu``); the level just below, value ``v`` (key ``b0 − 1``), holds
    tokens whose ``C`` is ``F(b0) + c·v`` for the c-th of them by id, so it is head exactly when that is
    ``<= mu``; every lower token has ``C >= F(b0 − 1) > mu``. The within-level rank ``c`` (an integer cumsum)
    is only computed when some row has two or more tokens at that level and keeps at least one of them.
    """
    kdt = np.int32 if p.dtype == np.float32 else np.int64
    key_one = int(np.ones((), p.dtype).view(kdt))
    n_iter = (key_one + 2).bit_length()  # hi − lo <= key(1) + 2 at the start; each pass halves it (rounded up)

    def val(k):
        return jax.lax.bitcast_convert_type(jnp.maximum(k, 0), p.dtype)[..., None]

    def mass_at_or_above(k):
        return jnp.sum(jnp.where(p >= val(k), p, 0.0), axis=-1)

    pmax = jnp.max(p, axis=-1)
    top = jnp.argmax(p, axis=-1)  # the first maximal token: rank 0 of the stable descending order
    hi = jax.lax.bitcast_convert_type(pmax, kdt) + 1  # F(hi) = 0 <= mu
    lo = jnp.full_like(hi, -1)  # virtual: F(-1) = +inf > mu
    f_hi = jnp.zeros(hi.shape, p.dtype)

    def bisect(_, carry):
        lo, hi, f_hi = carry
        active = hi - lo > 1
        mid = lo + (hi - lo) // 2
        f_mid = mass_at_or_above(mid)
        take = active & (f_mid <= mu)
        return (jnp.where(active & ~take, mid, lo), jnp.where(take, mid, hi), jnp.where(take, f_mid, f_hi))

    _, b0, f0 = jax.lax.fori_loop(0, n_iter, bisect, (lo, hi, f_hi))
    v = val(b0 - 1)
    level = (p == v) & (b0 > 0)[..., None]  # b0 = 0: every token has key >= b0, no partial level
    count = jnp.sum(level, axis=-1)
    partial = (count >= 2) & (f0 + v[..., 0] <= mu)
    rank = jax.lax.cond(jnp.any(partial), lambda: jnp.cumsum(level, axis=-1, dtype=jnp.int32),
                        lambda: level.astype(jnp.int32))  # 1-based rank by id within the level
    ids = jax.lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1)
    head = ((p >= val(b0)) | (level & (f0[..., None] + rank.astype(p.dtype) * v <= mu))
            | (ids == top[..., None]) | (jnp.asarray(mu) >= 1))  # mu >= 1: C <= 1 everywhere (exact arithmetic)
    gap = jnp.abs(p - q)
    g_head = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
    g_tail = jnp.sum(jnp.where(head, 0.0, gap), axis=-1)
    return g_head, g_tail


def _akl_gaps(p, q, mu):
    """``_akl_gaps_block`` over ``[..., V]``; on CPU in blocks of rows (``lax.map``) so that the ~30 search
    passes over a block run in cache instead of streaming the whole ``[N, V]`` array from memory each time."""
    lead, vocab = p.shape[:-1], p.shape[-1]
    p2, q2 = p.reshape(-1, vocab), q.reshape(-1, vocab)
    n = p2.shape[0]
    block = _AKL_CPU_BLOCK
    if jax.default_backend() != "cpu" or n <= block:
        g_head, g_tail = _akl_gaps_block(p2, q2, mu)
    else:
        n_pad = -n % block
        if n_pad:  # zero rows: all-head, zero gaps; dropped below
            p2, q2 = (jnp.pad(x, ((0, n_pad), (0, 0))) for x in (p2, q2))
        g_head, g_tail = jax.lax.map(lambda pq: _akl_gaps_block(pq[0], pq[1], mu),
                                     (p2.reshape(-1, block, vocab), q2.reshape(-1, block, vocab)))
        g_head, g_tail = g_head.reshape(-1)[:n], g_tail.reshape(-1)[:n]
    return g_head.reshape(lead), g_tail.reshape(lead)


def adaptive_kl_per_position(student_logits, teacher_logits, *, temperature=1.0, mu=0.5):
    """Adaptive KL (AKL, Wu et al. 2024): ``g_head/(g_head+g_tail)·FKL + g_tail/(g_head+g_tail)·RKL``.

    Head/tail split exactly as released (``get_ratio`` in ``AKL.py`` of github.com/wutaiqiang/LLM_KD_AKL,
    arXiv 2404.02657): the teacher probabilities are sorted in *descending* order (ties: lower token id
    first); a token is *tail* when the inclusive cumulative teacher mass up to it exceeds ``mu``
    (``cumsum > mu``), except the top token, which is always *head*. E.g. ``p = [.4, .3, .2, .1]``, μ = 0.5:
    head = {token 0} (cumsums .4 | .7, .9, 1.0). ``g = Σ |p − q|`` over each part; the weights are constants
    for the gradient (``stop_gradient``; the released code detaches the student probabilities), so the
    gradient is ``w_head·∇FKL + w_tail·∇RKL``. ``mu`` in [0, 1]: μ = 0 keeps only the top token in the head;
    μ = 1 makes every token head (AKL = FKL). Differences from the released code, which are not about the
    split: ``temperature`` divides both logit sets; ``-inf`` logits are probability 0 (the released code
    replaces ±inf logits by 0 before its softmax); when ``p == q`` (both gaps 0) the weights are ½/½ (the
    loss is 0 anyway) instead of 0/0.
    Cost: no sort; the split is found by a bisection over the teacher probabilities (~30 vectorized O(V)
    passes, see ``_akl_gaps_block``) on top of the two KLs.
    """
    check_positive("temperature", temperature)
    check_unit_interval("mu", mu)
    lp = log_probs(teacher_logits, temperature)
    lq = log_probs(student_logits, temperature)
    p = jax.lax.stop_gradient(jnp.exp(lp))
    q = jax.lax.stop_gradient(jnp.exp(lq))
    g_head, g_tail = _akl_gaps(p, q, mu)
    denom = g_head + g_tail
    safe = denom > 0
    w_head = jnp.where(safe, g_head / jnp.where(safe, denom, 1.0), 0.5)
    w_tail = jnp.where(safe, g_tail / jnp.where(safe, denom, 1.0), 0.5)
    return _weighted_fkl_rkl(lp, lq, w_head, w_tail)


@jax.custom_vjp
def _weighted_fkl_rkl(lp, lq, w_fkl, w_rkl):
    """``w_fkl·KL(p ‖ q) + w_rkl·KL(q ‖ p)`` per position from log-probabilities, in one pass over V.

    Same value and zero handling as ``kl_from_log_probs`` (``kl_terms``); the weights get no gradient (they are
    ``stop_gradient``-ed by the caller). The backward pass is written out as one fused elementwise pass, where
    autodiff of the two double-``where`` sums makes several (``experiments/benchmarks/losses.py`` times AKL
    against reverse KL). First-order reverse mode only, like the chunked path (no ``jvp``/Hessians).
    """
    return jnp.sum(w_fkl[..., None] * kl_terms(lp, lq) + w_rkl[..., None] * kl_terms(lq, lp), axis=-1)


def _weighted_fkl_rkl_fwd(lp, lq, w_fkl, w_rkl):
    return _weighted_fkl_rkl(lp, lq, w_fkl, w_rkl), (lp, lq, w_fkl, w_rkl)


def _weighted_fkl_rkl_bwd(res, g):
    # d/dlp p·(lp − lq) = p·(lp − lq + 1), d/dlq = −p (only where p > 0); the same with p, q swapped.
    lp, lq, w_fkl, w_rkl = res
    p, q = jnp.exp(lp), jnp.exp(lq)
    a, b = (g * w_fkl)[..., None], (g * w_rkl)[..., None]
    # a zero probability enters as the smallest normal float, as in ``kl_terms`` (an infinite divergence
    # still gets a finite gradient)
    floor = jnp.log(jnp.finfo(jnp.result_type(lp)).tiny)
    d = jnp.where(jnp.isneginf(lp), floor, lp) - jnp.where(jnp.isneginf(lq), floor, lq)
    on_p, on_q = p > 0, q > 0
    d_lp = jnp.where(on_p, a * p * (d + 1.0), 0.0) - jnp.where(on_q, b * q, 0.0)
    d_lq = jnp.where(on_q, b * q * (1.0 - d), 0.0) - jnp.where(on_p, a * p, 0.0)
    return d_lp, d_lq, jnp.zeros_like(w_fkl), jnp.zeros_like(w_rkl)


_weighted_fkl_rkl.defvjp(_weighted_fkl_rkl_fwd, _weighted_fkl_rkl_bwd)


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
    """Mean adaptive KL (AKL): head/tail split of the teacher distribution at cumulative mass ``mu`` (0.5), as
    released (see ``adaptive_kl_per_position``)."""
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
