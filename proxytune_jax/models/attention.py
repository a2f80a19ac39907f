"""Grouped-query attention with a hand-written backward pass.

``attend`` is softmax attention over explicit ``allowed`` masks (causal, padding, sliding window: see
``layers.AttentionLayout``), used by every family with a KV cache (prefill, decoding).

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

Passes without a KV cache (training, scoring, evaluation) go through ``attend_self``, which picks the path
of ``models.backend.current()`` at trace time: ``attend_blockwise`` (below; the portable default: online
softmax forward, recomputation backward, no [T, T] stored per layer), cuDNN on GPU, splash attention on TPU,
or on CPU ``cpu_backend.attend_causal`` (this module's ``attend`` over causal query blocks; from
``cpu_backend.BLOCKWISE_FROM`` queries on, ``attend_blockwise``).

Not done, on purpose: computing ``dVᵀ``/``dKᵀ`` and transposing them behind an ``optimization_barrier`` is
faster in isolation but aborts XLA:CPU's dot emitter (a failed layout check, jax 0.10.2) for some decode
shapes, and gained nothing inside the train step.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# Bump when the numerics of any attention path change (a different reduction order, mask value or block size):
# the toy world's cache digest includes it, so models trained under old numerics are rebuilt, not reused.
NUMERICS_VERSION = 1

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


# ------------------------------------------------------------------------ self-attention without a cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SelfMask:
    """Who attends to whom in a pass without a KV cache, without materializing ``[B, T, T]``: query ``t`` sees
    key ``s`` iff ``s <= t`` (slots), ``key_valid[b, s]``, and, with a ``window``,
    ``positions[b, s] > positions[b, t] - window``. Batches are left-padded (``layers.AttentionLayout``)."""

    key_valid: jax.Array  # [B, T] bool
    positions: jax.Array  # [B, T] int32
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def dense(self) -> jax.Array:
        """The same mask as ``allowed [B, T, T]`` (for the CPU path and references)."""
        slots = jnp.arange(self.key_valid.shape[1])
        allowed = (slots[None, None, :] <= slots[None, :, None]) & self.key_valid[:, None, :]  # [B, T, T]
        if self.window is not None:
            allowed = allowed & (self.positions[:, None, :] > self.positions[:, :, None] - self.window)
        return allowed


def attend_self(q: jax.Array, k: jax.Array, v: jax.Array, mask: SelfMask, scale: float) -> jax.Array:
    """Attention of a pass without a KV cache: q [B, T, H, D]; k, v [B, K, T, D] -> [B, T, H, D], by the path of
    ``models.backend.current()`` (see the module docstring)."""
    from proxytune_jax.models import backend, cpu_backend  # cpu_backend imports this module

    path = backend.current()
    t = q.shape[1]
    if path == "cpu" and t < cpu_backend.BLOCKWISE_FROM:
        return cpu_backend.attend_causal(q, k, v, mask.dense(), scale)
    if path == "gpu" and _cudnn_fits(q):
        return _attend_cudnn(q, k, v, mask, scale)
    if path == "tpu":
        out = _attend_splash(q, k, v, mask, scale)
        if out is not None:
            return out
    return attend_blockwise(q, k, v, mask, scale)


# Query/key block of the portable blockwise attention (rows of one online-softmax step).
BLOCK = 128


def attend_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, mask: SelfMask, scale: float,
                     block: int | None = None) -> jax.Array:
    """Memory-lean causal attention (FlashAttention-2 equations in plain JAX), the portable default.

    q [B, T, H, D]; k, v [B, K, T, D] (heads first, H a multiple of K) -> [B, T, H, D] in q's dtype. Queries
    and keys go in blocks of ``block`` (default ``BLOCK``; T padded up to a multiple); query block ``i`` visits
    key blocks ``0..i`` (the causal triangle) with an online softmax in float32. Only the output and the
    log-sum-exp per row are kept for the backward pass, which recomputes each block's probabilities:
    temporaries are O(T · block) per layer instead of O(T²). A row with no allowed key (a left-pad query) outputs zeros and
    gets zero gradients (``attend`` gives it a uniform softmax instead; no real position ever reads it).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    blk = min(BLOCK if block is None else block, t)
    tp = -(-t // blk) * blk
    pad = tp - t
    q5 = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    key_valid, positions = mask.key_valid.astype(bool), mask.positions.astype(jnp.int32)
    if pad:
        q5 = jnp.pad(q5, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))  # padded keys are never allowed
        positions = jnp.pad(positions, ((0, 0), (0, pad)))
    out = _blockwise(q5, k, v, key_valid, positions, mask.window, float(scale), blk)  # [B, K, G, Tp, D]
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _block_allowed(key_valid, positions, window, i, j, blk):
    """[B, 1, 1, bq, bk] mask of query block i against key block j."""
    q_slot = i * blk + jnp.arange(blk)
    k_slot = j * blk + jnp.arange(blk)
    kv = jax.lax.dynamic_slice_in_dim(key_valid, j * blk, blk, axis=1)  # [B, bk]
    allowed = (k_slot[None, None, :] <= q_slot[None, :, None]) & kv[:, None, :]  # [B, bq, bk]
    if window is not None:
        qp = jax.lax.dynamic_slice_in_dim(positions, i * blk, blk, axis=1)  # [B, bq]
        kp = jax.lax.dynamic_slice_in_dim(positions, j * blk, blk, axis=1)  # [B, bk]
        allowed = allowed & (kp[:, None, :] > qp[:, :, None] - window)
    return allowed[:, None, None]


