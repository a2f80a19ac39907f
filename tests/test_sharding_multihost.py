"""Multi-host training through jax.distributed: two processes on 127.0.0.1 (CPU collectives over gloo), one
device each, a data-parallel mesh spanning both. They must train in lock step (identical losses and
identical params on both hosts) and match a single-process run of the same config."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(r'''
    import hashlib, json, sys
    from proxytune_jax.sharding import initialize_distributed
    pid, port, cfg_json, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    assert initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                                  initialization_timeout=120) == pid
    import jax, numpy as np
    from proxytune_jax.sharding import to_host
    from proxytune_jax.training.config import TrainConfig
    from proxytune_jax.training.loop import train

    losses = []
    from proxytune_jax.training.config import from_dict
    res = train(from_dict(json.loads(cfg_json)), workdir, progress=False, return_state=True,
                on_step=lambda step, m, ck: losses.append(m["loss"]))
    digest = hashlib.sha256(b"".join(to_host(x).tobytes() for x in jax.tree.leaves(res.state.params)))
    print("RESULT " + json.dumps({"pid": pid, "process_count": jax.process_count(),
        "devices": len(jax.devices()), "local": len(jax.local_devices()), "losses": losses,
        "digest": digest.hexdigest(), "export": str(res.export_dir)}), flush=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_lock_step(tiny_checkpoint, tmp_path):
    from proxytune_jax.training.config import TrainConfig
    from proxytune_jax.training.loop import train

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q: {a} plus {b}?", "response": f" a: {a + b}"} for a in range(5) for b in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from proxytune_jax.training import CheckpointConfig, DataConfig, ModelConfig, OptimConfig
    cfg = TrainConfig(model=ModelConfig(student=str(tiny_checkpoint("llama", seed=1))),
                      data=DataConfig(train_file=str(data), max_length=20, batch_size=4), steps=8,
                      optim=OptimConfig(learning_rate=1e-2), checkpoint=CheckpointConfig(save_every=4), log_every=1)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), str(port),
                               json.dumps(cfg.to_dict()), str(tmp_path / "run")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    # the same run on one process while they work
    single = train(dataclasses.replace(cfg, export=False), tmp_path / "single", progress=False)
    single_losses = [json.loads(l)["loss"] for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][0][7:]) for out, _ in outs]
    r0, r1 = sorted(results, key=lambda r: r["pid"])
    assert r0["process_count"] == r1["process_count"] == 2
    assert r0["devices"] == 2 and r0["local"] == 1  # one global mesh over both processes
    assert len(r0["losses"]) == 8 and r0["losses"] == r1["losses"]  # in lock step
    assert r0["digest"] == r1["digest"]  # identical params on both hosts after 8 updates
    assert r0["losses"][-1] < r0["losses"][0]
    for a, b in zip(r0["losses"], single_losses):  # = the single-process run (all-reduce really happened)
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (r0["losses"], single_losses)
    # process 0 wrote the shared files; the checkpoints were written by both together
    assert r0["export"].endswith("final") and r1["export"] == "None"
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 8
