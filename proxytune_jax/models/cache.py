"""The KV cache: an explicit pytree passed into and out of every decode step (gemma's sampler style).

Conventions shared by every architecture:

* Batches are **left-padded**. By default all rows share one write cursor ``length`` (``[]``: slots written
  so far), so a step writes ``T`` new slots ``[length, length + T)`` in every row at once. Speculative
  decoding accepts a different number of tokens per row: :meth:`KVCache.with_row_lengths` turns the cursor into
  one per row (``[B]``), a step then writes row ``b`` at ``[length[b], length[b] + T)``, and
  :meth:`KVCache.rollback` moves the cursors back and hides the rejected slots (the next write overwrites them).
* ``mask[b, s]`` says whether slot ``s`` of row ``b`` holds a real token (pads are written but masked).
* The position of a token is the number of real tokens before it in its row; models derive it from
  ``mask`` (cache) and ``attention_mask`` (new tokens), so callers never pass positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D] (heads first: attention reads it with no transpose)
    v: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D]
    mask: jax.Array  # [B, S] bool: slot holds a real token
    length: jax.Array  # [] int32 shared by all rows, or [B] int32 per row: slots written so far

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def zeros(cls, *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
              head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            mask=jnp.zeros((batch_size, max_length), bool),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def per_row(self) -> bool:  # static (shape-based): one write cursor per row
        return self.length.ndim == 1

    def with_row_lengths(self) -> "KVCache":
        """The same cache with one write cursor per row (``length [B]``), all equal to the shared one."""
        length = jnp.broadcast_to(jnp.asarray(self.length, jnp.int32), (self.mask.shape[-2],))
        return dataclasses.replace(self, length=length)

    def rollback(self, new_length: jax.Array) -> "KVCache":
        """Per-row cursors set to ``new_length [B]`` (at most the current ones) and every slot
        ``s >= new_length[b]`` of row ``b`` masked out: those tokens become invisible to attention and to the
        positions of later tokens (positions are mask cumsums), and the next write overwrites them."""
        new_length = jnp.asarray(new_length, jnp.int32)  # [B]
        keep = jnp.arange(self.mask.shape[-1])[None, :] < new_length[:, None]  # [B, S] (also under a stacked axis)
        return dataclasses.replace(self, mask=self.mask & keep, length=new_length)

    def positions_of(self, attention_mask: jax.Array) -> jax.Array:
        """Positions [B, T] of ``T`` new tokens appended to this cache (pads get the last real position)."""
        before = jnp.sum(self.mask, axis=-1, dtype=jnp.int32)[:, None]  # [B, 1]
        return before + jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions [B, T] of a left-padded batch with no cache: real token i of a row gets position i."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
