"""Time and peak memory of the distillation losses: plain [N, V] logits vs the chunked (memory-lean) path.

For every per-position loss, at N = B·T positions (default 4096) and each vocabulary size, one jitted step
``value_and_grad`` w.r.t. the student's final hidden states and LM-head weight is measured for
  - plain   : ``loss_from_hidden`` (full float32 [N, V] logits for student and teacher),
  - chunked : ``chunked_loss`` (lax.scan over position chunks, fused gradient, no recompute),
  - remat   : ``chunked_loss_remat`` (lax.scan + jax.checkpoint; for the losses named by --remat,
              default forward_kl only, to keep the CPU run short),
all in the same process and run, interleaved. Memory is reported two ways:
  - XLA: ``jax.jit(f).lower(...).compile().memory_analysis()``: temp + argument + output − alias bytes
    (what the executable needs at peak, as XLA plans it),
  - RSS (cross-check, forward_kl only, --rss): a fresh subprocess per (path, V) compiles the step, then
    runs it once; peak resident set during that first run (VmHWM, reset through /proc/self/clear_refs)
    minus the resident set before it. (Inside one long process RSS is useless: XLA's CPU allocator keeps
    buffers of earlier steps resident and reuses them.)
Time is the median wall time of --repeats calls after one warm-up call (compile excluded).
Hidden size D (default 64) sets the matmul share of the step: the fused chunked path does the same four
matmuls as the plain one, so its time ratio tends to 1 as D grows; a small D stresses the vocabulary-wide
elementwise work, which is where chunking could lose. The CPU of the shared 2-core machine makes this slow.
The non-per-position losses (SinKD, FIRST top-k KL) are timed plain at their own sizes, as a reference.

Usage: python experiments/benchmarks/losses.py [--positions 4096] [--hidden 256] [--vocab 32000 128256]
       [--losses forward_kl reverse_kl ...] [--repeats 2] [--remat]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from _fit import does_not_fit, human, is_out_of_memory, memory_budget_bytes, xla_peak_bytes
from proxytune_jax.losses import LOSSES, chunked_loss, chunked_loss_remat, loss_from_hidden

# The losses ``chunked_loss`` takes with a full-logit teacher: entries of ``losses.LOSSES`` with a per-position form.
FULL_LOGIT_PER_POSITION = [k for k, spec in LOSSES.items()
                           if spec.per_position is not None and spec.teacher == "logits"]

GIB = float(1 << 30)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MAX_RUN_BYTES = float("inf")  # set by --max-run-gib, default: what fits this machine (_fit.memory_budget_bytes)
SKIPPED: list[str] = []  # "name: why" of every step not run


def measure(fn, args, repeats, warmup=True, label=""):
    """(median seconds, XLA peak bytes) of a jitted fn(*args). Time is nan when not executed: repeats=0, an XLA
    peak above the budget ("does not fit (N GB)"), or an out-of-memory error while running (reported, skipped)."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as err:  # noqa: BLE001 -- report and go on with the next row
        if not is_out_of_memory(err):
            raise
        SKIPPED.append(f"{label}: out of memory while compiling")
        print(f"  {label}: out of memory while compiling; skipped", flush=True)
        return float("nan"), float("nan")
    xla = xla_peak_bytes(compiled)
    note = does_not_fit(xla, MAX_RUN_BYTES)
    if note:
        SKIPPED.append(f"{label}: {note}")
        print(f"  {label}: {note}; skipped", flush=True)
    if repeats == 0 or note:
        return float("nan"), xla
    try:
        if warmup:
            jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001
        if not is_out_of_memory(err):
            raise
        SKIPPED.append(f"{label}: ran out of memory ({xla / GIB:.1f} GiB planned)")
        print(f"  {label}: ran out of memory; skipped", flush=True)
        return float("nan"), xla
    return statistics.median(times), xla


def _inputs(n, d, vocab, seed=0):
    key = jax.random.split(jax.random.PRNGKey(seed), 5)
    hs = jax.random.normal(key[0], (n, d), jnp.float32)
    ws = jax.random.normal(key[1], (vocab, d), jnp.float32) * d ** -0.5  # [V, D]
    ht = jax.random.normal(key[2], (n, d), jnp.float32)
    wt = jax.random.normal(key[3], (vocab, d), jnp.float32) * (2.0 / d) ** 0.5
    labels = jax.random.randint(key[4], (n,), 0, vocab)
    return hs, ws, ht, wt, labels


