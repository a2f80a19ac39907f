"""Hugging Face Hub ids wherever a model path is accepted (``proxytune_jax.models.hub``), with no network and no
mocks: a real Hugging Face cache folder is laid out under ``tmp_path`` the way huggingface_hub writes it
(``models--org--name/{blobs,snapshots/<commit>,refs}``) and read with ``HF_HUB_OFFLINE=1``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from proxytune_jax import cli
from proxytune_jax.errors import UserError
from proxytune_jax.models.hf_io import load_pretrained
from proxytune_jax.models.hub import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
COMMIT_1, COMMIT_2 = "1" * 40, "2" * 40


def add_snapshot(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``folder``'s files in the HF cache ``cache`` as snapshot ``commit`` of model ``repo_id``: contents
    in ``blobs/<sha256>``, relative symlinks (copies where symlinks are not allowed) in
    ``snapshots/<commit>/``, and each ref in ``refs`` (a branch or tag name) pointing at ``commit``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        try:
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        except OSError:
            shutil.copyfile(blob, snapshot / f.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return dict(v1=tiny_checkpoint("llama", seed=30), v2=tiny_checkpoint("llama", seed=31),
                teacher=tiny_checkpoint("llama", seed=32, hidden_size=64, intermediate_size=96))


@pytest.fixture()
def hub(models, tmp_path, monkeypatch):
    """An offline HF cache with ``org/tiny`` (main -> v1, tag v2 -> v2) and ``org/teacher``."""
    cache = tmp_path / "hf_cache"
    snaps = dict(v1=add_snapshot(cache, "org/tiny", models["v1"], COMMIT_1),
                 v2=add_snapshot(cache, "org/tiny", models["v2"], COMMIT_2, refs=("v2",)),
                 teacher=add_snapshot(cache, "org/teacher", models["teacher"], COMMIT_1))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return cache, snaps


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_same(a, b):
    pa, pb = _params(a), _params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)


def test_hub_id_loads_like_its_folder_and_revisions_pick_snapshots(hub, models):
    cache, snaps = hub
    assert resolve_model_path("org/tiny") == snaps["v1"].resolve()
    _assert_same(load_pretrained("org/tiny", progress=False), load_pretrained(models["v1"], progress=False))
    second = load_pretrained(models["v2"], progress=False)
    for rev in ("v2", COMMIT_2):  # a tag and a commit hash
        assert resolve_model_path("org/tiny", revision=rev) == snaps["v2"].resolve()
        _assert_same(load_pretrained("org/tiny", revision=rev, progress=False), second)
    assert not np.array_equal(_params(second)[0], _params(load_pretrained("org/tiny", progress=False))[0])


def test_cache_found_through_hf_home(hub, monkeypatch, tmp_path):
    cache, snaps = hub
    home = tmp_path / "hf_home"
    shutil.copytree(cache, home / "hub", symlinks=True)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_model_path("org/tiny") == (home / "hub" / "models--org--tiny" / "snapshots" / COMMIT_1).resolve()


def test_a_local_folder_wins_over_the_hub(hub, models, tmp_path, monkeypatch):
    local = tmp_path / "work" / "org" / "tiny"
    shutil.copytree(models["v2"], local)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model_path("org/tiny") == Path("org/tiny")
    _assert_same(load_pretrained("org/tiny", progress=False), load_pretrained(models["v2"], progress=False))


@pytest.mark.parametrize("name", ["./runs/x", "/no/such/model", "~/no_such_model_dir", "runs/tiny/student",
                                  "..\\x", "a--b"])
def test_missing_local_paths_say_the_folder_does_not_exist(hub, name):
    with pytest.raises(UserError, match="the folder does not exist") as err:
        load_pretrained(name)
    assert "cache" not in str(err.value)  # a filesystem path is never looked up on the Hub


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "weights.safetensors").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        resolve_model_path(tmp_path / "weights.safetensors")


def test_generate_cli_takes_hub_ids(hub, models, tmp_path, capsys):
    outs = {}
    for name, target in [("hub", "org/tiny"), ("folder", models["v1"])]:
        outs[name] = tmp_path / f"{name}.jsonl"
        code = cli.main(["generate", "--target", str(target), "--prompt", "the quick brown fox",
                         "--max-new-tokens", "3", "--output", str(outs[name])])
        assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in outs["hub"].read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "the quick brown fox" and 1 <= len(rows[0]["token_ids"]) <= 3
    assert outs["hub"].read_text() == outs["folder"].read_text()


def test_train_cli_takes_hub_ids(hub, tmp_path, capsys):
    rows = [{"prompt": f"question: what is {a} plus {b}?", "response": f" answer: {a + b}"}
            for a in range(4) for b in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli.main(["train", "--config", str(REPO / "experiments" / "configs" / "distill_tiny.py"), "--no-progress",
                     "--set", "model.student=org/tiny", "--set", "objective.teacher=org/teacher",
                     "--set", f"data.train_file={tmp_path / 'train.jsonl'}", "--set", "data.eval_file=",
                     "--set", "data.max_length=32", "--set", "steps=2", "--set", "steps_per_call=1",
                     "--set", "optim.warmup_steps=1", "--set", "eval_every=0", "--set", "log_every=1",
                     "--set", "checkpoint.save_every=2", "--workdir", str(tmp_path / "run")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    trained, start = load_pretrained(tmp_path / "run" / "final", progress=False), load_pretrained("org/tiny")
    assert [p.shape for p in _params(trained)] == [p.shape for p in _params(start)]
    assert not all(np.array_equal(a, b) for a, b in zip(_params(trained), _params(start)))  # it trained org/tiny
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2]


def test_a_missing_hub_id_offline_is_a_clear_cli_error(hub, tmp_path, capsys):
    cache, _ = hub
    out = tmp_path / "out.jsonl"
    code = cli.main(["generate", "--target", "org/absent", "--prompt", "hi", "--max-new-tokens", "3",
                     "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--target org/absent" in err and str(cache) in err and "HF_HUB_OFFLINE=1" in err, err
    assert "hf download org/absent" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(UserError, match=r"org/tiny at revision 'nope' is not in the Hugging Face cache"):
        resolve_model_path("org/tiny", revision="nope")
    code = cli.main(["train", "--config", str(REPO / "experiments" / "configs" / "distill_tiny.py"),
                     "--set", "model.student=org/absent", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "student org/absent" in err and str(cache) in err and "Traceback" not in err, err


def test_topk_cache_teacher_may_be_a_hub_id(hub, tmp_path):
    from proxytune_jax.losses.first import TopKCache
    from proxytune_jax.training.topk_cache import build_topk_cache
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a}?", "response": f" {a}"}) + "\n" for a in range(3)))
    out = build_topk_cache("org/teacher", data, tmp_path / "topk", k=2, batch_size=4)
    assert len(TopKCache(out)) == 3
