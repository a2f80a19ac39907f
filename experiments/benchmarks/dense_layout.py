"""Why ``models.cpu_backend.dense`` stores weights ``[out, in]`` and computes few-row products transposed.

A chain of ``--layers`` MLP blocks ``x + silu(x W1) W2`` (hidden ``--hidden``, mlp ``--mlp``, float32) is
timed, jitted, for several row counts N (tokens per step: a decode step's batch, a prefill, a train batch),
three ways:

- ``x @ W[in, out]``: flax's kernel layout, the plain product;
- ``x @ W[out, in].T``: the PyTorch layout, the plain product (``einsum("ni,oi->no")``);
- ``cpu_backend.dense``: the PyTorch layout through the library's ``dense`` (for N <= ``SMALL_BATCH_ROWS`` it
  computes ``W @ x.T -> [out, N]`` behind an ``optimization_barrier`` and transposes the small result).

Prints best-of-``--repeats`` milliseconds, the weight-read rate (weight bytes / time) and ``dense``'s speed-up
over the flax layout. Few rows are bound by reading the weights; many rows by the matmul units.

    python experiments/benchmarks/dense_layout.py [--rows 1 8 32 128 512] [--layers 12]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.models import cpu_backend


def best_time(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def mlp_chain(linear):
    def f(params, x):
        for w1, w2 in params:
            x = x + linear(jax.nn.silu(linear(x, w1)), w2)
        return x
    return jax.jit(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    d, f = args.hidden, args.mlp
    w_in_out = [(rng.standard_normal((d, f), np.float32) * d ** -0.5,
                 rng.standard_normal((f, d), np.float32) * f ** -0.5) for _ in range(args.layers)]
    flax_layout = [(jnp.asarray(a), jnp.asarray(b)) for a, b in w_in_out]
    torch_layout = [(jnp.asarray(a.T.copy()), jnp.asarray(b.T.copy())) for a, b in w_in_out]
    weight_bytes = 2 * args.layers * d * f * 4
    ways = {
        "x @ W[in, out]": (mlp_chain(lambda x, w: x @ w), flax_layout),
        "x @ W[out, in].T": (mlp_chain(lambda x, w: jnp.einsum("ni,oi->no", x, w)), torch_layout),
        "cpu_backend.dense": (mlp_chain(cpu_backend.dense), torch_layout),
    }
    print(f"{args.layers} MLP blocks {d} x {f}, float32, weights {weight_bytes / 2**20:.0f} MiB, "
          f"SMALL_BATCH_ROWS = {cpu_backend.SMALL_BATCH_ROWS}, devices {jax.devices()}")
    print("| rows N | " + " | ".join(f"{name} ms (GB/s)" for name in ways) + " | dense / flax layout |")
    print("|---|" + "---|" * (len(ways) + 1))
    for n in args.rows:
        x = jnp.asarray(rng.standard_normal((n, d), np.float32))
        times, outs = [], []
        for fn, params in ways.values():
            times.append(best_time(fn, params, x, repeats=args.repeats))
            outs.append(np.asarray(fn(params, x)))
        err = max(float(np.max(np.abs(o - outs[0]))) for o in outs[1:])
        if err > 1e-3 * max(1.0, float(np.max(np.abs(outs[0])))):
            raise SystemExit(f"the three ways disagree at N={n}: max abs difference {err}")
        cells = " | ".join(f"{t * 1e3:.2f} ({weight_bytes / t / 1e9:.1f})" for t in times)
        print(f"| {n} | {cells} | {times[0] / times[2]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
