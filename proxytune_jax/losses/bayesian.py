"""Bayesian KD from a closed-source teacher (Chen et al. 2024, arXiv 2401.07013 v1; ``docs/methods.md`` §2.12).

The teacher T only gives text (a corpus C of its generations). Its next-token distribution is estimated as
  1. a **prior** ``p̂`` from hashed n-gram counts over C (``NgramPrior``), blended with the one-hot label:
     ``p̂(w) = #(w, ctx)/(γ·#(ctx)) + (γ−1)/γ · 1[w = w_t]``  (ctx = the n tokens before position t);
  2. a **posterior** ``E(P | M)`` (``posterior_estimate``): each ``P(w)`` is a discrete random variable on the
     m grid values ``pⁱ = (i − ½)/m`` in (0, 1); its prior pmf is the maximum-entropy pmf on that grid with
     mean ``p̂(w)`` (exponential tilting ``Pr(pⁱ) ∝ exp(λ·pⁱ)``, λ found by bisection). K tokens ``ŵ`` sampled
     from a proxy model M at the same prefix update it in closed form, ``Pr(pⁱ | M) ∝ (pⁱ)^c (1 − pⁱ)^(K−c)
     Pr(pⁱ)`` (c = hits of w among the K samples, computed in log space; equal to K sequential Bayes updates),
     and ``E(P | M) = Σ pⁱ Pr(pⁱ | M)``, renormalized over the support.
  3. the objective ``L = mean_t [CE_t + α·KL(p̂_t ‖ q_t) + β·KL(E(P|M)_t ‖ q_t)]`` (``bayesian_kd``).

Choices the paper leaves open (all arguments; our defaults):
- n = 2 (context of the 2 previous tokens; positions before a sequence start use a sentinel), γ = 2
  (half n-gram, half label), at most ``support = 32`` n-gram continuations kept per context (the most frequent;
  the kept n-gram mass is renormalized to 1/γ), unseen context → the prior backs off to the one-hot label.
- The posterior lives on the **support** = prior support ∪ proxy samples (tokens with neither stay at 0);
  m = 100 grid values; a prior mean below the smallest grid value ``1/(2m)`` (e.g. 0 for a token only the
  proxy proposed) is raised to just above it — the grid cannot represent smaller means, so rare tokens are
  floored at ~``1/(2m)`` before renormalization (larger m lowers the floor).
- α = β = 0.5; K = 8 proxy samples at temperature 1 (``sample_proxy_tokens``).
The n-gram statistics are host-side NumPy (a data-pipeline step, like tokenization); the posterior and the
loss are jittable JAX.

Sparse distributions are the library's top-k type ``proxytune_jax.topk.TopK`` (ids ``[..., S]`` int32, −1 =
unused slot; log-probs, −inf where the probability is 0), built from probabilities by
``SparseDist(ids, probs)`` (``TopK.from_probs``); ``.probs`` reads them back. Ids with positive probability
are distinct.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.topk import TopK
from proxytune_jax.losses._common import (F32, as_mask, check_positive, kl_terms, log_probs, masked_mean, upcast,
                                         zero_masked)
from proxytune_jax.losses.divergences import cross_entropy_per_position


SparseDist = TopK.from_probs  # a sparse distribution from (ids, probs): the shared TopK type


# ------------------------------------------------------------------------------------------- n-gram prior
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h):
    """splitmix64 finalizer (uint64 arrays, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        h = h + _GOLDEN
        h = (h ^ (h >> np.uint64(30))) * _M1
        h = (h ^ (h >> np.uint64(27))) * _M2
        return h ^ (h >> np.uint64(31))


def context_hashes(tokens, n: int):
    """64-bit hash of the n tokens before each position: ``tokens [..., L] -> uint64 [..., L]``.

    Positions before the sequence start count as a sentinel token, so the first positions of a sequence have
    their own contexts (``<s> <s>``, ``<s> w0``, …). Collisions between distinct contexts have probability
    ~ (#contexts)²/2⁶⁵ — negligible for corpora of billions of tokens.
    """
    tok = np.asarray(tokens, dtype=np.int64)
    vals = (tok + 1).astype(np.uint64)  # 0 = sentinel
    lead = tok.shape[:-1]
    h = np.full(tok.shape, np.uint64(n), dtype=np.uint64)
    for j in range(1, n + 1):
        prev = np.concatenate([np.zeros(lead + (j,), np.uint64), vals[..., :-j]], axis=-1)[..., : tok.shape[-1]]
        h = _mix(h ^ prev)
    return h


class NgramPrior:
    """Hashed n-gram continuation counts of a corpus, stored as sorted context hashes + CSR continuations.

    Memory: 8 + 4 + 8 bytes per distinct (context, next-token) pair plus 16 bytes per distinct context —
    a few hundred MB for a corpus of ~10M tokens. Build with ``NgramPrior.from_corpus``.
    """

    def __init__(self, n, context_keys, offsets, next_ids, next_counts):
        self.n = int(n)
        self.context_keys = context_keys  # [U] uint64, sorted
        self.offsets = offsets  # [U + 1] int64: continuations of context u are [offsets[u], offsets[u+1])
        self.next_ids = next_ids  # [E] int32, per context by descending count
        self.next_counts = next_counts  # [E] int64
        self.context_counts = np.add.reduceat(next_counts, offsets[:-1]) if len(next_counts) else np.zeros(0, np.int64)

    @classmethod
    def from_corpus(cls, sequences, *, n: int = 2) -> "NgramPrior":
        """Count ``(context, next token)`` pairs over ``sequences`` (an iterable of 1-D int token arrays)."""
        if n < 0:
            raise UserError(f"n (the context window) must be >= 0, got {n}.")
        keys, nexts = [], []
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64).reshape(-1)
            if seq.size == 0:
                continue
            if seq.min() < 0:
                raise UserError("corpus token ids must be >= 0 (drop padding before counting).")
            keys.append(context_hashes(seq, n))
            nexts.append(seq.astype(np.int32))
        if not keys:
            raise UserError("the corpus is empty; pass at least one non-empty token sequence.")
        keys = np.concatenate(keys)
        nexts = np.concatenate(nexts)
        order = np.lexsort((nexts, keys))
        keys, nexts = keys[order], nexts[order]
        new_pair = np.ones(len(keys), bool)
        new_pair[1:] = (keys[1:] != keys[:-1]) | (nexts[1:] != nexts[:-1])
        starts = np.flatnonzero(new_pair)
        pair_keys, pair_ids = keys[starts], nexts[starts]
        pair_counts = np.diff(np.append(starts, len(keys))).astype(np.int64)
        # within each context, order continuations by descending count (ties: ascending id)
        order = np.lexsort((pair_ids, -pair_counts, pair_keys))
        pair_keys, pair_ids, pair_counts = pair_keys[order], pair_ids[order], pair_counts[order]
        new_ctx = np.ones(len(pair_keys), bool)
        new_ctx[1:] = pair_keys[1:] != pair_keys[:-1]
        ctx_starts = np.flatnonzero(new_ctx)
        offsets = np.append(ctx_starts, len(pair_keys)).astype(np.int64)
        return cls(n, pair_keys[ctx_starts], offsets, pair_ids, pair_counts)

    def count(self, context, token) -> int:
        """#(context followed by token) for a context tuple of length n (brute-force checks, debugging)."""
        seq = np.asarray(list(context) + [token], np.int64)
        key = context_hashes(seq, self.n)[-1] if len(context) == self.n else None
        if key is None:
            raise UserError(f"context must have exactly n={self.n} tokens.")
        u = np.searchsorted(self.context_keys, key)
        if u >= len(self.context_keys) or self.context_keys[u] != key:
            return 0
        ids = self.next_ids[self.offsets[u]:self.offsets[u + 1]]
        hit = np.flatnonzero(ids == token)
        return int(self.next_counts[self.offsets[u] + hit[0]]) if hit.size else 0

    def prior(self, tokens, mask=None, *, gamma: float = 2.0, support: int = 32) -> TopK:
        """Prior ``p̂`` for every position of ``tokens [..., L]``: entry t is the distribution of ``tokens[..., t]``
        given ``tokens[..., t-n:t]``. Returns NumPy ``SparseDist`` ``[..., L, support + 1]`` (the extra slot holds
        the label when it is not among the kept continuations). For LM training with student logits predicting
        ``tokens[:, 1:]``, slice ``[:, 1:]``. Masked positions (``mask [..., L]`` False) get an all-empty row.
        """
        if not gamma >= 1.0:
            raise UserError(f"gamma must be >= 1 (it blends n-gram estimate and label), got {gamma}.")
        if support < 1:
            raise UserError(f"support must be >= 1, got {support}.")
        tokens = np.asarray(tokens, np.int64)
        m = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
        keys = context_hashes(np.where(tokens >= 0, tokens, 0), self.n)
        u = np.searchsorted(self.context_keys, keys)
        u_c = np.minimum(u, len(self.context_keys) - 1)
        found = (u < len(self.context_keys)) & (self.context_keys[u_c] == keys) & m
        start = self.offsets[u_c]
        n_cont = np.where(found, self.offsets[u_c + 1] - start, 0)
        slot = np.arange(support)
        take = slot < n_cont[..., None]  # [..., L, S]
        idx = np.where(take, start[..., None] + slot, 0)
        ids = np.where(take, self.next_ids[idx], -1)
        counts = np.where(take, self.next_counts[idx], 0).astype(np.float64)
        kept = counts.sum(-1, keepdims=True)
        ngram = np.where(kept > 0, counts / np.maximum(kept, 1.0), 0.0) / gamma  # n-gram part, mass 1/γ
        label = np.where(m, tokens, -1)
        is_label = (ids == label[..., None]) & take
        in_kept = is_label.any(-1)
        w_label = np.where(found, (gamma - 1.0) / gamma, 1.0)  # unseen context: one-hot label
        probs = ngram + np.where(is_label, w_label[..., None], 0.0)
        extra_p = np.where(m & ~in_kept, w_label, 0.0)
        extra_id = np.where(m & ~in_kept, label, -1)
        ids = np.concatenate([ids, extra_id[..., None]], -1).astype(np.int32)
        probs = np.concatenate([probs, extra_p[..., None]], -1)
        probs = np.where(ids >= 0, probs, 0.0)
        return SparseDist(ids, probs.astype(np.float32))


