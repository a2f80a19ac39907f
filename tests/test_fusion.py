"""Each fusion rule against a NumPy re-statement of its formula (docs/methods.md §1) on random logits, plus
invariants: traced hyperparameters (vmap over α), -inf handling without NaN, registry errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

from conftest import np_log_softmax, np_softmax
from proxytune_jax.decoding import fusion
from proxytune_jax.errors import UserError

B, V = 3, 40


def np_top_p_keep(logits, p):
    """Smallest set of top tokens whose mass reaches p (mass strictly before a token < p)."""
    keep = np.zeros(logits.shape, bool)
    for b, row in enumerate(np_softmax(logits)):
        order = np.argsort(-row, kind="stable")
        before = 0.0
        for i in order:
            if before < p or not keep[b].any():
                keep[b, i] = True
            before += row[i]
    return keep


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(B, V)).astype(np.float32) * 3 for _ in range(5)]


def run(name, xs, **params):
    p = fusion.resolve_params(name, params)
    return np.asarray(jax.jit(lambda xs, p: fusion.combine(name, xs, p))([jnp.asarray(x) for x in xs], p))


def test_proxy_tuning(logits):
    m, e, a = logits[:3]
    expected = np_log_softmax(m) + 0.7 * (np_log_softmax(e) - np_log_softmax(a))
    np.testing.assert_allclose(run("proxy_tuning", [m, e, a], alpha=0.7), expected, rtol=1e-5, atol=1e-4)
    # default α = 1, and the same softmax as the official code's raw-logit sum
    got = run("proxy_tuning", [m, e, a])
    np.testing.assert_allclose(np_softmax(got), np_softmax(m + e - a), atol=1e-5)


def test_eft_several_experts(logits):
    m, e1, a1, e2, a2 = logits
    w = np.array([0.5, 1.5], np.float32)
    expected = (np_log_softmax(m) + w[0] * (np_log_softmax(e1) - np_log_softmax(a1))
                + w[1] * (np_log_softmax(e2) - np_log_softmax(a2)))
    np.testing.assert_allclose(run("eft", logits, weights=w), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(UserError, match="needs hyperparameter"):
        fusion.resolve_params("eft", {})


def test_dexperts_truncates_base_before_combining(logits):
    m, e, a = logits[:3]
    keep = np_top_p_keep(m, 0.6)
    expected = np.where(keep, np_log_softmax(m), -np.inf) + 2.0 * (np_log_softmax(e) - np_log_softmax(a))
    got = run("dexperts", [m, e, a], filter_p=0.6)
    np.testing.assert_array_equal(np.isinf(got), ~keep)  # truncated tokens stay -inf
    np.testing.assert_allclose(got[keep], expected[keep], rtol=1e-5, atol=1e-4)
    assert 0 < keep.sum() < keep.size


def test_contrastive_decoding(logits):
    e, a = logits[:2]
    lam, plaus, tau = 0.8, 0.05, 0.5
    lp_e, lp_a = np_log_softmax(e), np_log_softmax(a / tau)
    p_e = np.exp(lp_e)
    head = p_e >= plaus * p_e.max(-1, keepdims=True)
    expected = np.where(head, lp_e - lam * lp_a, -np.inf)
    got = run("contrastive", [e, a], lam=lam, plausibility=plaus, amateur_temperature=tau)
    np.testing.assert_array_equal(np.isinf(got), ~head)
    np.testing.assert_allclose(got[head], expected[head], rtol=1e-5, atol=1e-4)


def test_small_large_direct_and_temperature(logits):
    s, l = logits[:2]
    np.testing.assert_allclose(run("small_large_direct", [s, l]), s + 0.5 * l, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(run("small_large_temperature", [s, l], lam=0.3, temperature=4.0),
                               s + 0.3 * l / 4.0, rtol=1e-6, atol=1e-5)


def test_small_large_low_confidence(logits):
    s, l = logits[:2]
    mask = (np_softmax(s) < 0.05).astype(np.float64)
    expected = s + 0.5 * mask * l
    np.testing.assert_allclose(run("small_large_low_confidence", [s, l], theta=0.05), expected, rtol=1e-5,
                               atol=1e-5)
    assert 0 < mask.sum() < mask.size


def np_kl_optimized(s, l, steps, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam by hand on KL(softmax(l) || softmax(z)); d/dz = softmax(z) - softmax(l) per row."""
    z = s.astype(np.float64).copy()
    p = np_softmax(l)
    m = np.zeros_like(z)
    v = np.zeros_like(z)
    for t in range(1, steps + 1):
        g = np_softmax(z) - p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        z = z - lr * mh / (np.sqrt(vh) + eps)
    return z


