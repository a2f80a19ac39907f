"""Building blocks shared by every family: dense layers, embeddings, norms and attention masks (the attention
itself is ``models.attention``).

Parameter names: ``weight`` ``[out, in]`` (the PyTorch / Hugging Face layout, see :func:`dense` for why),
``bias``, ``embedding`` ``[V, D]``, ``scale``, so the partition rules of every family read the same.
Activations run in the parameter dtype; norms, softmax and logits run in float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from proxytune_jax.errors import UserError
from proxytune_jax.models.cache import KVCache, positions_from_mask
from proxytune_jax.models.lora import LoraWeight, lora_dense

def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    """``num`` independent keys (or ``None``s when building shapes only)."""
    return [None] * num if key is None else list(jax.random.split(key, num))


def normal(key: jax.Array | None, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """``std * N(0, 1)`` of ``shape``; zeros when ``key`` is None (shape-only construction: under
    ``nnx.eval_shape`` tracing hundreds of random initialisers of a 70B model would cost seconds)."""
    if key is None:
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def root_key(rngs: nnx.Rngs | None) -> jax.Array | None:
    return None if rngs is None else rngs.params()


# Up to this many rows (tokens) a dense layer computes its output transposed (see ``dense``).
SMALL_BATCH_ROWS = 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``x [..., I] @ w[O, I].T -> [..., O]`` (``preferred_element_type=out_dtype``), with a hand-written VJP.

    Weights are stored ``[out, in]`` like PyTorch's ``Linear.weight``. With few rows (``<= SMALL_BATCH_ROWS``
    tokens: decode steps) the product is computed as ``w @ x.T -> [O, N]`` and transposed afterwards
    (an ``optimization_barrier`` keeps XLA from folding the transpose back into the product): XLA:CPU then
    streams each weight row once, contiguous, against all ``N`` rows of ``x``. With one row, or many (training,
    prefill), it is the plain ``einsum("...i,oi->...o")`` (at N = 1 that is already a contiguous matrix-vector
    product). Few-row products are bound by reading the weights, so the layout that reads them contiguously
    wins there; with many rows the matmul units dominate and the layouts tie. ``experiments/benchmarks/
    dense_layout.py`` measures ``dense`` against ``x @ w[I, O]`` (flax's layout) for several row counts N in
    one run and prints the speed-up.

    Backward pass spelled out: ``dx = g @ w`` and ``dw = g_flat.T @ x_flat`` (``[N, O] x [N, I] -> [O, I]``).
    JAX's generic ``dot_general`` transpose rule would produce ``dw`` transposed and make XLA:CPU materialize
    the cotangent ``g`` transposed, fusing the whole elementwise producer of ``g`` (e.g. the softmax / KL
    gradient of ``[B, T, V]`` logits) into a strided, cache-hostile write. Gradients are cast back to the
    dtypes of ``x`` and ``w``. (Being a ``custom_vjp``, this supports reverse mode only, like every training
    path of this library.)
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


class Linear(nnx.Module):
    """``y = x @ weight.T (+ bias)`` with ``weight [out, in]`` (as PyTorch / Hugging Face store it). ``weight``
    may hold a ``models.lora.LoraWeight`` (an unmerged LoRA adapter): then ``+ scale · x Aᵀ Bᵀ``."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, key, std: float = 0.02):
        # drawn [in, out] and stored transposed: a seed gives the same layer as a flax [in, out] kernel would
        self.weight = nnx.Param(normal(key, (in_features, out_features), std, dtype).T)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight.get_value()
        if isinstance(w, LoraWeight):  # an unmerged LoRA adapter (models.lora.apply)
            y = lora_dense(x, w, dense)
        else:
            y = dense(x, w)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table ``embedding [num, D]``."""

    def __init__(self, num: int, features: int, *, dtype, key, std: float = 0.02):
        self.embedding = nnx.Param(normal(key, (num, features), std, dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, statistics in float32 (as HF Llama)."""

    def __init__(self, features: int, *, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias``, statistics in float32 (as GPT-2)."""

    def __init__(self, features: int, *, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------- masks


def check_lengths(seq_len: int, cache: KVCache | None, max_positions: int, model_name: str) -> None:
    """Raise UserError for sequences or caches longer than the model's position range."""
    if seq_len > max_positions:
        raise UserError(
            f"{model_name}: input has {seq_len} tokens but max_position_embeddings is {max_positions}; "
            "truncate the input (or chunk it) to at most max_position_embeddings tokens")
    if cache is None:
        return
    if cache.max_length > max_positions:
        raise UserError(
            f"{model_name}: the KV cache has {cache.max_length} slots but max_position_embeddings is "
            f"{max_positions}; create it with max_length <= {max_positions}")
    concrete = hasattr(cache.length, "__array__") and not isinstance(cache.length, jax.core.Tracer)
    if concrete and int(cache.length) + seq_len > cache.max_length:  # eager calls only; jit cannot raise
        raise UserError(
            f"{model_name}: writing {seq_len} tokens at slot {int(cache.length)} overflows the KV cache of "
            f"{cache.max_length} slots; create the cache with a larger max_length")


class AttentionLayout:
    """Who attends to whom in one forward step, shared by all layers.

    Without a cache the keys are the ``T`` new tokens; with a cache they are the cache's ``S`` slots after
    the new tokens were written at ``[length, length + T)``.
    """

    def __init__(self, attention_mask: jax.Array | None, batch: int, seq_len: int,
                 cache: KVCache | None):
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq_len), bool)
        attention_mask = attention_mask.astype(bool)  # [B, T]
        self.cache = cache
        if cache is None:
            self.positions = positions_from_mask(attention_mask)  # [B, T]
            self.key_valid = attention_mask  # [B, S=T]
            self.key_positions = self.positions  # [B, S]
            query_slots = jnp.arange(seq_len)  # [T]
            key_slots = jnp.arange(seq_len)  # [S]
            self.write_at = None
        else:
            self.positions = cache.positions_of(attention_mask)  # [B, T]
            self.key_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.length))
            self.key_positions = jnp.maximum(jnp.cumsum(self.key_valid.astype(jnp.int32), axis=-1) - 1, 0)
            query_slots = cache.length + jnp.arange(seq_len)
            key_slots = jnp.arange(cache.max_length)
            self.write_at = cache.length
        # [B, T, S]: causal over slots and only real keys.
        self.allowed = (key_slots[None, None, :] <= query_slots[None, :, None]) & self.key_valid[:, None, :]

    def allowed_within(self, window: int | None) -> jax.Array:
        """[B, T, S] mask, additionally limited to the last ``window`` positions (sliding window)."""
        if window is None:
            return self.allowed
        near = self.key_positions[:, None, :] > self.positions[:, :, None] - window
        return self.allowed & near

    def new_cache(self, ks: list[jax.Array], vs: list[jax.Array], seq_len: int) -> KVCache | None:
        if self.cache is None:
            return None
        return KVCache(k=tuple(ks), v=tuple(vs), mask=self.key_valid, length=self.cache.length + seq_len)


