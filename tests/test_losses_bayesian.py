"""Bayesian KD: n-gram prior vs brute-force counting, posterior vs sequential Bayes updates in NumPy,
objective vs a dense NumPy re-statement."""
from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from proxytune_jax import losses as L
from proxytune_jax.errors import UserError

VOCAB = 7
N = 2


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    # a Markov-ish corpus so contexts repeat
    seqs = []
    for _ in range(60):
        x = [int(rng.integers(VOCAB))]
        for _ in range(int(rng.integers(4, 25))):
            x.append(int((x[-1] * 3 + rng.integers(3)) % VOCAB))
        seqs.append(np.array(x))
    return seqs


def brute_counts(seqs, n):
    """#(ctx, w) and #(ctx) with the sentinel -1 before each sequence start."""
    pair, ctx = Counter(), Counter()
    for s in seqs:
        padded = [-1] * n + list(s)
        for t in range(len(s)):
            c = tuple(padded[t:t + n])
            pair[(c, int(s[t]))] += 1
            ctx[c] += 1
    return pair, ctx


def test_counts_match_brute_force(corpus):
    prior = L.NgramPrior.from_corpus(corpus, n=N)
    pair, _ = brute_counts(corpus, N)
    full_ctx = [(c, w) for (c, w) in pair if -1 not in c]
    assert len(full_ctx) > 20
    for c, w in full_ctx:
        assert prior.count(c, w) == pair[(c, w)]
    assert prior.count((0, 0), 6) == pair.get(((0, 0), 6), 0)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 5.0])
def test_prior_matches_the_formula(gamma, corpus):
    prior = L.NgramPrior.from_corpus(corpus, n=N)
    pair, ctx = brute_counts(corpus, N)
    tokens = np.stack([corpus[0][:6], corpus[1][:6]])
    tokens[1, 4] = (tokens[1, 3] * 3 + 2) % VOCAB
    dist = prior.prior(tokens, gamma=gamma, support=VOCAB)
    dense = np.zeros(tokens.shape + (VOCAB,))
    np.add.at(dense, tuple(np.indices(dist.ids.shape)[:-1]) + (np.maximum(dist.ids, 0),),
              np.where(dist.ids >= 0, dist.probs, 0))
    for b in range(2):
        padded = [-1] * N + list(tokens[b])
        for t in range(tokens.shape[1]):
            c = tuple(padded[t:t + N])
            ref = np.zeros(VOCAB)
            if ctx[c]:
                for w in range(VOCAB):
                    ref[w] = pair.get((c, w), 0) / (gamma * ctx[c])
                ref[tokens[b, t]] += (gamma - 1) / gamma
            else:
                ref[tokens[b, t]] = 1.0  # unseen context: one-hot label
            np.testing.assert_allclose(dense[b, t], ref, rtol=1e-6, atol=1e-7)


def test_unseen_context_truncation_and_mask(corpus):
    prior = L.NgramPrior.from_corpus(corpus, n=N)
    tokens = np.array([[1, 2, 3, 4, 5, 6]])
    dist = prior.prior(tokens, mask=np.array([[1, 1, 1, 1, 1, 0]], bool), gamma=2.0, support=1)
    np.testing.assert_allclose(dist.probs.sum(-1)[0, :5], 1.0, rtol=1e-6)
    assert dist.probs[0, 5].sum() == 0 and np.all(dist.ids[0, 5] == -1)
    with pytest.raises(UserError):
        prior.prior(tokens, gamma=0.5)


def np_maxent_pmf(mean, grid):
    lo, hi = grid[0] + 1e-4 * (grid[-1] - grid[0]) / len(grid), grid[-1] - 1e-4 * (grid[-1] - grid[0]) / len(grid)
    mean = min(max(mean, lo), hi)

    def pmf(lam):
        w = np.exp(lam * grid - np.max(lam * grid))
        return w / w.sum()

    lam = brentq(lambda l: pmf(l) @ grid - mean, -40 * len(grid) / (grid[-1] - grid[0]),
                 40 * len(grid) / (grid[-1] - grid[0]), xtol=1e-12)
    return pmf(lam)


