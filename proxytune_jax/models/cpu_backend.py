"""CPU-only compute tricks, used when ``models.backend.current() == "cpu"`` (chosen at trace time).

Everything here was tuned on a 2-core XLA:CPU host; none of it runs on GPU/TPU, which take the plain einsums
and ``attention.attend_blockwise`` (or a fused kernel). The evidence for each trick is a benchmark script that
measures it against the plain form in one run:

* ``dense``: few-row products (``1 < rows <= SMALL_BATCH_ROWS``, decode steps) computed transposed behind an
  ``optimization_barrier``, and a hand-written VJP that writes ``dw`` in the ``[out, in]`` layout
  (``experiments/benchmarks/dense_layout.py``);
* ``attend_causal``: the causal upper triangle skipped with ``causal_blocks(T)`` query blocks
  (``experiments/benchmarks/attention.py``), over ``attention.attend``'s hand-written backward that stores
  the softmax P: O(T^2) temporaries per layer. Above ``BLOCKWISE_FROM`` queries the CPU path switches to the
  memory-lean ``attention.attend_blockwise`` (``experiments/benchmarks/memory.py``);
* ``compiler_options``: XLA:CPU temporaries split into heaps of at most ``CPU_HEAP_BYTES``, so glibc keeps
  reusing them instead of faulting in fresh zeroed pages every call (``experiments/benchmarks/cpu_heaps.py``;
  buffer assignment only, results bit for bit the same).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from proxytune_jax.models.attention import attend

# ----------------------------------------------------------------------------------------------- dense

SMALL_BATCH_ROWS = 128  # up to this many rows (tokens) ``dense`` computes its output transposed


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``x [..., I] @ w[O, I].T -> [..., O]`` (``preferred_element_type=out_dtype``) for XLA:CPU.

    With ``1 < rows <= SMALL_BATCH_ROWS`` the product is ``w @ x.T -> [O, N]``, transposed behind an
    ``optimization_barrier`` (each weight row streamed once, contiguous). Backward written out:
    ``dx = g @ w``, ``dw = g_flat.T @ x_flat`` (``[O, I]`` directly, no transposed cotangent), cast back to the
    dtypes of ``x`` and ``w``. Reverse mode only.
    """
    rows = math.prod(x.shape[:-1])
    if 1 < rows <= SMALL_BATCH_ROWS:
        xt = x.reshape(rows, x.shape[-1])  # [N, I]
        yt = jnp.einsum("oi,ni->on", w, xt, preferred_element_type=out_dtype)  # [O, N]
        return jax.lax.optimization_barrier(yt).T.reshape(*x.shape[:-1], w.shape[0])
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)


def _dense_fwd(x, w, out_dtype):
    return dense(x, w, out_dtype), (x, w)


def _dense_bwd(out_dtype, residuals, g):
    del out_dtype
    x, w = residuals
    dx = jnp.einsum("...o,oi->...i", g, w)  # [..., I]
    dw = jnp.einsum("no,ni->oi", g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))  # [O, I]
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)

# ------------------------------------------------------------------------------------------- attention

# From this many queries on, the CPU path uses the memory-lean blockwise attention (its O(T) temporaries win
# over attend_causal's stored P; see experiments/benchmarks/memory.py and attention.py).
BLOCKWISE_FROM = 1024


def causal_blocks(seq_len: int) -> int:
    """Query blocks ``attend_causal`` uses for ``seq_len`` queries: ``floor(sqrt(seq_len // 8))``, at least 1
    (T 128 -> 4, T 512 -> 8, T 2048 -> 16; ``experiments/benchmarks/attention.py``)."""
    return max(1, math.isqrt(seq_len // 8))


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
                  num_blocks: int | None = None) -> jax.Array:
    """``attention.attend`` for a forward pass without a KV cache, skipping the causal upper triangle.

    Same shapes as ``attend`` with ``S == T``; the caller promises that ``allowed`` lies inside the causal
    triangle. Query block ``[a, e)`` attends over keys ``[0, e)`` only; every row with an allowed key gets
    ``attend``'s result (up to summation order). A row with no allowed key (a left-pad query) gets a uniform
    softmax over its block's keys: finite, zero gradient, never seen by a real position. ``num_blocks``
    defaults to ``causal_blocks(T)``; 1 is plain ``attend``.
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


# ------------------------------------------------------------------------------------ compiler options

CPU_HEAP_BYTES = 8 << 20


def compiler_options() -> dict:
    """``jax.jit(compiler_options=...)`` for XLA:CPU: temp heaps of at most ``CPU_HEAP_BYTES`` (a soft limit:
    a single larger buffer still gets a heap of its own)."""
    return {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_BYTES}
