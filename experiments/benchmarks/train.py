"""Tokens/s of one online-distillation train step: proxytune_jax (jitted, donated state) against a PyTorch /
transformers re-implementation of the same step, on the same tiny models, in one run.

The step (every row): teacher forward without gradient, student forward, forward KL(teacher || student) on
the response tokens (+ 0.1 * cross-entropy), backward, global-norm clipping at 1.0, AdamW (lr 1e-3, wd 0.01,
b1 0.9, b2 0.95). Same weights (the JAX side loads the folders transformers wrote), same batches. The first
step's loss is printed for every row as a sanity check.

    python experiments/benchmarks/train.py [--size tiny|small] [--batch 8] [--seq 128] [--steps 40]
                                           [--block 5] [--threads N] [--steps-per-call 4] [--no-mesh]

Rows (JAX: every combination of)
  1 device / mesh data=N     ``make_train_step`` on one device, or on a mesh ``data = N`` over N CPU devices,
                             one per core (``proxytune train --cpu-devices N``), each batch split over them
                             as over N GPUs (N: the most cores that divide the batch);
  1 step / k steps per call  one jitted call per step, or ``make_multi_step``: k steps scanned in one call
                             (``TrainConfig.steps_per_call``);
and PyTorch/transformers: eager PyTorch with as many intra-op threads as cores.

Prints a table: median seconds per step (wall clock and process CPU time), tokens/s (real tokens in the batch /
median wall-clock step time), and each row's speed-up over PyTorch. With ``--threads 1`` the CPU-time ratio is
the measure least disturbed by other jobs on a shared machine (with more threads it also counts spin-waiting).

Fairness: every row runs in its own process, as a real training run would: sharing one process let each
library's memory allocations change the other's speed through glibc's malloc state (PyTorch ran at 40-56 ms
per tiny step depending on which JAX variant ran before it in the same process). Every row gets the same cores
(``--threads``; default: all this process may use). After one untimed warm-up call each, the rows alternate in
*blocks* of ``--block`` consecutive calls (the other processes wait on a pipe meanwhile) so that load from
other jobs on a shared machine hits all rows alike. The first call of every block is not timed: it absorbs
the switch (threads of the other process spinning down, this one's waking up), which a real training loop,
running steps back to back, never pays. The JAX timing blocks on the new state and metrics; the state is
donated. Times of a k-step call count as k steps of a k-th of the time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # (student, teacher) small_llama_config arguments (head_dim = hidden_size / num_heads)
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
             dict(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2)),
    "small": (dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4),
              dict(hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8, num_kv_heads=4)),
}
VOCAB = 1024
CE_WEIGHT = 0.1


def make_models(root: Path, size: str):
    import torch
    import transformers

    from proxytune_jax.models import small_llama_config
    paths = []
    for name, over, seed in (("student", SIZES[size][0], 1), ("teacher", SIZES[size][1], 2)):
        ours = small_llama_config(VOCAB, max_positions=512, rms_norm_eps=1e-5, **over)
        cfg = transformers.LlamaConfig(**ours.to_hf_dict())  # a PyTorch checkpoint with transformers' init
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():  # peaked (not near-uniform) distributions, like a trained model
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.1)
        model.save_pretrained(root / name)
        paths.append(root / name)
    return paths


def make_batches(n: int, batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(seq // 2, seq + 1, batch)
        ids = np.zeros((batch, seq), np.int32)
        attn = np.zeros((batch, seq), np.int32)
        loss = np.zeros((batch, seq), np.int32)
        for r, L in enumerate(lengths):  # left-padded, the second half of each row is the "response"
            ids[r, seq - L:] = rng.integers(3, VOCAB, L)
            attn[r, seq - L:] = 1
            loss[r, seq - L // 2:] = 1
        out.append({"input_ids": ids, "attention_mask": attn, "loss_mask": loss})
    return out


def setup_jax(student_dir, teacher_dir, batches, steps_per_call: int = 1, devices: int = 1):
    """The jitted, donated online-distillation step as ``run(i) -> (loss, steps)`` (compiled on first call):
    one step on batch ``i``, or with ``steps_per_call = k > 1`` one call of ``make_multi_step`` running k
    steps on batches ``i .. i+k-1`` (``loss`` is then the first of them). ``devices``: the mesh is
    ``data = devices`` over that many (CPU) devices, the batch split over them."""
    import jax
    import proxytune_jax as pj
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import MeshConfig, make_mesh, put_global_batch, put_stacked_batches, shard_tree
    from proxytune_jax.training import OnlineDistillation
    from proxytune_jax.training.optim import OptimConfig, make_optimizer
    from proxytune_jax.training.state import init_train_state, split_params, train_state_shardings
    from proxytune_jax.training.step import make_multi_step, make_train_step

    mesh = make_mesh(MeshConfig(devices, 1, 1), devices=jax.devices()[:devices])
    student, teacher = pj.load_pretrained(student_dir), pj.load_pretrained(teacher_dir)
    g, params = split_params(student)
    tg, tparams = split_params(teacher)
    rules = partition_rules(student.config)
    opt = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10**6, min_lr_ratio=1.0,
                                     weight_decay=0.01, b1=0.9, b2=0.95, grad_clip_norm=1.0))
    state = init_train_state(params, opt, rules=rules, mesh=mesh)
    objective = OnlineDistillation(teacher=str(teacher_dir), loss="forward_kl", ce_weight=CE_WEIGHT)
    step = make_train_step(objective.loss_fn(g, {"teacher": tg}), opt, mesh,
                           state_shardings=train_state_shardings(state, rules, mesh),
                           frozen={"teacher": shard_tree(tparams, partition_rules(teacher.config), mesh)})
    holder = {"state": state}
    if steps_per_call == 1:
        device_batches = [put_global_batch(b, mesh) for b in batches]

        def run(i):  # one step on batch i (blocks until the new state and metrics exist)
            holder["state"], m = step(holder["state"], device_batches[i % len(device_batches)])
            jax.block_until_ready((holder["state"], m))
            return float(m["loss"]), 1
        return run

    multi, k, n = make_multi_step(step), steps_per_call, len(batches)
    stacked = [put_stacked_batches([batches[(i + j) % n] for j in range(k)], mesh) for i in range(n)]

    def run_multi(i):  # k steps on batches i .. i+k-1 in one call
        holder["state"], m = multi(holder["state"], stacked[i % n])
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"][0]), k
    return run_multi


def setup_torch(student_dir, teacher_dir, batches):
    """The same step in eager PyTorch / transformers as ``run(i) -> (loss, 1)``."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in student.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)

    def to_torch(b):
        ids = torch.tensor(b["input_ids"], dtype=torch.long)
        attn = torch.tensor(b["attention_mask"], dtype=torch.long)
        pos = torch.clamp(torch.cumsum(attn, -1) - 1, min=0)
        mask = (torch.tensor(b["loss_mask"][:, 1:]) > 0) & (attn[:, 1:] > 0) & (attn[:, :-1] > 0)
        return ids, attn, pos, mask

    def step(b):
        ids, attn, pos, mask = b
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1].float()
        s_logits = student(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1].float()
        m = mask.float()
        lp, lq = F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)
        kl = ((lp.exp() * (lp - lq)).sum(-1) * m).sum() / m.sum().clamp(min=1)
        nll = -lq.gather(-1, ids[:, 1:, None])[..., 0]
        ce = (nll * m).sum() / m.sum().clamp(min=1)
        loss = kl + CE_WEIGHT * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    torch_batches = [to_torch(b) for b in batches]
    return lambda i: (step(torch_batches[i % len(torch_batches)]), 1)


