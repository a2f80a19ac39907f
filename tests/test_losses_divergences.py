"""Divergences on full logits: NumPy re-statements, hypothesis invariants, numerics edge cases."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
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


def np_akl_head_weight(p, q, mu=0.5, ties="lower_id_first"):
    """Head weight ``s1/(s1+s2)`` of AKL, transcribed from the released code (Wu et al. 2024, arXiv 2404.02657;
    github.com/wutaiqiang/LLM_KD_AKL, ``AKL.py``, ``get_ratio``), in float64:

        re_teacher_probs, idx = teacher_probs.sort(dim=-1, descending=True)
        errors = |re_teacher_probs - student_probs.gather(idx)|
        mask = cumsum(re_teacher_probs) > mu;  mask[..., 0] = False     # mask = tail
        s1 = errors summed off the mask (head), s2 = on the mask (tail)

    Ties are broken by a stable sort (lower token id first; ``ties="higher_id_first"`` flips it, to show that
    the choice matters). ``s1 + s2 = 0`` (p == q) gives ½ here (the library's convention; released: 0/0).
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if ties == "lower_id_first":
        idx = np.argsort(-p, axis=-1, kind="stable")
    else:
        idx = p.shape[-1] - 1 - np.argsort(-p[..., ::-1], axis=-1, kind="stable")
    re_p, re_q = np.take_along_axis(p, idx, -1), np.take_along_axis(q, idx, -1)
    errors = np.abs(re_p - re_q)
    mask = np.cumsum(re_p, axis=-1) > mu
    mask[..., 0] = False
    s1 = np.where(mask, 0.0, errors).sum(-1)
    s2 = np.where(mask, errors, 0.0).sum(-1)
    denom = s1 + s2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, s1 / np.where(denom > 0, denom, 1.0), 0.5)


