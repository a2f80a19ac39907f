"""What ``xla_options.compiler_options`` (XLA:CPU temporaries in heaps of at most 8 MiB) does to a train step.

The tiny online-distillation step of ``experiments/benchmarks/train.py`` (same models, same batches, one
device) is run in a fresh process per setting, because the state of glibc's malloc is per process:

- ``heaps <= 8 MiB``: the library's default (``compiler_options(mesh)`` passed to ``jax.jit``);
- ``one heap``: the same step compiled without compiler options (XLA's default single temp heap);
- ``keep freed memory``: no compiler options, glibc told to keep freed memory instead
  (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, process-global; for reference only).

Per setting it prints the minor page faults per step (``getrusage``) and the median wall time per step over
``--steps`` steps after a warm-up, plus each setting's time relative to the library default, measured in the
same run. The option matters when the step's temp heap is larger than glibc's largest mmap threshold (32 MiB):
such a heap is then faulted in page by page on every call.

    python experiments/benchmarks/cpu_heaps.py [--size tiny|small] [--batch 8] [--seq 128] [--steps 30]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "heaps <= 8 MiB": ({}, True),
    "one heap": ({}, False),
    "keep freed memory": ({"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}, False),
}


def _train_bench():
    spec = importlib.util.spec_from_file_location("_train_bench", HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(student_dir: str, teacher_dir: str, batch: int, seq: int, steps: int, with_option: bool) -> dict:
    """One setting, in this (fresh) process: ``{"faults_per_step", "median_s"}``."""
    bench = _train_bench()
    if not with_option:  # compile the same step without the library's compiler options
        import proxytune_jax.training.step as step_module
        step_module.compiler_options = lambda mesh: None
    batches = bench.make_batches(4, batch, seq)
    run = bench.setup_jax(Path(student_dir), Path(teacher_dir), batches)
    for i in range(3):  # compile + warm-up
        run(i)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(steps):
        t = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"faults_per_step": faults / steps, "median_s": statistics.median(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        s, t, b, q, n, opt = args._child
        print(json.dumps(child(s, t, int(b), int(q), int(n), opt == "1")))
        return 0

    bench = _train_bench()
    with tempfile.TemporaryDirectory() as tmp:
        student_dir, teacher_dir = bench.make_models(Path(tmp), args.size)
        results = {}
        for name, (env, with_option) in SETTINGS.items():
            out = subprocess.run([sys.executable, __file__, "--_child", str(student_dir), str(teacher_dir),
                                  str(args.batch), str(args.seq), str(args.steps), "1" if with_option else "0"],
                                 env={**os.environ, **env}, capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results["heaps <= 8 MiB"]["median_s"]
    print(f"{args.size} online-distillation step, batch {args.batch} x {args.seq}, {args.steps} steps per setting")
    for name, r in results.items():
        print(f"  {name:<18} {r['faults_per_step']:9.0f} minor faults/step   {r['median_s'] * 1e3:8.2f} ms/step   "
              f"{r['median_s'] / ref:5.2f}x the library default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
