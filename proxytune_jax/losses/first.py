"""FIRST (Shum et al. 2024): distillation from an offline, sparse top-k teacher.

Teacher format: the library's top-k type ``proxytune_jax.topk.TopK`` (``TopK`` is the same class):
per position the top-k token ids (``[..., k]``, -1 = empty slot) and their log-probs **from a
full-vocabulary softmax** (float16 on disk). ``topk_from_logits`` makes it from logits.

Offline cache on disk (``TopKCacheWriter`` / ``TopKCache``): a folder with
  ``index.json``      k, vocab size, dtypes, the shard list (file names and position counts),
  ``sequences.npy``   ``[num_sequences, 3]`` int64 rows ``(shard, start, length)``,
  ``shard_XXXXX.ids`` raw little-endian ids ``[positions, k]`` (uint16 for vocabularies below 65535 ids, 65535
                      = empty slot; int32 otherwise, -1 = empty), ``shard_XXXXX.logp`` raw float16
                      ``[positions, k]``: ``topk.bytes_per_position(k, V)`` bytes per position (20 at k = 5,
                      80 at k = 20 for V < 65535). Caches of format 1 (int32 ids) still read.
Shards are appended to (never rewritten) and read back with ``np.memmap`` (no whole-file loads: a sequence
read touches only its own pages). A sequence never straddles two shards. ``index.json`` is written last, by
``close()``; a folder without it is an incomplete cache and the reader refuses it.

Loss (``topk_kl``): ``Σ m·KL(t ‖ s) / max(Σ m, 1)`` with the teacher temperature τ as calibration:
- ``mode="renormalize"``: teacher ``t = softmax(logp_topk / τ)`` over the k ids; student = its full softmax
  (τ = 1) gathered at the k ids and renormalized in log space (identical to ``log_softmax`` of the gathered
  logits).
- ``mode="tail_bucket"``: a (k+1)-th "other" bucket on both sides. Teacher buckets
  ``[logp_1..logp_k, TopK.tail_logp()]`` (``-inf`` when float16 rounding takes the listed mass to 1), tempered as one
  (k+1)-way distribution ``softmax(buckets / τ)`` (exact at τ = 1); student buckets are its full-softmax
  probabilities at the k ids and the exact logsumexp of the remaining vocabulary (no ``1 − Σ`` cancellation).
  Both sides are true distributions, so the KL is ≥ 0 by construction; nothing is clamped.
``fit_temperature`` picks τ on held-out data by minimizing the teacher's NLL of the observed tokens under the
same tempered distribution (convex in 1/τ; golden-section search).
(The released FIRST code mixes probabilities and log-probs; this is a re-statement of the paper.)
"""
from __future__ import annotations

import json
import math
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.atomic import open_atomic, write_json_atomic
from proxytune_jax.errors import UserError
from proxytune_jax.topk import TopK, storage_ids_dtype
from proxytune_jax.losses._common import F32, as_mask, upcast, check_positive, kl_from_log_probs, masked_mean, zero_masked

MODES = ("renormalize", "tail_bucket")


TopKTeacher = TopK  # the FIRST teacher is the library's one top-k type


def topk_from_logits(logits, k: int = 5) -> TopK:
    """Top-k ids and log-probs of ``log_softmax(logits)`` over the full vocabulary (``TopK.from_logits``)."""
    return TopK.from_logits(logits, k)


def teacher_log_buckets(teacher: TopK, *, temperature=1.0, mode="renormalize", vocab_size=None):
    """Teacher log-distribution used by the loss: ``[..., k]`` (renormalize) or ``[..., k+1]`` (tail_bucket);
    empty slots (id -1) get ``-inf``.

    With ``vocab_size == k`` the tail bucket is exactly empty (``-inf``), not ``1 − Σ`` rounding noise."""
    check_positive("temperature", temperature)
    teacher = TopK(jnp.asarray(teacher.ids), jnp.asarray(teacher.logp))
    logp = teacher.listed_logp()
    tau = jnp.asarray(temperature, F32)
    if mode == "renormalize":
        return jax.nn.log_softmax(logp / tau, axis=-1)
    if mode == "tail_bucket":
        if vocab_size is not None and vocab_size <= logp.shape[-1]:
            tail = jnp.full(logp.shape[:-1] + (1,), -jnp.inf, F32)
        else:
            tail = teacher.tail_logp()[..., None]
        return jax.nn.log_softmax(jnp.concatenate([logp, tail], axis=-1) / tau, axis=-1)
    raise UserError(f"unknown mode {mode!r}; choose one of {MODES}.")


