"""What a training run reports beyond metrics.jsonl (issue #21): TensorBoard event files read back with
TensorBoard's own reader, an offline W&B run read back from its transaction log, run_info (config, commit,
versions), a profiler trace, generation-based evaluation during training, and `proxytune plot` of two runs.

One tiny SFT run (module fixture, through the CLI entry point) feeds most tests; a second, shorter run with
another learning rate is the other arm of the plot."""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import jax
import pytest

from proxytune_jax import cli
from proxytune_jax.errors import UserError
from proxytune_jax.training.config import load_config
from conftest import persistent_compilation_cache

REPO = Path(__file__).resolve().parents[1]
SFT_CONFIG = REPO / "experiments" / "configs" / "sft_tiny.py"
STEPS, EVERY = 24, 12


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from persistent_compilation_cache(str(tmp_path_factory.getbasetemp() / "jax_cache"))


def _rows(pairs):
    # Every answer is "answer: 7": a tiny model learns it within a few dozen steps, so the generation-based
    # accuracy has somewhere to go from its untrained start.
    return [{"prompt": f"question: what is {a} plus {b}?", "response": " answer: 7"} for a, b in pairs]


def _overrides(work: Path, student: Path, steps: int, lr: float) -> list[str]:
    sets = [f"model.student={student}", f"data.train_file={work / 'train.jsonl'}",
            f"data.eval_file={work / 'eval.jsonl'}", "data.max_length=40", "data.batch_size=8", f"steps={steps}",
            "steps_per_call=1", "log_every=4", f"eval_every={EVERY}", f"checkpoint.save_every={EVERY}",
            f"optim.learning_rate={lr}", "optim.warmup_steps=2"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """Run A: tensorboard + wandb (offline), gen_eval every 12 steps, a profile of steps 3:4. Run B: a shorter
    run with another learning rate, metrics.jsonl only."""
    work = tmp_path_factory.mktemp("report")
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows([(a, b) for a in range(6)
                                                                                     for b in range(6)])))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows([(a, 9) for a in range(8)])))
    student = tiny_checkpoint("llama", seed=3)
    mp = pytest.MonkeyPatch()
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_CONFIG_DIR": str(work / "wandb_config"), "WANDB_CACHE_DIR": str(work / "wandb_cache")
                 }.items():
        mp.setenv(k, v)
    try:
        gen = ["--set", f"gen_eval.every={EVERY}", "--set", "gen_eval.max_new_tokens=10",
               "--set", "gen_eval.batch_size=4", "--set", 'gen_eval.metrics=["accuracy", "rouge"]']
        report_to = "tensorboard,wandb" if _has_wandb() else "tensorboard"
        a = ["train", "--config", str(SFT_CONFIG), "--no-progress", *_overrides(work, student, STEPS, 1e-2), *gen,
             "--report-to", report_to, "--profile", "3:4", "--workdir", str(work / "lr_1e-2")]
        assert cli.main(a) == 0
        b = ["train", "--config", str(SFT_CONFIG), "--no-progress", *_overrides(work, student, EVERY, 3e-3),
             "--set", "export=false", "--report-to", "none", "--workdir", str(work / "lr_3e-3")]
        assert cli.main(b) == 0
    finally:
        mp.undo()
    return work


def _has_wandb() -> bool:
    try:
        import wandb  # noqa: F401
        return True
    except ImportError:
        return False


