"""Divergences on full logits: NumPy re-statements, hypothesis invariants, numerics edge cases."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from proxytune_jax.errors import UserError
from proxytune_jax import losses as L

# ---------------------------------------------------------------------------------------- NumPy reference


def np_log_softmax(x, t=1.0):
    z = np.asarray(x, np.float64) / t
    mx = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    e = np.exp(z - mx)
    return z - mx - np.log(e.sum(-1, keepdims=True))


def np_kl(p, r):
    """Σ p log(p/r) with 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(r)), 0.0)
    return terms.sum(-1)


def np_per_position(name, s, t, labels=None, temperature=1.0, **kw):
    p = np.exp(np_log_softmax(t, temperature))
    q = np.exp(np_log_softmax(s, temperature))
    if name == "forward_kl":
        return np_kl(p, q)
    if name == "reverse_kl":
        return np_kl(q, p)
    if name in ("js_divergence", "generalized_jsd"):
        b = kw.get("beta", 0.5)
        if b == 0:
            return np_kl(p, q)
        if b == 1:
            return np_kl(q, p)
        m = b * p + (1 - b) * q
        return b * np_kl(p, m) + (1 - b) * np_kl(q, m)
    if name == "tv_distance":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skew_forward_kl":
        a = kw.get("alpha", 0.1)
        return np_kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = kw.get("alpha", 0.1)
        return np_kl(q, (1 - a) * p + a * q)
    if name == "adaptive_kl":
        mu = kw.get("mu", 0.5)
        out = np.zeros(p.shape[:-1])
        for idx in np.ndindex(*p.shape[:-1]):
            order = np.argsort(p[idx], kind="stable")
            ps, qs = p[idx][order], q[idx][order]
            tail = np.cumsum(ps) < mu
            gap = np.abs(ps - qs)
            gh, gt = gap[~tail].sum(), gap[tail].sum()
            out[idx] = (gh * np_kl(p[idx], q[idx]) + gt * np_kl(q[idx], p[idx])) / (gh + gt)
        return out
    if name == "uld":
        ps, qs = -np.sort(-p, -1), -np.sort(-q, -1)
        w = max(ps.shape[-1], qs.shape[-1])
        pad = lambda a: np.concatenate([a, np.zeros(a.shape[:-1] + (w - a.shape[-1],))], -1)  # noqa: E731
        return np.abs(pad(ps) - pad(qs)).sum(-1)
    lq1 = np_log_softmax(s)
    ce = -np.take_along_axis(lq1, labels[..., None], -1)[..., 0]
    if name == "hinton_kd":
        a = kw.get("alpha", 0.5)
        return a * temperature ** 2 * np_kl(p, q) + (1 - a) * ce
    if name == "uld_kd":
        return ce + kw.get("weight", 1.5) * np_per_position("uld", s, t, temperature=temperature)
    raise KeyError(name)


def np_masked_mean(per, mask):
    m = mask.astype(np.float64)
    return float((per * m).sum() / max(m.sum(), 1.0))


NAMES = ["forward_kl", "reverse_kl", "js_divergence", "tv_distance", "skew_forward_kl", "skew_reverse_kl",
         "generalized_jsd", "adaptive_kl", "hinton_kd", "uld", "uld_kd"]
LABELLED = {"hinton_kd", "uld_kd"}


def call(name, s, t, mask=None, labels=None, **kw):
    if name in LABELLED:
        kw["labels"] = labels
    return getattr(L, name)(s, t, mask, **kw)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 4, 17)).astype(np.float32) * 2
    t = rng.normal(size=(3, 4, 17)).astype(np.float32) * 2
    mask = rng.random((3, 4)) < 0.7
    mask[0, 0] = True
    labels = rng.integers(0, 17, size=(3, 4))
    return s, t, mask, labels


HYPER = {"skew_forward_kl": [{"alpha": 0.1}, {"alpha": 0.0}, {"alpha": 0.5}],
         "skew_reverse_kl": [{"alpha": 0.1}, {"alpha": 0.0}, {"alpha": 0.5}],
         "generalized_jsd": [{"beta": 0.5}, {"beta": 0.0}, {"beta": 1.0}, {"beta": 0.2}],
         "adaptive_kl": [{"mu": 0.5}, {"mu": 0.3}],
         "hinton_kd": [{"alpha": 0.5}, {"alpha": 0.9}],
         "uld_kd": [{"weight": 1.5}]}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [2.0])  # τ = 1 is compared with NumPy in the edge-case tests below
def test_matches_numpy(name, temperature, data):
    s, t, mask, labels = data
    for kw in HYPER.get(name, [{}]):
        got = float(call(name, s, t, mask, labels, temperature=temperature, **kw))
        ref = np_masked_mean(np_per_position(name, s, t, labels, temperature, **kw), mask)
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-7), (name, kw)