# ---------------------------------------------------------------------------------------------- posterior
def probability_grid(num_bins: int) -> jax.Array:
    """The m values ``pⁱ = (i − ½)/m`` in (0, 1)."""
    return (jnp.arange(num_bins, dtype=F32) + 0.5) / num_bins


def max_entropy_log_pmf(mean, grid, *, iters: int = 60):
    """Log of the maximum-entropy pmf on ``grid [m]`` with the given ``mean [...]`` -> ``[..., m]``.

    ``Pr(pⁱ) ∝ exp(λ·pⁱ)``; the mean is increasing in λ, which is found by bisection. Means outside
    ``(grid[0], grid[-1])`` are clipped just inside.
    """
    m = grid.shape[0]
    span = grid[-1] - grid[0]
    eps = 1e-4 * span / m
    target = jnp.clip(jnp.asarray(mean, F32), grid[0] + eps, grid[-1] - eps)
    bound = 40.0 * m / span

    def mean_of(lam):
        return jnp.sum(jax.nn.softmax(lam[..., None] * grid, axis=-1) * grid, axis=-1)

    def step(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        up = mean_of(mid) < target
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, step, (jnp.full_like(target, -bound), jnp.full_like(target, bound)))
    lam = 0.5 * (lo + hi)
    return jax.nn.log_softmax(lam[..., None] * grid, axis=-1)


