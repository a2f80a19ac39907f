"""Building blocks shared by every family: dense layers, embeddings, norms and attention masks (the attention
itself is ``models.attention``).

Parameter names: ``weight`` ``[out, in]`` (the PyTorch / Hugging Face layout, see :func:`dense` for why),
``bias``, ``embedding`` ``[V, D]``, ``scale``, so the partition rules of every family read the same.
Activations run in the parameter dtype; norms, softmax and logits run in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from proxytune_jax.errors import UserError
from proxytune_jax.models import backend, cpu_backend
from proxytune_jax.models.attention import SelfMask
from proxytune_jax.models.cache import KVCache, positions_from_mask
from proxytune_jax.models.lora import LoraWeight, lora_dense
from proxytune_jax.sharding import constrain_replicated

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


def dense(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``x [..., I] @ w[O, I].T -> [..., O]`` (``preferred_element_type=out_dtype``).

    Weights are stored ``[out, in]`` like PyTorch's ``Linear.weight``. The plain einsum on GPU/TPU (and the
    portable path); on the CPU path ``cpu_backend.dense`` (transposed few-row products, a hand-written VJP).
    """
    if backend.current() == "cpu":
        return cpu_backend.dense(x, w, out_dtype)
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)


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
        # whole table (under a step's activation_sharding): the looked-up rows then follow the batch sharding
        return jnp.take(constrain_replicated(self.embedding[...]), ids, axis=0)


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
    # eager calls only; jit cannot raise. Per-row cursors ([B]): the furthest row decides.
    if concrete and int(jnp.max(cache.length)) + seq_len > cache.max_length:
        raise UserError(
            f"{model_name}: writing {seq_len} tokens at slot {int(jnp.max(cache.length))} overflows the KV cache of "
            f"{cache.max_length} slots; create the cache with a larger max_length")


class AttentionLayout:
    """Who attends to whom in one forward step, shared by all layers.

    Without a cache the keys are the ``T`` new tokens; with a cache they are the cache's ``S`` slots after
    the new tokens were written at ``[length, length + T)`` -- per row ``[length[b], length[b] + T)`` when the
    cache has one cursor per row (``KVCache.with_row_lengths``).
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
            if cache.per_row:  # row b writes at its own cursor: [B, T] query slots, a per-row mask update
                self.key_valid = jax.vmap(lambda m, a, at: jax.lax.dynamic_update_slice(m, a, (at,)))(
                    cache.mask, attention_mask, cache.length)  # [B, S]
                query_slots = cache.length[:, None] + jnp.arange(seq_len)[None, :]  # [B, T]
            else:
                self.key_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.length))
                query_slots = cache.length + jnp.arange(seq_len)  # [T]
            self.key_positions = jnp.maximum(jnp.cumsum(self.key_valid.astype(jnp.int32), axis=-1) - 1, 0)
            key_slots = jnp.arange(cache.max_length)
            self.write_at = cache.length
        self._query_slots, self._key_slots = query_slots, key_slots

    @property
    def allowed(self) -> jax.Array:
        """[B, T, S]: causal over slots and only real keys."""
        query = self._query_slots if self._query_slots.ndim == 2 else self._query_slots[None]  # [B | 1, T]
        return (self._key_slots[None, None, :] <= query[:, :, None]) & self.key_valid[:, None, :]

    def allowed_within(self, window: int | None) -> jax.Array:
        """[B, T, S] mask, additionally limited to the last ``window`` positions (sliding window)."""
        if window is None:
            return self.allowed
        near = self.key_positions[:, None, :] > self.positions[:, :, None] - window
        return self.allowed & near

    def mask(self, window: int | None):
        """What a layer's attention takes: without a cache a ``SelfMask`` (no [B, T, T] materialized), with a
        cache the explicit ``allowed_within(window)`` [B, T, S]."""
        if self.cache is None:
            return SelfMask(self.key_valid, self.positions, window)
        return self.allowed_within(window)

    def new_cache(self, ks: list[jax.Array], vs: list[jax.Array], seq_len: int) -> KVCache | None:
        if self.cache is None:
            return None
        return KVCache(k=tuple(ks), v=tuple(vs), mask=self.key_valid, length=self.cache.length + seq_len)


# ------------------------------------------------------------------------------------ rematerialization

# ``remat`` of a model config -> the ``jax.checkpoint`` policy of each decoder block (None: no checkpoint).
# "matmuls" keeps the outputs of the weight matmuls (dots without batch dimensions) and recomputes the rest
# (norms, activations, attention); "full" keeps only each block's input.
REMAT_POLICIES = {
    "none": None,
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_remat(remat: str, model_name: str) -> None:
    if remat not in REMAT_POLICIES:
        raise UserError(f"{model_name}: remat {remat!r} is not one of {tuple(REMAT_POLICIES)}; "
                        "pick 'none' (store activations), 'matmuls' (save matmul outputs) or 'full'")


def remat_block(fn, remat: str):
    """``fn`` (one decoder block's call without a KV cache: training, scoring) under the ``jax.checkpoint``
    policy ``REMAT_POLICIES[remat]`` (``fn`` itself for "none")."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat])


def heads_first(x: jax.Array) -> jax.Array:
    """[B, T, K, D] -> [B, K, T, D], the layout of keys/values in ``attention.attend`` and the KV cache (both
    attention products are then plain batched matmuls over (B, K): no per-step transpose of the cache)."""
    return jnp.swapaxes(x, 1, 2)


def write_kv(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, at: jax.Array):
    """Write new keys/values ``[B, K, T, D]`` into cache slots ``[at, at + T)`` of ``[B, K, S, D]``; ``at`` is
    ``[]`` (one cursor: a plain dynamic_update_slice) or ``[B]`` (row b at ``[at[b], at[b] + T)``: a scatter)."""
    if jnp.ndim(at) == 1:
        def row(c, x, a):  # [K, S, D], [K, T, D]
            return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, a, 0))
        return jax.vmap(row)(cache_k, k, at), jax.vmap(row)(cache_v, v, at)
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