def _lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from metrics.jsonl, with the documented naming (eval_x -> eval/x, ...)."""
    out: dict[str, dict[int, float]] = {}
    for line in _lines(run):
        for k, v in line.items():
            if k == "step":
                continue
            tag = ("gen_eval/" + k[9:] if k.startswith("gen_eval_") else "eval/" + k[5:] if k.startswith("eval_")
                   else "train/" + k)
            out.setdefault(tag, {})[line["step"]] = float(v)
    return out


def test_tensorboard_event_files_hold_every_logged_metric(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = runs / "lr_1e-2"
    logdir = run / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*")), list(run.iterdir())
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected = _expected_scalars(run)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "eval/loss",
            "gen_eval/accuracy", "gen_eval/rouge1", "gen_eval/rougeL"} <= set(expected)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(got) == sorted(points), tag
        for step, value in points.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)  # float32 in the file
    texts = set(acc.Tags()["tensors"])
    assert {"run_info/config/text_summary", "run_info/git/text_summary", "run_info/versions/text_summary"} <= texts
    config_text = acc.Tensors("run_info/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config_text) == json.loads((run / "config.json").read_text())


def test_run_info_records_config_commit_and_versions(runs):
    run = runs / "lr_1e-2"
    info = json.loads((run / "run_info.json").read_text())
    assert info["config"] == json.loads((run / "config.json").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert info["git"]["commit"] == head.stdout.strip()
    import flax
    import transformers
    assert info["versions"]["jax"] == jax.__version__ and info["versions"]["flax"] == flax.__version__
    assert info["versions"]["transformers"] == transformers.__version__
    assert info["devices"] == {"platform": jax.devices()[0].platform, "count": jax.device_count(),
                               "kind": jax.devices()[0].device_kind, "processes": 1}
    assert info["resumed_from"] is None


def _wandb_records(path: Path) -> list:
    """Records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (":W&B", magic, version), then
    LevelDB-log framing: 32 KiB blocks of chunks (crc32c u32, length u16, type u8: 1 full, 2 first, 3 middle,
    4 last), each record a ``wandb_internal_pb2.Record``. Read here independently of the writer."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding at a block's end
            pos += block - pos % block if pos % block else 0
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def test_wandb_offline_run_holds_the_metrics_and_the_config(runs):
    pytest.importorskip("wandb", reason="W&B is an optional extra: pip install 'proxytune_jax[wandb]'")
    run = runs / "lr_1e-2"
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    assert files[0].name == f"run-{(run / 'wandb_run_id').read_text().strip()}.wandb"
    records = _wandb_records(files[0])
    history: dict[str, dict[int, float]] = {}
    config: dict = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            step = rec.history.step.num
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run" and rec.run.config.update:
            for item in rec.run.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    expected = _expected_scalars(run)
    assert set(history) == set(expected)
    for tag, points in expected.items():
        assert sorted(history[tag]) == sorted(points), tag
        for step, value in points.items():
            assert history[tag][step] == pytest.approx(value, rel=1e-12), (tag, step)
    saved = json.loads((run / "config.json").read_text())
    assert config["optim"] == saved["optim"] and config["gen_eval"] == saved["gen_eval"]
    assert config["run_info"]["versions"]["jax"] == jax.__version__


