"""TAID (Shing et al. 2025): the loss and the adaptive schedule against an independent transcription of the
released PyTorch code (SakanaAI/TAID ``src/distil_losses/taid.py`` + ``fkl.py``), written here in NumPy and
plain Python floats, and the ``taid`` objective's schedule carried through ``training.fit``."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax, np_softmax
from proxytune_jax.losses import LOSSES, taid_loss, taid_schedule_init, taid_schedule_update


def released_taid_loss(s, z, mask, t):
    """``compute_loss``: p_t = softmax((1−t)·s + t·z); ``forward_kl(logits=s, teacher_probs=p_t, mask)`` =
    −Σ_pos m·Σ_v p_t·log_softmax(s) / Σ m."""
    p_t = np_softmax((1 - t) * np.asarray(s, np.float64) + t * np.asarray(z, np.float64))
    x = np.sum(p_t * np_log_softmax(s), axis=-1)
    m = np.asarray(mask, np.float64)
    return -np.sum(x * m) / np.sum(m)


class ReleasedSchedule:
    """``TAID.update_t`` of the released code with Python floats."""

    def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, disable_adaptive=False):
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.disable_adaptive = disable_adaptive
        self.t, self.prev_loss, self.momentum = t_start, math.inf, 0.0

    def update_t(self, loss, global_step, num_train_steps):
        if math.isinf(self.prev_loss):
            self.prev_loss = loss
            return
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        adaptive_delta = 1.0 / (1.0 + math.exp(-self.momentum))
        progress = global_step / num_train_steps
        t_target = self.t_start + (self.t_end - self.t_start) * progress
        delta_t = self.alpha * adaptive_delta * (1 - self.t)
        self.t = min(self.t_end, max(t_target, self.t + delta_t)) if not self.disable_adaptive else t_target
        self.prev_loss = loss


@pytest.mark.parametrize("t", [0.0, 0.4, 0.73, 1.0])
def test_taid_loss_matches_the_released_code(t):
    rng = np.random.default_rng(int(t * 100))
    s, z = rng.normal(size=(3, 5, 11)) * 2, rng.normal(size=(3, 5, 11)) * 3
    mask = rng.random((3, 5)) < 0.7
    got = float(taid_loss(jnp.asarray(s, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(mask), t=t))
    np.testing.assert_allclose(got, released_taid_loss(s, z, mask, t), rtol=2e-5)
    assert LOSSES["taid"].hyperparameters == {"t": 0.4, "temperature": 1.0}


def test_taid_gradient_is_the_kl_gradient_with_the_interpolated_teacher_detached():
    """d/ds of H(p_t, q) with p_t built on sg(s): (q − p_t)·m / Σm, per position (closed form)."""
    rng = np.random.default_rng(1)
    s, z = rng.normal(size=(4, 9)), rng.normal(size=(4, 9)) * 2
    mask = np.array([1, 0, 1, 1], bool)
    t = 0.6
    g = np.asarray(jax.grad(lambda x: taid_loss(x, jnp.asarray(z, jnp.float32), jnp.asarray(mask), t=t))(
        jnp.asarray(s, jnp.float32)))
    p_t = np_softmax((1 - t) * s + t * z)
    want = (np_softmax(s) - p_t) * mask[:, None] / mask.sum()
    np.testing.assert_allclose(g, want, atol=2e-6)


def test_taid_is_finite_for_minus_inf_logits_and_empty_masks():
    s = jnp.array([[0.0, -jnp.inf, 1.0], [2.0, 0.5, -jnp.inf]])
    z = jnp.array([[1.0, 3.0, -jnp.inf], [-jnp.inf, 0.0, 1.0]])
    for t in (0.4, 1.0):
        v, g = jax.value_and_grad(lambda x: taid_loss(x, z, None, t=t))(s)
        assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
    v, g = jax.value_and_grad(lambda x: taid_loss(x, z, jnp.zeros(2, bool), t=0.4))(s)
    assert float(v) == 0.0 and np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("adaptive", [True, False])
def test_schedule_matches_the_released_update(adaptive):
    """A loss curve with improvements, plateaus and a setback: t, step by step, equals the released rule."""
    rng = np.random.default_rng(3)
    losses = np.concatenate([np.linspace(5.0, 2.0, 40), 2.0 + 0.3 * rng.random(30), np.linspace(2.5, 0.5, 30)])
    kw = dict(t_start=0.2, t_end=0.95, alpha=0.05, beta=0.9)  # a fast alpha so the adaptive term matters
    ref = ReleasedSchedule(**kw, disable_adaptive=not adaptive)
    n = len(losses)
    update = jax.jit(lambda st, loss, step: taid_schedule_update(st, loss, step, n, **kw, adaptive=adaptive))
    state = taid_schedule_init(kw["t_start"])
    ts, ref_ts = [], []
    for step, loss in enumerate(losses):
        ref.update_t(float(np.float32(loss)), step, n)
        state = update(state, jnp.float32(loss), step)
        ts.append(float(state["taid_t"]))
        ref_ts.append(ref.t)
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-5, atol=1e-6)
    linear = kw["t_start"] + (kw["t_end"] - kw["t_start"]) * np.arange(1, n) / n
    if adaptive:  # the adaptive term really moved t above the linear floor somewhere
        assert np.max(np.asarray(ts[1:]) - linear) > 0.01
    else:
        np.testing.assert_allclose(ts[1:], linear, rtol=1e-5)


def test_taid_objective_carries_its_schedule_through_fit(tiny_checkpoint):
    """``fit`` with the ``taid`` objective (teacher logits with the data): the logged t of every step is what
    the released schedule gives for the logged losses, for each seed; the step's t reaches the loss."""
    import proxytune_jax as pj
    from proxytune_jax.training import TAID, OptimConfig, fit

    student = pj.load_pretrained(tiny_checkpoint("llama", seed=1))
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 300, size=(16, 10)).astype(np.int32)
    lm = np.zeros_like(ids)
    lm[:, 5:] = 1
    teacher_logits = (rng.normal(size=(16, 9, student.config.vocab_size)) * 3).astype(np.float16)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": lm, "teacher_logits": teacher_logits}
    objective = TAID(t_start=0.3, alpha=0.2, beta=0.5)
    res = fit(student, data, objective, steps=12, batch_size=4, optim=OptimConfig(learning_rate=3e-3),
              seeds=(0, 1), steps_per_call=4, progress=False)
    for seed in range(2):
        ref = ReleasedSchedule(t_start=0.3, alpha=0.2, beta=0.5)
        for step in range(12):
            assert res.metrics["taid_t"][seed, step] == pytest.approx(ref.t, rel=1e-5)
            ref.update_t(float(res.metrics["taid"][seed, step]), step, 12)
    assert res.metrics["taid_t"][0, -1] >= 0.3 + 0.7 * 10 / 12 - 1e-6  # the t of step 11: at least the floor


def test_taid_objective_refuses_bad_values_and_file_data_without_a_teacher():
    from proxytune_jax.errors import UserError
    from proxytune_jax.training import TAID
    from proxytune_jax.training.objectives import DataContext

    for bad in (dict(t_start=1.0), dict(t_start=0.5, t_end=0.4), dict(beta=1.0), dict(temperature=0.0)):
        with pytest.raises(UserError):
            TAID(**bad).validate()
    with pytest.raises(UserError, match="objective.teacher"):
        TAID().attach(DataContext("train", "data.jsonl", [], None))
    assert TAID().bind_run(50).total_steps == 50 and TAID(total_steps=7).bind_run(50).total_steps == 7