def posterior_estimate(prior: TopK, samples, *, num_bins: int = 100) -> TopK:
    """Posterior ``E(P | M)`` on the support prior ∪ proxy samples; see the module docstring.

    Args:
      prior: ``SparseDist [..., S]`` (from ``NgramPrior.prior``).
      samples: ``[..., K]`` token ids sampled from the proxy model at each position (K = samples.shape[-1]).
      num_bins: m, the number of grid values.
    Returns:
      ``SparseDist [..., S + K]`` normalized over its support (duplicate sample slots get probability 0).
      A position with an empty support (masked) gets all zeros.
    """
    p_ids = jnp.asarray(prior.ids).astype(jnp.int32)
    p_probs = jnp.asarray(prior.probs, F32)
    samples = jnp.asarray(samples).astype(jnp.int32)
    k = samples.shape[-1]
    ids = jnp.concatenate([p_ids, samples], axis=-1)  # [..., S+K]
    valid = jnp.concatenate([p_probs > 0, samples >= 0], axis=-1)
    same = (ids[..., :, None] == ids[..., None, :]) & valid[..., :, None] & valid[..., None, :]
    earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), k=-1)
    keep = valid & ~jnp.any(same & earlier, axis=-1)
    prior_mean = jnp.sum(jnp.where(ids[..., :, None] == p_ids[..., None, :], p_probs[..., None, :], 0.0), axis=-1)
    hits = jnp.sum((ids[..., :, None] == samples[..., None, :]) & (samples[..., None, :] >= 0), axis=-1).astype(F32)
    grid = probability_grid(num_bins)
    log_prior = max_entropy_log_pmf(prior_mean, grid)  # [..., S+K, m]
    log_post = hits[..., None] * jnp.log(grid) + (k - hits)[..., None] * jnp.log1p(-grid) + log_prior
    post_mean = jnp.sum(jax.nn.softmax(log_post, axis=-1) * grid, axis=-1)
    post_mean = jnp.where(keep, post_mean, 0.0)
    total = jnp.sum(post_mean, axis=-1, keepdims=True)
    probs = jnp.where(total > 0, post_mean / jnp.where(total > 0, total, 1.0), 0.0)
    return SparseDist(jnp.where(keep, ids, -1), probs)