def heads_first(x: jax.Array) -> jax.Array:
    """[B, T, K, D] -> [B, K, T, D], the layout of keys/values in ``attention.attend`` and the KV cache (both
    attention products are then plain batched matmuls over (B, K): no per-step transpose of the cache)."""
    return jnp.swapaxes(x, 1, 2)


def write_kv(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, at: jax.Array):
    """Write new keys/values ``[B, K, T, D]`` into cache slots ``[at, at + T)`` of ``[B, K, S, D]``."""
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, 0, at, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, at, 0))
    return cache_k, cache_v


def lm_logits(h: jax.Array, weight: jax.Array) -> jax.Array:
    """h [B, T, D] @ weight [V, D].T -> logits [B, T, V] accumulated and returned in float32."""
    return dense(h, weight.astype(h.dtype), jnp.float32)


class CausalLM(nnx.Module):
    """What every architecture shares: its KV cache, its output projection and ``__call__``.

    A subclass sets ``config``, ``dtype`` and ``lm_head`` (``None`` when tied to the embedding), and defines
    ``token_embedding()`` (its ``Embed``) and ``hidden_states(input_ids, attention_mask, cache)``.
    """

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        c = self.config
        check_lengths(max_length, None, c.max_position_embeddings, c.model_type)
        return KVCache.zeros(num_layers=c.num_hidden_layers, batch_size=batch_size, max_length=max_length,
                             num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                             dtype=dtype or self.dtype)

    def lm_head_weight(self) -> jax.Array:
        """The output projection [V, D] (the token embedding itself when tied)."""
        if self.lm_head is None:
            return self.token_embedding().embedding[...]
        return self.lm_head.weight[...]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.hidden_states(input_ids, attention_mask, cache)
        return lm_logits(h, self.lm_head_weight()), cache  # [B, T, V] float32
