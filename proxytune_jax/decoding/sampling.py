"""Sampling on the combined next-token scores, in the official proxy-tuning order.

``processors (banned ids) -> temperature -> top-k -> top-p -> argmax or categorical``

Every knob is a traced value (a field of the :class:`SamplingParams` pytree), so changing the temperature,
top-k or top-p between calls never recompiles:

* ``temperature == 0`` means greedy (argmax of the processed scores); ``temperature > 0`` divides the scores.
* ``top_k == 0`` (or ``>= V``) turns top-k off; ties at the k-th value are all kept (like ``transformers``).
* ``top_p`` in (0, 1]; ``1.0`` turns it off. A token is kept when the probability mass of the tokens ranked
  strictly before it is ``< top_p`` (the most likely token is always kept), i.e. the smallest set of top tokens
  whose mass reaches ``top_p`` -- the same set as ``transformers``' ``TopPLogitsWarper`` up to ties.
* Removed tokens get ``-inf``; a row whose scores are all ``-inf`` falls back to token 0 rather than NaN.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    temperature: jax.Array  # [] float32; 0 = greedy
    top_k: jax.Array  # [] int32; 0 = off
    top_p: jax.Array  # [] float32 in (0, 1]; 1 = off
    banned: jax.Array  # [V] bool; True = never chosen (the "processors" step)

    @classmethod
    def create(cls, vocab_size: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               banned_ids=()) -> "SamplingParams":
        banned = jnp.zeros((vocab_size,), bool)
        ids = [int(i) for i in banned_ids if 0 <= int(i) < vocab_size]
        if ids:
            banned = banned.at[jnp.asarray(ids)].set(True)
        return cls(temperature=jnp.asarray(temperature, jnp.float32), top_k=jnp.asarray(top_k, jnp.int32),
                   top_p=jnp.asarray(top_p, jnp.float32), banned=banned)


def apply_banned(scores: jax.Array, banned: jax.Array) -> jax.Array:
    """scores [B, V], banned [V] bool -> banned ids set to -inf."""
    return jnp.where(banned[None, :], NEG_INF, scores)


def apply_temperature(scores: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide by the temperature; temperature 0 (greedy) leaves the scores unchanged."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    return scores / t


def _sorted_keep(sorted_desc: jax.Array, k: jax.Array, p: jax.Array) -> jax.Array:
    """On descending-sorted scores [B, V]: [B, V] bool of the positions kept by top-k then top-p."""
    v = sorted_desc.shape[-1]
    rank = jnp.arange(v)[None, :]
    in_k = (k <= 0) | (rank < k)
    s = jnp.where(in_k, sorted_desc, NEG_INF)
    probs = jax.nn.softmax(s, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return in_k & ((mass_before < p) | (p >= 1.0) | (rank == 0))


def _cutoff_mask(scores: jax.Array, k: jax.Array, p: jax.Array) -> jax.Array:
    """[B, V] bool: ``scores`` at or above the lowest kept sorted value (one sort; ties at the cut are kept)."""
    sorted_desc = -jnp.sort(-scores, axis=-1)  # [B, V]
    keep = _sorted_keep(sorted_desc, k, p)
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return scores >= cutoff


def top_k_mask(scores: jax.Array, k: jax.Array) -> jax.Array:
    """[B, V] bool: True for tokens kept by top-k (k traced; k <= 0 keeps everything; ties at the k-th value
    are kept, like ``transformers``)."""
    return _cutoff_mask(scores, k, jnp.asarray(1.0))


def top_p_mask(scores: jax.Array, p: jax.Array) -> jax.Array:
    """[B, V] bool: True for tokens in the nucleus of ``softmax(scores)`` (p traced; p >= 1 keeps all).

    A token is kept iff the mass of the tokens ranked strictly before it is < p (so the top token always is);
    tokens tied with the last kept one are kept too."""
    return _cutoff_mask(scores, jnp.asarray(0), p)


def process_scores(scores: jax.Array, params: SamplingParams) -> jax.Array:
    """banned -> temperature -> top-k -> top-p; returns the final [B, V] scores sampled from (-inf = removed).

    Top-k and top-p share one sort: top-p renormalises over the top-k survivors, as applying the two
    ``transformers`` warpers in sequence does."""
    scores = apply_banned(scores.astype(jnp.float32), params.banned)
    scores = apply_temperature(scores, params.temperature)
    v = scores.shape[-1]
    active = ((params.top_k > 0) & (params.top_k < v)) | (params.top_p < 1.0)
    # The sort is skipped (lax.cond) when top-k and top-p are off: it costs more than a small model's step.
    return jax.lax.cond(active, lambda s: jnp.where(_cutoff_mask(s, params.top_k, params.top_p), s, NEG_INF),
                        lambda s: s, scores)


def is_row_keys(key) -> bool:
    """``key`` is a typed key array with one key per row (``[B]``), not one key for the batch."""
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def fold_in(key, data):
    """``jax.random.fold_in`` for one key or one key per row."""
    if is_row_keys(key):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)
    return jax.random.fold_in(key, data)


def choose_tokens(scores: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """scores [B, V] -> tokens [B] int32: argmax when temperature == 0, else a categorical draw. ``key``: one
    key for the batch, or a typed key per row (``[B]``: each row's draw depends on its own key only, so a
    prompt's sample does not depend on the batch it is decoded in)."""
    def sample(s):
        final = process_scores(s, params)
        final = jnp.where(jnp.all(final == NEG_INF, axis=-1, keepdims=True), 0.0, final)
        if is_row_keys(key):
            return jax.vmap(lambda k, f: jax.random.categorical(k, f))(key, final).astype(jnp.int32)
        return jax.random.categorical(key, final, axis=-1).astype(jnp.int32)

    def greedy(s):  # top-k / top-p / temperature never change the argmax: only the banned ids matter
        return jnp.argmax(apply_banned(s.astype(jnp.float32), params.banned), axis=-1).astype(jnp.int32)

    return jax.lax.cond(params.temperature > 0, sample, greedy, scores)