def _student_log_buckets(student_logits, ids, mode):
    s = upcast(student_logits)
    valid = ids >= 0
    ids = jnp.where(valid, ids, 0)
    if mode == "renormalize":
        return jax.nn.log_softmax(jnp.where(valid, jnp.take_along_axis(s, ids, axis=-1), -jnp.inf), axis=-1)
    lq = jax.nn.log_softmax(s, axis=-1)
    picked = jnp.where(valid, jnp.take_along_axis(lq, ids, axis=-1), -jnp.inf)
    vocab = s.shape[-1]
    flat_ids = jnp.where(valid, ids, vocab).reshape(-1, ids.shape[-1])  # empty slots scatter out of range
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    in_topk = jnp.zeros((flat_ids.shape[0], vocab), bool).at[rows, flat_ids].set(True, mode="drop").reshape(s.shape)
    rest = jnp.where(in_topk, -jnp.inf, lq)
    mx = jnp.max(rest, axis=-1, keepdims=True)
    mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
    total = jnp.sum(jnp.where(in_topk, 0.0, jnp.exp(jnp.where(in_topk, mx, rest) - mx)), axis=-1, keepdims=True)
    tail = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + mx, -jnp.inf)  # -inf: empty tail
    return jnp.concatenate([picked, tail], axis=-1)