def sample_proxy_tokens(key, proxy_logits, num_samples: int = 8, *, temperature: float = 1.0):
    """K tokens per position from ``softmax(proxy_logits / τ)``: ``[..., V] -> [..., K]`` int32."""
    check_positive("temperature", temperature)
    logits = jnp.asarray(proxy_logits, F32) / temperature
    draws = jax.random.categorical(key, logits, axis=-1, shape=(num_samples,) + logits.shape[:-1])
    return jnp.moveaxis(draws, 0, -1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- objective
def sparse_kl_per_position(student_logits, target: TopK, *, temperature=1.0):
    """``KL(target ‖ softmax(student/τ))`` per position for a sparse target ``[..., S]``."""
    lq = log_probs(student_logits, temperature)
    target = TopK(jnp.asarray(target.ids), jnp.asarray(target.logp))
    ids = target.ids
    picked = jnp.take_along_axis(lq, jnp.where(ids >= 0, ids, 0).astype(jnp.int32), axis=-1)
    return jnp.sum(kl_terms(upcast(target.listed_logp()), picked), axis=-1)


def sparse_kl(student_logits, target: TopK, mask=None, *, temperature=1.0):
    """Mean over valid positions of ``KL(target ‖ q)`` for a sparse target distribution."""
    student_logits = jnp.asarray(student_logits)
    m = as_mask(mask, student_logits.shape[:-1])
    return masked_mean(sparse_kl_per_position(zero_masked(student_logits, m), target, temperature=temperature), m)


def bayesian_kd(student_logits, labels, prior: TopK, posterior: TopK, mask=None, *, alpha=0.5,
                beta=0.5, temperature=1.0):
    """``mean_t [CE_t + α·KL(p̂_t ‖ q_t) + β·KL(E(P|M)_t ‖ q_t)]`` over valid positions.

    Args:
      student_logits: ``[..., V]``; labels: ``[...]`` the teacher's observed tokens (negative = masked).
      prior, posterior: ``SparseDist [..., S]`` aligned with the student positions.
      temperature: divides the student logits inside the two KL terms (the CE term uses τ = 1).
    (The teacher is closed-source, hence no teacher logits in the signature.)
    """
    student_logits = jnp.asarray(student_logits)
    labels = jnp.asarray(labels)
    m = as_mask(mask, student_logits.shape[:-1]) & (labels >= 0)
    s = zero_masked(student_logits, m)
    per = (cross_entropy_per_position(s, jnp.where(m, labels, 0))
           + alpha * sparse_kl_per_position(s, prior, temperature=temperature)
           + beta * sparse_kl_per_position(s, posterior, temperature=temperature))
    return masked_mean(per, m)


__all__ = ["SparseDist", "NgramPrior", "context_hashes", "probability_grid", "max_entropy_log_pmf",
           "posterior_estimate", "sample_proxy_tokens", "sparse_kl", "sparse_kl_per_position", "bayesian_kd"]
