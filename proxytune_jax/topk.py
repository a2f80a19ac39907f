"""``TopK``: a next-token distribution known by its top k (ids + log-probs) and the mass of the rest (the tail).

One type for every place the library meets a sparse distribution: a FIRST teacher and its on-disk cache
(``losses.first``), a teacher behind an API that returns ``top_logprobs`` (``training.recorded_teacher``), the
Bayesian-KD prior and posterior (``losses.bayesian``), and the decoding side's black-box bases.

    ids   [..., k]  int32   token ids; -1 marks an empty slot (an API that returned fewer than k entries,
                            a prior with a smaller support)
    logp  [..., k]  float   log-probabilities from the *full-vocabulary* distribution (not renormalized
                            over the k); -inf in empty slots. float16 is the storage format.

The tail mass is ``1 − Σ_listed p``; ``tail_logp()`` computes its log without cancellation
(``log1mexp(logsumexp(logp))``) and returns ``-inf`` when rounding (float16 storage, an API's rounded
log-probs) makes the listed mass reach or pass 1, never NaN or ``+inf``. ``to_log_probs(V)`` gives a dense
``[..., V]`` distribution: the tail spread uniformly over the unlisted ids (``tail="uniform"``) or dropped and
the listed ids renormalized (``tail="drop"``).

Works on NumPy arrays (host-side builders, caches) and JAX arrays (losses, jitted steps) alike; a NamedTuple,
so it is a pytree.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.errors import UserError

TAILS = ("uniform", "drop")


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def log1mexp(x):
    """``log(1 − exp(x))`` for ``x ≤ 0``, stable at both ends; ``-inf`` for ``x ≥ 0`` (NumPy or JAX)."""
    xp = _xp(x)
    neg = x < 0
    safe = xp.where(neg, x, -1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = xp.where(safe > -math.log(2.0), xp.log(-xp.expm1(safe)), xp.log1p(-xp.exp(safe)))
    return xp.where(neg, out, -xp.inf)


class TopK(NamedTuple):
    """See the module docstring."""

    ids: Any  # [..., k] int32, -1 = empty slot
    logp: Any  # [..., k] full-vocabulary log-probs, -inf in empty slots

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_logits(cls, logits, k: int) -> "TopK":
        """The top ``k`` of ``log_softmax(logits)`` (float32 log-probs, descending; ties: lower id first)."""
        logits = jnp.asarray(logits)
        if not 1 <= k <= logits.shape[-1]:
            raise UserError(f"k must lie in [1, vocab={logits.shape[-1]}], got {k}.")
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        vals, ids = jax.lax.top_k(lp, k)
        return cls(ids.astype(jnp.int32), vals)

    @classmethod
    def from_probs(cls, ids, probs) -> "TopK":
        """From probabilities (a sparse prior or posterior): ``logp = log p``, ``-inf`` where ``p = 0`` or
        the slot is empty (``id < 0``)."""
        xp = _xp(probs)
        ids, probs = xp.asarray(ids), xp.asarray(probs)
        live = (ids >= 0) & (probs > 0)
        with np.errstate(divide="ignore"):
            logp = xp.where(live, xp.log(xp.where(live, probs, 1.0)), -xp.inf)
        return cls(ids, logp.astype(xp.float32))

    # ------------------------------------------------------------------ views
    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def valid(self):
        """``[..., k]`` bool: the slot holds a token."""
        return self.ids >= 0

    @property
    def probs(self):
        """``[..., k]`` float32 probabilities (0 in empty slots)."""
        xp = _xp(self.logp)
        lp = xp.asarray(self.logp).astype(xp.float32)
        return xp.where(self.valid, xp.exp(xp.where(self.valid, lp, -xp.inf)), 0.0)

    def listed_logp(self):
        """``[..., k]`` float32 log-probs with empty slots forced to ``-inf``."""
        xp = _xp(self.logp)
        return xp.where(self.valid, xp.asarray(self.logp).astype(xp.float32), -xp.inf)

    def tail_logp(self):
        """``[...]`` log of the mass outside the listed ids; ``-inf`` when rounding makes the listed mass
        reach 1 (never NaN or ``+inf``)."""
        xp = _xp(self.logp)
        lp = self.listed_logp()
        if xp is np:
            mx = np.max(lp, axis=-1, keepdims=True)
            mx = np.where(np.isfinite(mx), mx, 0.0)
            with np.errstate(divide="ignore"):
                total = np.log(np.sum(np.exp(lp - mx), axis=-1)) + mx[..., 0]
        else:
            total = jax.nn.logsumexp(lp, axis=-1)
        return log1mexp(xp.minimum(total, 0.0))

    def renormalized(self):
        """``[..., k]`` log-probs conditioned on the listed ids (``log_softmax`` over the valid slots)."""
        lp = self.listed_logp()
        if _xp(lp) is np:
            mx = np.max(lp, axis=-1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                return lp - (np.log(np.sum(np.exp(lp - mx), axis=-1, keepdims=True)) + mx)
        return jax.nn.log_softmax(lp, axis=-1)

    def to_log_probs(self, vocab_size: int, *, tail: str = "uniform") -> jax.Array:
        """Dense ``[..., V]`` float32 log-probs: the listed ids keep their log-probs and the tail mass is spread
        evenly over the ``V − listed`` other ids (``"uniform"``), or the listed ids are renormalized and every
        other id gets ``-inf`` (``"drop"``). Duplicate ids are not expected."""
        if tail not in TAILS:
            raise UserError(f"tail must be one of {TAILS}, got {tail!r}")
        ids = jnp.asarray(self.ids).astype(jnp.int32)
        lp = jnp.asarray(self.renormalized() if tail == "drop" else self.listed_logp())
        valid = ids >= 0
        onehot = jax.nn.one_hot(jnp.where(valid, ids, vocab_size), vocab_size + 1, dtype=jnp.bool_)[..., :vocab_size]
        listed = jnp.any(onehot, axis=-2)  # [..., V]
        dense = jnp.max(jnp.where(onehot, lp[..., None], -jnp.inf), axis=-2)  # [..., V]
        if tail == "drop":
            return dense
        n_other = vocab_size - jnp.sum(listed, axis=-1, keepdims=True)  # [..., 1]
        t = jnp.asarray(self.tail_logp())[..., None]
        spread = jnp.where(n_other > 0, t - jnp.log(jnp.maximum(n_other, 1).astype(jnp.float32)), -jnp.inf)
        return jnp.where(listed, dense, spread)

    # ------------------------------------------------------------------ storage
    def compressed(self, vocab_size: int) -> "TopK":
        """Host copy in the storage format: ids uint16 when the vocabulary fits (else int32; an empty slot is
        then ``vocab_size``'s sentinel, see ``storage_ids_dtype``), log-probs float16."""
        dt = storage_ids_dtype(vocab_size)
        ids = np.asarray(self.ids)
        if dt == np.uint16:
            ids = np.where(ids < 0, 65535, ids)
        return TopK(ids.astype(dt), np.asarray(self.logp, np.float16))


def storage_ids_dtype(vocab_size: int):
    """``uint16`` for vocabularies up to 65535 ids (65535 is the empty-slot sentinel), else ``int32``."""
    return np.dtype(np.uint16) if vocab_size < 65535 else np.dtype(np.int32)


def bytes_per_position(k: int, vocab_size: int) -> int:
    """Storage of one position's top-k (ids + float16 log-probs)."""
    return k * (storage_ids_dtype(vocab_size).itemsize + 2)


__all__ = ["TopK", "TAILS", "bytes_per_position", "log1mexp", "storage_ids_dtype"]
