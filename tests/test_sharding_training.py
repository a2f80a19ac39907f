"""Sharded training on 8 simulated CPU devices (data=2, fsdp=2, tensor=2) against 1 device, and checkpoints
restored onto a different mesh (8 -> 1 and 1 -> 8). Runs in a subprocess because the device count must be set
(XLA_FLAGS) before jax is imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from proxytune_jax.sharding import MeshConfig, make_mesh, suffix_shardings, tree_shardings

SCRIPT = textwrap.dedent(r'''
    import json, sys
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from transformers import AutoTokenizer
    import proxytune_jax as pj
    from proxytune_jax.checkpoint import Checkpointer
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import MeshConfig, make_mesh, put_global_batch, shard_tree
    from proxytune_jax.training.data import load_batches
    from proxytune_jax.training.objectives import OnlineDistillation
    from proxytune_jax.training.optim import OptimConfig, make_optimizer
    from proxytune_jax.training.state import abstract_train_state, init_train_state, split_params
    from proxytune_jax.training.step import make_train_step

    student_dir, teacher_dir, data_file, work = sys.argv[1:5]
    assert len(jax.devices()) == 8, jax.devices()
    tok = AutoTokenizer.from_pretrained(student_dir)
    data = load_batches(data_file, tok, batch_size=8, max_length=24, seed=0)
    student, teacher = pj.load_pretrained(student_dir), pj.load_pretrained(teacher_dir)
    g, params = split_params(student)
    tg, tparams = split_params(teacher)
    rules, trules = partition_rules(student.config), partition_rules(teacher.config)
    opt = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=3, total_steps=30))
    objective = OnlineDistillation(teacher="t", loss="forward_kl", ce_weight=0.1).loss_fn(g, {"teacher": tg})
    abstract_params = jax.eval_shape(lambda p: p, params)

    steppers = {}

    def stepper(mesh):  # one jitted step per mesh, compiled once
        if id(mesh) not in steppers:
            ab = abstract_train_state(abstract_params, opt, rules=rules, mesh=mesh)
            sh = jax.tree.map(lambda s: s.sharding, ab)
            steppers[id(mesh)] = ab, make_train_step(objective, opt, mesh, state_shardings=sh,
                                                     frozen={"teacher": shard_tree(tparams, trules, mesh)})
        return steppers[id(mesh)]

    def run(mesh, state, first, n):
        _, step = stepper(mesh)
        out = []
        for s in range(first, first + n):
            state, m = step(state, put_global_batch(data.batch(s), mesh))
            out.append({k: float(v) for k, v in m.items()})
        return state, out

    def host(tree):
        return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]

    mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    from proxytune_jax.errors import UserError
    try:
        put_global_batch({"x": np.zeros((6, 2))}, mesh8)
        indivisible_error = ""
    except UserError as err:
        indivisible_error = str(err)
    batch_shard_shape = list(put_global_batch(data.batch(0), mesh8)["input_ids"].addressable_shards[0].data.shape)
    mesh1 = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    s8 = init_train_state(params, opt, rules=rules, mesh=mesh8)
    q = s8.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    sharded_spec = str(q.sharding.spec)
    shard_shape = list(q.addressable_shards[0].data.shape)
    s8, m8 = run(mesh8, s8, 0, 20)
    s1, m1 = run(mesh1, init_train_state(params, opt, rules=rules, mesh=mesh1), 0, 20)
    diff20 = max(float(np.max(np.abs(a - b))) for a, b in zip(host(s8.params), host(s1.params)))

    # 8 -> 1: save the 8-device state, restore it onto the 1-device mesh, continue there.
    with Checkpointer(work + "/ck8", save_every=1) as ck:
        ck.save(20, s8, {"note": "8 devices"})
    with Checkpointer(work + "/ck8", save_every=1) as ck:
        ab1, _ = stepper(mesh1)
        r1, meta, step = ck.restore_latest(ab1)
    exact_8_to_1 = all(np.array_equal(a, b) for a, b in zip(host(s8), host(r1)))
    on_mesh1 = all(x.sharding.mesh.devices.size == 1 for x in jax.tree.leaves(r1))
    # 1 -> 8: save the 1-device state, restore onto 8 devices.
    with Checkpointer(work + "/ck1", save_every=1) as ck:
        ck.save(20, s1, {})
    with Checkpointer(work + "/ck1", save_every=1) as ck:
        ab8, _ = stepper(mesh8)
        r8, _, _ = ck.restore_latest(ab8)
    exact_1_to_8 = all(np.array_equal(a, b) for a, b in zip(host(s1), host(r8)))
    q8 = r8.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    restored_spec = str(q8.sharding.spec)
    restored_mesh = dict(q8.sharding.mesh.shape)
    mu_spec = str(r8.opt_state[1][0].mu["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].sharding.spec)
    # keep training the restored states: 8-state resumed on 1 device vs 1-state resumed on 8 devices
    r1, c1 = run(mesh1, r1, 20, 5)
    r8, c8 = run(mesh8, r8, 20, 5)
    # the same 5 steps on 8 devices as one make_multi_step call over stacked batches
    from proxytune_jax.sharding import put_stacked_batches
    from proxytune_jax.training.step import make_multi_step
    with Checkpointer(work + "/ck1", save_every=1) as ck:
        r8m, _, _ = ck.restore_latest(stepper(mesh8)[0])
    stacked = put_stacked_batches([data.batch(s) for s in range(20, 25)], mesh8)
    stacked_shard_shape = list(stacked["input_ids"].addressable_shards[0].data.shape)
    r8m, mm = make_multi_step(stepper(mesh8)[1])(r8m, stacked)
    multi_losses = [float(x) for x in mm["loss"]]
    multi_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(host(r8m.params), host(r8.params)))
    multi_spec = str(r8m.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].sharding.spec)
    print("RESULT " + json.dumps(dict(m8=m8, m1=m1, diff20=diff20, sharded_spec=sharded_spec,
        shard_shape=shard_shape, full_shape=list(q.shape), meta=meta, step=step, exact_8_to_1=exact_8_to_1,
        on_mesh1=on_mesh1, exact_1_to_8=exact_1_to_8, restored_spec=restored_spec, restored_mesh=restored_mesh,
        mu_spec=mu_spec, c1=c1, c8=c8, indivisible_error=indivisible_error,
        batch_shard_shape=batch_shard_shape, multi_losses=multi_losses, multi_diff=multi_diff,
        multi_spec=multi_spec, stacked_shard_shape=stacked_shard_shape)))
''')


@pytest.fixture(scope="module")
def mesh_run(tiny_checkpoint, tmp_path_factory):
    student = tiny_checkpoint("llama", seed=1)
    teacher = tiny_checkpoint("llama", seed=2, hidden_size=64, intermediate_size=96)
    work = tmp_path_factory.mktemp("mesh_run")
    data = work / "train.jsonl"
    rows = [{"prompt": f"question: what is {a} plus {b}?", "response": f" answer: {a + b}"}
            for a in range(8) for b in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = work / "mesh_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, str(script), str(student), str(teacher), str(data), str(work)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT "):]), stderr=res.stderr)


# What XLA's SPMD partitioner logs when a sharding it was given cannot be reached cheaply (issue #23).
SHARDING_WARNINGS = ("involuntary full rematerialization", "full rematerialization", "resharding",
                     "reshard ", "unable to reshard")


def test_8_device_train_steps_compile_without_remat_or_resharding_warnings(mesh_run):
    """Every compile of the run (single steps on the (data, fsdp, tensor) = (2, 2, 2) mesh, the multi-step
    scan, checkpoint restores) logs no involuntary rematerialization or resharding: activations carry batch
    sharding constraints (``sharding.activation_sharding``)."""
    hits = [l for l in mesh_run["stderr"].splitlines() if any(w in l.lower() for w in SHARDING_WARNINGS)]
    assert not hits, "\n".join(hits[:5])


def test_8_devices_match_1_device_for_20_steps_of_online_distillation(mesh_run):
    m8, m1 = mesh_run["m8"], mesh_run["m1"]
    assert len(m8) == len(m1) == 20
    for a, b in zip(m8, m1):
        for key in ("loss", "forward_kl", "ce", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)
        assert a["tokens"] == b["tokens"] > 0
    assert m8[-1]["forward_kl"] < m8[0]["forward_kl"]  # it trained, not just agreed
    assert mesh_run["diff20"] < 1e-4


def test_params_are_really_sharded_on_the_8_device_mesh(mesh_run):
    # q_proj [H*Dh, D] over (tensor, fsdp): each device holds a quarter
    from jax.sharding import PartitionSpec as P
    assert mesh_run["sharded_spec"] == str(P("tensor", "fsdp"))
    full, shard = mesh_run["full_shape"], mesh_run["shard_shape"]
    assert shard == [full[0] // 2, full[1] // 2]


def test_batches_split_over_data_and_fsdp(mesh_run):
    assert mesh_run["batch_shard_shape"] == [2, 24]  # 8 rows over data x fsdp = 4, tensor replicates
    assert "divisible" in mesh_run["indivisible_error"] and "6" in mesh_run["indivisible_error"]


def test_checkpoint_from_8_devices_restores_on_1_and_back(mesh_run):
    assert mesh_run["exact_8_to_1"] and mesh_run["on_mesh1"]
    assert mesh_run["meta"] == {"note": "8 devices"} and mesh_run["step"] == 20
    assert mesh_run["exact_1_to_8"]
    assert "fsdp" in mesh_run["restored_spec"] and "tensor" in mesh_run["restored_spec"]
    assert mesh_run["restored_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh_run["mu_spec"] == mesh_run["restored_spec"]  # Adam moments follow their parameter
    for a, b in zip(mesh_run["c1"], mesh_run["c8"]):  # resumed runs keep training and still agree
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"]))


def test_multi_step_on_the_8_device_mesh_equals_single_steps(mesh_run):
    """make_multi_step over 5 stacked batches, sharded (step axis whole, rows over data x fsdp), continues the
    restored state exactly as 5 single steps did, and keeps the params' sharding."""
    assert mesh_run["stacked_shard_shape"] == [5, 2, 24]
    for a, b in zip(mesh_run["multi_losses"], mesh_run["c8"]):
        assert abs(a - b["loss"]) <= 1e-6 * max(1.0, abs(b["loss"]))
    assert len(mesh_run["multi_losses"]) == 5 and mesh_run["multi_diff"] < 1e-6
    assert mesh_run["multi_spec"] == mesh_run["sharded_spec"]


# ------------------------------------------------------------------------------- in-process, 1 device


def test_suffix_shardings_mirror_params_and_replicate_the_rest():
    import jax
    import optax
    from jax.sharding import PartitionSpec as P
    mesh = make_mesh(MeshConfig())
    params = {"model": {"w": np.zeros((4, 4), np.float32), "b": np.zeros((4,), np.float32)}}
    rules = [(r"w$", P("fsdp", "tensor"))]
    psh = tree_shardings(params, rules, mesh)
    opt_state = optax.adam(1e-3).init(params)
    sh = suffix_shardings(opt_state, params, psh, mesh)
    assert sh[0].mu["model"]["w"].spec == P("fsdp", "tensor")
    assert sh[0].nu["model"]["b"].spec == P()
    assert sh[0].count.spec == P()
    leaves = jax.tree.leaves(sh)
    assert len(leaves) == len(jax.tree.leaves(opt_state))
