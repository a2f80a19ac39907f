"""Training LoRA adapters (``model.lora``, ``training.lora``): only the adapter is trained, held in the
optimizer state and the checkpoints; SFT and online distillation end to end from the CLI, every registered
objective's loss traced with a LoRA student, ``fit(lora=...)``; the PEFT export loads in peft."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import proxytune_jax as pj
from conftest import plus_rows, write_jsonl
from proxytune_jax import cli
from proxytune_jax.errors import UserError
from proxytune_jax.models import lora, peft_io
from proxytune_jax.training import OBJECTIVES, OptimConfig, SFT, fit
from proxytune_jax.training.config import apply_overrides, load_config
from proxytune_jax.training.lora import BASE_ROLE, wrap_generate, wrap_loss_fn

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("lora_run")
    rows = plus_rows(60)
    return work, write_jsonl(work / "train.jsonl", rows[:48]), write_jsonl(work / "eval.jsonl", rows[48:])


def _train_args(config, student, work, train, evalf, name, *extra):
    return ["train", "--config", str(REPO / "experiments" / "configs" / config), "--no-progress",
            "--set", f"model.student={student}", "--set", f"data.train_file={train}",
            "--set", f"data.eval_file={evalf}", "--set", "data.max_length=32", "--set", "steps=40",
            "--set", "eval_every=40", "--set", "checkpoint.save_every=20", "--set", "log_every=20",
            "--set", "optim.learning_rate=1e-2", "--set", "optim.warmup_steps=2", "--set", "steps_per_call=1",
            "--set", "model.lora.r=4", "--set", "model.lora.alpha=8",
            "--set", 'model.lora.target_modules=["q_proj","v_proj","up_proj","down_proj"]',
            "--workdir", str(work / name), *extra]


def test_sft_with_lora_trains_only_the_adapter_and_exports_peft(data_files, tiny_checkpoint, capsys):
    import torch
    peft = pytest.importorskip("peft")
    work, train, evalf = data_files
    student = tiny_checkpoint("llama", seed=1)
    assert cli.main(_train_args("sft_tiny.py", student, work, train, evalf, "sft")) == 0
    out = capsys.readouterr().out
    assert "LoRA r=4" in out and "PEFT folder" in out and "--expert-adapter" in out
    run = work / "sft"
    evals = {l["step"]: l for l in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in l}
    assert evals[40]["eval_loss"] < 0.8 * evals[0]["eval_loss"], evals  # the adapter learns
    assert json.loads((run / "config.json").read_text())["model"]["lora"]["r"] == 4

    # the checkpoint holds the adapter (and Adam's moments of it) only: no leaf of the base's size
    from proxytune_jax.checkpoint import Checkpointer
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import MeshConfig, make_mesh
    from proxytune_jax.training.optim import make_optimizer
    from proxytune_jax.training.state import abstract_train_state
    base = pj.load_pretrained(student, progress=False)
    params = nnx.to_pure_dict(nnx.split(base)[1])
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))
    shapes = jax.eval_shape(lambda: lora.init_lora(params, cfg, jax.random.key(0)))
    abstract = abstract_train_state(shapes, make_optimizer(OptimConfig(total_steps=1)),
                                    rules=partition_rules(base.config), mesh=make_mesh(MeshConfig()))
    with Checkpointer(run / "checkpoints") as ck:
        state, _, step = ck.restore_latest(abstract)
    assert step == 40
    n_adapter = lora.num_params(state.params)
    assert n_adapter == 2 * 4 * (32 + 32 + 32 + 16 + 32 + 64 + 64 + 32)  # 2 layers x (A + B) of 4 modules
    assert max(x.size for x in jax.tree.leaves(state.opt_state)) <= 64 * 4  # nothing of the base's size
    assert lora.num_params(state.opt_state) < 2.1 * n_adapter  # Adam's mu and nu (+ counters)

    # final/ is a PEFT folder: our load equals the checkpoint; peft + transformers give our logits
    adapter, cfg2 = peft_io.load_adapter(run / "final", params, base.config)
    assert (cfg2.r, cfg2.alpha, sorted(cfg2.target_modules)) == (4, 8.0, sorted(cfg.target_modules))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), adapter, state.params)
    from transformers import AutoModelForCausalLM
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                                         run / "final").eval()
    ids = np.random.RandomState(0).randint(3, 300, size=(2, 9))
    ours = np.asarray(lora.with_adapter(base, adapter, cfg)(jnp.asarray(ids))[0])
    with torch.no_grad():
        np.testing.assert_allclose(ours, ref(torch.tensor(ids)).logits.numpy(), atol=1e-4, rtol=0)
    assert (run / "final" / "tokenizer_config.json").is_file()

    # rerun = resume from the adapter-only checkpoint
    args = _train_args("sft_tiny.py", student, work, train, evalf, "sft", "--set", "steps=44")
    assert cli.main(args) == 0
    assert "resumed from step 40" in capsys.readouterr().out
    resumed, _ = peft_io.load_adapter(run / "final", params, base.config)
    assert not np.allclose(resumed["model"]["layers"][0]["mlp"]["up_proj"]["weight"]["lora_B"],
                           adapter["model"]["layers"][0]["mlp"]["up_proj"]["weight"]["lora_B"])


def test_online_distillation_with_a_lora_student(data_files, tiny_checkpoint):
    work, train, evalf = data_files
    student = tiny_checkpoint("llama", seed=1)
    teacher = tiny_checkpoint("llama", seed=2)
    assert cli.main(_train_args("distill_tiny.py", student, work, train, evalf, "distill",
                                "--set", f"objective.teacher={teacher}", "--set", "model.lora.dropout=0.1")) == 0
    evals = [l for l in map(json.loads, (work / "distill" / "metrics.jsonl").read_text().splitlines())
             if "eval_forward_kl" in l]
    assert evals[-1]["eval_forward_kl"] < 0.8 * evals[0]["eval_forward_kl"], evals
    assert (work / "distill" / "final" / peft_io.WEIGHTS_FILE).is_file()


def _batch(b=2, t=8, v=300, k=3):
    rng = np.random.RandomState(0)
    ids = rng.randint(3, v, size=(b, t)).astype(np.int32)
    ones = np.ones((b, t), np.int32)
    topk = np.stack([np.argsort(-rng.rand(b, t, v))[..., :k]]).reshape(b, t, k).astype(np.int32)
    logp = np.log(np.full((b, t, k), 0.2, np.float32))
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones,
            "teacher_logits": rng.randn(b, t - 1, v).astype(np.float32), "topk_ids": topk, "topk_logp": logp,
            "prior_ids": topk, "prior_probs": np.full((b, t, k), 0.2, np.float32)}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_differentiates_only_the_adapter(name, tiny_checkpoint):
    """Each registered objective's loss (and in-step generation) traced with a LoRA student: the gradient is a
    tree of the adapter's shapes (shape-level, no compile)."""
    model = pj.load_pretrained(tiny_checkpoint("llama", seed=1), progress=False)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    obj = OBJECTIVES[name]().bind_run(10)
    if name == "on_policy":
        obj = type(obj)(max_new_tokens=2)
    roles = obj.frozen_models()
    frozen = {role: params for role in roles}
    frozen_graphdefs = {role: graphdef for role in roles}
    cfg = lora.LoraConfig(r=2, dropout=0.1)
    adapter = lora.init_lora(params, cfg, jax.random.key(0))
    loss_fn = wrap_loss_fn(obj.loss_fn(graphdef, frozen_graphdefs), cfg)
    generate = wrap_generate(obj.make_generate(graphdef, frozen_graphdefs), cfg)
    frozen[BASE_ROLE] = params
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    key = jax.random.key(0)

    def grads(ad):
        b = batch if generate is None else generate(ad, frozen, batch, key)
        return jax.grad(lambda a: loss_fn(a, frozen, b, key, obj.init_state())[0])(ad)

    g = jax.eval_shape(grads, adapter)
    assert jax.tree.structure(g) == jax.tree.structure(adapter)
    assert [x.shape for x in jax.tree.leaves(g)] == [x.shape for x in jax.tree.leaves(adapter)]