def test_generation_eval_is_logged_and_matches_an_independent_decode(runs):
    """gen_eval at steps 0, 12, 24: the accuracy rises from the untrained model's; at the last step it equals
    greedy decoding of the exported model (a separate TextGenerator) scored by `proxytune eval`."""
    from transformers import AutoTokenizer

    import proxytune_jax as pj
    from proxytune_jax.decoding import TextGenerator
    run = runs / "lr_1e-2"
    gen = {l["step"]: l for l in _lines(run) if "gen_eval_accuracy" in l}
    assert sorted(gen) == [0, EVERY, STEPS]
    # the learned answer: well above the untrained model's (random bytes; a digit 7 now and then)
    assert gen[STEPS]["gen_eval_accuracy"] >= max(0.5, gen[0]["gen_eval_accuracy"] + 0.25), gen
    prompts = [json.loads(l)["prompt"] for l in (runs / "eval.jsonl").read_text().splitlines()]
    refs = [json.loads(l)["response"] for l in (runs / "eval.jsonl").read_text().splitlines()]
    model = pj.load_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    outs = TextGenerator([model], [tok], "plain").generate(prompts, max_new_tokens=10, batch_size=len(prompts))
    saved = [json.loads(l) for l in (run / "gen_eval" / f"step_{STEPS:06d}.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in saved] == [o.completion for o in outs]
    assert [s["reference"] for s in saved] == refs
    (runs / "pred.jsonl").write_text("".join(json.dumps({"completion": o.completion}) + "\n" for o in outs))
    (runs / "ref.jsonl").write_text("".join(json.dumps({"answer": r}) + "\n" for r in refs))
    assert cli.main(["eval", "--predictions", str(runs / "pred.jsonl"), "--references", str(runs / "ref.jsonl"),
                     "--metric", "accuracy", "rouge", "--output", str(runs / "scores.json")]) == 0
    scores = json.loads((runs / "scores.json").read_text())
    for k in ("accuracy", "rouge1", "rouge2", "rougeL"):
        assert gen[STEPS][f"gen_eval_{k}"] == pytest.approx(scores[k], abs=1e-12), k


def test_profile_writes_a_trace(runs):
    traces = list((runs / "lr_1e-2" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    assert not (runs / "lr_3e-3" / "profile").exists() and not (runs / "lr_3e-3" / "tensorboard").exists()


def test_plot_draws_two_runs_from_their_metrics(runs, capsys):
    import matplotlib.image as mpimg

    from proxytune_jax.training.curves import plot_curves
    a, b = runs / "lr_1e-2", runs / "lr_3e-3"
    out = runs / "plots" / "curves.png"
    assert cli.main(["plot", str(a), str(b), "-o", str(out)]) == 0
    assert "2 run(s)" in capsys.readouterr().out
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and float(img[..., :3].std()) > 0.01  # a PNG with content
    drawn = plot_curves([a, b], runs / "plots" / "again.png", ["train/loss", "eval/loss", "gen_eval/accuracy"])
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("gen_eval/accuracy", "gen_eval_accuracy")):
        for run in (a, b):
            want = [(l["step"], l[key]) for l in _lines(run) if key in l]
            if not want:
                assert run.name not in drawn[tag]
                continue
            steps, values = drawn[tag][run.name]
            assert list(zip(steps.tolist(), values.tolist())) == want, (tag, run.name)
    assert set(drawn["train/loss"]) == {"lr_1e-2", "lr_3e-3"}
    assert cli.main(["plot", str(a), str(runs / "nothing_here"), "-o", str(out)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    assert cli.main(["plot", str(a), "-o", str(out), "--metrics", "eval/accuracy"]) == 2
    err = capsys.readouterr().err
    assert "no run logged 'eval/accuracy'" in err and "train/loss" in err and "Traceback" not in err


def test_report_and_gen_eval_mistakes_are_user_errors(monkeypatch, tmp_path):
    base = ["model.student=s", "data.train_file=t"]
    with pytest.raises(UserError, match="unknown writer 'tensorbord'.*tensorboard"):
        load_config(SFT_CONFIG, base + ['report.to=["tensorbord"]'])
    with pytest.raises(UserError, match="'none' cannot be combined"):
        load_config(SFT_CONFIG, base + ['report.to=["none", "wandb"]'])
    for bad in ("8:5", "x", "0"):
        with pytest.raises(UserError, match="give steps as A:B"):
            load_config(SFT_CONFIG, base + [f"report.profile={bad}"])
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        load_config(SFT_CONFIG, base + ["gen_eval.every=5", 'gen_eval.metrics=["bleu"]'])
    with pytest.raises(UserError, match="no prompts"):
        load_config(SFT_CONFIG, base + ["data.eval_file=", "gen_eval.every=5"])
    from proxytune_jax.training.config import ReportConfig
    from proxytune_jax.training.reporting import Reporter
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'proxytune_jax\[wandb\]'"):
        Reporter(tmp_path, ReportConfig(to=("wandb",)))
    from proxytune_jax.training.gen_eval import read_prompt_set
    (tmp_path / "p.jsonl").write_text('{"prompt": "q"}\n')
    with pytest.raises(UserError, match="no reference"):
        read_prompt_set(tmp_path / "p.jsonl")


def test_a_resumed_run_replaces_the_lost_steps_in_tensorboard(runs, tmp_path):
    """A run killed after step 24 was logged but before its checkpoint: the rerun resumes from step 12, and
    TensorBoard (its own reader) shows each step once, with the values of metrics.jsonl as rewritten."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "lr_1e-2"
    shutil.copytree(runs / "lr_1e-2", run, ignore=shutil.ignore_patterns("wandb", "final", "profile"))
    shutil.rmtree(run / "checkpoints" / str(STEPS))  # the kill: step 24's checkpoint never completed
    before = _expected_scalars(run)
    student = json.loads((run / "config.json").read_text())["model"]["student"]
    args = ["train", "--config", str(SFT_CONFIG), "--no-progress", *_overrides(runs, Path(student), STEPS, 1e-2),
            "--set", f"gen_eval.every={EVERY}", "--set", "gen_eval.max_new_tokens=10", "--set", "gen_eval.batch_size=4",
            "--set", 'gen_eval.metrics=["accuracy", "rouge"]', "--set", "export=false",
            "--report-to", "tensorboard", "--workdir", str(run)]
    assert cli.main(args) == 0
    assert json.loads((run / "run_info.json").read_text())["resumed_from"] == EVERY
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    expected = _expected_scalars(run)
    assert set(expected) == set(before) and set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == sorted(points), tag  # every step once: the lost ones purged
        for step, value in got:
            assert value == pytest.approx(points[step], rel=1e-6, abs=1e-12), (tag, step)
