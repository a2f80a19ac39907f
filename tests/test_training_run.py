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
from filelock import FileLock

from proxytune_jax import cli
from proxytune_jax.errors import UserError
from proxytune_jax.training.config import TrainConfig, apply_overrides, load_config
from conftest import persistent_compilation_cache

REPO = Path(__file__).resolve().parents[1]
DISTILL_CONFIG = REPO / "experiments" / "configs" / "distill_tiny.py"


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Share compiled steps between the runs of this module (and its subprocesses)."""
    yield from persistent_compilation_cache(str(tmp_path_factory.getbasetemp() / "jax_cache"))


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
            "--set", f"model.student={student}", "--set", f"objective.teacher={teacher}",
            "--set", f"data.train_file={work / 'train.jsonl'}", "--set", f"data.eval_file={work / 'eval.jsonl'}",
            "--set", "data.max_length=40", "--set", "steps=300", "--set", "eval_every=300", "--set", "checkpoint.save_every=100",
            "--set", "log_every=50", "--set", "optim.learning_rate=5e-3", "--workdir", str(work / "run")]
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
    assert saved["steps"] == 300 and saved["objective"]["name"] == "online_distillation"
    assert saved["objective"]["loss"] == "forward_kl" and saved["optim"]["learning_rate"] == 5e-3
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
    abstract = abstract_train_state(jax.eval_shape(lambda p: p, params), make_optimizer(OptimConfig(total_steps=1)),
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
    n_lines = len(lines)
    assert cli.main(args + ["--set", "steps=310", "--set", "eval_every=0"]) == 0  # the finished run, rerun as is
    assert "eval: " in capsys.readouterr().out  # its final evaluation, read back
    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == n_lines  # ... not appended a second time
    assert cli.main(args + ["--set", "steps=310", "--set", "optim.learning_rate=1e-2"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "learning_rate" in err and "new --workdir" in err


def test_config_mistakes_are_clear_user_errors(tmp_path, capsys):
    from proxytune_jax.training import DataConfig, ModelConfig, OnlineDistillation, OptimConfig
    cfg = TrainConfig(model=ModelConfig(student="s"), data=DataConfig(train_file="t"),
                      objective=OnlineDistillation(teacher="x"))
    assert apply_overrides(cfg, ["steps=7", "data.pack=true", "objective.loss_params={\"beta\": 0.5}",
                                 "optim.learning_rate=1e-3", "objective.loss=generalized_jsd"]) == \
        TrainConfig(model=ModelConfig(student="s"), data=DataConfig(train_file="t", pack=True), steps=7,
                    objective=OnlineDistillation(teacher="x", loss="generalized_jsd", loss_params={"beta": 0.5}),
                    optim=OptimConfig(learning_rate=1e-3))
    assert apply_overrides(cfg, ["objective.loss_params.temperature=2"]).objective.loss_params == {"temperature": 2}
    with pytest.raises(UserError, match="unknown field 'stepz' of TrainConfig"):
        apply_overrides(cfg, ["stepz=3"])
    with pytest.raises(UserError, match="unknown field 'lr' of OptimConfig"):
        apply_overrides(cfg, ["optim.lr=3"])
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
        load_config(DISTILL_CONFIG, ["objective.name=distill"])
    with pytest.raises(UserError, match="online_distillation needs objective.teacher"):
        load_config(DISTILL_CONFIG, ["objective.teacher="])
    with pytest.raises(UserError, match="not divisible by grad_accum_steps"):
        load_config(DISTILL_CONFIG, ["grad_accum_steps=3"])
    with pytest.raises(UserError, match="loss generalized_jsd has no hyperparameter 'mu'"):
        load_config(DISTILL_CONFIG, ["objective.loss=generalized_jsd", "objective.loss_params={\"mu\": 1}"])
    with pytest.raises(UserError, match="cannot be used here .it needs a topk teacher"):
        load_config(DISTILL_CONFIG, ["objective.loss=topk_kl"])
    from proxytune_jax.training import DataContext, OfflineLogits
    with pytest.raises(UserError, match="offline_logits reads teacher logits stored with in-memory data"):
        OfflineLogits().attach(DataContext("train", "train.jsonl", [], None))
    assert cli.main(["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_files_are_type_checked(tmp_path):
    """A value of the wrong type in a config file is refused naming the field (a string "no" for a bool used to
    read as true)."""
    cases = {
        'data=DataConfig(train_file="t", pack="no")': "config data.pack: expected bool, got str 'no'",
        'data=DataConfig(train_file="t"), steps="10"': "config steps: expected int, got str '10'",
        'data=DataConfig(train_file="t"), optim=OptimConfig(learning_rate="1e-3")':
            "config optim.learning_rate: expected float, got str",
        'data=DataConfig(train_file="t"), objective="sft"': "config objective: expected an objective",
        'data=DataConfig(train_file="t"), objective=SFT(label_smoothing=True)':
            "config objective.label_smoothing: expected float, got bool",
        'data=DataConfig(train_file="t"), optim=OptimConfig(learning_rate=float("nan"))': "NaN is not a value",
    }
    for i, (fields, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.py"
        path.write_text("from proxytune_jax.training import *\n"
                        f'config = TrainConfig(model=ModelConfig(student="s"), {fields})\n')
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            load_config(path)


def test_a_work_dir_of_the_old_flat_config_is_refused(tmp_path, capsys):
    """A workdir written before the config tree (one flat TrainConfig) is refused with the way out, and its
    files are left as they were."""
    from proxytune_jax.training import DataConfig, ModelConfig
    from proxytune_jax.training.loop import train
    old = {"objective": "sft", "student": "s", "train_file": "t", "learning_rate": 3e-4, "steps": 10}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = TrainConfig(model=ModelConfig(student="s"), data=DataConfig(train_file="t"))
    with pytest.raises(UserError, match="older proxytune_jax .one flat TrainConfig.*new --workdir"):
        train(cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == old


def test_a_loss_keeps_its_own_hyperparameter_defaults():
    """The objective passes a loss only what the config sets: SinKD keeps its τ = 2 and AKL its μ; a set
    value reaches the loss unchanged."""
    from proxytune_jax.losses import LOSSES
    from proxytune_jax.training import OnlineDistillation
    terms = OnlineDistillation(teacher="t", loss="sinkd").terms()
    assert terms[0][1] == {"temperature": 2.0, "epsilon": 0.1, "num_iters": 20, "weight": 0.001}
    terms = OnlineDistillation(teacher="t", loss="sinkd", loss_params={"epsilon": 0.5}).terms()
    assert terms[0][1]["temperature"] == 2.0 and terms[0][1]["epsilon"] == 0.5
    assert OnlineDistillation(teacher="t", loss="adaptive_kl").terms()[0][1] == {"temperature": 1.0, "mu": 0.5}
    assert LOSSES["sinkd"].resolve({"num_iters": 5.0}) == {**LOSSES["sinkd"].hyperparameters, "num_iters": 5}
    with pytest.raises(UserError, match="expected an integer"):
        LOSSES["sinkd"].resolve({"num_iters": 2.5})
    with pytest.raises(UserError, match="expected a number"):
        LOSSES["forward_kl"].resolve({"temperature": True})
    with pytest.raises(UserError, match="not one of renormalize, tail_bucket"):
        LOSSES["topk_kl"].resolve({"mode": "both"})


# ------------------------------------------------------------------------ several steps per jitted call

@pytest.mark.parametrize("k", [2, 3, 5])
def test_call_lengths_end_on_every_save_and_eval_step(k):
    """Property over many loop settings: calls run k steps or 1, never past a checkpoint, an evaluation or the
    last step, and a run resumed at any checkpoint groups its steps exactly like the uninterrupted run."""
    from hypothesis import given, settings, strategies as st
    from proxytune_jax.training.trainer import call_length

    @settings(max_examples=60, deadline=None)
    @given(steps=st.integers(1, 60), save_every=st.integers(1, 20), eval_every=st.integers(0, 20),
           evaluating=st.booleans())
    def check(steps, save_every, eval_every, evaluating):
        cut = (save_every, eval_every if evaluating else 0)

        def ends(start):
            out, s = [], start
            while s < steps:
                n = call_length(s, steps, k, cut)
                assert n in (1, k)
                s += n
                out.append(s)
            assert s == steps
            return out

        full = ends(0)
        must = {s for s in range(1, steps + 1) if s % save_every == 0 or s == steps
                or (evaluating and eval_every and s % eval_every == 0)}
        assert must <= set(full)
        for ckpt in range(save_every, steps, save_every):  # resume at every checkpoint
            assert ends(ckpt) == [e for e in full if e > ckpt]
        # only the steps right before a cut run alone: at most k - 1 single steps per cut
        assert sum(1 for a, b in zip([0] + full, full) if b - a == 1 and k > 1) <= (k - 1) * len(must)

    check()


def test_steps_per_call_trains_exactly_like_single_steps(run_setup, tmp_path):
    """The same run with 1 and with 3 steps per jitted call: the same logged losses, evaluations, checkpoints
    and final params (the scan body is the step function; XLA may round differently, so 1e-6)."""
    from proxytune_jax.training.loop import train
    work, args = run_setup
    over = [a for a in args[args.index("--set"):args.index("--workdir")] if a != "--set"]
    results = {}
    for k in (1, 3):
        cfg = load_config(DISTILL_CONFIG, over + ["steps=14", "checkpoint.save_every=5", "eval_every=4",
                                                  "log_every=2", "checkpoint.keep=5", f"steps_per_call={k}",
                                                  "export=false"])
        res = train(cfg, tmp_path / f"k{k}", progress=False, return_state=True)
        lines = [json.loads(l) for l in (tmp_path / f"k{k}" / "metrics.jsonl").read_text().splitlines()]
        ckpts = sorted(int(p.name) for p in (tmp_path / f"k{k}" / "checkpoints").iterdir() if p.name.isdigit())
        results[k] = (res, lines, ckpts)
    (r1, l1, c1), (r3, l3, c3) = results[1], results[3]
    assert c1 == c3 == [5, 10, 14]
    assert [l["step"] for l in l1] == [l["step"] for l in l3]  # train lines every 2 steps, evals at 0, 4, 8, 12, 14
    assert [l["step"] for l in l1 if "eval_loss" in l] == [0, 4, 8, 12, 14]
    for a, b in zip(l1, l3):
        for key in ("loss", "forward_kl", "grad_norm", "learning_rate", "tokens", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
        if "tokens_per_s" in a:
            assert b["tokens_per_s"] > 0
    diffs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(r1.state.params), jax.tree.leaves(r3.state.params))]
    assert max(diffs) < 1e-6
    moved = [float(np.max(np.abs(np.asarray(x))) > 0) for x in jax.tree.leaves(r1.state.params)]
    assert all(moved)


def test_cpu_devices_flag_splits_the_batch_over_cpu_devices(run_setup, tmp_path):
    """`proxytune train --cpu-devices 2` in a fresh process: the mesh spans 2 CPU devices and the run matches
    the 1-device run of the previous test's settings to fp32 rounding."""
    import subprocess
    import sys
    work, args = run_setup
    over = [a for a in args[args.index("--set"):args.index("--workdir")]]
    cmd = [sys.executable, "-m", "proxytune_jax.cli", "train", "--config", str(DISTILL_CONFIG), *over,
           "--set", "steps=6", "--set", "optim.warmup_steps=2", "--set", "checkpoint.save_every=3", "--set", "eval_every=0",
           "--set", "log_every=1",
           "--set", "steps_per_call=2", "--set", "export=false"]
    # both runs with XLA's optimizations turned down (6 tiny steps: compile time dominates)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.pop("XLA_FLAGS", None)
    out2 = subprocess.run(cmd + ["--cpu-devices", "2", "--workdir", str(tmp_path / "d2")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert out2.returncode == 0, out2.stderr[-3000:]
    assert "over 2 cpu device(s), 2 step(s) per call" in out2.stdout and "step 6/6" in out2.stdout
    out1 = subprocess.run(cmd + ["--workdir", str(tmp_path / "d1")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert out1.returncode == 0 and "over 1 cpu device(s)" in out1.stdout, out1.stderr[-3000:]
    l1, l2 = ([m for m in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
              for d in ("d1", "d2"))
    assert [l["step"] for l in l1] == [l["step"] for l in l2] == [1, 2, 3, 4, 5, 6], (l1, l2)
    for a, b in zip(l1, l2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_cpu_devices_refused_once_jax_has_started():
    from proxytune_jax.commands.train import use_cpu_devices
    jax.devices()  # this test process's backend is up
    with pytest.raises(UserError, match="before JAX starts"):
        use_cpu_devices(2)
    with pytest.raises(UserError, match="--cpu-devices must be >= 1"):
        use_cpu_devices(0)
    with pytest.raises(UserError, match="steps_per_call must be >= 1"):
        load_config(DISTILL_CONFIG, ["steps_per_call=0"])


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("sft", []), ("distill", []), ("first", []), ("bayes", []),
                                        ("distill", ["objective.name=online_distillation_chunked"]),
                                        ("distill", ["objective.name=taid"]),
                                        ("distill", ["objective.name=on_policy", "objective.max_new_tokens=4"]),
                                        ("distill", ["objective.name=proxy_tuned_teacher",
                                                     "objective.base=runs/tiny/teacher",
                                                     "objective.expert=runs/tiny/teacher",
                                                     "objective.anti_expert=runs/tiny/student"])])
@pytest.mark.usefixtures("fast_compiles_one_test")  # a few steps each: compile time dominates
def test_every_tiny_config_trains_from_the_cli(name, extra, tmp_path_factory, monkeypatch, capsys):
    """`experiments/configs/make_tiny.py` then `proxytune train --config <each tiny config>`: every objective of
    the examples runs end to end from the command line (a few steps each; the configs' relative paths)."""
    import runpy
    root = tmp_path_factory.getbasetemp() / "tiny_configs"
    monkeypatch.chdir(root.parent)
    with FileLock(str(root.parent / "tiny_configs.lock")):
        if not (root / "runs" / "tiny" / "topk_eval").is_dir():
            root.mkdir(exist_ok=True)
            monkeypatch.chdir(root)
            monkeypatch.setattr("sys.argv", ["make_tiny.py", "runs/tiny", "--teacher-steps", "8"])
            with pytest.raises(SystemExit) as done:
                runpy.run_path(str(REPO / "experiments" / "configs" / "make_tiny.py"), run_name="__main__")
            assert done.value.code == 0
    monkeypatch.chdir(root)
    config = REPO / "experiments" / "configs" / f"{name}_tiny.py"
    capsys.readouterr()
    workdir = f"runs/{name}" + ("_" + extra[0].split("=")[1] if extra else "")
    assert cli.main(["train", "--config", str(config), "--workdir", workdir, "--no-progress",
                     *[a for e in extra for a in ("--set", e)],
                     "--set", "steps=6", "--set", "optim.warmup_steps=2", "--set", "checkpoint.save_every=6",
                     "--set", "eval_every=6",
                     "--set", "log_every=3", "--set", "export=false"]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "eval:" in out
    lines = [json.loads(l) for l in (root / workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [3, 6]
    assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)


def test_data_without_targets_and_a_teacher_with_another_tokenizer_are_refused(run_setup, tmp_path, capsys):
    """Two inputs that used to train "successfully" and wrongly: a data file whose responses all fall beyond
    data.max_length (nothing to learn), and a teacher whose tokenizer has the student's size but other ids. Both now stop
    before any training with a message naming the fix, and leave nothing behind in the work dir but config.json."""
    import shutil
    work, args = run_setup
    empty = tmp_path / "empty.jsonl"
    long_prompt = "the quick brown fox jumps over the lazy dog " * 8  # cut off at data.max_length: no response left
    empty.write_text("".join(json.dumps({"prompt": f"{long_prompt}{i}?", "response": " ok"}) + "\n" for i in range(8)))
    assert cli.main(args[:-1] + [str(tmp_path / "w1"), "--set", f"data.train_file={empty}",
                                 "--set", "data.eval_file="]) == 2
    err = capsys.readouterr().err
    assert "has no target tokens" in err and "Traceback" not in err
    assert not (tmp_path / "w1" / "checkpoints").exists() and not (tmp_path / "w1" / "metrics.jsonl").exists()

    teacher = Path(args[args.index("--set") + 3].split("=", 1)[1])  # objective.teacher=<folder>
    other = tmp_path / "teacher_other_tokenizer"
    shutil.copytree(teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(k for k, v in vocab.items() if v in (10, 11))  # swap two ids: same size, other tokens
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert cli.main(args[:-1] + [str(tmp_path / "w2"), "--set", f"objective.teacher={other}"]) == 2
    err = capsys.readouterr().err
    assert "has another tokenizer than the student" in err and "Traceback" not in err