def _blk(x, i, blk, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * blk, blk, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q5, k, v, key_valid, positions, window, scale, blk):
    """q5 [B, K, G, Tp, D]; k, v [B, K, Tp, D]; key_valid, positions [B, Tp] -> [B, K, G, Tp, D]."""
    return _blockwise_fwd(q5, k, v, key_valid, positions, window, scale, blk)[0]


def _blockwise_fwd(q5, k, v, key_valid, positions, window, scale, blk):
    f32 = jnp.float32
    n = q5.shape[3] // blk

    def q_block(i):
        qi = _blk(q5, i, blk, 3)  # [B, K, G, bq, D]

        def body(j, carry):
            m, l, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, D]
            s = jnp.einsum("bkgqd,bksd->bkgqs", qi, _blk(k, j, blk, 2).astype(qi.dtype),
                           preferred_element_type=f32) * scale  # [B, K, G, bq, bk]
            allowed = _block_allowed(key_valid, positions, window, i, j, blk)
            m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, s, MASK_VALUE), axis=-1))
            p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, bq, bk]
            corr = jnp.exp(m - m_new)
            vj = _blk(v, j, blk, 2)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj,
                                                     preferred_element_type=f32)
            return m_new, l * corr + jnp.sum(p, axis=-1), acc

        shape = qi.shape[:-1]
        init = (jnp.full(shape, MASK_VALUE, f32), jnp.zeros(shape, f32), jnp.zeros(qi.shape, f32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, body, init)
        has = l > 0
        out = acc / jnp.where(has, l, 1.0)[..., None]
        return out.astype(q5.dtype), jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), 0.0)

    outs, lses = jax.lax.map(q_block, jnp.arange(n))  # [n, B, K, G, bq, D], [n, B, K, G, bq]
    b, kh, g, tp, d = q5.shape
    out = jnp.moveaxis(outs, 0, 3).reshape(b, kh, g, tp, d)  # [B, K, G, Tp, D]
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, tp)  # [B, K, G, Tp]
    return out, (q5, k, v, key_valid, positions, out, lse)


