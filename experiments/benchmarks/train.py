"""Tokens/s of one online-distillation train step: proxytune_jax (jitted, donated state) against a PyTorch /
transformers re-implementation of the same step, on the same tiny models, in one run.

The step (both sides): teacher forward without gradient, student forward, forward KL(teacher || student) on
the response tokens (+ 0.1 * cross-entropy), backward, global-norm clipping at 1.0, AdamW (lr 1e-3, wd 0.01,
b1 0.9, b2 0.95). Same weights (the JAX side loads the folders transformers wrote), same batches. The first
step's loss is printed for both sides as a sanity check.

    python experiments/benchmarks/train.py [--size tiny|small] [--batch 8] [--seq 128] [--steps 20]
                                           [--block 5] [--threads N]

Prints a table: median seconds per step (wall clock and process CPU time), tokens/s (real tokens in the batch /
median wall-clock step time), and the JAX / PyTorch ratios. With ``--threads 1`` the CPU-time ratio is the
measure least disturbed by other jobs on a shared machine (with more threads it also counts spin-waiting).

Fairness: both sides get the same number of threads (``--threads``; default: the cores this process may use,
which is what XLA:CPU uses); after one untimed warm-up step each, the two sides alternate in *blocks* of
``--block`` consecutive steps (JAX block, PyTorch block, ...) so that load from other processes on a shared
machine hits both sides alike. The first step of every block is not timed: it absorbs the switch (the other
library's worker threads spinning down, this one's waking up), which a real training loop, running steps back
to back, never pays (a pause before every timed step would instead charge the wake-up of XLA's parked worker
threads to each JAX step: 59 ms instead of 41-45 ms per tiny step). The JAX timing blocks on the new state and
metrics; the state is donated.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # (student, teacher) overrides of a Llama config
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
             dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)),
    "small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=32),
              dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64)),
}
VOCAB = 1024
CE_WEIGHT = 0.1


def make_models(root: Path, size: str):
    import torch
    import transformers
    paths = []
    for name, over, seed in (("student", SIZES[size][0], 1), ("teacher", SIZES[size][1], 2)):
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                       **over)
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


def setup_jax(student_dir, teacher_dir, batches):
    """The jitted, donated online-distillation step as ``run(i) -> loss`` (compiled on first call)."""
    import jax
    import proxytune_jax as pj
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import MeshConfig, make_mesh, put_global_batch, shard_tree
    from proxytune_jax.training.objectives import online_distillation_objective
    from proxytune_jax.training.optim import OptimConfig, make_optimizer
    from proxytune_jax.training.state import init_train_state, split_params, train_state_shardings
    from proxytune_jax.training.step import make_train_step

    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    student, teacher = pj.load_pretrained(student_dir), pj.load_pretrained(teacher_dir)
    g, params = split_params(student)
    tg, tparams = split_params(teacher)
    rules = partition_rules(student.config)
    opt = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10**6, min_lr_ratio=1.0,
                                     weight_decay=0.01, b1=0.9, b2=0.95, grad_clip_norm=1.0))
    state = init_train_state(params, opt, rules=rules, mesh=mesh)
    step = make_train_step(online_distillation_objective(g, tg, loss="forward_kl", ce_weight=CE_WEIGHT), opt, mesh,
                           state_shardings=train_state_shardings(state, rules, mesh),
                           frozen={"teacher": shard_tree(tparams, partition_rules(teacher.config), mesh)})
    device_batches = [put_global_batch(b, mesh) for b in batches]
    holder = {"state": state}

    def run(i):  # one step on batch i; returns the loss (blocks until the new state and metrics exist)
        holder["state"], m = step(holder["state"], device_batches[i % len(device_batches)])
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])

    return run


def setup_torch(student_dir, teacher_dir, batches):
    """The same step in eager PyTorch / transformers as ``run(i) -> loss``."""
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
    return lambda i: step(torch_batches[i % len(torch_batches)])


def timed(run, i):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = run(i)
    return loss, time.perf_counter() - t0, time.process_time() - c0


def timed_block(run, first: int, block: int) -> list[tuple[float, float]]:
    """``block`` consecutive steps from batch ``first``; (wall, CPU) seconds of all but the first."""
    run(first)  # untimed: the switch from the other library
    return [timed(run, first + j)[1:] for j in range(1, block)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0,
                   help="cores for BOTH sides: the process is pinned to N cores (sched_setaffinity; XLA:CPU "
                        "uses the cores it may run on) and torch.set_num_threads(N). 0: all cores available. "
                        "1 is the comparison least disturbed by other jobs on a shared machine")
    p.add_argument("--block", type=int, default=5,
                   help="consecutive steps per side before switching (the first of each block is not timed)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.block < 2:
        p.error("--block must be >= 2 (the first step of each block is not timed)")

    if args.threads:  # pin the process to N cores before jax is imported: XLA:CPU sizes its pools from them
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    threads = len(os.sched_getaffinity(0))
    import torch
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        student_dir, teacher_dir = make_models(Path(tmp), args.size)
        batches = make_batches(4, args.batch, args.seq)
        tokens = statistics.mean(float(b["attention_mask"].sum()) for b in batches)
        run_jax = setup_jax(student_dir, teacher_dir, batches)
        run_torch = setup_torch(student_dir, teacher_dir, batches)
        jl, jc, _ = timed(run_jax, 0)  # first step: compilation (JAX) / warm-up (PyTorch)
        tl, tc, _ = timed(run_torch, 0)
        jt, tt = [], []
        i = 1
        while len(jt) < args.steps:  # alternating blocks, so both sides see the same background load
            jt += timed_block(run_jax, i, args.block)
            tt += timed_block(run_torch, i, args.block)
            i += args.block
        jt, tt = jt[:args.steps], tt[:args.steps]
    jm, tm = (statistics.median(t for t, _ in x) for x in (jt, tt))
    jcpu, tcpu = (statistics.median(c for _, c in x) for x in (jt, tt))
    rows = [("proxytune_jax (jit)", jl, jc, jm, jcpu, tokens / jm),
            ("PyTorch/transformers", tl, tc, tm, tcpu, tokens / tm)]
    print(f"online distillation step, size={args.size} (student {SIZES[args.size][0]['hidden_size']}x"
          f"{SIZES[args.size][0]['num_hidden_layers']}, teacher {SIZES[args.size][1]['hidden_size']}x"
          f"{SIZES[args.size][1]['num_hidden_layers']}), vocab {VOCAB}, batch {args.batch} x {args.seq}, "
          f"{args.steps} timed steps in alternating blocks of {args.block}, threads: torch {torch.get_num_threads()}, "
          f"cores (XLA) {threads}; {tokens:.0f} real tokens per batch")
    print(f"{'implementation':<22} {'first loss':>11} {'first step s':>13} {'median s/step':>14} "
          f"{'median CPU s/step':>18} {'tokens/s':>10}")
    for name, loss, first, med, cpu, tps in rows:
        print(f"{name:<22} {loss:>11.5f} {first:>13.3f} {med:>14.4f} {cpu:>18.4f} {tps:>10.0f}")
    ratio = tm / jm
    print(f"speed-up JAX / PyTorch: {ratio:.2f}x wall-clock (target >= 1.5x), {tcpu / jcpu:.2f}x in process CPU "
          f"time; first-step loss difference {abs(jl - tl):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "batch": args.batch, "seq": args.seq,
                                               "jax_tokens_per_s": tokens / jm, "torch_tokens_per_s": tokens / tm,
                                               "ratio": ratio, "cpu_time_ratio": tcpu / jcpu,
                                               "threads": threads, "jax_first_loss": jl, "torch_first_loss": tl}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