def test_posterior_equals_sequential_bayes_updates():
    m = 30
    grid = (np.arange(m) + 0.5) / m
    prior = L.SparseDist(np.array([[3, 1, 4, -1]]), np.array([[0.5, 0.3, 0.2, 0.0]], np.float32))
    samples = np.array([[3, 3, 1, 6, 3, 1, 3, 6]])
    post = jax.jit(L.posterior_estimate, static_argnames="num_bins")(prior, samples, num_bins=m)
    ids, probs = np.asarray(post.ids[0]), np.asarray(post.probs[0])
    support = {3: 0.5, 1: 0.3, 4: 0.2, 6: 0.0}
    est = {}
    for w, mean in support.items():
        pr = np_maxent_pmf(mean, grid)
        for s in samples[0]:  # K sequential updates, each normalized by η
            pr = pr * (grid if s == w else 1 - grid)
            pr = pr / pr.sum()
        est[w] = float(pr @ grid)
    z = sum(est.values())
    got = {int(i): float(p) for i, p in zip(ids, probs) if i >= 0 and p > 0}
    assert set(got) == set(support)
    for w in support:
        assert got[w] == pytest.approx(est[w] / z, rel=2e-4)
    assert probs.sum() == pytest.approx(1.0, rel=1e-6)
    assert list(ids).count(3) == 1 and list(ids).count(6) == 1  # duplicates removed


def test_maxent_pmf_has_the_requested_mean():
    grid = L.probability_grid(50)
    means = jnp.array([0.02, 0.1, 0.37, 0.5, 0.9])
    got = jnp.sum(jnp.exp(L.max_entropy_log_pmf(means, grid)) * grid, -1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(means), rtol=1e-4)


def test_objective_matches_dense_numpy():
    rng = np.random.default_rng(3)
    s = (rng.normal(size=(2, 3, VOCAB)) * 2).astype(np.float32)
    labels = np.array([[1, 2, 3], [4, -100, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    prior = L.SparseDist(rng.permuted(np.tile(np.arange(4), (2, 3, 1)), axis=-1),
                         rng.dirichlet(np.ones(4), size=(2, 3)).astype(np.float32))
    post = L.SparseDist(np.tile(np.array([5, 1, -1]), (2, 3, 1)),
                        np.tile(np.array([0.25, 0.75, 0.0], np.float32), (2, 3, 1)))
    got = float(jax.jit(lambda x: L.bayesian_kd(x, labels, prior, post, mask, alpha=0.3, beta=0.8,
                                                temperature=1.5))(s))
    valid = mask & (labels >= 0)
    total = 0.0
    for b, t in zip(*np.nonzero(valid)):
        z = s[b, t].astype(np.float64)
        lq1 = z - np.log(np.exp(z - z.max()).sum()) - z.max()
        zt = z / 1.5
        lqt = zt - np.log(np.exp(zt - zt.max()).sum()) - zt.max()
        kl = lambda d: sum(p * (np.log(p) - lqt[i]) for i, p in zip(d.ids[b, t], d.probs[b, t]) if p > 0)  # noqa
        total += -lq1[labels[b, t]] + 0.3 * kl(prior) + 0.8 * kl(post)
    assert got == pytest.approx(total / valid.sum(), rel=1e-5)
    v, g = jax.jit(jax.value_and_grad(lambda x: L.bayesian_kd(x, labels, prior, post, np.zeros_like(mask))))(s)
    assert float(v) == 0.0 and bool(jnp.all(g == 0))


def test_end_to_end_pipeline_is_finite(corpus):
    prior_model = L.NgramPrior.from_corpus(corpus, n=N)
    tokens = np.stack([corpus[2][:8], corpus[3][:8]])
    prior = prior_model.prior(tokens)
    samples = L.sample_proxy_tokens(jax.random.PRNGKey(0), jnp.zeros(tokens.shape + (VOCAB,)), 8)
    assert samples.shape == tokens.shape + (8,)
    post = jax.jit(L.posterior_estimate)(prior, samples)
    s = jnp.asarray(np.random.default_rng(4).normal(size=tokens.shape + (VOCAB,)), jnp.bfloat16)
    v, g = jax.jit(jax.value_and_grad(lambda x: L.bayesian_kd(x, tokens, prior, post)))(s)
    assert v.dtype == jnp.float32 and np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
