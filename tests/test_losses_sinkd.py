"""SinKD: the unrolled released algorithm vs a plain NumPy loop; the ott-jax form vs ott-jax called directly
and vs a NumPy Sinkhorn; the factor N between the two; masks and numerics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxytune_jax import losses as L


def np_softmax(x, t):
    z = np.asarray(x, np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_cdist_l1(x, y):
    out = np.zeros((len(x), len(y)))
    for i in range(len(x)):
        for j in range(len(y)):
            out[i, j] = np.abs(x[i] - y[j]).sum()
    return out


def np_released_sinkd(cost, eps=0.1, iters=20, weight=0.001):
    """The released code's loop, verbatim in NumPy: K = exp(-W/ε); rows then columns to sum 1."""
    P = np.exp(-cost / eps)
    for _ in range(iters):
        P = P / P.sum(axis=1, keepdims=True)
        P = P / P.sum(axis=0, keepdims=True)
    return weight * np.sum(P * cost)


def np_sinkhorn_uniform(cost, eps, iters=5000):
    """Log-domain Sinkhorn with uniform marginals 1/N to convergence; returns <P, C>."""
    n, m = cost.shape
    la, lb = np.full(n, -np.log(n)), np.full(m, -np.log(m))
    f, g = np.zeros(n), np.zeros(m)
    for _ in range(iters):
        f = eps * la - eps * np.logaddexp.reduce((g[None, :] - cost) / eps, axis=1)
        g = eps * lb - eps * np.logaddexp.reduce((f[:, None] - cost) / eps, axis=0)
    P = np.exp((f[:, None] + g[None, :] - cost) / eps)
    return float(np.sum(P * cost))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    s = (rng.normal(size=(2, 5, 9)) * 2).astype(np.float32)
    t = (rng.normal(size=(2, 5, 9)) * 2).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 1], [0, 1, 1, 1, 0]], bool)
    labels = rng.integers(0, 9, size=(2, 5))
    valid = mask.reshape(-1)
    return s, t, mask, labels, valid


def test_l1_cdist_matches_numpy_with_uneven_blocks():
    rng = np.random.default_rng(1)
    x, y = rng.random((7, 5)), rng.random((4, 5))
    got = L.l1_cdist(x.astype(np.float32), y.astype(np.float32), block_rows=3)
    np.testing.assert_allclose(np.asarray(got), np_cdist_l1(x, y), rtol=1e-5)


def test_sinkd_matches_released_numpy_loop(batch):
    s, t, mask, _, valid = batch
    for kw in [{}, {"temperature": 1.0, "epsilon": 0.05, "num_iters": 7, "weight": 0.0008}]:
        tau = kw.get("temperature", 2.0)
        ps = np_softmax(s.reshape(-1, 9)[valid], tau)
        pt = np_softmax(t.reshape(-1, 9)[valid], tau)
        ref = np_released_sinkd(np_cdist_l1(ps, pt), kw.get("epsilon", 0.1), kw.get("num_iters", 20),
                                kw.get("weight", 0.001))
        assert float(L.sinkd(s, t, mask, **kw)) == pytest.approx(ref, rel=1e-5)


def test_sinkd_regression_and_onehot_match_numpy(batch):
    s, t, mask, labels, valid = batch
    ys, yt = s[..., 0], t[..., 0]
    cost = np.abs(ys.reshape(-1)[valid][:, None].astype(np.float64) - yt.reshape(-1)[valid][None, :])
    assert float(L.sinkd_regression(ys, yt, mask)) == pytest.approx(np_released_sinkd(cost), rel=1e-5)
    ps = np_softmax(s.reshape(-1, 9)[valid], 2.0)
    onehot = np.eye(9)[labels.reshape(-1)[valid]]
    ref = np_released_sinkd(np_cdist_l1(ps, onehot))
    assert float(L.sinkd_onehot(s, labels, mask)) == pytest.approx(ref, rel=1e-5)


def test_sinkhorn_ott_matches_ott_called_directly(batch):
    from ott.geometry import costs, pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    s, t, mask, _, valid = batch
    ps = jax.nn.softmax(jnp.asarray(s.reshape(-1, 9)[valid]) / 2.0)
    pt = jax.nn.softmax(jnp.asarray(t.reshape(-1, 9)[valid]) / 2.0)
    geom = pointcloud.PointCloud(ps, pt, cost_fn=costs.PNormP(1), epsilon=0.1)
    out = sinkhorn.Sinkhorn(threshold=1e-6)(linear_problem.LinearProblem(geom))
    ref = float(jnp.sum(out.matrix * geom.cost_matrix))
    got = float(L.sinkhorn_ott(s, t, mask, threshold=1e-6))
    assert got == pytest.approx(ref, rel=1e-4)


def test_sinkhorn_ott_matches_numpy_sinkhorn_and_the_factor_n(batch):
    s, t, mask, _, valid = batch
    eps = 0.2
    cost = np_cdist_l1(np_softmax(s.reshape(-1, 9)[valid], 2.0), np_softmax(t.reshape(-1, 9)[valid], 2.0))
    ref = np_sinkhorn_uniform(cost, eps)
    got = float(L.sinkhorn_ott(s, t, mask, epsilon=eps, threshold=1e-7))
    assert got == pytest.approx(ref, rel=1e-4)
    n = int(valid.sum())
    converged = float(L.sinkd(s, t, mask, epsilon=eps, num_iters=500, weight=1.0))
    assert converged == pytest.approx(n * got, rel=1e-4)  # plan mass N vs 1


@pytest.mark.parametrize("fn", ["sinkd", "sinkhorn_ott"])
def test_empty_mask_and_garbage_rows(fn, batch):
    s, t, mask, _, _ = batch
    f = getattr(L, fn)
    none = np.zeros_like(mask)
    v, g = jax.jit(jax.value_and_grad(lambda x: f(x, t, none)))(np.full_like(s, -np.inf))
    assert float(v) == 0.0 and bool(jnp.all(g == 0))
    s2 = np.where(mask[..., None], s, np.nan).astype(np.float32)
    vg = jax.jit(jax.value_and_grad(lambda x: f(x, t, mask)))
    v2, g2 = vg(s2)
    assert float(v2) == pytest.approx(float(vg(s)[0]), rel=1e-6)
    assert bool(jnp.all(jnp.isfinite(g2)))


def test_small_epsilon_and_bf16_stay_finite(batch):
    """Log-space normalization: ε = 0.005 underflows exp(−W/ε) in the released linear-space loop."""
    s, t, mask, _, _ = batch
    v, g = jax.value_and_grad(lambda x: L.sinkd(x, t, mask, epsilon=0.005))(jnp.asarray(s, jnp.bfloat16))
    assert v.dtype == jnp.float32 and np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
