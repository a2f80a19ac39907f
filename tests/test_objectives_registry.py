"""Objectives as registered strategies and the loss table: an objective written outside the package trains
through `proxytune train`; every table entry declares its hyperparameters as its function does; `training.fit`
with several seeds equals separate runs."""
from __future__ import annotations

import inspect
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import plus_rows, write_jsonl
from proxytune_jax import cli
from proxytune_jax.errors import UserError
from proxytune_jax.losses import LOSSES, LossSpec, get_loss, register_loss

# An objective written by a user, in a config file outside the package: cross-entropy minus β times the
# entropy of the prediction (a confidence penalty, Pereyra et al. 2017). One dataclass + one registration.
USER_CONFIG = textwrap.dedent('''
    import dataclasses
    from typing import ClassVar

    import jax
    import jax.numpy as jnp

    from proxytune_jax.training import (CheckpointConfig, DataConfig, ModelConfig, Objective, OptimConfig,
                                        TrainConfig, register_objective)
    from proxytune_jax.training.objectives import model_logits, shifted, token_cross_entropy


    @register_objective
    @dataclasses.dataclass(frozen=True)
    class ConfidencePenalty(Objective):
        name: ClassVar[str] = "confidence_penalty"
        beta: float = 0.1

        def loss_fn(self, student, frozen_graphdefs):
            def loss_fn(params, frozen, batch, rng, state):
                labels, mask = shifted(batch)
                logits = model_logits(student, params, batch)
                ce = token_cross_entropy(logits, labels, mask)
                logp = jax.nn.log_softmax(logits, -1)
                ent = -jnp.sum(jnp.exp(logp) * logp, -1)
                m = mask.astype(jnp.float32)
                entropy = jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)
                loss = ce - self.beta * entropy
                return loss, {"loss": loss, "ce": ce, "entropy": entropy, "tokens": jnp.sum(mask, dtype=jnp.int32)}
            return loss_fn


    config = TrainConfig(
        model=ModelConfig(student=STUDENT),
        data=DataConfig(train_file=TRAIN, max_length=24, batch_size=8),
        objective=ConfidencePenalty(beta=0.2),
        steps=24, optim=OptimConfig(learning_rate=1e-2, warmup_steps=2), checkpoint=CheckpointConfig(save_every=12),
        log_every=4, export=False)
''')


def test_an_objective_registered_outside_the_package_trains_and_resumes(tiny_checkpoint, tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", plus_rows(6))
    config = tmp_path / "my_objective.py"
    config.write_text(f"STUDENT = {str(tiny_checkpoint('llama', seed=1))!r}\n"
                      f"TRAIN = {str(tmp_path / 'train.jsonl')!r}\n" + USER_CONFIG)
    work = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--workdir", str(work), "--no-progress"]) == 0
    lines = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [4, 8, 12, 16, 20, 24]
    for l in lines:  # the objective's own terms reach the metrics, and they add up
        assert l["loss"] == pytest.approx(l["ce"] - 0.2 * l["entropy"], rel=1e-5, abs=1e-6)
    assert lines[-1]["ce"] < 0.7 * lines[0]["ce"]
    saved = json.loads((work / "config.json").read_text())
    assert saved["objective"] == {"name": "confidence_penalty", "beta": 0.2}
    # rerun with a longer budget: the file registers the objective again and the run resumes
    capsys.readouterr()
    assert cli.main(["train", "--config", str(config), "--workdir", str(work), "--no-progress",
                     "--set", "steps=28"]) == 0
    assert "resumed from step 24" in capsys.readouterr().out
    # a value of the user's objective is type-checked like the library's
    assert cli.main(["train", "--config", str(config), "--workdir", str(tmp_path / "w2"),
                     "--set", "objective.beta=high"]) == 2
    assert "cannot read 'high' as float" in capsys.readouterr().err


def test_every_loss_declares_the_hyperparameters_of_its_function():
    """The table is explicit; this checks it against the functions' signatures (names and defaults), so a
    declared default can never drift from the function's."""
    for name, spec in LOSSES.items():
        params = inspect.signature(spec.fn).parameters
        kw = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "labels"}
        assert kw == dict(spec.hyperparameters), name
        assert ("labels" in params) == spec.uses_labels, name
        if spec.per_position is not None:
            pp = inspect.signature(spec.per_position).parameters
            assert {k for k, p in pp.items() if p.kind is p.KEYWORD_ONLY} - {"labels"} == set(kw), name