def test_cross_entropy_matches_numpy_and_ignores_negative_labels(data):
    s, _, mask, labels = data
    labels = labels.copy()
    labels[1, 1] = -100
    ref_mask = mask & (labels >= 0)
    ce = -np.take_along_axis(np_log_softmax(s), np.maximum(labels, 0)[..., None], -1)[..., 0]
    assert float(L.cross_entropy(s, labels, mask)) == pytest.approx(np_masked_mean(ce, ref_mask), rel=1e-5)


def test_uld_across_vocabularies():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(5, 11)).astype(np.float32)
    t = rng.normal(size=(5, 19)).astype(np.float32)
    ref = np_per_position("uld", s, t).mean()
    assert float(L.uld(s, t)) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(UserError):
        L.forward_kl(s, t)


def test_forward_reverse_direction_convention(data):
    """forward_kl = KL(teacher ‖ student): its gradient at the student vanishes when student == teacher and
    it equals Σ p log p/q computed by hand for one row."""
    s, t, _, _ = data
    p = np.exp(np_log_softmax(t[0, 0]))
    q = np.exp(np_log_softmax(s[0, 0]))
    assert float(L.forward_kl(s[0, 0], t[0, 0])) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-5)
    assert float(L.reverse_kl(s[0, 0], t[0, 0])) == pytest.approx(float(np.sum(q * np.log(q / p))), rel=1e-5)


# ------------------------------------------------------------------------------------------------ properties
V_PROP = 7
logit_rows = hnp.arrays(np.float32, (3, V_PROP), elements=st.floats(-8, 8, width=32))
DIVERGENCES = ["forward_kl", "reverse_kl", "js_divergence", "tv_distance", "skew_forward_kl", "skew_reverse_kl",
               "generalized_jsd", "adaptive_kl", "uld"]
JITTED = {n: jax.jit(getattr(L, n)) for n in DIVERGENCES}
GJSD_HALF = jax.jit(lambda s, t: L.generalized_jsd(s, t, beta=0.5))
PROP = settings(max_examples=20, deadline=None)


@PROP
@given(a=logit_rows, b=logit_rows)
def test_divergences_nonnegative_and_zero_on_equal(a, b):
    for name, f in JITTED.items():
        assert float(f(a, b)) >= -1e-6, name
        assert abs(float(f(a, a))) <= 1e-6, name


@PROP
@given(a=logit_rows, b=logit_rows)
def test_forward_kl_is_reverse_kl_with_arguments_swapped(a, b):
    fab = float(JITTED["forward_kl"](a, b))
    assert fab == pytest.approx(float(JITTED["reverse_kl"](b, a)), rel=1e-5, abs=1e-6)


@PROP
@given(a=logit_rows, b=logit_rows)
def test_js_symmetric_bounded_and_gjsd_half_is_js(a, b):
    js = float(JITTED["js_divergence"](a, b))
    assert js == pytest.approx(float(JITTED["js_divergence"](b, a)), rel=1e-5, abs=1e-7)
    assert js <= math.log(2) + 1e-6
    assert float(GJSD_HALF(a, b)) == pytest.approx(js, rel=1e-5, abs=1e-7)


@PROP
@given(a=logit_rows, b=logit_rows)
def test_tvd_in_unit_interval(a, b):
    v = float(JITTED["tv_distance"](a, b))
    assert -1e-7 <= v <= 1 + 1e-6


@PROP
@given(a=logit_rows, b=logit_rows, seed=st.integers(0, 2 ** 31 - 1))
def test_uld_invariant_to_vocab_permutations(a, b, seed):
    rng = np.random.default_rng(seed)
    pa, pb = rng.permutation(V_PROP), rng.permutation(V_PROP)
    # A permutation changes the softmax's summation order, so each float32 probability may move by an ulp or two
    # (~1e-7 absolute); the distance sums 2·V such differences, hence abs=1e-6 (1e-7 failed, by 1.3e-7, on
    # nearly equal rows whose true distance is 1.5e-3).
    assert float(JITTED["uld"](a[:, pa], b[:, pb])) == pytest.approx(float(JITTED["uld"](a, b)), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------- numerics
def _value_and_grad(name, s, t, mask=None, labels=None, **kw):
    return jax.value_and_grad(lambda x: call(name, x, t, mask, labels, **kw))(s)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_compute_in_fp32(name, data):
    s, t, mask, labels = data
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    got = call(name, sb, tb, mask, labels)
    assert got.dtype == jnp.float32
    ref = np_masked_mean(np_per_position(name, np.asarray(sb, np.float32), np.asarray(tb, np.float32), labels), mask)
    assert float(got) == pytest.approx(ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_logits_on_masked_vocab_equal_the_sliced_vocab(name, data):
    """-inf at the same vocab entries for student and teacher (e.g. padded embedding rows): finite value and
    gradient, equal to the loss on the vocabulary without those entries (ULD: up to the zero padding)."""
    s, t, mask, labels = data
    s2, t2 = s.copy(), t.copy()
    s2[..., -3:] = -np.inf
    t2[..., -3:] = -np.inf
    labels = np.minimum(labels, 13)
    v, g = _value_and_grad(name, s2, t2, mask, labels)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))
    assert float(v) == pytest.approx(float(call(name, s[..., :-3], t[..., :-3], mask, labels)), rel=1e-5, abs=1e-7)
    assert bool(jnp.all(g[..., -3:] == 0))