def timed(run, i):
    """(first loss, wall, CPU) of one call, the times per optimizer step."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss, steps = run(i)
    return loss, (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def timed_block(run, first: int, block: int) -> list[tuple[float, float]]:
    """``block`` consecutive calls from batch ``first``; (wall, CPU) seconds per step of all but the first."""
    run(first)  # untimed: the switch from the other library
    return [timed(run, first + j)[1:] for j in range(1, block)]


def _worker(conn, spec: dict, student_dir, teacher_dir, batches, threads: int) -> None:
    """One side of the comparison in its own process (see the module docstring): sends (first loss, first call
    seconds), then answers ``(first batch, block)`` with ``timed_block`` until it receives ``None``."""
    if spec["kind"] == "jax":
        if spec["devices"] > 1:  # before JAX starts its backend, as `proxytune train --cpu-devices N` does
            from proxytune_jax.commands.train import use_cpu_devices
            use_cpu_devices(spec["devices"])
        run = setup_jax(student_dir, teacher_dir, batches, spec["steps_per_call"], spec["devices"])
    else:
        import torch
        torch.set_num_threads(threads)
        run = setup_torch(student_dir, teacher_dir, batches)
    t0 = time.perf_counter()
    loss = run(0)[0]
    conn.send((loss, time.perf_counter() - t0))
    while (msg := conn.recv()) is not None:
        conn.send(timed_block(run, *msg))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=0,
                   help="cores for BOTH sides: the process is pinned to N cores (sched_setaffinity; XLA:CPU "
                        "uses the cores it may run on) and torch.set_num_threads(N). 0: all cores available. "
                        "1 is the comparison least disturbed by other jobs on a shared machine")
    p.add_argument("--block", type=int, default=5,
                   help="consecutive steps per side before switching (the first of each block is not timed)")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="also time make_multi_step with this many optimizer steps per jitted call (the "
                        "TrainConfig.steps_per_call of proxytune train); 1: only the single-step row")
    p.add_argument("--no-mesh", dest="mesh", action="store_false",
                   help="leave out the row with a data-parallel mesh over one CPU device per core")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.block < 2:
        p.error("--block must be >= 2 (the first step of each block is not timed)")
    if args.steps_per_call < 1:
        p.error("--steps-per-call must be >= 1")

    if args.threads:  # pin to N cores before any worker starts: XLA:CPU sizes its pools from them
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    threads = len(os.sched_getaffinity(0))
    k = args.steps_per_call
    mesh_devices = max(d for d in range(1, threads + 1) if args.batch % d == 0) if args.mesh else 1
    specs = {}
    for devices in sorted({1, mesh_devices}):
        for per_call in sorted({1, k}):
            where = "1 device" if devices == 1 else f"mesh data={devices}"
            specs[f"proxytune_jax ({where}, {per_call} step{'s' if per_call > 1 else ''}/call)"] = dict(
                kind="jax", devices=devices, steps_per_call=per_call)
    specs["PyTorch/transformers"] = dict(kind="torch")
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        student_dir, teacher_dir = make_models(Path(tmp), args.size)
        batches = make_batches(4, args.batch, args.seq)
        tokens = statistics.mean(float(b["attention_mask"].sum()) for b in batches)
        sides, first = {}, {}
        try:
            for name, spec in specs.items():  # one at a time: compilation (JAX) / warm-up (PyTorch)
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(theirs, spec, student_dir, teacher_dir, batches, threads),
                                   daemon=True)
                proc.start()
                sides[name] = (proc, ours)
                first[name] = ours.recv()
            times = {name: [] for name in sides}
            i = 1
            while min(len(t) for t in times.values()) < args.steps:  # alternating blocks: same background load
                for name, (_, conn) in sides.items():
                    conn.send((i, args.block))
                    times[name] += conn.recv()
                i += args.block
        finally:
            for proc, conn in sides.values():
                conn.send(None)
                proc.join(timeout=60)
    torch_name, base = "PyTorch/transformers", "proxytune_jax (1 device, 1 step/call)"
    med = {n: statistics.median(w for w, _ in t[:args.steps]) for n, t in times.items()}
    cpu = {n: statistics.median(c for _, c in t[:args.steps]) for n, t in times.items()}
    print(f"online distillation step, size={args.size} (student {SIZES[args.size][0]['hidden_size']}x"
          f"{SIZES[args.size][0]['num_layers']}, teacher {SIZES[args.size][1]['hidden_size']}x"
          f"{SIZES[args.size][1]['num_layers']}), vocab {VOCAB}, batch {args.batch} x {args.seq}, "
          f"{args.steps} timed calls per row in alternating blocks of {args.block}, {threads} cores (torch threads, "
          f"XLA:CPU pool); {tokens:.0f} real tokens per batch; every row in its own process")
    print(f"{'implementation':<42} {'first loss':>11} {'first call s':>13} {'median s/step':>14} "
          f"{'median CPU s/step':>18} {'tokens/s':>10} {'vs PyTorch':>11}")
    for name in sides:
        loss, t_first = first[name]
        print(f"{name:<42} {loss:>11.5f} {t_first:>13.3f} {med[name]:>14.4f} {cpu[name]:>18.4f} "
              f"{tokens / med[name]:>10.0f} {med[torch_name] / med[name]:>10.2f}x")
    ratios = {n: med[torch_name] / med[n] for n in sides if n != torch_name}
    print("speed-up JAX / PyTorch (wall clock; target >= 1.5x): "
          + ", ".join(f"{r:.2f}x ({n.split('(')[1][:-1]})" for n, r in ratios.items())
          + f"; in process CPU time {cpu[torch_name] / cpu[base]:.2f}x (1 device, 1 step/call); "
          f"first-step loss difference {max(abs(first[n][0] - first[torch_name][0]) for n in ratios):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "size": args.size, "batch": args.batch, "seq": args.seq, "threads": threads, "steps_per_call": k,
            "tokens_per_s": {n: tokens / med[n] for n in sides}, "ratio": ratios,
            "cpu_time_ratio": cpu[torch_name] / cpu[base],
            "first_loss": {n: first[n][0] for n in sides}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