def test_a_registered_loss_is_usable_by_name_and_misuse_is_refused():
    from proxytune_jax.training import OnlineDistillation

    def squared_prob_gap(student_logits, teacher_logits, mask=None, *, temperature=1.0):
        from proxytune_jax.losses import reduce_loss
        return reduce_loss(lambda s, t, *, temperature: jnp.sum(
            (jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature)) ** 2, -1),
            student_logits, teacher_logits, mask, temperature=temperature)

    spec = register_loss(LossSpec("squared_prob_gap_test", squared_prob_gap, {"temperature": 1.0}))
    try:
        terms = OnlineDistillation(teacher="t", loss="squared_prob_gap_test", loss_params={"temperature": 2}).terms()
        assert terms[0][0] is spec and terms[0][1] == {"temperature": 2.0}
        s, t = jax.random.normal(jax.random.key(0), (2, 3, 5, 11))
        np.testing.assert_allclose(float(spec(s, t, None, temperature=2.0)),
                                   np.mean(np.sum((jax.nn.softmax(s / 2) - jax.nn.softmax(t / 2)) ** 2, -1)),
                                   rtol=1e-6)
        with pytest.raises(UserError, match="already registered"):
            register_loss(LossSpec("squared_prob_gap_test", squared_prob_gap, {"temperature": 1.0}))
    finally:
        LOSSES.pop("squared_prob_gap_test")
    with pytest.raises(UserError, match="it has no per-position form"):
        get_loss("sinkd", per_position=True)


def test_fit_with_several_seeds_equals_separate_runs(tiny_checkpoint):
    """`training.fit` trains seeds together by vmap; each seed's model equals a run with that seed alone (the
    same updates up to float reassociation) and differs from the other seeds' (own data order)."""
    import proxytune_jax as pj
    from proxytune_jax.training import SFT, OptimConfig, fit

    model = pj.load_pretrained(tiny_checkpoint("llama", seed=1))
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 300, size=(40, 12)).astype(np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=2)
    kw = dict(steps=11, batch_size=8, optim=optim, steps_per_call=4, progress=False)
    both = fit(model, data, SFT(label_smoothing=0.1), seeds=(3, 5), **kw)
    alone = [fit(model, data, SFT(label_smoothing=0.1), seeds=(s,), **kw) for s in (3, 5)]
    assert both.metrics["loss"].shape == (2, 11)
    for i in range(2):
        np.testing.assert_allclose(both.metrics["loss"][i], alone[i].metrics["loss"][0], rtol=1e-5)
        # Adam divides by the gradient's scale, so reassociated float sums move near-zero-gradient weights by
        # up to ~1e-4 after 11 steps of lr 1e-2 (params move ~1e-1); another seed's run differs by far more.
        assert _max_diff(both.models[i], alone[i].model) < 1e-3
        assert _max_diff(both.models[i], alone[1 - i].model) > 2e-2
    assert not np.allclose(both.metrics["loss"][0], both.metrics["loss"][1])
    assert both.metrics["loss"][0, -1] < both.metrics["loss"][0, 0]


def _max_diff(m1, m2) -> float:
    from flax import nnx
    a, b = jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m2))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def test_objective_state_and_in_step_data_reach_the_loss(tiny_checkpoint):
    """The two hooks later objectives need: state carried in the train state (``init_state`` /
    ``update_state``: a step counter here, as TAID's schedule would be) and data made inside the step
    (``make_generate``: here a per-row weight drawn from the step's key). Both are seen by the loss every step."""
    import dataclasses
    from typing import ClassVar

    import proxytune_jax as pj
    from proxytune_jax.training import Objective, OptimConfig, fit
    from proxytune_jax.training.objectives import model_logits, shifted, token_cross_entropy

    @dataclasses.dataclass(frozen=True)
    class Counting(Objective):
        name: ClassVar[str] = "counting_test"

        def init_state(self):
            return {"seen": jnp.zeros((), jnp.float32)}

        def update_state(self, state, step, metrics):
            return {"seen": state["seen"] + 1.0}

        def make_generate(self, student, frozen_graphdefs):
            def generate(params, frozen, batch, rng):
                return {**batch, "row_weight": jax.random.uniform(rng, batch["input_ids"].shape[:1]) + 1.0}
            return generate

        def loss_fn(self, student, frozen_graphdefs):
            def loss_fn(params, frozen, batch, rng, state):
                labels, mask = shifted(batch)
                ce = token_cross_entropy(model_logits(student, params, batch), labels, mask)
                w = jnp.mean(batch["row_weight"])
                return w * ce, {"loss": w * ce, "ce": ce, "seen": state["seen"], "weight": w,
                                "tokens": jnp.sum(mask, dtype=jnp.int32)}
            return loss_fn

    model = pj.load_pretrained(tiny_checkpoint("llama", seed=1))
    ids = np.random.default_rng(0).integers(4, 300, size=(16, 10)).astype(np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    res = fit(model, data, Counting(), steps=6, batch_size=4, optim=OptimConfig(learning_rate=1e-3), seeds=(0, 1),
              steps_per_call=4, progress=False)
    np.testing.assert_array_equal(res.metrics["seen"], np.tile(np.arange(6.0), (2, 1)))
    w = res.metrics["weight"]
    assert np.all((w > 1.0) & (w < 2.0)) and len(np.unique(w)) == w.size  # a fresh draw every step and seed
    np.testing.assert_allclose(res.metrics["loss"], w * res.metrics["ce"], rtol=1e-6)