def test_fit_with_lora_trains_the_adapter_per_seed(tiny_checkpoint):
    model = pj.load_pretrained(tiny_checkpoint("llama", seed=1), progress=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 300, size=(24, 10)).astype(np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    cfg = lora.LoraConfig(r=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
    res = fit(model, data, SFT(), steps=12, batch_size=8, optim=OptimConfig(learning_rate=2e-2), seeds=(0, 1),
              progress=False, lora=cfg)
    assert len(res.adapters) == 2 and res.metrics["loss"][0, -1] < res.metrics["loss"][0, 0]
    a0, a1 = (a["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]["lora_B"] for a in res.adapters)
    assert float(jnp.abs(a0).max()) > 0 and not np.allclose(a0, a1)
    w = res.models[0].model.layers[0].self_attn.q_proj.weight.get_value()
    assert isinstance(w, lora.LoraWeight)
    base_q = model.model.layers[0].self_attn.q_proj.weight.get_value()
    np.testing.assert_array_equal(np.asarray(w.weight), np.asarray(base_q))  # the base is untouched


def test_lora_config_mistakes_are_user_errors(data_files, tiny_checkpoint, capsys):
    config = REPO / "experiments" / "configs" / "sft_tiny.py"
    with pytest.raises(UserError, match="rank r must be an integer >= 1"):
        load_config(config, ["model.lora.r=0"])
    loaded = load_config(config, ["model.lora.r=4"])
    assert loaded.model.lora == lora.LoraConfig(r=4)
    assert apply_overrides(loaded, ["model.lora=null"]).model.lora is None
    work, train, evalf = data_files
    args = _train_args("sft_tiny.py", tiny_checkpoint("llama", seed=1), work, train, evalf, "bad",
                       "--set", 'model.lora.target_modules=["query"]')
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "match no linear layer" in err and "q_proj" in err and "Traceback" not in err