PATHS = {"plain": loss_from_hidden, "chunked": chunked_loss, "remat": chunked_loss_remat}


def _step(name, impl, pos):
    def step(hs, ws, ht, wt, mask):
        kw = {"position_args": pos} if pos else {}
        return jax.value_and_grad(lambda a, b: impl(name, a, b, ht, wt, mask, **kw), argnums=(0, 1))(hs, ws)
    return step


def rss_child(name, path, n, d, vocab):
    """Run in a fresh process: print the RSS increase (bytes) during the first execution of the step."""
    hs, ws, ht, wt, labels = _inputs(n, d, vocab)
    pos = {"labels": labels} if LOSSES[name].uses_labels else None
    args = (hs, ws, ht, wt, jnp.ones((n,), bool))
    compiled = jax.jit(_step(name, PATHS[path], pos)).lower(*args).compile()
    jax.block_until_ready(args)
    base = _rss_bytes("VmRSS")
    ok = _reset_peak_rss()
    jax.block_until_ready(compiled(*args))
    print("RSS_PEAK_INCREASE", _rss_bytes("VmHWM") - base if ok else -1, flush=True)


def rss_rows(name, n, d, vocabs, paths):
    import subprocess
    import sys
    rows = []
    for v in vocabs:
        res = {}
        for path in paths:
            out = subprocess.run([sys.executable, __file__, "--_rss-child", name, path, str(n), str(d), str(v)],
                                 capture_output=True, text=True, check=True).stdout
            res[path] = int(out.split("RSS_PEAK_INCREASE")[1].split()[0])
        rows.append((name, v, res))
        print(f"  RSS {name} V={v}: " + ", ".join(f"{p} {b / GIB:.2f}GiB" for p, b in res.items()), flush=True)
    return rows


def per_position_rows(names, n, d, vocab, repeats, remat, seed=0, warmup=True):
    hs, ws, ht, wt, labels = _inputs(n, d, vocab, seed)
    mask = jnp.ones((n,), bool)
    rows = []
    for name in names:
        pos = {"labels": labels} if LOSSES[name].uses_labels else None
        res = {}
        for path in ["plain", "chunked"] + (["remat"] if name in remat else []):
            res[path] = measure(_step(name, PATHS[path], pos), (hs, ws, ht, wt, mask), repeats, warmup,
                                label=f"{name} {path} V={vocab}")
        rows.append((name, vocab, res))
        p, c = res["plain"], res["chunked"]
        print(f"  {name:16s} V={vocab:6d} XLA plain {human(p[1])}, chunked {human(c[1])}", flush=True)
        print(f"  {name:16s} V={vocab:6d} plain {p[0]:7.2f}s {p[1] / GIB:6.2f}GiB | chunked {c[0]:7.2f}s "
              f"{c[1] / GIB:6.2f}GiB  (time x{c[0] / p[0]:.2f}, XLA mem /{p[1] / c[1]:.1f})", flush=True)
    return rows


