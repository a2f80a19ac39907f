"""On-policy distillation (GKD): the prompts cut out of a batch, the rollouts made inside the step (against a
brute-force greedy loop without a KV cache), the λ coin, and training through ``fit``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxytune_jax.decoding.rollout import append_rollout, prompts_of, rollout


def _batch():
    """Left-padded rows [pads | prompt | target] with different prompt and target lengths."""
    rows = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14]), ([15, 16, 17, 18], [19]), ([20], [])]
    width = 7
    ids, attn, lm = (np.zeros((4, width), np.int32) for _ in range(3))
    for i, (p, t) in enumerate(rows):
        seq = p + t
        ids[i, width - len(seq):] = seq
        attn[i, width - len(seq):] = 1
        lm[i, width - len(t):] = 1 if t else 0
    return rows, {"input_ids": ids, "attention_mask": attn, "loss_mask": lm}


def test_prompts_of_keeps_the_tokens_before_the_first_target_right_aligned():
    rows, batch = _batch()
    ids, mask = jax.jit(prompts_of)({k: jnp.asarray(v) for k, v in batch.items()})
    ids, mask = np.asarray(ids), np.asarray(mask)
    for i, (p, _) in enumerate(rows):
        assert ids[i][mask[i]].tolist() == p
        assert mask[i].tolist() == [False] * (7 - len(p)) + [True] * len(p)  # left-padded
        assert np.all(ids[i][~mask[i]] == 0)


def _greedy_brute_force(model, prompt: list[int], n: int, eos: int, width: int = 16) -> list[int]:
    """Greedy decoding by full forwards over the whole sequence (no cache), left-padded to one width so a
    single compiled forward serves every length."""
    from flax import nnx
    graphdef, params = nnx.split(model)
    forward = _jitted_forward(graphdef)
    seq, out = list(prompt), []
    for _ in range(n):
        ids = np.zeros((1, width), np.int32)
        mask = np.zeros((1, width), np.int32)
        ids[0, width - len(seq):], mask[0, width - len(seq):] = seq, 1
        logits = forward(params, jnp.asarray(ids), jnp.asarray(mask))
        tok = int(jnp.argmax(logits[0, -1]))
        out.append(tok)
        seq.append(tok)
        if tok == eos:
            break
    return out


_FORWARDS = {}


def _jitted_forward(graphdef):
    from flax import nnx
    if graphdef not in _FORWARDS:
        _FORWARDS[graphdef] = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m)[0])
    return _FORWARDS[graphdef]


@pytest.fixture(scope="module")
def models():
    from proxytune_jax.models import init_model, small_llama_config
    vocab, eos = 40, 3
    cfg = small_llama_config(vocab, 32, 2, 4, max_positions=32, eos_token_id=eos)
    student = init_model(cfg, seed=0)
    # make EOS likely after a few tokens so some rows stop early
    student.lm_head.weight[...] = student.lm_head.weight[...].at[eos].mul(4.0)
    teacher = init_model(small_llama_config(vocab, 48, 2, 4, max_positions=32, eos_token_id=eos), seed=1)
    return student, teacher, eos


def test_greedy_rollout_equals_a_brute_force_loop_and_the_new_rows_are_well_formed(models):
    from flax import nnx
    student, _, eos = models
    rows, batch = _batch()
    n = 6
    graphdef, params = nnx.split(student)
    pids, pmask = prompts_of({k: jnp.asarray(v) for k, v in batch.items()})
    out = jax.jit(lambda p, i, m: rollout(graphdef, p, i, m, jax.random.key(0), max_new_tokens=n,
                                          temperature=0.0))(params, pids, pmask)
    new = {k: np.asarray(v) for k, v in append_rollout(pids, pmask, out).items()}
    stopped_early = 0
    for i, (p, _) in enumerate(rows):
        want = _greedy_brute_force(student, p, n, eos)
        k = int(out.num_tokens[i])
        assert np.asarray(out.tokens[i, :k]).tolist() == want
        stopped_early += k < n
        assert new["input_ids"][i][new["attention_mask"][i] > 0].tolist() == p + want
        assert new["input_ids"][i][new["loss_mask"][i] > 0].tolist() == want
    assert stopped_early >= 1  # the EOS path is exercised


def test_the_student_fraction_decides_per_step_and_only_distillation_rows_get_samples(models):
    from flax import nnx
    from proxytune_jax.training import OnPolicyDistillation
    student, teacher, _ = models
    _, batch = _batch()
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["kd_rows"] = jnp.asarray([1, 1, 0, 1], jnp.int32)
    batch["ce_rows"] = 1 - batch["kd_rows"]
    sg, sp = nnx.split(student)
    tg, tp = nnx.split(teacher)
    n = 5

    def run(objective, key):
        gen = objective.make_generate(sg, {"teacher": tg})
        return jax.jit(gen)(sp, {"teacher": tp}, batch, key)

    # λ = 0 without seq_kd: supervised KD, nothing to generate
    assert OnPolicyDistillation(teacher="t", student_fraction=0.0).make_generate(sg, {"teacher": tg}) is None
    # λ = 1, greedy: the kd rows get the student's greedy continuation, the gold row keeps its target
    out = run(OnPolicyDistillation(teacher="t", student_fraction=1.0, max_new_tokens=n, temperature=0.0),
              jax.random.key(0))
    width = batch["input_ids"].shape[1]
    assert out["input_ids"].shape == (4, width + n)
    np.testing.assert_array_equal(np.asarray(out["input_ids"][2, :width]), np.asarray(batch["input_ids"][2]))
    np.testing.assert_array_equal(np.asarray(out["loss_mask"][2, :width]), np.asarray(batch["loss_mask"][2]))
    assert not np.any(np.asarray(out["attention_mask"][2, width:]))
    pids, _ = prompts_of(batch)
    np.testing.assert_array_equal(np.asarray(out["input_ids"][0, :width]), np.asarray(pids[0]))
    # seq_kd with λ = 0: the teacher's samples instead
    seq = run(OnPolicyDistillation(teacher="t", student_fraction=0.0, seq_kd=True, max_new_tokens=n,
                                   temperature=0.0), jax.random.key(0))
    assert not np.array_equal(np.asarray(seq["input_ids"]), np.asarray(out["input_ids"]))
    # λ = 0.3: over 200 steps' keys, the share of steps trained on student samples is λ (binomial, 4.5 sd)
    mixed = OnPolicyDistillation(teacher="t", student_fraction=0.3, max_new_tokens=n, temperature=1.0)
    gen = jax.jit(jax.vmap(lambda k: mixed.make_generate(sg, {"teacher": tg})(sp, {"teacher": tp}, batch, k)))
    outs = gen(jax.random.split(jax.random.key(1), 200))
    sampled = np.asarray(jnp.any(outs["loss_mask"][:, 0, width:] > 0, axis=-1))  # row 0: a kd row
    assert abs(sampled.mean() - 0.3) < 4.5 * np.sqrt(0.3 * 0.7 / 200)


def test_on_policy_trains_through_fit_and_refuses_bad_values(models):
    from proxytune_jax.errors import UserError
    from proxytune_jax.training import OnPolicyDistillation, OptimConfig, fit
    student, teacher, _ = models
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 40, size=(16, 9)).astype(np.int32)
    lm = np.zeros_like(ids)
    lm[:, 6:] = 1
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": lm}
    res = fit(student, data, OnPolicyDistillation(teacher="t", student_fraction=1.0, max_new_tokens=4,
                                                  loss="forward_kl"),
              steps=4, batch_size=4, optim=OptimConfig(learning_rate=1e-3), seeds=(0, 1), steps_per_call=2,
              frozen_models={"teacher": teacher}, progress=False)
    assert np.all(np.isfinite(res.metrics["loss"])) and np.all(res.metrics["forward_kl"] > 0)
    assert np.all(res.metrics["tokens"] <= 4 * 4)  # the sampled tokens (at most max_new_tokens per row)
    for bad in (dict(student_fraction=1.5), dict(max_new_tokens=0), dict(temperature=-1.0), dict(teacher="")):
        with pytest.raises(UserError):
            OnPolicyDistillation(**{"teacher": "t", **bad}).validate()