def test_small_large_kl_optimized_logits(logits):
    s, l = logits[:2]
    got = run("small_large_kl", [s, l], steps=7, lr=0.2)
    np.testing.assert_allclose(got, np_kl_optimized(s, l, 7, 0.2), rtol=1e-4, atol=1e-4)
    # more steps -> closer to the large model
    kl = lambda z: np.sum(np_softmax(l) * (np_log_softmax(l) - np_log_softmax(z)))
    assert kl(run("small_large_kl", [s, l], steps=30)) < kl(got) < kl(s)


def test_hyperparameters_are_traced_vmap_over_alpha(logits):
    m, e, a = [jnp.asarray(x) for x in logits[:3]]
    alphas = jnp.asarray([0.0, 0.5, 2.0])
    f = jax.jit(jax.vmap(lambda al: fusion.combine("proxy_tuning", [m, e, a], {"alpha": al})))
    out = np.asarray(f(alphas))
    for i, al in enumerate([0.0, 0.5, 2.0]):
        np.testing.assert_allclose(out[i], run("proxy_tuning", logits[:3], alpha=al), rtol=1e-5, atol=1e-4)


_JITTED = {name: jax.jit(lambda xs, p, name=name: fusion.combine(name, xs, p)) for name in fusion.FUSION_RULES}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.0, 3.0), st.integers(1, V - 1))
def test_no_nan_with_masked_ids(seed, alpha, n_masked):
    """-inf logits (masked / impossible ids) never turn into NaN, for any rule reading them."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(2, V)).astype(np.float32) for _ in range(3)]
    masked = rng.permutation(V)[:n_masked]
    for x in xs:
        x[:, masked] = -np.inf
    for name in ("proxy_tuning", "dexperts", "contrastive", "small_large_direct", "small_large_kl"):
        rule = fusion.get_rule(name)
        params = {"alpha": alpha} if "alpha" in rule.defaults else {}
        out = np.asarray(_JITTED[name]([jnp.asarray(x) for x in xs[: len(rule.roles)]],
                                       fusion.resolve_params(name, params)))
        assert not np.isnan(out).any(), name
        assert np.isfinite(out).any(axis=-1).all(), name  # some token stays possible
        assert np.isneginf(out[:, masked]).all(), name


def test_registry_errors():
    with pytest.raises(UserError, match="unknown fusion rule"):
        fusion.get_rule("nope")
    with pytest.raises(UserError, match="no hyperparameter"):
        fusion.resolve_params("proxy_tuning", {"beta": 1.0})
    with pytest.raises(UserError, match="not finite"):
        fusion.resolve_params("proxy_tuning", {"alpha": float("nan")})
    with pytest.raises(UserError, match="takes models"):
        fusion.combine("proxy_tuning", [jnp.zeros((1, 4))] * 2, {"alpha": jnp.float32(1)})
    # adding a rule is one decorated function
    @fusion.register("test_only_max", roles=("a", "b"), inputs="logits")
    def _max(xs, params):
        return jnp.maximum(xs[0], xs[1])
    try:
        out = fusion.combine("test_only_max", [jnp.zeros((1, 3)), jnp.ones((1, 3))], {})
        np.testing.assert_array_equal(np.asarray(out), np.ones((1, 3)))
    finally:
        del fusion.FUSION_RULES["test_only_max"]


def test_combine_fills_each_rules_defaults_and_refuses_unknown_names():
    """`combine(rule, logits, {})` uses the rule's own defaults (it used to raise KeyError); an unknown name is
    a UserError naming the rule's hyperparameters."""
    from proxytune_jax.errors import UserError
    checked = 0
    for name, rule in fusion.FUSION_RULES.items():
        xs = [jax.random.normal(jax.random.key(i), (2, 7)) for i in range(len(rule.roles))]
        if rule.required:
            continue
        np.testing.assert_array_equal(np.asarray(fusion.combine(name, xs, {})),
                                      np.asarray(fusion.combine(name, xs, dict(rule.defaults))))
        checked += 1
    assert checked >= 5
    xs = [jax.random.normal(jax.random.key(i), (2, 7)) for i in range(3)]
    with pytest.raises(UserError, match="has no hyperparameter.*alpha"):
        fusion.combine("proxy_tuning", xs, {"alfa": 1.0})
