"""Train steps: objectives against PyTorch/NumPy re-statements, gradient accumulation equal to the big-batch
step, the optimizer's schedule and decay mask, offline top-k caches lining up with batches."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import proxytune_jax as pj
from conftest import np_log_softmax, write_jsonl
from proxytune_jax.errors import UserError
from proxytune_jax.models import partition_rules
from proxytune_jax.sharding import MeshConfig, make_mesh, put_global_batch
from proxytune_jax.training.data import load_batches
from proxytune_jax.training.objectives import SFT, OnlineDistillation, OnlineDistillationChunked, shifted


def sft_objective(g):
    return SFT().loss_fn(g, {})


def online_distillation_objective(g, tg, **kw):
    return OnlineDistillation(teacher="t", **kw).loss_fn(g, {"teacher": tg})
from proxytune_jax.training.optim import OptimConfig, decay_mask, learning_rate_schedule, make_optimizer
from proxytune_jax.training.state import init_train_state, split_params, train_state_shardings
from proxytune_jax.training.step import make_train_step

ROWS = [{"prompt": f"question: what is {a} plus {b}?", "response": f" answer: {a + b}" + " ok" * ((a + 2 * b) % 5)}
        for a in range(6) for b in range(6)]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    from transformers import AutoTokenizer
    work = tmp_path_factory.mktemp("step")
    data_file = work / "train.jsonl"
    write_jsonl(data_file, ROWS)
    sdir = tiny_checkpoint("llama", seed=1)
    tdir = tiny_checkpoint("llama", seed=2, hidden_size=64, intermediate_size=96)
    tok = AutoTokenizer.from_pretrained(sdir)
    data = load_batches(data_file, tok, batch_size=8, max_length=40, seed=0)
    return dict(sdir=sdir, tdir=tdir, data=data, data_file=data_file, work=work, tok=tok,
                student=pj.load_pretrained(sdir), teacher=pj.load_pretrained(tdir))


def _torch_logits(torch_lm, path, batch):
    import torch
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    pos = torch.clamp(torch.cumsum(mask, -1) - 1, min=0)
    with torch.no_grad():
        out = torch_lm(path)(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return out.double().numpy()[:, :-1]


def test_sft_and_online_distillation_losses_match_torch_and_numpy(setup, torch_lm):
    batch = setup["data"].batch(0)
    g, params = split_params(setup["student"])
    tg, tparams = split_params(setup["teacher"])
    s_np, t_np = _torch_logits(torch_lm, setup["sdir"], batch), _torch_logits(torch_lm, setup["tdir"], batch)
    labels = batch["input_ids"][:, 1:]
    m = ((batch["loss_mask"][:, 1:] > 0) & (batch["attention_mask"][:, 1:] > 0)
         & (batch["attention_mask"][:, :-1] > 0)).astype(np.float64)
    assert m.sum() > 0
    ce = -(np.take_along_axis(np_log_softmax(s_np), labels[..., None], -1)[..., 0] * m).sum() / m.sum()
    tau = 2.0
    lp, lq = np_log_softmax(t_np / tau), np_log_softmax(s_np / tau)
    kl = ((np.exp(lp) * (lp - lq)).sum(-1) * m).sum() / m.sum()

    jb = jax.tree.map(jnp.asarray, batch)
    loss, metrics = jax.jit(sft_objective(g))(params, {}, jb, jax.random.PRNGKey(0), {})
    assert abs(float(loss) - ce) < 1e-5 * max(1, ce) and int(metrics["tokens"]) == int(m.sum())
    fn = online_distillation_objective(g, tg, loss="forward_kl", loss_params={"temperature": tau}, ce_weight=0.3,
                                       kd_weight=2.0)
    loss, metrics = jax.jit(fn)(params, {"teacher": tparams}, jb, jax.random.PRNGKey(0), {})
    assert abs(float(metrics["forward_kl"]) - kl) < 1e-5 * max(1, kl)
    assert abs(float(metrics["ce"]) - ce) < 1e-5 * max(1, ce)
    assert abs(float(loss) - (2.0 * kl + 0.3 * ce)) < 1e-5 * max(1, kl)


def test_teacher_gets_no_gradient_and_any_loss_name_resolves(setup):
    g, params = split_params(setup["student"])
    tg, tparams = split_params(setup["teacher"])
    jb = jax.tree.map(jnp.asarray, setup["data"].batch(1))
    fn = online_distillation_objective(g, tg, loss="generalized_jsd", loss_params={"beta": 0.3})
    grads = jax.jit(jax.grad(lambda p, t, b: fn(p, {"teacher": t}, b, jax.random.PRNGKey(0), {})[0],
                             argnums=(0, 1)))(params, tparams, jb)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(grads[1]))  # stop_gradient
    assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(grads[0]))
    hinton = online_distillation_objective(g, tg, loss="hinton_kd")  # mixes CE itself: gets labels
    assert np.isfinite(float(jax.jit(hinton)(params, {"teacher": tparams}, jb, jax.random.PRNGKey(0), {})[0]))
    with pytest.raises(UserError, match="loss 'nope' cannot be used here; choose one of: adaptive_kl.*forward_kl"):
        OnlineDistillation(teacher="t", loss="nope").validate()


def test_gradient_accumulation_equals_the_big_batch_step(setup):
    mesh = make_mesh(MeshConfig())
    g, params = split_params(setup["student"])
    rules = partition_rules(setup["student"].config)
    opt = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, grad_clip_norm=0.5))
    objective = sft_objective(g)
    for s in range(setup["data"].batches_per_epoch):
        batch = setup["data"].batch(s)
        _, mask = shifted(batch)
        if len({int(mask[j::4].sum()) for j in range(4)}) > 1:
            break  # unequal token counts per micro-batch: the weighting matters
    else:
        raise AssertionError("no batch with unequal micro-batch token counts")
    results = {}
    for accum in (1, 4):
        state = init_train_state(params, opt, rules=rules, mesh=mesh)
        sh = train_state_shardings(state, rules, mesh)
        step = make_train_step(objective, opt, mesh, state_shardings=sh, grad_accum_steps=accum)
        for s in range(2):
            state, metrics = step(state, put_global_batch(batch, mesh))
        results[accum] = (jax.device_get(state.params), {k: float(v) for k, v in metrics.items()})
    (p1, m1), (p4, m4) = results[1], results[4]
    assert m1["tokens"] == m4["tokens"] == int(mask.sum())
    for key in ("loss", "ce", "grad_norm"):
        assert abs(m1[key] - m4[key]) < 1e-5 * max(1, abs(m1[key])), key
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4))]
    assert max(diffs) < 1e-5  # Adam steps are ~1e-2 here; fp32 summation order differs
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params))]
    assert max(moved) > 1e-3  # the steps did move the params
    with pytest.raises(UserError, match="grad_accum_steps must be >= 1"):
        make_train_step(objective, opt, mesh, state_shardings=sh, grad_accum_steps=0)


def test_schedule_warmup_cosine_and_decay_mask():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 5e-4) < 1e-9 and abs(float(lr(10)) - 1e-3) < 1e-9
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 0.5))  # halfway through the cosine
    assert abs(float(lr(60)) - mid) < 1e-8 and abs(float(lr(110)) - 1e-4) < 1e-9
    params = {"model": {"norm": {"scale": jnp.ones(4)}, "layers": {0: {"q_proj": {"weight": jnp.ones((4, 4)),
                                                                               "bias": jnp.ones(4)}}}}}
    mask = decay_mask(params)
    assert mask["model"]["layers"][0]["q_proj"] == {"weight": True, "bias": False}
    assert mask["model"]["norm"]["scale"] is False
    with pytest.raises(UserError, match="warmup_steps"):
        learning_rate_schedule(OptimConfig(warmup_steps=20, total_steps=10))


def test_offline_topk_cache_lines_up_with_batches(setup, tmp_path):
    from flax import nnx
    from proxytune_jax.losses.first import topk_from_logits
    from proxytune_jax.training.topk_cache import TopKAttacher, build_topk_cache
    cache = build_topk_cache(setup["tdir"], setup["data_file"], tmp_path / "cache", k=4, batch_size=8)
    data = setup["data"]
    attach = TopKAttacher(cache, data.examples, name="train")
    batch = attach(data.batch(3))  # left-padded rows of shuffled examples
    tg, tparams = split_params(setup["teacher"])
    forward = jax.jit(lambda p, ids, m: topk_from_logits(nnx.merge(tg, p)(ids, m)[0], 5))  # k + 1: see the gaps
    direct = forward(tparams, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    real = batch["attention_mask"] > 0
    ids, logp = np.asarray(direct.ids)[real], np.asarray(direct.logp)[real]  # [N, 5]
    # The cache ran the teacher on other rows and padding, so float rounding differs: ids must agree except at
    # a genuine near-tie (a log-prob within 1e-4 of a neighbour's), where the order may swap.
    gap = np.full((len(ids), 4), np.inf)
    gap[:, 1:] = logp[:, :3] - logp[:, 1:4]
    gap = np.minimum(gap, logp[:, :4] - logp[:, 1:5])
    tied = gap < 1e-4
    assert tied.mean() < 0.01
    np.testing.assert_array_equal(batch["topk_ids"][real][~tied], ids[:, :4][~tied])
    np.testing.assert_allclose(batch["topk_logp"][real], logp[:, :4], atol=2e-3)  # float16
    assert np.allclose(np.exp(batch["topk_logp"][~real]).sum(-1), 1.0)  # pads: a harmless uniform entry
    other = load_batches(setup["data_file"], setup["tok"], batch_size=8, max_length=40)
    with pytest.raises(UserError, match="does not match"):
        TopKAttacher(cache, other.examples[:-1], name="train")


def _train_lines(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_offline_topk_and_bayesian_objectives_train(setup, tmp_path):
    from proxytune_jax.training import (Bayesian, CheckpointConfig, DataConfig, ModelConfig, OfflineTopK, OptimConfig,
                                        TrainConfig)
    from proxytune_jax.training.loop import train
    from proxytune_jax.training.topk_cache import build_topk_cache
    cache = build_topk_cache(setup["tdir"], setup["data_file"], tmp_path / "cache", k=5)
    # scored before and after on a fixed set (the training file itself: a fixed yardstick, not noisy batches)
    common = dict(model=ModelConfig(student=str(setup["sdir"])),
                  data=DataConfig(train_file=str(setup["data_file"]), eval_file=str(setup["data_file"]),
                                  max_length=40, batch_size=8),
                  steps=30, optim=OptimConfig(learning_rate=1e-2), log_every=5,
                  checkpoint=CheckpointConfig(save_every=30), eval_every=30, export=False)
    first = train(TrainConfig(objective=OfflineTopK(topk_cache=str(cache), eval_topk_cache=str(cache),
                                                    mode="tail_bucket", ce_weight=0.5), **common),
                  tmp_path / "first", progress=False)
    lines = _train_lines(tmp_path / "first")
    assert {"topk_kl", "ce", "loss"} <= set(lines[0])
    for l in lines:  # every term reported, and they add up to the objective
        assert abs(l["loss"] - (l["topk_kl"] + 0.5 * l["ce"])) < 1e-5 * max(1, l["loss"])
    evals = [json.loads(l) for l in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert [e["step"] for e in evals] == [0, 30]
    assert evals[1]["eval_topk_kl"] < 0.7 * evals[0]["eval_topk_kl"], evals
    assert first.eval_metrics == {k: v for k, v in evals[1].items() if k != "step"}

    train(TrainConfig(objective=Bayesian(proxy=str(setup["tdir"]), alpha=0.5, beta=0.25, posterior_bins=50),
                      **common), tmp_path / "bayes", progress=False)
    lines = _train_lines(tmp_path / "bayes")
    for l in lines:
        assert abs(l["loss"] - (l["ce"] + 0.5 * l["kl_prior"] + 0.25 * l["kl_posterior"])) < 1e-4 * max(1, l["loss"])
    evals = [json.loads(l) for l in (tmp_path / "bayes" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert evals[1]["eval_loss"] < 0.5 * evals[0]["eval_loss"], evals


def test_prior_of_a_padded_row_equals_the_prior_of_the_bare_example(setup):
    from proxytune_jax.losses.bayesian import NgramPrior
    from proxytune_jax.training.objectives import PriorAttacher
    data = setup["data"]
    prior = NgramPrior.from_corpus([e.ids for e in data.examples], n=2)
    batch = PriorAttacher(prior, gamma=2.0, support=8)(data.batch(2))
    order = data.order(0)[16:24]  # the examples of batch 2
    for row, i in enumerate(order):
        e = data.examples[i]
        n = min(len(e.ids), 40)
        bare = prior.prior(e.ids[:n], gamma=2.0, support=8)
        np.testing.assert_array_equal(batch["prior_ids"][row, 40 - n:], bare.ids)
        np.testing.assert_allclose(batch["prior_probs"][row, 40 - n:], bare.probs)
        assert (batch["prior_ids"][row, :40 - n] == -1).all() and (batch["prior_probs"][row, :40 - n] == 0).all()
        np.testing.assert_allclose(batch["prior_probs"][row, 40 - n:].sum(-1), 1.0, rtol=1e-5)


def test_chunked_online_distillation_equals_the_plain_objective(setup):
    g, params = split_params(setup["student"])
    tg, tparams = split_params(setup["teacher"])
    plain = online_distillation_objective(g, tg, loss="reverse_kl", loss_params={"temperature": 1.5})
    chunked = OnlineDistillationChunked(teacher="t", loss="reverse_kl", loss_params={"temperature": 1.5},
                                        chunk_size=48).loss_fn(g, {"teacher": tg})
    jb = jax.tree.map(jnp.asarray, setup["data"].batch(2))

    @jax.jit
    def both(p, t, b):  # arrays as arguments, never closed over
        return [jax.value_and_grad(fn, has_aux=True)(p, {"teacher": t}, b, jax.random.PRNGKey(0), {})
                for fn in (plain, chunked)]

    ((lp, mp), gp), ((lc, mc), gc) = both(params, tparams, jb)
    assert abs(float(lp) - float(lc)) < 1e-5 * max(1, abs(float(lp)))
    assert int(mp["tokens"]) == int(mc["tokens"]) and abs(float(mc["reverse_kl"]) - float(lc)) < 1e-7
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gc)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


def test_multi_step_is_the_single_step_scanned(setup):
    """make_multi_step over 3 stacked batches = 3 calls of the single step: per-step metrics and final params
    (same computation in a scan body; 1e-6 allows XLA to round differently there)."""
    from proxytune_jax.sharding import put_stacked_batches
    from proxytune_jax.training.step import make_multi_step
    mesh = make_mesh(MeshConfig())
    g, params = split_params(setup["student"])
    tg, tparams = split_params(setup["teacher"])
    rules = partition_rules(setup["student"].config)
    opt = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
    objective = online_distillation_objective(g, tg, loss="forward_kl", ce_weight=0.1)
    frozen = {"teacher": tparams}
    batches = [setup["data"].batch(s) for s in range(3)]
    out = {}
    for mode in ("single", "multi"):
        state = init_train_state(params, opt, rules=rules, mesh=mesh)
        step = make_train_step(objective, opt, mesh, state_shardings=train_state_shardings(state, rules, mesh),
                               frozen=frozen, learning_rate_fn=learning_rate_schedule(
                                   OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10)))
        if mode == "single":
            ms = []
            for b in batches:
                state, m = step(state, put_global_batch(b, mesh))
                ms.append({k: float(v) for k, v in m.items()})
        else:
            stacked = put_stacked_batches(batches, mesh)
            assert stacked["input_ids"].shape == (3,) + batches[0]["input_ids"].shape
            state, m = make_multi_step(step)(state, stacked)
            assert all(v.shape == (3,) for v in m.values())
            ms = [{k: float(v[j]) for k, v in m.items()} for j in range(3)]
        out[mode] = (jax.device_get(state), ms)
    (s1, m1), (s3, m3) = out["single"], out["multi"]
    assert int(s1.step) == int(s3.step) == 3
    for a, b in zip(m1, m3):
        assert a.keys() == b.keys() and {"loss", "forward_kl", "ce", "grad_norm", "learning_rate"} <= a.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    assert len({round(m["loss"], 6) for m in m1}) == 3  # three different batches
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s3.params))]
    assert max(diffs) < 1e-6
    np.testing.assert_array_equal(np.asarray(s1.rng), np.asarray(s3.rng))
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(params))]
    assert max(moved) > 1e-3


def test_put_stacked_batches_checks_shapes_and_divisibility():
    from proxytune_jax.sharding import put_stacked_batches
    mesh = make_mesh(MeshConfig())
    a, b = {"x": np.arange(8).reshape(4, 2)}, {"x": np.arange(8, 16).reshape(4, 2)}
    out = put_stacked_batches([a, b], mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), np.stack([a["x"], b["x"]]))
    assert out["x"].sharding.spec[0] is None  # the step axis is never split
    with pytest.raises(ValueError, match="differ in shape"):
        put_stacked_batches([a, {"x": np.zeros((2, 2))}], mesh)
    with pytest.raises(ValueError, match="at least one batch"):
        put_stacked_batches([], mesh)
