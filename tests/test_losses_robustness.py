"""Every full-logit loss of ``losses.LOSSES`` on hostile inputs: rows with a single finite logit, empty batches,
all-masked batches (finite value or +inf where the divergence really is infinite, and always a finite
gradient), and float hyperparameters traced under ``jit`` and ``vmap`` (equal to the Python-number call)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytune_jax.losses import LOSSES

FULL = sorted(k for k, s in LOSSES.items() if s.teacher == "logits")
SLOW = {"sinkhorn_ott"}  # an ott-jax solve per call: covered by the fixed cases, not the property sweep
V = 7


def _call(name, student, teacher, mask, **hyper):
    spec = LOSSES[name]
    extra = {"labels": jnp.zeros(student.shape[:-1], jnp.int32) + 2} if spec.uses_labels else {}
    return spec.fn(student, teacher, mask, **hyper, **extra)


@pytest.mark.parametrize("name", FULL)
def test_empty_and_all_masked_batches_give_zero_with_a_zero_gradient(name):
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.normal(size=(3, V)), jnp.float32) for _ in range(2))
    for ss, tt, m in ((s[:0], t[:0], jnp.zeros((0,), bool)), (s, t, jnp.zeros((3,), bool))):
        v, g = jax.value_and_grad(lambda x: _call(name, x, tt, m))(ss)
        assert float(v) == 0.0 and g.shape == ss.shape and np.all(np.asarray(g) == 0.0), name


@functools.lru_cache(maxsize=None)
def _jitted_value_and_grad(name):
    """value_and_grad of loss ``name`` in the student logits, jitted once (the examples share its shapes)."""
    return jax.jit(jax.value_and_grad(lambda x, t, m: _call(name, x, t, m)))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), keep_s=st.integers(1, V), keep_t=st.integers(1, V))
def test_rows_with_few_finite_logits_have_finite_gradients(seed, keep_s, keep_t):
    """Each row keeps ``keep`` finite logits at random ids (down to one), student and teacher independently:
    the value may be +inf (mass where the other side has none), never NaN; the gradient is always finite."""
    rng = np.random.default_rng(seed)

    def rows(keep):
        x = rng.normal(size=(4, V)) * 3
        for r in range(4):
            x[r, rng.permutation(V)[keep:]] = -np.inf
        return jnp.asarray(x, jnp.float32)

    s, t = rows(keep_s), rows(keep_t)
    mask = jnp.asarray([True, True, False, True])
    for name in FULL:
        if name in SLOW:
            continue
        v, g = _jitted_value_and_grad(name)(s, t, mask)
        assert not np.isnan(float(v)), name
        assert np.all(np.isfinite(np.asarray(g))), name


@pytest.mark.parametrize("name", FULL)
def test_float_hyperparameters_can_be_traced_under_jit_and_vmap(name):
    """A sweep over a hyperparameter is one ``vmap``; values (including the endpoints 0 and 1 of the unit-
    interval ones) equal the Python-number calls."""
    spec = LOSSES[name]
    rng = np.random.default_rng(1)
    s, t = (jnp.asarray(rng.normal(size=(3, V)), jnp.float32) for _ in range(2))
    floats = [k for k, v in spec.hyperparameters.items() if isinstance(v, float) and k != "threshold"]
    assert floats, name
    for key in floats:
        default = spec.hyperparameters[key]
        values = [0.0, 0.3, 1.0] if key in ("alpha", "beta", "mu", "t") else [default, default * 1.5]
        want = np.asarray([float(_call(name, s, t, None, **{key: v})) for v in values])
        jitted = jax.jit(lambda x: _call(name, s, t, None, **{key: x}))
        np.testing.assert_allclose([float(jitted(jnp.float32(v))) for v in values], want, rtol=1e-5, atol=1e-6)
        swept = jax.vmap(lambda x: _call(name, s, t, None, **{key: x}))(jnp.asarray(values, jnp.float32))
        np.testing.assert_allclose(np.asarray(swept), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["chunked_loss", "chunked_loss_remat"])
def test_the_chunked_path_takes_an_empty_batch(impl):
    from proxytune_jax import losses
    fn = getattr(losses, impl)
    h, w = jnp.zeros((0, 5, 8)), jnp.asarray(np.random.default_rng(2).normal(size=(11, 8)), jnp.float32)
    v, (gh, gw) = jax.value_and_grad(lambda x, y: fn("forward_kl", x, y, h, w), argnums=(0, 1))(h, w)
    assert float(v) == 0.0 and gh.shape == h.shape and np.all(np.asarray(gw) == 0.0)
