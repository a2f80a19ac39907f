"""The memory-lean path: same value and gradient as the plain path, and no [N, V] array in its program."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxytune_jax import losses as L
from proxytune_jax.errors import UserError

B, T, D, DT, V = 2, 7, 6, 5, 33


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    hs = rng.normal(size=(B, T, D)).astype(np.float32)
    ws = (rng.normal(size=(D, V)) * 0.7).astype(np.float32).T.copy()  # [V, D] like lm_head.weight
    ht = rng.normal(size=(B, T, DT)).astype(np.float32)
    wt = (rng.normal(size=(DT, V)) * 0.9).astype(np.float32).T.copy()
    mask = rng.random((B, T)) < 0.7
    labels = rng.integers(0, V, size=(B, T))
    return hs, ws, ht, wt, mask, labels


REMAT_CHECKED = {"forward_kl", "hinton_kd", "adaptive_kl", "uld"}  # the remat variant on a subset (test time)
HYPER = {"skew_forward_kl": {"alpha": 0.2}, "generalized_jsd": {"beta": 0.3}, "hinton_kd": {"alpha": 0.6},
         "adaptive_kl": {"mu": 0.4}}


def _vg(fn, name, hs, ws, ht, wt, mask, labels, **kw):
    pos = {"position_args": {"labels": labels}} if L.LOSSES[name].uses_labels else {}
    kw = dict(HYPER.get(name, {}), temperature=1.5, **kw)
    return jax.jit(jax.value_and_grad(lambda h, w: fn(name, h, w, ht, wt, mask, **pos, **kw), argnums=(0, 1)))(hs, ws)


@pytest.mark.parametrize("name", sorted(k for k, spec in L.LOSSES.items()
                                         if spec.per_position is not None and spec.teacher == "logits"))
def test_chunked_equals_plain_value_and_gradient(name, arrays):
    hs, ws, ht, wt, mask, labels = arrays
    v0, (gh0, gw0) = _vg(L.loss_from_hidden, name, hs, ws, ht, wt, mask, labels)
    fns = (L.chunked_loss, L.chunked_loss_remat) if name in REMAT_CHECKED else (L.chunked_loss,)
    for fn in fns:
        v, (gh, gw) = _vg(fn, name, hs, ws, ht, wt, mask, labels, chunk_size=4)  # 14 positions: ragged last chunk
        assert float(v) == pytest.approx(float(v0), rel=1e-5)
        np.testing.assert_allclose(np.asarray(gh), np.asarray(gh0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gw), np.asarray(gw0), rtol=1e-4, atol=1e-6)


def test_plain_path_is_the_logit_loss(arrays):
    hs, ws, ht, wt, mask, labels = arrays
    s, t = hs @ ws.T, ht @ wt.T
    assert float(L.loss_from_hidden("forward_kl", hs, ws, ht, wt, mask, temperature=2.0)) == pytest.approx(
        float(L.forward_kl(s, t, mask, temperature=2.0)), rel=1e-5)
    assert float(L.chunked_loss("hinton_kd", hs, ws, ht, wt, mask, position_args={"labels": labels})) == \
        pytest.approx(float(L.hinton_kd(s, t, mask, labels=labels)), rel=1e-5)


def test_uld_across_vocabularies_chunked(arrays):
    hs, ws, ht, wt, mask, _ = arrays
    wt2 = np.concatenate([wt, wt[:9]], axis=0)  # teacher vocab 42 != 33
    ref = float(L.uld(hs @ ws.T, ht @ wt2.T, mask))
    assert float(L.chunked_loss("uld", hs, ws, ht, wt2, mask, chunk_size=3)) == pytest.approx(ref, rel=1e-5)


def test_teacher_gradient_zero_in_fused_and_real_in_remat(arrays):
    hs, ws, ht, wt, mask, _ = arrays
    g_fused = jax.grad(lambda w: L.chunked_loss("forward_kl", hs, ws, ht, w, mask, chunk_size=4))(wt)
    assert bool(jnp.all(g_fused == 0))
    g_remat = jax.grad(lambda w: L.chunked_loss_remat("forward_kl", hs, ws, ht, w, mask, chunk_size=4))(wt)
    g_ref = jax.grad(lambda w: L.forward_kl(hs @ ws.T, ht @ w.T, mask))(wt)
    np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g_ref), rtol=1e-4, atol=1e-6)


def test_all_masked_bf16_and_user_errors(arrays):
    hs, ws, ht, wt, mask, _ = arrays
    none = np.zeros_like(mask)
    v, (gh, gw) = jax.value_and_grad(lambda h, w: L.chunked_loss("js_divergence", h, w, ht, wt, none),
                                     argnums=(0, 1))(hs, ws)
    assert float(v) == 0.0 and bool(jnp.all(gh == 0)) and bool(jnp.all(gw == 0))
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ws, ht, wt)]
    v, (gh, gw) = jax.value_and_grad(lambda h, w: L.chunked_loss("forward_kl", h, w, bf[2], bf[3], mask,
                                                                 chunk_size=4), argnums=(0, 1))(bf[0], bf[1])
    ref = L.loss_from_hidden("forward_kl", *bf, mask)
    assert v.dtype == jnp.float32 and gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    assert float(v) == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(UserError):
        L.chunked_loss("nope", hs, ws, ht, wt)
    with pytest.raises(UserError):
        L.chunked_loss("forward_kl", hs, ws.T, ht, wt)


def _shapes_in_jaxpr(jaxpr):
    """Shapes of every value produced anywhere in a jaxpr, sub-jaxprs (scan, remat, custom_vjp, ...) included."""
    shapes = set()

    def visit(obj):
        if hasattr(obj, "jaxpr") and hasattr(obj.jaxpr, "eqns"):  # ClosedJaxpr
            obj = obj.jaxpr
        if hasattr(obj, "eqns"):
            shapes.update(_shapes_in_jaxpr(obj))
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o)

    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shapes.add(tuple(getattr(var.aval, "shape", ())))
        for p in eqn.params.values():
            visit(p)
    return shapes


def test_chunked_program_never_holds_full_logits():
    n, d, v = 64, 4, 1000
    hs, ws = jnp.ones((n, d)), jnp.ones((v, d))
    plain = jax.make_jaxpr(jax.value_and_grad(lambda h, w: L.loss_from_hidden("forward_kl", h, w, h, w), (0, 1)))
    chunked = jax.make_jaxpr(jax.value_and_grad(lambda h, w: L.chunked_loss("forward_kl", h, w, h, w,
                                                                            chunk_size=16), (0, 1)))
    remat = jax.make_jaxpr(jax.value_and_grad(lambda h, w: L.chunked_loss_remat("forward_kl", h, w, h, w,
                                                                               chunk_size=16), (0, 1)))
    assert (n, v) in _shapes_in_jaxpr(plain(hs, ws).jaxpr)
    for prog in (chunked, remat):
        shapes = _shapes_in_jaxpr(prog(hs, ws).jaxpr)
        assert (16, v) in shapes  # the chunk logits exist ...
        assert not any(len(s) >= 2 and s[-1] == v and np.prod(s[:-1]) >= n for s in shapes)  # ... nothing bigger