def other_rows(vocab, repeats, seed=0, warmup=True):
    """Losses that are not per-position: value_and_grad w.r.t. student logits (plain only)."""
    from proxytune_jax.losses.first import TopKTeacher, topk_from_logits, topk_kl
    from proxytune_jax.losses.sinkd import sinkd, sinkhorn_ott

    key = jax.random.split(jax.random.PRNGKey(seed), 3)
    rows = []
    n = 4096
    s = jax.random.normal(key[0], (n, vocab), jnp.float32)
    t = jax.random.normal(key[1], (n, vocab), jnp.float32) * 2
    teacher = topk_from_logits(t, 5)
    for mode in ("renormalize", "tail_bucket"):
        f = lambda s, ids, lp, mode=mode: jax.value_and_grad(
            lambda x: topk_kl(x, TopKTeacher(ids, lp), None, mode=mode))(s)
        rows.append((f"topk_kl[{mode}] N={n}, k=5", vocab, measure(f, (s, teacher.ids, teacher.logp), repeats, warmup,
                                                                     label=f"topk_kl[{mode}] V={vocab}")))
    n_ot = 256
    s2, t2 = s[:n_ot], t[:n_ot]
    rows.append((f"sinkd N={n_ot}", vocab, measure(lambda a, b: jax.value_and_grad(sinkd)(a, b), (s2, t2), repeats,
                                                   warmup, label=f"sinkd V={vocab}")))
    rows.append((f"sinkhorn_ott N={n_ot}", vocab,
                 measure(lambda a, b: jax.value_and_grad(sinkhorn_ott)(a, b), (s2, t2), repeats, warmup,
                         label=f"sinkhorn_ott V={vocab}")))
    for name, v, r in rows:
        print(f"  {name:28s} V={v:6d} {r[0]:7.2f}s  XLA {r[1] / GIB:6.2f}GiB", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--losses", nargs="+",  # default: the divergences (not cross_entropy, which reads no teacher)
                    default=[k for k in FULL_LOGIT_PER_POSITION if k not in ("uld_kd", "cross_entropy")])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the first execution after the (ahead-of-time) compile instead of a second one")
    ap.add_argument("--memory-only", nargs="*", default=[],
                    help="losses reported by compile-time XLA memory only (not executed; e.g. the sort-bound ones)")
    ap.add_argument("--max-run-gib", type=float, default=None,
                    help="do not execute steps whose XLA peak exceeds this (default: 85%% of the memory available "
                         "now, or of the accelerator's); they are reported as 'does not fit (N GB)'")
    ap.add_argument("--rss", action="store_true", help="RSS cross-check of forward_kl in fresh subprocesses")
    ap.add_argument("--_rss-child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--remat", nargs="*", default=["forward_kl"], help="losses also measured with chunked_loss_remat")
    ap.add_argument("--skip-others", action="store_true", help="skip the SinKD / FIRST reference rows")
    args = ap.parse_args()
    global MAX_RUN_BYTES
    MAX_RUN_BYTES = args.max_run_gib * GIB if args.max_run_gib is not None else memory_budget_bytes()
    if args._rss_child:
        name, path, n, d, v = args._rss_child
        return rss_child(name, path, int(n), int(d), int(v))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; N={args.positions} "
          f"positions, D={args.hidden}, value_and_grad w.r.t. student hidden + LM head", flush=True)
    rows = []
    for v in args.vocab:
        rows += per_position_rows(args.losses, args.positions, args.hidden, v, args.repeats, args.remat,
                                  warmup=not args.no_warmup)
        if args.memory_only:
            rows += per_position_rows(args.memory_only, args.positions, args.hidden, v, 0, [])
    others = [] if args.skip_others else sum((other_rows(v, args.repeats, warmup=not args.no_warmup)
                                              for v in args.vocab), [])
    paths = ["plain", "chunked"] + (["remat"] if args.remat else [])
    rss_paths = ["plain", "chunked"] + (["remat"] if "forward_kl" in args.remat else [])
    rss = rss_rows("forward_kl", args.positions, args.hidden, args.vocab, rss_paths) if args.rss else []

    head = "| loss | V | " + " | ".join(f"{p} s | {p} XLA GiB" for p in paths)
    head += " | time chunked/plain | XLA peak plain/chunked |"
    print()
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, v, res in rows:
        cells = []
        for p in paths:
            t, x = res.get(p, (float("nan"), float("nan")))
            cells.append(f"{t:.2f} | {x / GIB:.2f}" if p in res else " | ")
        p, c = res["plain"], res["chunked"]
        print(f"| {name} | {v} | " + " | ".join(cells) + f" | {c[0] / p[0]:.2f} | {p[1] / c[1]:.1f} |")
    if rss:
        print()
        print("| RSS cross-check (fresh process, first run) | V | " + " | ".join(f"{p} GiB" for p in rss_paths)
              + " | plain/chunked |")
        print("|---|---|" + "---|" * (len(rss_paths) + 1))
        for name, v, res in rss:
            print(f"| {name} | {v} | " + " | ".join(f"{res[p] / GIB:.2f}" for p in rss_paths)
                  + f" | {res['plain'] / max(res['chunked'], 1):.1f} |")
    if others:
        print()
        print("| loss (plain, value_and_grad w.r.t. student logits) | V | s | XLA GiB |")
        print("|---|---|---|---|")
        for name, v, (t, x) in others:
            print(f"| {name} | {v} | {t:.2f} | {x / GIB:.2f} |")
    if SKIPPED:
        print()
        print(f"Not run (budget {human(MAX_RUN_BYTES)}; --max-run-gib to change): " + "; ".join(SKIPPED))


if __name__ == "__main__":
    main()
