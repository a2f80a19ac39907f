"""The shared top-k + tail type (``proxytune_jax.topk.TopK``) against float64 NumPy, its use by FIRST's loss and
cache (empty slots, float16 rounding of the tail, the compressed storage) and by the Bayesian sparse KL."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import np_log_softmax
from proxytune_jax import losses as L
from proxytune_jax.topk import TopK, bytes_per_position


def test_from_logits_is_the_top_k_of_the_full_log_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 17)) * 3
    t = TopK.from_logits(jnp.asarray(x, jnp.float32), 5)
    lp = np_log_softmax(x)
    order = np.argsort(-lp, axis=-1, kind="stable")[..., :5]
    np.testing.assert_array_equal(np.asarray(t.ids), order)
    np.testing.assert_allclose(np.asarray(t.logp), np.take_along_axis(lp, order, -1), atol=1e-5)
    assert L.TopKTeacher is TopK and isinstance(L.SparseDist(np.array([1]), np.array([1.0])), TopK)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(1, 8), st.floats(0.1, 8.0), st.integers(0, 2**31 - 1),
       st.sampled_from([np.float32, np.float16]))
def test_tail_is_one_minus_the_listed_mass_and_never_nan_or_plus_inf(vocab, k, scale, seed, dtype):
    k = min(k, vocab)
    x = np.random.default_rng(seed).normal(size=(6, vocab)) * scale
    lp = np_log_softmax(x)
    ids = np.argsort(-lp, axis=-1)[:, :k]
    logp = np.take_along_axis(lp, ids, -1).astype(dtype)
    for t in (TopK(ids, logp), TopK(jnp.asarray(ids), jnp.asarray(logp))):
        tail = np.asarray(t.tail_logp(), np.float64)
        assert not np.any(np.isnan(tail)) and not np.any(tail == np.inf)
        want = 1.0 - np.exp(logp.astype(np.float64)).sum(-1)
        ok = want > 0  # (the float32 sum of the listed mass is exact to ~1e-7)
        np.testing.assert_allclose(np.exp(tail[ok]), want[ok], rtol=1e-3, atol=3e-7)
        assert np.all(np.exp(tail) <= 1.0 + 1e-6)


def test_float16_rounding_past_one_gives_an_empty_tail_and_finite_first_losses():
    """Listed float16 log-probs whose mass rounds above 1: the tail is exactly empty, the tail-bucket loss and
    its gradient are finite (they were +inf / NaN when 1 − Σ went negative)."""
    logp = np.log(np.array([[0.5, 0.3, 0.2002]], np.float64)).astype(np.float16)  # Σ > 1 after rounding
    assert np.exp(logp.astype(np.float64)).sum() > 1.0
    t = TopK(np.array([[3, 1, 0]], np.int32), logp)
    assert float(t.tail_logp()[0]) == -np.inf
    s = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6)), jnp.float32)
    v, g = jax.value_and_grad(lambda z: L.topk_kl(z, t, mode="tail_bucket"))(s)
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))


def test_dense_views_spread_or_drop_the_tail():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 11))
    t = TopK.from_logits(jnp.asarray(x, jnp.float32), 4)
    dense = np.asarray(t.to_log_probs(11), np.float64)
    np.testing.assert_allclose(np.exp(dense).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(dense, np.asarray(t.ids), -1), np.asarray(t.logp), atol=1e-6)
    lp = np_log_softmax(x)
    rest = np.ones_like(lp, bool)
    np.put_along_axis(rest, np.asarray(t.ids), False, -1)
    want_other = np.log((1 - np.exp(np.asarray(t.logp, np.float64)).sum(-1)) / 7)
    np.testing.assert_allclose(dense[rest].reshape(2, 3, 7), np.repeat(want_other[..., None], 7, -1), rtol=1e-4)
    drop = np.asarray(t.to_log_probs(11, tail="drop"))
    assert np.all(drop[rest] == -np.inf)
    np.testing.assert_allclose(np.exp(drop).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("mode", ["renormalize", "tail_bucket"])
def test_an_empty_slot_counts_as_no_entry(mode):
    """A teacher with k = 4 and one empty slot gives the loss of the same teacher with k = 3."""
    rng = np.random.default_rng(3)
    x, s = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    full = TopK.from_logits(jnp.asarray(x, jnp.float32), 3)
    ids = jnp.concatenate([full.ids[:, :2], -jnp.ones((5, 1), jnp.int32), full.ids[:, 2:]], -1)
    logp = jnp.concatenate([full.logp[:, :2], -jnp.inf * jnp.ones((5, 1)), full.logp[:, 2:]], -1)
    s = jnp.asarray(s, jnp.float32)
    a = L.topk_kl(s, full, mode=mode)
    b, g = jax.value_and_grad(lambda z: L.topk_kl(z, TopK(ids, logp), mode=mode))(s)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(g)))


def test_cache_stores_compressed_ids_keeps_empty_slots_and_reads_format_one(tmp_path):
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 300, size=(6, 3)).astype(np.int32)
    ids[2, 1] = -1
    logp = np.log(rng.dirichlet(np.ones(4), size=6)[:, :3]).astype(np.float32)
    logp[2, 1] = -np.inf
    with L.TopKCacheWriter(tmp_path / "c", k=3, vocab_size=300) as w:
        w.add(ids, logp)
    got = L.TopKCache(tmp_path / "c")[0]
    np.testing.assert_array_equal(got.ids, ids)
    assert os.path.getsize(tmp_path / "c" / "shard_00000.ids") + os.path.getsize(
        tmp_path / "c" / "shard_00000.logp") == 6 * bytes_per_position(3, 300) == 6 * 12
    assert bytes_per_position(20, 32000) == 80 and bytes_per_position(20, 128256) == 120
    # a cache written before (format 1: int32 ids) still reads
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    stored = ids.copy()
    (tmp_path / "c" / "shard_00000.ids").write_bytes(stored.astype("<i4").tobytes())
    index.update({"format": "proxytune_jax.first.topk/1", "ids_dtype": "<i4"})
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(L.TopKCache(tmp_path / "c")[0].ids, ids)


def test_sparse_kl_reads_the_shared_type():
    rng = np.random.default_rng(5)
    s = rng.normal(size=(4, 9))
    ids = np.array([[1, 4, -1], [0, 2, 3], [5, -1, -1], [8, 7, 6]], np.int32)
    probs = np.where(ids >= 0, rng.random(ids.shape), 0.0)
    probs = probs / probs.sum(-1, keepdims=True)
    target = L.SparseDist(ids, probs)
    np.testing.assert_allclose(target.probs, probs, rtol=1e-6)
    lq = np_log_softmax(s)
    want = np.mean([sum(p * (np.log(p) - lq[r, i]) for i, p in zip(ids[r], probs[r]) if i >= 0)
                    for r in range(4)])
    np.testing.assert_allclose(float(L.sparse_kl(jnp.asarray(s, jnp.float32), target)), want, rtol=1e-5)