def topk_kl_per_position(student_logits, teacher: TopK, *, temperature=1.0, mode="renormalize"):
    """``KL(t ‖ s)`` per position over the top-k (+ tail) buckets; see the module docstring."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {MODES}.")
    ids = jnp.asarray(teacher.ids).astype(jnp.int32)
    lt = teacher_log_buckets(teacher, temperature=temperature, mode=mode, vocab_size=jnp.shape(student_logits)[-1])
    ls = _student_log_buckets(jnp.asarray(student_logits), ids, mode)
    return kl_from_log_probs(lt, ls)


def topk_kl(student_logits, teacher: TopK, mask=None, *, temperature=1.0, mode="renormalize"):
    """FIRST loss: mean over valid positions of ``KL(t ‖ s)`` against a sparse top-k teacher.

    Args:
      student_logits: ``[..., V]``; the student side uses τ = 1.
      teacher: ``TopK(ids [..., k] int, logp [..., k] float16/32)``.
      mask: ``[...]`` valid positions. A position whose teacher row has no entry at all (every id -1, e.g.
        an API teacher's end-of-sequence position) counts as masked.
      temperature: the *teacher's* calibration temperature τ (see ``fit_temperature``).
      mode: ``"renormalize"`` or ``"tail_bucket"``.
    """
    student_logits = jnp.asarray(student_logits)
    ids = jnp.asarray(teacher.ids)
    if ids.shape[:-1] != student_logits.shape[:-1] or jnp.shape(teacher.logp) != ids.shape:
        raise UserError(f"teacher ids {ids.shape} / logp {jnp.shape(teacher.logp)} must be [..., k] over the student's "
                        f"positions {student_logits.shape[:-1]}.")
    m = as_mask(mask, student_logits.shape[:-1]) & jnp.any(ids >= 0, axis=-1)
    k, vocab = ids.shape[-1], student_logits.shape[-1]
    filler = jnp.arange(k, dtype=ids.dtype) % vocab  # distinct ids for masked rows (values unused)
    safe_teacher = TopK(jnp.where(m[..., None], ids, filler),
                        jnp.where(m[..., None], jnp.asarray(teacher.logp), -math.log(k) - 1.0))
    per = topk_kl_per_position(zero_masked(student_logits, m), safe_teacher, temperature=temperature, mode=mode)
    return masked_mean(per, m)


# ------------------------------------------------------------------------------------------ temperature fit
def teacher_nll(teacher: TopK, targets, mask=None, *, temperature=1.0, mode="tail_bucket", vocab_size=None):
    """Mean NLL of the observed ``targets [...]`` under the tempered teacher buckets.

    ``tail_bucket``: a target outside the top-k scores the tail bucket (the constant ``log(V − k)`` of a
    uniform split of the tail is dropped: it does not move the argmin). ``renormalize``: only positions whose
    target is inside the top-k count (the others have zero probability under that teacher).
    """
    ids = jnp.asarray(teacher.ids)
    targets = jnp.asarray(targets)
    m = as_mask(mask, targets.shape)
    lt = teacher_log_buckets(teacher, temperature=temperature, mode=mode, vocab_size=vocab_size)
    hit = ids == targets[..., None]
    inside = jnp.any(hit, axis=-1)
    ll_in = jnp.sum(jnp.where(hit, lt[..., : ids.shape[-1]], 0.0), axis=-1)
    if mode == "tail_bucket":
        ll = jnp.where(inside, ll_in, lt[..., -1])
        return masked_mean(-ll, m)
    return masked_mean(-ll_in, m & inside)


def fit_temperature(teacher: TopK, targets, mask=None, *, mode="tail_bucket", bounds=(0.05, 20.0),
                    iters: int = 60, vocab_size=None) -> float:
    """Teacher temperature τ minimizing ``teacher_nll`` on held-out data (golden-section search over 1/τ,
    where the NLL is convex). Returns a Python float inside ``bounds``.

    Use the ``mode`` the loss will use. With k < V, ``tail_bucket`` tempers the (k+1)-bucket distribution, which
    is not the same as tempering the full teacher, so its optimum differs from the full-vocabulary one;
    ``renormalize`` conditions on the top-k, where tempering the top-k log-probs is exact."""
    lo_t, hi_t = bounds
    check_positive("bounds[0]", lo_t)
    if not hi_t > lo_t:
        raise UserError(f"bounds must be (low, high) with high > low, got {bounds}.")
    ids, logp = jnp.asarray(teacher.ids), jnp.asarray(teacher.logp, F32)
    targets = jnp.asarray(targets)
    m = as_mask(mask, targets.shape)

    @jax.jit
    def _nll(inv_t, ids, logp, targets, m):  # data passed as arguments, never closed over
        return teacher_nll(TopK(ids, logp), targets, m, temperature=1.0 / inv_t, mode=mode,
                           vocab_size=vocab_size)

    def nll(inv_t):
        return _nll(jnp.asarray(inv_t, F32), ids, logp, targets, m)
    a, b = 1.0 / hi_t, 1.0 / lo_t
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = float(nll(c)), float(nll(d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = float(nll(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = float(nll(d))
    return float(1.0 / ((a + b) / 2.0))


# --------------------------------------------------------------------------------------------- disk cache
INDEX = "index.json"
SEQUENCES = "sequences.npy"


class TopKCacheWriter:
    """Append sequences of top-k teacher entries to a sharded on-disk cache (see the module docstring).

    ``shard_positions`` bounds the positions per shard (a longer single sequence gets a shard of its own).
    Use as a context manager, or call ``close()``; nothing is readable before ``close()``.
    """

    def __init__(self, path, *, k: int, vocab_size: int, shard_positions: int = 1 << 20):
        if k < 1 or vocab_size < k:
            raise UserError(f"need 1 <= k <= vocab_size, got k={k}, vocab_size={vocab_size}.")
        self.path = os.fspath(path)
        if os.path.exists(os.path.join(self.path, INDEX)):
            raise UserError(f"{self.path} already holds a top-k cache; choose a new folder or delete it.")
        os.makedirs(self.path, exist_ok=True)
        self.k, self.vocab_size, self.shard_positions = int(k), int(vocab_size), int(shard_positions)
        self.shards: list[dict] = []
        self.sequences: list[tuple[int, int, int]] = []
        self._ids_f = self._logp_f = None
        self._topk = jax.jit(topk_from_logits, static_argnums=1)
        self.ids_dtype = storage_ids_dtype(self.vocab_size).newbyteorder("<")

    def _open_shard(self):
        self._close_shard()
        i = len(self.shards)
        rec = {"ids": f"shard_{i:05d}.ids", "logp": f"shard_{i:05d}.logp", "positions": 0}
        self.shards.append(rec)
        self._ids_f = open(os.path.join(self.path, rec["ids"]), "wb")
        self._logp_f = open(os.path.join(self.path, rec["logp"]), "wb")

    def _close_shard(self):
        for f in (self._ids_f, self._logp_f):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._ids_f = self._logp_f = None

    def add(self, ids, logp) -> int:
        """Append one sequence: ``ids [L, k]`` int, ``logp [L, k]`` full-vocabulary log-probs. Returns its index."""
        ids = np.asarray(ids)
        logp = np.asarray(logp, dtype=np.float32)
        if ids.ndim != 2 or ids.shape[1] != self.k or logp.shape != ids.shape:
            raise UserError(f"expected ids and logp of shape [L, {self.k}], got {ids.shape} and {logp.shape}.")
        if ids.size and (ids.min() < -1 or ids.max() >= self.vocab_size):
            raise UserError(f"token ids must lie in [0, {self.vocab_size}) (-1: an empty slot); got range "
                            f"[{ids.min()}, {ids.max()}].")
        if logp.size and not (np.all(np.isfinite(logp) | np.isneginf(logp)) and logp.max() <= 1e-3):
            raise UserError("logp must be log-probabilities (<= 0, no NaN) from a full-vocabulary log_softmax.")
        n = ids.shape[0]
        if not self.shards or (self.shards[-1]["positions"] and self.shards[-1]["positions"] + n > self.shard_positions):
            self._open_shard()
        rec = self.shards[-1]
        stored = TopK(ids, logp).compressed(self.vocab_size)
        self._ids_f.write(np.ascontiguousarray(stored.ids, dtype=self.ids_dtype).tobytes())
        self._logp_f.write(np.ascontiguousarray(stored.logp, dtype="<f2").tobytes())
        self.sequences.append((len(self.shards) - 1, rec["positions"], n))
        rec["positions"] += n
        return len(self.sequences) - 1

    def add_logits(self, logits) -> int:
        """Append one sequence from full teacher logits ``[L, V]`` (top-k of the full log_softmax)."""
        logits = jnp.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != self.vocab_size:
            raise UserError(f"expected logits [L, {self.vocab_size}], got {logits.shape}.")
        t = jax.device_get(self._topk(logits, self.k))
        return self.add(t.ids, t.logp)

    def add_batch(self, teacher: TopK, mask) -> list[int]:
        """Append each row of a batch ``[B, T, k]``, keeping the positions where ``mask [B, T]`` is set."""
        ids, logp, mask = (np.asarray(x) for x in (teacher.ids, teacher.logp, mask))
        return [self.add(ids[b][mask[b].astype(bool)], logp[b][mask[b].astype(bool)]) for b in range(ids.shape[0])]

    def close(self):
        self._close_shard()
        with open_atomic(os.path.join(self.path, SEQUENCES), "wb") as f:
            np.save(f, np.asarray(self.sequences, np.int64).reshape(-1, 3))
        index = {"format": "proxytune_jax.first.topk/2", "k": self.k, "vocab_size": self.vocab_size,
                 "ids_dtype": self.ids_dtype.str, "logp_dtype": "<f2", "num_sequences": len(self.sequences),
                 "num_positions": int(sum(s["positions"] for s in self.shards)), "shards": self.shards}
        write_json_atomic(os.path.join(self.path, INDEX), index, indent=1)  # last: the cache exists from here

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        # A failed write (a full disk, bad input) leaves no half cache behind: the shards written so far go.
        for f in (self._ids_f, self._logp_f):
            if f is not None:
                f.close()
        for rec in self.shards:
            for name in (rec["ids"], rec["logp"]):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.path, name))


class TopKCache:
    """Read-only, memory-mapped view of a cache written by ``TopKCacheWriter``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, INDEX)
        if not os.path.exists(index_path):
            raise UserError(f"{self.path} has no {INDEX}: not a top-k cache, or its writer never closed; rewrite it.")
        with open(index_path) as f:
            self.index = json.load(f)
        self.k = int(self.index["k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.ids_dtype = np.dtype(self.index.get("ids_dtype", "<i4"))  # format 1: int32
        self.sequences = np.load(os.path.join(self.path, SEQUENCES), mmap_mode="r")
        self._maps: dict[int, tuple[np.memmap, np.memmap]] = {}

    def __len__(self):
        return int(self.index["num_sequences"])

    def _shard(self, i):
        if i not in self._maps:
            rec = self.index["shards"][i]
            shape = (rec["positions"], self.k)
            if rec["positions"] == 0:
                self._maps[i] = (np.zeros(shape, self.ids_dtype), np.zeros(shape, "<f2"))
            else:
                self._maps[i] = (np.memmap(os.path.join(self.path, rec["ids"]), self.ids_dtype, "r", shape=shape),
                                 np.memmap(os.path.join(self.path, rec["logp"]), "<f2", "r", shape=shape))
        return self._maps[i]

    def __getitem__(self, i) -> TopK:
        """Sequence i: ``ids [L, k]`` int32 (-1 = empty slot; a copy of the stored ids), ``logp [L, k]`` float16
        (a memory-mapped view)."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        shard, start, length = (int(x) for x in self.sequences[i])
        ids, logp = self._shard(shard)
        ids = np.asarray(ids[start:start + length]).astype(np.int32)
        if self.ids_dtype.kind == "u":
            ids[ids == np.iinfo(self.ids_dtype).max] = -1
        return TopK(ids, logp[start:start + length])

    def batch(self, indices, length=None):
        """Padded batch: ``(TopK(ids [B, T, k] int32, logp [B, T, k] float16), mask [B, T] bool)``.

        ``length`` defaults to the longest sequence; longer sequences are truncated. Padding: id 0, logp 0.
        """
        seqs = [self[int(i)] for i in indices]
        t = length if length is not None else max((len(s.ids) for s in seqs), default=0)
        ids = np.zeros((len(seqs), t, self.k), np.int32)
        logp = np.zeros((len(seqs), t, self.k), np.float16)
        mask = np.zeros((len(seqs), t), bool)
        for b, s in enumerate(seqs):
            n = min(len(s.ids), t)
            ids[b, :n], logp[b, :n], mask[b, :n] = s.ids[:n], s.logp[:n], True
        return TopK(ids, logp), mask


__all__ = ["TopK", "TopKTeacher", "topk_from_logits", "topk_kl", "topk_kl_per_position", "teacher_log_buckets",
           "teacher_nll", "fit_temperature", "TopKCacheWriter", "TopKCache"]