def np_akl_released(p, q, mu=0.5, ties="lower_id_first"):
    """Released AKL (``AKL.py``: ``get_kl(teacher, student)·h_ratio + get_kl(student, teacher)·l_ratio``)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    h = np_akl_head_weight(p, q, mu, ties)
    return h * np_kl(p, q) + (1.0 - h) * np_kl(q, p)


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
        return np_akl_released(p, q, kw.get("mu", 0.5))
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


# ------------------------------------------------------------------------------- AKL: the released head/tail split
def _probs(logits, temperature=1.0):
    return np.exp(np_log_softmax(logits, temperature))


def _log(p):
    return np.log(np.asarray(p, np.float64)).astype(np.float32)


AKL_PER = jax.jit(L.adaptive_kl_per_position)  # mu and temperature traced: one compile per shape


def test_akl_released_example():
    """p = [.4, .3, .2, .1], μ = 0.5: inclusive cumsums .4 | .7 .9 1 -> head = {0} (the old ascending `< μ` rule,
    one token off, put token 1 in the head too and gave 0.3595)."""
    p, q = [.4, .3, .2, .1], [.5, .05, .15, .3]
    ref = float(np_akl_released(p, q, 0.5))
    assert round(ref, 4) == 0.3230
    assert float(np_akl_head_weight(p, q, 0.5)) == pytest.approx(0.1 / 0.6)
    got = float(L.adaptive_kl(_log(q), _log(p), mu=0.5))
    assert got == pytest.approx(ref, rel=1e-5) and round(got, 4) == 0.3230


def test_akl_ties_straddling_mu_lower_id_first():
    """Four equal teacher probabilities (ids 1, 3, 4, 6) below the top token (id 5); μ cuts the tie group after
    0..3 of them: those in the head are the lowest ids. The student differs on the tied tokens, so the tie order
    changes the loss (checked against the reversed order)."""
    t = np.array([-1.0, 1.0, -2.0, 1.0, 1.0, 2.0, 1.0, -1.5], np.float32)
    s = np.array([0.0, 3.0, 0.0, 2.0, -3.0, 1.0, -2.0, 0.0], np.float32)
    p, q = _probs(t), _probs(s)
    tie = p[1]
    for n_in in range(4):
        mu = p[5] + (n_in + 0.5) * tie
        ref = float(np_akl_released(p, q, mu))
        assert float(L.adaptive_kl(s, t, mu=mu)) == pytest.approx(ref, rel=1e-5), n_in
        assert float(AKL_PER(s, t, mu=mu)) == pytest.approx(ref, rel=1e-5), n_in
        if n_in:
            assert abs(ref - float(np_akl_released(p, q, mu, ties="higher_id_first"))) > 1e-3


@pytest.mark.parametrize("mu", [0.0, 0.1, 0.5, 0.7])
def test_akl_ties_at_the_top(mu):
    """A uniform teacher (every token tied with the top one) and a teacher with two equal maxima: the head is a
    prefix of the ids (at least the lowest-id top token); vmapped (the tie branch becomes a select) == batched."""
    t = np.stack([np.zeros(5), [3.0, -1.0, 3.0, 0.0, 2.0], [0.0, 4.0, 1.0, 4.0, 4.0]]).astype(np.float32)
    s = np.stack([[1.0, -1.0, 2.0, 0.0, 0.5], [0.0, 2.0, -1.0, 1.0, 0.0], [2.0, 0.0, 1.0, -2.0, 1.0]]).astype(np.float32)
    ref = np_akl_released(_probs(t), _probs(s), mu)
    np.testing.assert_allclose(np.asarray(AKL_PER(s, t, mu=mu)), ref, rtol=1e-5, atol=1e-7)
    vm = jax.vmap(lambda a, b: L.adaptive_kl_per_position(a, b, mu=mu))(s, t)
    np.testing.assert_allclose(np.asarray(vm), ref, rtol=1e-5, atol=1e-7)


def test_akl_mu_zero_keeps_only_the_top_token_and_mu_one_is_forward_kl(data):
    s, t, mask, _ = data
    p, q = _probs(t), _probs(s)
    ref0 = np_akl_released(p, q, 0.0)
    gap = np.abs(p - q)
    top = np.take_along_axis(gap, np.argmax(p, -1)[..., None], -1)[..., 0]
    h = top / gap.sum(-1)  # μ = 0: the head is the top token alone
    np.testing.assert_allclose(ref0, h * np_kl(p, q) + (1 - h) * np_kl(q, p), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(AKL_PER(s, t, mu=0.0)), ref0, rtol=1e-5)
    assert float(L.adaptive_kl(s, t, mask, mu=0.0)) == pytest.approx(np_masked_mean(ref0, mask), rel=1e-5)
    # μ = 1: every inclusive cumsum is <= 1, so everything is head and AKL = forward KL.
    assert float(L.adaptive_kl(s, t, mask, mu=1.0)) == pytest.approx(float(L.forward_kl(s, t, mask)), rel=1e-6)
    pd = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])  # dyadic: the float64 cumsum is exact, its last entry is 1
    qd = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    assert float(np_akl_released(pd, qd, 1.0)) == pytest.approx(float(np_kl(pd, qd)), rel=1e-12)
    assert float(L.adaptive_kl(_log(qd), _log(pd), mu=1.0)) == pytest.approx(float(np_kl(pd, qd)), rel=1e-5)
    with pytest.raises(UserError):
        L.adaptive_kl(s, t, mu=1.5)
    with pytest.raises(UserError):
        L.adaptive_kl(s, t, mu=-0.1)


def test_akl_masked_positions_and_row_blocks():
    """75 rows (more than one CPU search block of 32, not a multiple of it: padded): masked rows (NaN logits)
    are ignored, the others match the released rule."""
    rng = np.random.default_rng(7)
    s = rng.normal(size=(5, 15, 40)).astype(np.float32) * 2
    t = rng.normal(size=(5, 15, 40)).astype(np.float32) * 3
    t[..., :3] = t[..., 3:4]  # some ties
    mask = rng.random((5, 15)) < 0.6
    ref = np_akl_released(_probs(t), _probs(s), 0.4)
    np.testing.assert_allclose(np.asarray(AKL_PER(s, t, mu=0.4)), ref, rtol=1e-5, atol=1e-7)
    s2 = np.where(mask[..., None], s, np.nan).astype(np.float32)
    t2 = np.where(mask[..., None], t, np.nan).astype(np.float32)
    v, g = jax.value_and_grad(lambda x: L.adaptive_kl(x, t2, mask, mu=0.4))(s2)
    assert float(v) == pytest.approx(np_masked_mean(ref, mask), rel=1e-5)
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.where(mask[..., None], True, g == 0)))


def test_akl_neg_inf_logits():
    """-inf logits (probability 0 for teacher and student alike) fall in the tail with zero gap: same value as
    the released rule on the probabilities, finite gradient, zero on those entries. A teacher -inf where the
    student has mass makes reverse KL, hence AKL, +inf."""
    rng = np.random.default_rng(11)
    s = rng.normal(size=(4, 12)).astype(np.float32)
    t = rng.normal(size=(4, 12)).astype(np.float32) * 2
    s[:, [0, 5]] = -np.inf
    t[:, [0, 5]] = -np.inf
    t[1, 7] = s[1, 7] = -np.inf
    ref = np_akl_released(_probs(t), _probs(s), 0.5)
    v, g = jax.value_and_grad(lambda x: L.adaptive_kl(x, t))(s)
    assert float(v) == pytest.approx(ref.mean(), rel=1e-5)
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g[:, [0, 5]] == 0)) and float(g[1, 7]) == 0.0
    t3 = t.copy()
    t3[2, 3] = -np.inf
    assert float(L.adaptive_kl(s, t3)) == np.inf


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_akl_matches_the_released_rule(data):
    """Random rows at V from 2 to 64 (teacher logits drawn from a few values half the time: many exact ties),
    μ in [0, 1], τ in {0.5, 1, 2.5}, against the float64 transcription. Rows are padded to V = 64 with -inf
    logits (zero probability: no effect, see test_akl_neg_inf_logits) so that one compile serves every V."""
    v = data.draw(st.integers(2, 64), label="V")
    few = st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0])
    t = data.draw(hnp.arrays(np.float32, (3, v), elements=data.draw(st.sampled_from([few, st.floats(-6, 6, width=32)]))))
    s = data.draw(hnp.arrays(np.float32, (3, v), elements=st.floats(-6, 6, width=32)))
    mu = data.draw(st.floats(0.0, 1.0), label="mu")
    temperature = data.draw(st.sampled_from([0.5, 1.0, 2.5]), label="temperature")
    p, q = _probs(t, temperature), _probs(s, temperature)
    cum = np.cumsum(-np.sort(-p, -1), -1)
    assume(bool(np.all(np.abs(cum - mu) > 1e-5)))  # μ not within rounding of a cumsum (float32 vs float64)
    pad = np.full((3, 64 - v), -np.inf, np.float32)
    got = np.asarray(AKL_PER(np.concatenate([s, pad], -1), np.concatenate([t, pad], -1),
                             temperature=temperature, mu=mu))
    np.testing.assert_allclose(got, np_akl_released(p, q, mu), rtol=2e-5, atol=2e-6)


def test_akl_gradient_is_the_frozen_weight_mix():
    """Gradient (student and teacher logits) = that of ``h·FKL + (1−h)·RKL`` with the released weights frozen,
    in float32 and in float64 (the float64 search runs on 64-bit keys)."""
    rng = np.random.default_rng(5)
    s = rng.normal(size=(6, 37)).astype(np.float32) * 2
    t = rng.normal(size=(6, 37)).astype(np.float32) * 2
    t[:, 10:14] = t[:, 20:21]
    tau, mu = 1.5, 0.4
    h = np_akl_head_weight(_probs(t, tau), _probs(s, tau), mu)

    def akl(x, y):
        return jnp.sum(L.adaptive_kl_per_position(x, y, temperature=tau, mu=mu))

    for dtype, rtol in [(np.float32, 2e-5), (np.float64, 1e-10)]:
        with jax.enable_x64(dtype == np.float64):
            x, y, hh = jnp.asarray(s, dtype), jnp.asarray(t, dtype), jnp.asarray(h, dtype)

            def frozen(a, b, hh=hh):
                return jnp.sum(hh * L.forward_kl_per_position(a, b, temperature=tau)
                               + (1 - hh) * L.reverse_kl_per_position(a, b, temperature=tau))

            v, (gs, gt) = jax.jit(jax.value_and_grad(akl, argnums=(0, 1)))(x, y)
            vr, (rs, rt) = jax.jit(jax.value_and_grad(frozen, argnums=(0, 1)))(x, y)
            assert v.dtype == dtype and bool(jnp.all(jnp.isfinite(gs))) and bool(jnp.all(jnp.isfinite(gt)))
            assert float(v) == pytest.approx(float(vr), rel=rtol)
            np.testing.assert_allclose(np.asarray(gs), np.asarray(rs), rtol=rtol, atol=rtol * 1e-2)
            np.testing.assert_allclose(np.asarray(gt), np.asarray(rt), rtol=rtol, atol=rtol * 1e-2)


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
