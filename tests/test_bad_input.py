"""The bad-input corpus: what a new user gets wrong (paths, encodings, damaged files, odd numbers, a full disk, an
unwritable or read-only folder), run in-process through the CLI entry point (a few as real subprocesses).

Every case asserts the same contract: a non-zero exit, a short message that names the fix, no traceback, no
partial output, and no file that existed before changed. Full-disk and permission cases inject the OS error into
the writers (the tests run as root, where permissions do not stop writes)."""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxytune_jax import cli

REPO = Path(__file__).resolve().parents[1]
DISTILL_CONFIG = REPO / "experiments" / "configs" / "distill_tiny.py"


# --------------------------------------------------------------------------------------------------- harness
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _expect_refused(argv, message: str, capsys, folder: Path, *, new_files_allowed=()):
    """Run ``proxytune argv`` in-process and check the contract; ``folder`` holds every input and output."""
    before = _snapshot(folder)
    code = cli.main([str(a) for a in argv])  # an exception escaping here is a traceback for the user
    err = capsys.readouterr().err
    assert code != 0, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines()  # progress bars (tqdm) and checkpoint notes aside
             if l.strip() and not re.search(r"\d+%\||^\s*$|^\[checkpoint\]", l)]
    assert 1 <= len(lines) <= 3, err  # short: one line (plus at most a warning or two)
    after = _snapshot(folder)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file was changed"
    extra = [k for k in after if k not in before and not any(re.search(p, k) for p in new_files_allowed)]
    assert not extra, f"partial output left behind: {extra}"
    return err


