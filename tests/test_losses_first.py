"""FIRST: top-k KL vs a NumPy re-statement, the memory-mapped sharded cache, temperature fitting, numerics."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax
from proxytune_jax import losses as L
from proxytune_jax.errors import UserError


def np_topk_kl(s, ids, logp, mask, tau, mode):
    out = []
    for idx in zip(*np.nonzero(mask)):
        lp = logp[idx].astype(np.float64)
        q = np.exp(np_log_softmax(s[idx]))
        if mode == "renormalize":
            t = np.exp(np_log_softmax(lp, tau))
            sq = q[ids[idx]] / q[ids[idx]].sum()
        else:
            tail = max(1.0 - np.exp(lp).sum(), 0.0)
            t = np.exp(np_log_softmax(np.append(lp, np.log(tail)), tau))
            sq = np.append(q[ids[idx]], 1.0 - q[ids[idx]].sum())
        out.append(np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - np.log(sq)), 0.0)))
    return float(np.sum(out) / max(mask.sum(), 1))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    s = (rng.normal(size=(2, 4, 23)) * 2).astype(np.float32)
    t = (rng.normal(size=(2, 4, 23)) * 3).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)
    return s, t, mask


@pytest.mark.parametrize("mode", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.5])
def test_topk_kl_matches_numpy(mode, tau, data):
    s, t, mask = data
    teacher = L.topk_from_logits(t, 5)
    ids, logp = np.asarray(teacher.ids), np.asarray(teacher.logp)
    # the top-k really are the largest full-vocabulary log-probs
    np.testing.assert_allclose(logp, np.sort(np_log_softmax(t), -1)[..., ::-1][..., :5], rtol=1e-5, atol=1e-6)
    got = float(L.topk_kl(s, teacher, mask, temperature=tau, mode=mode))
    assert got == pytest.approx(np_topk_kl(s, ids, logp, mask, tau, mode), rel=1e-5)
    assert got >= 0.0


def test_full_vocab_tail_bucket_is_forward_kl(data):
    s, t, mask = data
    teacher = L.topk_from_logits(t, 23)
    assert float(L.topk_kl(s, teacher, mask, mode="tail_bucket")) == pytest.approx(
        float(L.forward_kl(s, t, mask)), rel=1e-5)
    assert float(L.topk_kl(s, teacher, mask, mode="renormalize")) == pytest.approx(
        float(L.forward_kl(s, t, mask)), rel=1e-5)


def test_float16_teacher_logp_never_gives_negative_kl(data):
    """float16 rounding can push Σ top-k p above 1; the tail is clipped at 0, never the KL."""
    s, t, mask = data
    teacher = L.topk_from_logits(t * 4, 5)  # very peaked: Σ top-k ≈ 1
    t16 = L.TopKTeacher(teacher.ids, jnp.asarray(teacher.logp, jnp.float16))
    v, g = jax.jit(jax.value_and_grad(lambda x: L.topk_kl(x, t16, mask, mode="tail_bucket")))(s)
    assert float(v) >= 0 and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("mode", ["renormalize", "tail_bucket"])
def test_numerics_edge_cases(mode, data):
    s, t, mask = data
    teacher = L.topk_from_logits(t, 5)
    # -inf student logits outside the teacher's top-k (masked vocabulary)
    s2 = s.copy()
    out = np.ones(s.shape, bool)
    np.put_along_axis(out, np.asarray(teacher.ids), False, -1)
    s2[out & (np.arange(23) % 3 == 0)] = -np.inf
    v, g = jax.jit(jax.value_and_grad(lambda x: L.topk_kl(x, teacher, mask, mode=mode)))(s2)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))
    # all-masked batch with garbage rows
    v, g = jax.jit(jax.value_and_grad(lambda x: L.topk_kl(x, teacher, np.zeros_like(mask), mode=mode)))(
        np.full_like(s, np.nan))
    assert float(v) == 0.0 and bool(jnp.all(g == 0))
    # extreme teacher temperatures, bf16 student
    for tau in (0.05, 20.0):
        v, g = jax.jit(jax.value_and_grad(lambda x: L.topk_kl(x, teacher, mask, temperature=tau, mode=mode)))(
            jnp.asarray(s, jnp.bfloat16))
        assert v.dtype == jnp.float32 and np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    # vocabulary of one (k = 1)
    one = L.topk_from_logits(np.zeros((3, 1), np.float32), 1)
    v, g = jax.value_and_grad(lambda x: L.topk_kl(x, one, mode=mode))(np.ones((3, 1), np.float32))
    assert float(v) == 0.0 and bool(jnp.all(g == 0))
    with pytest.raises(UserError):
        L.topk_kl(s, teacher, mask, mode="clamp")


def test_cache_round_trip_is_sharded_and_memory_mapped(tmp_path, data):
    rng = np.random.default_rng(1)
    vocab, k = 23, 4
    seqs = [(rng.normal(size=(n, vocab)) * 2).astype(np.float32) for n in (5, 3, 9, 0, 4, 7)]
    with L.TopKCacheWriter(tmp_path / "cache", k=k, vocab_size=vocab, shard_positions=8) as w:
        for x in seqs[:3]:
            w.add_logits(x)
        t = L.topk_from_logits(seqs[3], k)
        w.add(t.ids, t.logp)
        batch = np.stack([np.pad(seqs[4], ((0, 3), (0, 0))), seqs[5]])
        bt = L.topk_from_logits(batch, k)
        w.add_batch(bt, np.array([[1] * 4 + [0] * 3, [1] * 7]))
    cache = L.TopKCache(tmp_path / "cache")
    assert len(cache) == 6 and len(cache.index["shards"]) >= 3
    assert all(s["positions"] <= 9 for s in cache.index["shards"])  # 8 per shard; a 9-long sequence alone
    for i, x in enumerate(seqs):
        got = cache[i]
        ref = L.topk_from_logits(x, k) if len(x) else None
        assert got.ids.shape == (len(x), k)
        if len(x):
            assert isinstance(got.logp, np.memmap) and got.ids.dtype == np.int32  # log-probs: a view
            np.testing.assert_array_equal(np.asarray(got.ids), np.asarray(ref.ids))
            np.testing.assert_array_equal(np.asarray(got.logp), np.asarray(ref.logp).astype(np.float16))
    assert os.path.getsize(tmp_path / "cache" / "shard_00000.ids") == 8 * k * 2  # raw uint16 (V < 65535)
    assert os.path.getsize(tmp_path / "cache" / "shard_00000.logp") == 8 * k * 2  # raw float16, no header
    assert cache.index["ids_dtype"] == "<u2"
    teacher, mask = cache.batch([2, 0, 1])
    assert teacher.ids.shape == (3, 9, k) and mask.sum(1).tolist() == [9, 5, 3]
    np.testing.assert_array_equal(teacher.ids[1, :5], np.asarray(cache[0].ids))
    # the loss runs straight from the cache batch (float16 log-probs)
    s = (rng.normal(size=(3, 9, vocab))).astype(np.float32)
    assert np.isfinite(float(L.topk_kl(s, L.TopKTeacher(teacher.ids, teacher.logp), mask)))


def test_cache_refuses_bad_input_and_incomplete_folders(tmp_path):
    w = L.TopKCacheWriter(tmp_path / "c", k=2, vocab_size=5)
    with pytest.raises(UserError):
        w.add(np.array([[0, 7]]), np.array([[-0.1, -2.0]]))
    with pytest.raises(UserError):
        w.add(np.array([[0, 1, 2]]), np.array([[-0.1, -2.0, -3.0]]))
    w.add(np.array([[0, 1]]), np.array([[-0.1, -2.5]]))
    with pytest.raises(UserError):
        L.TopKCache(tmp_path / "c")  # not closed yet: no index
    w.close()
    assert len(L.TopKCache(tmp_path / "c")) == 1
    with pytest.raises(UserError):
        L.TopKCacheWriter(tmp_path / "c", k=2, vocab_size=5)


def test_fit_temperature_recovers_a_known_temperature():
    """Tokens drawn from softmax(z); the teacher reports z·2 (over-confident). Fitting by held-out NLL must find
    τ ≈ 2: exactly with the full vocabulary, and with top-5 in renormalize mode (tempering top-k is exact
    conditionally on the top-k)."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(20000, 12)) * 1.5
    p = np.exp(np_log_softmax(z))
    y = (p.cumsum(-1) > rng.random((20000, 1))).argmax(-1)
    full = L.topk_from_logits(jnp.asarray(z * 2.0, jnp.float32), 12)
    assert L.fit_temperature(full, y, vocab_size=12) == pytest.approx(2.0, rel=0.05)
    top5 = L.topk_from_logits(jnp.asarray(z * 2.0, jnp.float32), 5)
    assert L.fit_temperature(top5, y, mode="renormalize") == pytest.approx(2.0, rel=0.05)
    under = L.topk_from_logits(jnp.asarray(z * 0.5, jnp.float32), 12)
    assert L.fit_temperature(under, y, vocab_size=12) == pytest.approx(0.5, rel=0.05)