FINITE_WITH_ZERO_TEACHER_PROBS = ["forward_kl", "js_divergence", "tv_distance", "skew_forward_kl",
                                  "skew_reverse_kl", "generalized_jsd", "hinton_kd", "uld", "uld_kd"]


@pytest.mark.parametrize("name", FINITE_WITH_ZERO_TEACHER_PROBS)
def test_zero_teacher_probabilities(name, data):
    """Teacher mass exactly 0 on some tokens (where the student has mass): finite value and gradient, equal to
    the NumPy re-statement. (reverse KL / AKL are +inf there by definition: KL(q ‖ p) with p = 0 < q.)"""
    s, t, mask, labels = data
    t2 = t.copy()
    t2[..., :4] = -np.inf
    v, g = _value_and_grad(name, s, t2, mask, labels)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))
    ref = np_masked_mean(np_per_position(name, s, t2, labels), mask)
    assert float(v) == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_reverse_kl_is_infinite_where_the_teacher_has_no_mass(data):
    s, t, _, _ = data
    t2 = t.copy()
    t2[..., :4] = -np.inf
    assert float(L.reverse_kl(s, t2)) == np.inf


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_batch_is_zero_with_finite_gradient(name, data):
    s, t, _, labels = data
    s2 = np.full_like(s, -np.inf)  # garbage in padded rows must not matter
    t2 = np.full_like(t, np.nan)
    v, g = _value_and_grad(name, s2, t2, np.zeros(s.shape[:-1], bool), labels)
    assert float(v) == 0.0
    assert bool(jnp.all(g == 0))


@pytest.mark.parametrize("name", NAMES)
def test_masked_rows_are_ignored(name, data):
    s, t, mask, labels = data
    s2 = np.where(mask[..., None], s, np.nan).astype(np.float32)
    v, g = _value_and_grad(name, s2, t, mask, labels)
    assert float(v) == pytest.approx(float(call(name, s, t, mask, labels)), rel=1e-6)
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.where(mask[..., None], True, g == 0)))


@pytest.mark.parametrize("temperature", [0.05, 20.0])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_temperatures(name, temperature, data):
    s, t, mask, labels = data
    v, g = _value_and_grad(name, s * 3, t * 3, mask, labels, temperature=temperature)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))
    ref = np_masked_mean(np_per_position(name, s * 3, t * 3, labels, temperature), mask)
    assert float(v) == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_vocab_of_one(name):
    s = np.array([[0.3], [2.0]], np.float32)
    t = np.array([[-1.0], [5.0]], np.float32)
    v, g = _value_and_grad(name, s, t, None, np.zeros(2, np.int64))
    assert abs(float(v)) <= 1e-7 and bool(jnp.all(jnp.abs(g) <= 1e-7))  # mixtures: log(α + (1−α)) rounding


def test_vocab_128k_tiny_batch():
    rng = np.random.default_rng(3)
    v = 128256
    s = rng.normal(size=(2, v)).astype(np.float32) * 3
    t = rng.normal(size=(2, v)).astype(np.float32) * 3
    s[:, -256:] = -np.inf
    t[:, -256:] = -np.inf
    for name in ["forward_kl", "reverse_kl", "js_divergence", "adaptive_kl"]:
        val, g = _value_and_grad(name, s, t)
        assert bool(jnp.all(jnp.isfinite(g)))
        ref = np_masked_mean(np_per_position(name, s, t), np.ones(2, bool))
        assert float(val) == pytest.approx(ref, rel=1e-4), name


def test_user_errors(data):
    s, t, mask, labels = data
    with pytest.raises(UserError):
        L.forward_kl(s, t, mask, temperature=0.0)
    with pytest.raises(UserError):
        L.generalized_jsd(s, t, beta=1.5)
    with pytest.raises(UserError):
        L.forward_kl(s, t, mask[:, :2])
    with pytest.raises(UserError):
        L.forward_kl(s[:2], t)
    with pytest.raises(UserError):
        L.hinton_kd(s, t, labels=labels[:, :2])