class _Inject:
    """Raise ``OSError(code)`` from the writers: ``fsync`` (a full disk surfaces when data reach it) or any
    ``open`` for writing / ``mkdir`` under ``under``."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def fsync(self, code: int, after: int = 0, only: str = ""):
        """``after`` fsyncs succeed first (counting only files whose name ends with ``only``)."""
        real, calls = os.fsync, {"n": 0}

        def fsync(fd):
            if only and not os.readlink(f"/proc/self/fd/{fd}").endswith(only):
                return real(fd)
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(code, os.strerror(code))
            return real(fd)
        self.mp.setattr(os, "fsync", fsync)

    def writes(self, code: int, under: Path):
        real_open, real_mkdir = builtins.open, Path.mkdir
        under = str(under)

        def guarded_open(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and str(file).startswith(under) and set(mode) & set("wax+"):
                raise OSError(code, os.strerror(code), str(file))
            return real_open(file, mode, *a, **k)

        def guarded_mkdir(self, *a, **k):
            if str(self).startswith(under) and not self.exists():
                raise OSError(code, os.strerror(code), str(self))
            return real_mkdir(self, *a, **k)
        self.mp.setattr(builtins, "open", guarded_open)
        self.mp.setattr(io, "open", guarded_open)
        self.mp.setattr(Path, "mkdir", guarded_mkdir)


@pytest.fixture()
def inject(monkeypatch):
    return _Inject(monkeypatch)


# --------------------------------------------------------------------------------------------- proxytune eval
def _eval_files(folder: Path, preds, refs) -> list:
    (folder / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    (folder / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    return ["eval", "--predictions", folder / "p.jsonl", "--references", folder / "r.jsonl", "--metric",
            "exact_match", "--output", folder / "scores.json"]


EVAL_CASES = {
    "duplicate prediction id": ([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}],
                                [{"id": 1, "answer": "a"}], r"p\.jsonl: id 1 appears on rows 1 and 2"),
    "duplicate reference id": ([{"id": 1, "text": "a"}], [{"id": 1, "answer": "a"}, {"id": 1, "answer": "a"}],
                               r"r\.jsonl: id 1 appears on rows 1 and 2; each id must appear once"),
    "reference without prediction": ([{"id": 1, "text": "a"}], [{"id": 1, "answer": "a"}, {"id": 2, "answer": "b"}],
                                     r"id 2 has no prediction .* score files that cover the same ids"),
    "prediction without reference": ([{"id": 1, "text": "a"}, {"id": 3, "text": "c"}], [{"id": 1, "answer": "a"}],
                                     r"id 3 has no reference"),
    "ids on some rows only": ([{"id": 1, "text": "a"}, {"text": "b"}], [{"answer": "a"}, {"answer": "b"}],
                              r"row 2 has no 'id' but other rows have one"),
    "unhashable id": ([{"id": [1], "text": "a"}], [{"id": [1], "answer": "a"}], r"ids must be strings or integers"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_refuses_predictions_and_references_that_do_not_pair_once_each(case, tmp_path, capsys):
    preds, refs, message = EVAL_CASES[case]
    argv = _eval_files(tmp_path, preds, refs)
    (tmp_path / "scores.json").write_text('{"old": true}\n')  # an earlier result must survive
    _expect_refused(argv, message, capsys, tmp_path)


def test_eval_pairs_by_id_whatever_the_order(tmp_path, capsys):
    argv = _eval_files(tmp_path, [{"id": "b", "text": "x"}, {"id": "a", "text": "y"}],
                       [{"id": "a", "answer": "y"}, {"id": "b", "answer": "no"}])
    assert cli.main([str(a) for a in argv]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["exact_match"] == 0.5


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "no space left on the device"),
                                           (errno.EROFS, "read-only file system"),
                                           (errno.EACCES, "permission denied")])
def test_eval_output_on_a_full_disk_or_unwritable_folder(code, message, tmp_path, capsys, inject):
    argv = _eval_files(tmp_path, [{"text": "a"}], [{"answer": "a"}])
    (tmp_path / "scores.json").write_text('{"old": true}\n')
    if code == errno.ENOSPC:
        inject.fsync(code)
    else:
        inject.writes(code, tmp_path)
    _expect_refused(argv, message, capsys, tmp_path)


@pytest.mark.parametrize("which", ["predictions", "references"])
def test_eval_non_utf8_file_names_the_line_and_the_fix(which, tmp_path, capsys):
    argv = _eval_files(tmp_path, [{"text": "a"}, {"text": "b"}], [{"answer": "a"}, {"answer": "b"}])
    f = tmp_path / ("p.jsonl" if which == "predictions" else "r.jsonl")
    f.write_bytes(f.read_bytes() + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    _expect_refused(argv, rf"{f.name}:3: not UTF-8 text \(byte 0xe9.*save the file as UTF-8", capsys, tmp_path)


def test_a_utf8_byte_order_mark_is_read_as_text(tmp_path, capsys):
    argv = _eval_files(tmp_path, [{"text": "a"}], [{"answer": "a"}])
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "p.jsonl").read_bytes())
    assert cli.main([str(a) for a in argv]) == 0


# ------------------------------------------------------------------------------------------ proxytune generate
@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return Path(tiny_checkpoint("llama", seed=30))


def _generate(folder: Path, target: Path, *extra) -> list:
    if not (folder / "prompts.jsonl").exists():
        (folder / "prompts.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "the quick"}\n')
    return ["generate", "--target", target, "--prompts", folder / "prompts.jsonl", "--max-new-tokens", 3,
            "--output", folder / "out.jsonl", *extra]


def _damaged_copy(src: Path, dst: Path, name: str, content: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / name).write_bytes(content)
    return dst


GENERATE_CASES = {
    "prompts not UTF-8": (lambda f, m: (f / "prompts.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n'),
                          r"prompts\.jsonl:1: not UTF-8 text"),
    "prompts not JSON": (lambda f, m: (f / "prompts.jsonl").write_text("hello\n"), r"prompts\.jsonl:1: not valid JSON"),
    "config.json damaged": (lambda f, m: _damaged_copy(m, f / "model", "config.json", b'{"model_type": "lla'),
                            r"config .*config\.json is not valid JSON .* re-export the model"),
    "config.json not UTF-8": (lambda f, m: _damaged_copy(m, f / "model", "config.json", b'{"x": "\xff"}'),
                              r"config\.json: not UTF-8 text"),
    "generation_config.json damaged": (
        lambda f, m: _damaged_copy(m, f / "model", "generation_config.json", b"{oops"),
        r"generation config .* is not valid JSON .* fix or delete generation_config\.json"),
    "generation_config eos not ids": (
        lambda f, m: _damaged_copy(m, f / "model", "generation_config.json", b'{"eos_token_id": "</s>"}'),
        r"eos_token_id must be an integer or a list of integers"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_refuses_damaged_or_non_utf8_inputs(case, model_dir, tmp_path, capsys):
    setup, message = GENERATE_CASES[case]
    argv = _generate(tmp_path, model_dir)
    result = setup(tmp_path, model_dir)
    if isinstance(result, Path):  # a damaged model folder
        argv[argv.index("--target") + 1] = result
    (tmp_path / "out.jsonl").write_text("old results\n")
    _expect_refused(argv, message, capsys, tmp_path)


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "no space left on the device"),
                                           (errno.EROFS, "read-only file system"),
                                           (errno.EACCES, "permission denied")])
def test_generate_on_a_full_disk_or_unwritable_folder_keeps_the_old_output(code, message, model_dir, tmp_path,
                                                                           capsys, inject):
    out = tmp_path / "out"
    out.mkdir()
    argv = _generate(tmp_path, model_dir)
    argv[argv.index("--output") + 1] = out / "out.jsonl"
    (out / "out.jsonl").write_text("old results\n")
    if code == errno.ENOSPC:
        inject.fsync(code)
    else:
        inject.writes(code, out)
    _expect_refused(argv, message, capsys, tmp_path)


def test_generate_stops_on_every_models_eos_including_generation_config(tiny_checkpoint, tmp_path):
    """EOS ids are the union over all models of config.json, generation_config.json and the tokenizer: a chat
    expert's end-of-turn id (only in its generation_config.json) ends the fused text. TextGenerator reads
    generation_config.json itself (through load_pretrained), without the CLI passing it."""
    from transformers import AutoTokenizer

    from proxytune_jax.decoding.pipeline import TextGenerator
    from proxytune_jax.models.hf_io import load_pretrained, save_pretrained

    dirs = [Path(tiny_checkpoint("llama", seed=s)) for s in (40, 41, 42)]
    tok = AutoTokenizer.from_pretrained(dirs[0])
    plain = TextGenerator([load_pretrained(d, progress=False) for d in dirs], [tok] * 3, "proxy_tuning")
    first = plain.generate(["hello"], max_new_tokens=6, fusion_params={"alpha": 1.0})[0]
    assert len(first.token_ids) >= 2 and first.finish_reason == "length", first
    turn_end = first.token_ids[1]  # pretend the expert's chat end-of-turn is the second token it produced
    assert turn_end not in plain.eos_ids
    expert = tmp_path / "expert"
    shutil.copytree(dirs[1], expert)
    (expert / "generation_config.json").write_text(json.dumps({"eos_token_id": [turn_end]}))
    models = [load_pretrained(d, progress=False) for d in (dirs[0], expert, dirs[2])]
    gen = TextGenerator(models, [tok] * 3, "proxy_tuning")
    assert turn_end in gen.eos_ids and set(plain.eos_ids) <= set(gen.eos_ids)
    out = gen.generate(["hello"], max_new_tokens=6, fusion_params={"alpha": 1.0})[0]
    assert out.finish_reason == "eos" and out.token_ids == first.token_ids[:2]
    # save_pretrained keeps it, so an exported expert still ends its turn
    save_pretrained(models[1], tmp_path / "again")
    assert load_pretrained(tmp_path / "again", progress=False).config.generation_eos_token_id == (turn_end,)


# --------------------------------------------------------------------------------------------- proxytune train
@pytest.fixture(scope="module")
def train_setup(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("train_inputs")
    rows = [{"prompt": f"what is {a} plus {b}?", "response": f" {a + b}"} for a in range(4) for b in range(4)]
    (base / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = tiny_checkpoint("llama", seed=1)
    teacher = tiny_checkpoint("llama", seed=2)

    def argv(folder: Path, *sets: str) -> list:
        return ["train", "--config", DISTILL_CONFIG, "--no-progress", "--set", f"model.student={student}",
                "--set", f"objective.teacher={teacher}", "--set", f"data.train_file={base / 'train.jsonl'}",
                "--set", "data.eval_file=", "--set", "data.max_length=24", "--set", "steps=4",
                "--set", "checkpoint.save_every=2", "--set", "log_every=1",
                "--set", "optim.warmup_steps=1", *[x for s in sets for x in ("--set", s)],
                "--workdir", folder / "run"]
    return base, argv


TRAIN_SET_CASES = {
    "learning rate nan": (["optim.learning_rate=nan"], r"learning_rate: NaN is not a value; give a finite number"),
    "learning rate inf": (["optim.learning_rate=inf"], r"learning_rate must be a finite number > 0, got inf"),
    "weight decay nan": (["optim.weight_decay=nan"], r"weight_decay: NaN is not a value"),
    "steps zero": (["steps=0"], r"steps must be"),
    "batch size as text": (["data.batch_size=eight"], r"cannot read 'eight' as int"),
    "unknown loss": (["objective.loss=kl_divergence"], r"loss 'kl_divergence' cannot be used here; choose one of"),
}


@pytest.mark.parametrize("case", list(TRAIN_SET_CASES))
def test_train_refuses_bad_numbers_and_names_before_writing_anything(case, train_setup, tmp_path, capsys):
    _, argv = train_setup
    sets, message = TRAIN_SET_CASES[case]
    _expect_refused(argv(tmp_path, *sets), message, capsys, tmp_path)


def test_train_data_not_utf8(train_setup, tmp_path, capsys):
    _, argv = train_setup
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xe9", "response": " 1"}\n')
    _expect_refused(argv(tmp_path, f"data.train_file={tmp_path / 'bad.jsonl'}"), r"bad\.jsonl:1: not UTF-8 text",
                    capsys, tmp_path)


@pytest.mark.parametrize("code, message", [(errno.EROFS, "read-only file system"),
                                           (errno.EACCES, "permission denied")])
def test_train_into_an_unwritable_work_dir(code, message, train_setup, tmp_path, capsys, inject):
    _, argv = train_setup
    inject.writes(code, tmp_path / "run")
    _expect_refused(argv(tmp_path), message + r".*run", capsys, tmp_path)


def test_train_on_a_full_disk_mid_run_keeps_whole_lines_and_resumes(train_setup, tmp_path, capsys, inject):
    """The disk fills after a few metrics lines: a clear error; metrics.jsonl keeps whole lines only; config.json
    is whole; rerunning (space freed) resumes from the last checkpoint and finishes."""
    _, argv = train_setup
    inject.fsync(errno.ENOSPC, after=3, only="metrics.jsonl")  # 3 metrics lines, then the disk is full
    code = cli.main([str(a) for a in argv(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on the device" in err and "Traceback" not in err, err
    run = tmp_path / "run"
    json.loads((run / "config.json").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(l)["step"] >= 1 for l in lines)  # every line whole
    inject.mp.undo()
    assert cli.main([str(a) for a in argv(tmp_path)]) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_train_damaged_work_dir_config(train_setup, tmp_path, capsys):
    _, argv = train_setup
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"steps": 4, "model": {')
    _expect_refused(argv(tmp_path), r"work dir's config .* is not valid JSON .* use a new --workdir", capsys,
                    tmp_path)


# ------------------------------------------------------------------------------------- a few real subprocesses
def _proxytune(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "proxytune_jax.cli", *map(str, argv)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", ["eval non-UTF-8", "eval duplicate ids", "generate missing prompts",
                                  "train missing config"])
def test_real_processes_exit_2_with_one_line(case, tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"text": "\xff"}\n')
    (tmp_path / "r.jsonl").write_text('{"id": 1, "answer": "a"}\n{"id": 1, "answer": "b"}\n')
    (tmp_path / "p2.jsonl").write_text('{"id": 1, "text": "a"}\n')
    argv, message = {
        "eval non-UTF-8": (["eval", "--predictions", "p.jsonl", "--references", "r.jsonl"], "not UTF-8 text"),
        "eval duplicate ids": (["eval", "--predictions", "p2.jsonl", "--references", "r.jsonl"],
                               "appears on rows 1 and 2"),
        "generate missing prompts": (["generate", "--target", "nowhere", "--prompts", "none.jsonl", "--max-new-tokens", "4", "--output",
                                      "o.jsonl"], "does not exist"),
        "train missing config": (["train", "--config", "nope.py", "--workdir", "w"], "does not exist"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _proxytune(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
