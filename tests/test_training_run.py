"""`proxytune train` end to end on tiny models: the example config with --set overrides, a real learning
signal on held-out data, metrics/config/checkpoints/export in the workdir, rerun = resume, config mistakes as
clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from proxytune_jax import cli
from proxytune_jax.errors import UserError
from proxytune_jax.training.config import TrainConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
DISTILL_CONFIG = REPO / "experiments" / "configs" / "distill_tiny.py"


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Share compiled steps between the runs of this module (and its subprocesses)."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jax_cache"))
    yield
    jax.config.update("jax_compilation_cache_dir", old)


def _rows(pairs):
    return [{"prompt": f"question: what is {a} plus {b}?", "response": f" answer: {a + b}"} for a, b in pairs]


@pytest.fixture(scope="module")
def run_setup(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    train_rows = _rows([(a, b) for a in range(8) for b in range(8) if (a + b) % 5])
    eval_rows = _rows([(a, b) for a in range(8) for b in range(8) if (a + b) % 5 == 0])
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    student = tiny_checkpoint("llama", seed=1)
    teacher = tiny_checkpoint("llama", seed=2, hidden_size=64, intermediate_size=96)
    args = ["train", "--config", str(DISTILL_CONFIG), "--no-progress",
            "--set", f"student={student}", "--set", f"teacher={teacher}",
            "--set", f"train_file={work / 'train.jsonl'}", "--set", f"eval_file={work / 'eval.jsonl'}",
            "--set", "max_length=40", "--set", "steps=300", "--set", "eval_every=300", "--set", "save_every=100",
            "--set", "log_every=50", "--set", "learning_rate=5e-3", "--workdir", str(work / "run")]
    return work, args


def test_distillation_lowers_held_out_loss_and_writes_the_workdir(run_setup, capsys):
    work, args = run_setup
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    run = work / "run"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {l["step"]: l for l in lines if "eval_loss" in l}
    assert sorted(evals) == [0, 300]
    before, after = evals[0]["eval_forward_kl"], evals[300]["eval_forward_kl"]
    print(f"held-out forward KL: {before:.4f} -> {after:.4f}")
    assert after < 0.6 * before, (before, after)  # held-out prompts: a real learning signal
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [50, 100, 150, 200, 250, 300]
    for l in train_lines:
        assert {"loss", "forward_kl", "ce", "learning_rate", "tokens_per_s", "grad_norm", "tokens"} <= set(l)
        assert l["tokens_per_s"] > 0 and l["learning_rate"] > 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 300 and saved["objective"] == "online_distillation" and saved["loss"] == "forward_kl"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["100", "200", "300"]
    assert "exported Hugging Face folder" in out
    # the export is a Hugging Face folder our loader (and transformers) read, with the tokenizer
    import proxytune_jax as pj
    from transformers import AutoTokenizer
    model = pj.load_pretrained(run / "final")
    assert AutoTokenizer.from_pretrained(run / "final").eos_token_id is not None
    from proxytune_jax.checkpoint import Checkpointer
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import MeshConfig, make_mesh
    from proxytune_jax.training.optim import OptimConfig, make_optimizer
    from proxytune_jax.training.state import abstract_train_state, split_params
    _, params = split_params(model)
    mesh = make_mesh(MeshConfig())
    abstract = abstract_train_state(jax.eval_shape(lambda p: p, params), make_optimizer(OptimConfig()),
                                    rules=partition_rules(model.config), mesh=mesh)
    with Checkpointer(run / "checkpoints") as ck:
        state, meta, step = ck.restore_latest(abstract)
    assert step == 300 and meta["data_position"]["epoch"] >= 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # export == last checkpoint


def test_rerun_resumes_and_changed_config_is_refused(run_setup, capsys):
    work, args = run_setup
    if not (work / "run" / "checkpoints" / "300").exists():
        pytest.fail("needs the run of the previous test")
    n_lines = len((work / "run" / "metrics.jsonl").read_text().splitlines())
    assert cli.main(args + ["--set", "steps=310", "--set", "eval_every=0"]) == 0  # extend a finished run
    out = capsys.readouterr().out
    assert "resumed from step 300" in out and "step 310/310" in out
    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == n_lines + 2 and json.loads(lines[-2])["step"] == 310  # train line, then eval line
    assert cli.main(args + ["--set", "steps=310", "--set", "learning_rate=1e-2"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "learning_rate" in err and "new --workdir" in err


def test_config_mistakes_are_clear_user_errors(tmp_path, capsys):
    cfg = TrainConfig(student="s", train_file="t")
    assert apply_overrides(cfg, ["steps=7", "pack=true", "loss_kwargs={\"beta\": 0.5}", "learning_rate=1e-3"]) == \
        TrainConfig(student="s", train_file="t", steps=7, pack=True, loss_kwargs={"beta": 0.5}, learning_rate=1e-3)
    with pytest.raises(UserError, match="unknown config field; fields are objective, student"):
        apply_overrides(cfg, ["stepz=3"])
    with pytest.raises(UserError, match="cannot read 'many' as int"):
        apply_overrides(cfg, ["steps=many"])
    with pytest.raises(UserError, match="write key=value"):
        apply_overrides(cfg, ["steps"])
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(UserError, match=r"must define `config = TrainConfig\(...\)`"):
        load_config(bad)
    broken = tmp_path / "broken.py"
    broken.write_text("config = TrainConfig(\n")
    with pytest.raises(UserError, match="failed to run: SyntaxError"):
        load_config(broken)
    with pytest.raises(UserError, match="objective 'distill' is unknown"):
        load_config(DISTILL_CONFIG, ["objective=distill"])
    with pytest.raises(UserError, match="online_distillation needs config.teacher"):
        load_config(DISTILL_CONFIG, ["teacher="])
    with pytest.raises(UserError, match="not divisible by grad_accum_steps"):
        load_config(DISTILL_CONFIG, ["grad_accum_steps=3"])
    assert cli.main(["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err