def _blockwise_bwd(window, scale, blk, residuals, d_out):
    q5, k, v, key_valid, positions, out, lse = residuals
    f32 = jnp.float32
    n = q5.shape[3] // blk
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [B, K, G, Tp] = rowsum(P ∘ dP)

    def k_block(dq, j):
        kj, vj = _blk(k, j, blk, 2), _blk(v, j, blk, 2)  # [B, K, bk, D]

        def body(i, carry):
            dq, dk, dv = carry
            qi, doi = _blk(q5, i, blk, 3), _blk(d_out, i, blk, 3)  # [B, K, G, bq, D]
            s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj.astype(qi.dtype), preferred_element_type=f32) * scale
            allowed = _block_allowed(key_valid, positions, window, i, j, blk)
            p = jnp.where(allowed, jnp.exp(s - _blk(lse, i, blk, 3)[..., None]), 0.0)  # [B, K, G, bq, bk]
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi, preferred_element_type=f32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj.astype(doi.dtype), preferred_element_type=f32)
            ds = p * (dp - _blk(delta, i, blk, 3)[..., None]) * scale  # [B, K, G, bq, bk]
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qi.dtype), qi, preferred_element_type=f32)
            dqi = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kj.dtype), kj, preferred_element_type=f32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _blk(dq, i, blk, 3) + dqi, i * blk, axis=3)
            return dq, dk, dv

        zeros = jnp.zeros(kj.shape, f32)
        dq, dk, dv = jax.lax.fori_loop(j, n, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(k_block, jnp.zeros(q5.shape, f32), jnp.arange(n))  # dks [n, B, K, bk, D]
    b, kh, tp, d = k.shape
    dk = jnp.moveaxis(dks, 0, 2).reshape(b, kh, tp, d)
    dv = jnp.moveaxis(dvs, 0, 2).reshape(b, kh, tp, d)
    return dq.astype(q5.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ------------------------------------------------------------------- fused kernels (unmeasured here)


def _cudnn_fits(q: jax.Array) -> bool:
    """cuDNN flash attention takes bf16/fp16 with head dim a multiple of 8 up to 128 (otherwise: blockwise)."""
    return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def _left_pads(mask: SelfMask) -> jax.Array:
    return mask.key_valid.shape[1] - jnp.sum(mask.key_valid.astype(jnp.int32), axis=1)  # [B]


def _roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """x [B, T, ...] with row b rotated left by shift[b] (t -> t + shift mod T)."""
    t = x.shape[1]
    idx = (jnp.arange(t)[None, :] + shift[:, None]) % t  # [B, T]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _attend_cudnn(q, k, v, mask: SelfMask, scale, implementation="cudnn"):
    """GPU: ``jax.nn.dot_product_attention(implementation="cudnn")``. cuDNN takes padding as right-aligned
    sequence lengths, so each left-padded row is rotated to put its real tokens first, attended with
    ``is_causal`` and its length (and ``local_window_size`` for a sliding window), and rotated back; pad
    queries output zeros. Assumes the library's convention that padding is a contiguous left prefix."""
    pads = _left_pads(mask)  # [B]
    lengths = (q.shape[1] - pads).astype(jnp.int32)
    kk, vv = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, T, K, D]
    window = None if mask.window is None else (mask.window - 1, 0)
    out = jax.nn.dot_product_attention(
        _roll_rows(q, pads), _roll_rows(kk, pads), _roll_rows(vv, pads), scale=scale, is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, local_window_size=window,
        implementation=implementation)  # [B, T, H, D]
    out = _roll_rows(out, -pads)
    return jnp.where(mask.key_valid[:, :, None, None], out, 0).astype(q.dtype)


def _attend_splash(q, k, v, mask: SelfMask, scale, interpret=False):
    """TPU: splash attention (causal or local mask, padding as segment ids: pads segment 0, real tokens 1),
    vmapped over the batch; ``None`` when it does not import or T is not a multiple of its 128 block."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    except ImportError:
        return None
    b, t, h, d = q.shape
    if t % 128:
        return None
    g = h // k.shape[1]
    one = (sm.CausalMask((t, t)) if mask.window is None
           else sm.LocalMask((t, t), window_size=(mask.window - 1, 0), offset=0))
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * h), head_shards=1, q_seq_shards=1, interpret=interpret)
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, H, T, D]
    kh, vh = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)  # [B, H, T, D]
    seg = mask.key_valid.astype(jnp.int32)  # [B, T]
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
        qh, kh, vh, seg)  # [B, H, T, D]
    return jnp.where(mask.key_valid[:, :, None, None], jnp.swapaxes(out, 1, 2), 0).astype(q.dtype)
