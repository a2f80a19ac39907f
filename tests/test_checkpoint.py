"""Crash-safe checkpoints: save cadence and retention, incomplete and corrupt steps skipped (never loaded,
never silently deleted), and runs SIGKILLed at a random step / in the middle of a save that resume to the
bit-identical result of an uninterrupted run."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import persistent_compilation_cache, plus_rows, write_jsonl
from proxytune_jax.checkpoint import QUARANTINE, Checkpointer, abstract_tree, is_complete
from proxytune_jax.errors import UserError
from proxytune_jax.sharding import MeshConfig, make_mesh, replicated


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """Runs of one config (reference, killed children, resumes) share compiled steps through JAX's
    persistent cache; loading an executable gives the same code as compiling it."""
    path = str(tmp_path_factory.getbasetemp() / "jax_cache")
    yield from persistent_compilation_cache(path)


def _tree(seed: int):
    k = jax.random.PRNGKey(seed)
    return {"w": jax.random.normal(k, (8, 4)), "layers": {0: {"b": jnp.arange(4.0) + seed}}, "step": jnp.int32(seed)}


def _abstract(tree):
    mesh = make_mesh(MeshConfig())
    return abstract_tree(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def test_saves_every_n_steps_keeps_last_k_and_forced_final(tmp_path):
    with Checkpointer(tmp_path, save_every=3, keep=2) as ck:
        started = [s for s in range(1, 11) if ck.save(s, _tree(s), {"s": s}, force=(s == 10))]
    assert started == [3, 6, 9, 10]
    with Checkpointer(tmp_path, save_every=3, keep=2) as ck:
        assert ck.all_steps() == [9, 10]
        state, meta, step = ck.restore_latest(_abstract(_tree(0)))
    assert step == 10 and meta == {"s": 10}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_tree(10))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_incomplete_save_is_quarantined_with_a_message_not_deleted(tmp_path, capfd):
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, _tree(1), {})
    tmp = tmp_path / "2.orbax-checkpoint-tmp"  # what a save killed midway leaves
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_text("half a tensor")
    with Checkpointer(tmp_path, save_every=1) as ck:
        assert ck.all_steps() == [1]
        _, _, step = ck.restore_latest(_abstract(_tree(0)))
    assert step == 1
    err = capfd.readouterr().err
    assert "incomplete checkpoint" in err and "2.orbax-checkpoint-tmp" in err and "NOT loaded" in err
    assert not tmp.exists()
    moved = list((tmp_path / QUARANTINE).iterdir())
    assert len(moved) == 1 and (moved[0] / "state" / "partial").read_text() == "half a tensor"


def test_corrupt_latest_step_is_skipped_and_kept_aside(tmp_path, capfd):
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, _tree(1), {"s": 1})
        ck.save(2, _tree(2), {"s": 2})
    assert is_complete(tmp_path / "2")
    # damage every data file of step 2 (a disk error / truncated copy)
    damaged = 0
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name.upper():
            f.write_bytes(b"\x00garbage")
            damaged += 1
    assert damaged
    with Checkpointer(tmp_path, save_every=1) as ck:
        state, meta, step = ck.restore_latest(_abstract(_tree(0)))
        assert ck.all_steps() == [1]
    assert step == 1 and meta == {"s": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_tree(1)["w"]))
    err = capfd.readouterr().err
    assert "checkpoint step 2 is corrupt" in err and "NOT loaded" in err
    assert [p.name.split(".")[0] for p in (tmp_path / QUARANTINE).iterdir()] == ["2"]


def _flip_bit(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_bit_is_refused_by_its_checksum_and_the_previous_step_is_used(tmp_path, capfd):
    """orbax decodes most single-bit flips in its compressed chunks into a silently wrong array (shown below with
    a plain orbax restore); the content checksum saved with each step refuses them."""
    import orbax.checkpoint as ocp

    tree = lambda s: {"w": jax.random.normal(jax.random.PRNGKey(s), (64, 64)), "n": jnp.arange(5) + s}
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, tree(1), {"s": 1})
        ck.save(2, tree(2), {"s": 2})
    big = max((f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    _flip_bit(big, big.stat().st_size // 2)
    with ocp.StandardCheckpointer() as plain:  # today's behaviour without the checksum: a wrong array, no error
        silent = plain.restore(tmp_path / "2" / "state", _abstract(tree(0)))
    assert not np.array_equal(np.asarray(silent["w"]), np.asarray(tree(2)["w"]))
    with Checkpointer(tmp_path, save_every=1) as ck:
        state, meta, step = ck.restore_latest(_abstract(tree(0)))
        assert ck.all_steps() == [1]
    assert step == 1 and meta == {"s": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(tree(1)["w"]))
    err = capfd.readouterr().err
    assert "checkpoint step 2 is corrupt" in err and "checksum of w differs" in err and "NOT loaded" in err
    assert "using step 1, the newest step that restored cleanly (refused: 2" in err
    (moved,) = (tmp_path / QUARANTINE).iterdir()  # kept for inspection, byte for byte
    assert (moved / big.relative_to(tmp_path / "2")).read_bytes() != b"" and moved.name.startswith("2.")


def test_checksums_see_every_single_bit_flip_and_ignore_sharding():
    from proxytune_jax.checkpoint import tree_checksums

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.int32, np.uint8, jnp.bfloat16, np.bool_):
        x = (rng.normal(size=(7, 5)) > 0) if dtype is np.bool_ else rng.normal(size=(7, 5)).astype(dtype)
        base = tree_checksums({"x": jnp.asarray(x)})["x"]
        raw = np.asarray(x).view(np.uint8).reshape(-1).copy() if dtype is not np.bool_ else None
        if raw is None:
            flipped = x.copy(); flipped[3, 2] = ~flipped[3, 2]
            assert tree_checksums({"x": jnp.asarray(flipped)})["x"] != base
            continue
        for byte in range(0, raw.size, 3):
            for bit in range(8):
                r = raw.copy(); r[byte] ^= np.uint8(1 << bit)
                assert tree_checksums({"x": jnp.asarray(r.view(np.asarray(x).dtype).reshape(x.shape))})["x"] != base
        swapped = np.asarray(x).copy(); swapped[[0, 1]] = swapped[[1, 0]]
        if not np.array_equal(swapped, x):
            assert tree_checksums({"x": jnp.asarray(swapped)})["x"] != base  # order matters
    if len(jax.devices()) >= 2:
        mesh = jax.make_mesh((2,), ("d",))
        x = jnp.arange(64.0).reshape(8, 8)
        sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
        assert tree_checksums({"x": sharded}) == tree_checksums({"x": x})


def test_checkpoint_of_another_model_is_a_user_error_and_left_in_place(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, _tree(1), {})
    other = dict(_tree(1), w=jnp.zeros((8, 5)))
    with Checkpointer(tmp_path, save_every=1) as ck:
        with pytest.raises(UserError, match=r"different model.*w: saved \(8, 4\), expected \(8, 5\)"):
            ck.restore_latest(_abstract(other))
    assert (tmp_path / "1").is_dir() and not (tmp_path / QUARANTINE).exists()


def test_checkpoint_of_an_older_layout_names_both_paths_and_the_way_out_and_is_left_in_place(tmp_path):
    old = {"q_proj": {"kernel": jnp.ones((4, 6))}}  # before linear weights became "weight" [out, in]
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, old, {})
    new = {"q_proj": {"weight": jnp.ones((6, 4))}}
    with Checkpointer(tmp_path, save_every=1) as ck:
        with pytest.raises(UserError, match=r"version.*q_proj/weight: missing.*q_proj/kernel: not in this "
                                            r"run's state.*save_pretrained"):
            ck.restore_latest(_abstract(new))
    assert (tmp_path / "1").is_dir() and not (tmp_path / QUARANTINE).exists()


def test_empty_directory_restores_nothing(tmp_path):
    with Checkpointer(tmp_path / "new", save_every=1) as ck:
        assert ck.restore_latest(_abstract(_tree(0))) is None


# ----------------------------------------------------------------------------------- killed training runs

CHILD = textwrap.dedent(r'''
    import json, os, signal, sys
    from pathlib import Path
    from proxytune_jax.training.config import TrainConfig
    from proxytune_jax.training.loop import train

    from proxytune_jax.training.config import from_dict
    cfg = from_dict(json.loads(sys.argv[1]))
    workdir, mode, at = sys.argv[2], sys.argv[3], int(sys.argv[4])

    def hook(step, metrics, ckpt):
        if step != at:
            return
        if mode == "save":  # the async save of this step was started and is still being written
            tmp = [p.name for p in Path(ckpt.directory).iterdir() if "orbax-checkpoint-tmp" in p.name]
            print("TMP " + json.dumps(tmp), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, workdir, on_step=hook, progress=False)
    print("FINISHED", flush=True)
''')

STEPS, SAVE_EVERY = 24, 5


@pytest.fixture(scope="module")
def kill_setup(tiny_checkpoint, tmp_path_factory):
    from proxytune_jax.training.config import TrainConfig
    work = tmp_path_factory.mktemp("kill")
    data = work / "train.jsonl"
    write_jsonl(data, plus_rows(6))
    from proxytune_jax.training import CheckpointConfig, DataConfig, ModelConfig, OnlineDistillation, OptimConfig
    cfg = TrainConfig(model=ModelConfig(student=str(tiny_checkpoint("llama", seed=1))),
                      objective=OnlineDistillation(
                          teacher=str(tiny_checkpoint("llama", seed=2, hidden_size=64, intermediate_size=96)),
                          ce_weight=0.1),
                      data=DataConfig(train_file=str(data), max_length=20, batch_size=4), steps=STEPS,
                      optim=OptimConfig(learning_rate=5e-3, warmup_steps=2),
                      checkpoint=CheckpointConfig(save_every=SAVE_EVERY, keep=2), log_every=1,
                      steps_per_call=2)  # calls of 2 steps and single steps before each save
    script = work / "child.py"
    script.write_text(CHILD)
    return cfg, work, script


def _final_params(workdir: Path) -> dict:
    return load_file(str(workdir / "final" / "model.safetensors"))


def _losses(workdir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], l["loss"]) for l in lines if "loss" in l]


def test_killed_runs_resume_to_the_bit_identical_result(kill_setup, compilation_cache, capfd):
    from proxytune_jax.training.loop import train
    cfg, work, script = kill_setup
    kill_at = random.Random().randint(1, STEPS - 1)
    save_kill = 3 * SAVE_EVERY
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache)
    children = {
        "random": subprocess.Popen([sys.executable, str(script), json.dumps(cfg.to_dict()),
                                    str(work / "random"), "step", str(kill_at)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "save": subprocess.Popen([sys.executable, str(script), json.dumps(cfg.to_dict()),
                                  str(work / "save"), "save", str(save_kill)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    # meanwhile: the uninterrupted reference run, in this process
    ref = train(cfg, work / "reference", progress=False)
    assert ref.final_step == STEPS and ref.resumed_from is None
    outs = {k: p.communicate(timeout=600) for k, p in children.items()}
    for k, p in children.items():
        assert p.returncode == -9, (k, kill_at, outs[k][1][-3000:])  # died by SIGKILL
        assert "FINISHED" not in outs[k][0]
    tmp_seen = json.loads([l for l in outs["save"][0].splitlines() if l.startswith("TMP ")][0][4:])
    assert tmp_seen == [f"{save_kill}.orbax-checkpoint-tmp"], "the kill did not land during the save"
    assert (work / "save" / "checkpoints" / f"{save_kill}.orbax-checkpoint-tmp").is_dir()

    capfd.readouterr()
    # the kill may land while the async save of the last save step is still being written: then the one before
    last_save = (kill_at // SAVE_EVERY) * SAVE_EVERY
    expected_resume = {"random": {last_save or None, (last_save - SAVE_EVERY) or None},
                       "save": {save_kill - SAVE_EVERY}}  # orbax finishes a save before it starts the next
    reference = _final_params(work / "reference")
    for name in ("random", "save"):
        result = train(cfg, work / name, progress=False)
        assert result.final_step == STEPS
        assert result.resumed_from in expected_resume[name], (name, kill_at, result.resumed_from)
        resumed = _final_params(work / name)
        assert resumed.keys() == reference.keys()
        for key in reference:  # bit for bit
            assert np.array_equal(resumed[key], reference[key]), (name, kill_at, key)
        assert _losses(work / name) == _losses(work / "reference"), (name, kill_at)
    err = capfd.readouterr().err
    assert f"{save_kill}.orbax-checkpoint-tmp" in err and "incomplete checkpoint" in err
    assert any(p.name.startswith(f"{save_kill}.orbax-checkpoint-tmp")
               for p in (work / "save" / "checkpoints" / QUARANTINE).iterdir())
