"""Grouped-query attention with a hand-written backward pass.

``attend`` is softmax attention over explicit ``allowed`` masks (causal, padding, sliding window: see
``layers.AttentionLayout``), used by every family with a KV cache (prefill, decoding); ``attend_causal``
computes the same thing for passes without a cache (training, scoring, evaluation) at less cost.

Layout: the ``G = H / K`` query heads that share a KV head are folded into the query axis, so each
``(batch, kv head)`` pair is one plain matrix product ``[G*T, D] @ [D, S]`` instead of a 5-axis contraction.

The backward pass is written out (the FlashAttention equations) rather than left to autodiff:

    P = softmax(where(allowed, scale * Q Kᵀ, MASK_VALUE))     O = P V
    dV = Pᵀ dO      dP = dO Vᵀ      dS = scale * P ∘ (dP − rowsum(dO ∘ O))      dQ = dS K      dK = dSᵀ Q

with ``dS`` zeroed where ``allowed`` is False, exactly as autodiff of ``where`` would. A query row with no
allowed key (a left-pad position) gets a uniform softmax forward and exactly zero score gradient backward.
Autodiff of the masked softmax materializes several score-sized broadcasts, selects and relayouts; this form
makes one elementwise pass over the scores backward (``rowsum(P ∘ dP)`` is taken as ``rowsum(dO ∘ O)``, on
the small ``[G*T, D]`` tensors). ``experiments/benchmarks/attention.py`` times this backward pass against
the autodiff formulation in the same run (row ``autodiff``); ``experiments/benchmarks/train.py`` times the
whole train step.

``attend_causal`` is the same product for the common case where no query may see a later slot (every
forward pass without a KV cache: training, scoring, evaluation; causal, padding and sliding-window masks are
all inside the causal triangle). It splits the queries into ``n`` blocks and lets block ``i`` multiply only
the keys up to its own end, skipping the upper triangle: ``(n + 1) / 2n`` of the score work (62.5% at
``n = 4``), at the price of ``n`` smaller products instead of one. More blocks skip more of the triangle
but make each product smaller, so the best count grows slowly with T; ``causal_blocks(T) = floor(sqrt(T // 8))``
(T 128 -> 4, T 512 -> 8, T 2048 -> 16) is the block count that was fastest on a 2-core CPU.
``experiments/benchmarks/attention.py`` measures ``attend_causal`` at several block counts against ``attend``
(forward+backward, or ``--forward-only``) in one run; ``experiments/benchmarks/train.py`` times the train step.

Not done, on purpose: computing ``dVᵀ``/``dKᵀ`` and transposing them behind an ``optimization_barrier`` is
faster in isolation but aborts XLA:CPU's dot emitter (a failed layout check, jax 0.10.2) for some decode
shapes, and gained nothing inside the train step.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Masked attention scores are replaced (``jnp.where``, never added) by this finite value: a fully masked row
# (a pad query) then gets a uniform softmax instead of NaN.
MASK_VALUE = -1e30


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention.

    q [B, T, H, D]; k, v [B, K, S, D] (heads first) with H a multiple of K; allowed [B, T, S] bool
    -> [B, T, H, D] in q's dtype. Scores and softmax in float32; masked scores replaced by MASK_VALUE.
    ``scale`` is a Python float (usually ``D ** -0.5``).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    qf = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)  # [B, K, G*T, D]
    out = _attention(qf, k, v, allowed, float(scale))  # [B, K, G*T, D]
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _masked(x: jax.Array, allowed: jax.Array, fill: float) -> jax.Array:
    """``where(allowed, x, fill)`` for scores ``x [B, K, G*T, S]`` and ``allowed [B, T, S]``."""
    b, kv_heads, m, s = x.shape
    t = allowed.shape[1]
    x = jnp.where(allowed[:, None, None], x.reshape(b, kv_heads, m // t, t, s), fill)  # [B, K, G, T, S]
    return x.reshape(b, kv_heads, m, s)


def _probs(qf, k, allowed, scale):
    """Attention probabilities [B, K, G*T, S] in float32."""
    scores = jnp.einsum("bkmd,bksd->bkms", qf, k.astype(qf.dtype), preferred_element_type=jnp.float32)
    return jax.nn.softmax(_masked(scores * scale, allowed, MASK_VALUE), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(qf, k, v, allowed, scale):
    """qf [B, K, G*T, D]; k, v [B, K, S, D]; allowed [B, T, S] -> [B, K, G*T, D]."""
    return _attention_fwd(qf, k, v, allowed, scale)[0]


def _attention_fwd(qf, k, v, allowed, scale):
    p = _probs(qf, k, allowed, scale)  # [B, K, G*T, S] f32
    out = jnp.einsum("bkms,bksd->bkmd", p.astype(v.dtype), v).astype(qf.dtype)  # [B, K, G*T, D]
    return out, (qf, k, v, allowed, p, out)


def _attention_bwd(scale, residuals, d_out):
    qf, k, v, allowed, p, out = residuals
    f32 = jnp.float32
    dv = jnp.einsum("bkms,bkmd->bksd", p.astype(d_out.dtype), d_out, preferred_element_type=f32)  # [B, K, S, D]
    dp = jnp.einsum("bkmd,bksd->bkms", d_out, v.astype(d_out.dtype), preferred_element_type=f32)  # [B, K, G*T, S]
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # [B, K, G*T, 1] = rowsum(P ∘ dP)
    ds = _masked(p * (dp - row) * scale, allowed, 0.0)  # [B, K, G*T, S]
    dq = jnp.einsum("bkms,bksd->bkmd", ds.astype(k.dtype), k, preferred_element_type=f32)  # [B, K, G*T, D]
    dk = jnp.einsum("bkms,bkmd->bksd", ds.astype(qf.dtype), qf, preferred_element_type=f32)  # [B, K, S, D]
    return dq.astype(qf.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_blocks(seq_len: int) -> int:
    """Query blocks ``attend_causal`` uses for ``seq_len`` queries: ``floor(sqrt(seq_len // 8))``, at least 1
    (T 128 -> 4, T 512 -> 8, T 2048 -> 16; the fastest on a 2-core CPU, see the module docstring and
    ``experiments/benchmarks/attention.py``)."""
    return max(1, math.isqrt(seq_len // 8))


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
                  num_blocks: int | None = None) -> jax.Array:
    """``attend`` for a forward pass without a KV cache, skipping the causal upper triangle.

    Same shapes as ``attend`` with ``S == T``. The caller promises that ``allowed`` lies inside the causal
    triangle (``allowed[:, t, s]`` is False for every ``s > t``; true of every mask ``layers.AttentionLayout``
    builds without a cache); then query block ``[a, e)`` attends over keys ``[0, e)`` only, and every row with
    at least one allowed key gets exactly ``attend``'s result (up to float summation order). A row with no
    allowed key (a left-pad query) gets a uniform softmax over its block's keys ``[0, e)`` instead of all
    ``S``: finite, zero gradient, and never seen by a real position (it is masked as a key and excluded from
    every loss). ``num_blocks`` defaults to ``causal_blocks(T)``; 1 is plain ``attend``.
    """
    t, s = q.shape[1], k.shape[2]
    if s != t:
        raise ValueError(f"attend_causal needs as many keys as queries (no KV cache), got T={t}, S={s}; "
                         "use attend for cached decoding")
    n = causal_blocks(t) if num_blocks is None else num_blocks
    if not 1 <= n <= t:
        raise ValueError(f"num_blocks must be in [1, T={t}], got {n}")
    if n == 1:
        return attend(q, k, v, allowed, scale)
    ends = [round(i * t / n) for i in range(n + 1)]  # block i: queries [ends[i], ends[i + 1])
    return jnp.concatenate(
        [attend(q[:, a:e], k[:, :, :e], v[:, :, :e], allowed[:, a:e, :e], scale)  # [B, e - a, H, D]
         for a, e in zip(ends[:-1], ends[1:])], axis=1)  # [B, T, H, D]
