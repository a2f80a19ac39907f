"""Why ``models.attention`` writes its backward pass by hand and how many query blocks ``attend_causal`` uses.

One jitted forward+backward (gradient of ``sum(out * g)`` w.r.t. q, k, v) of grouped-query causal attention is
timed, at the tiny teacher's attention shapes by default (B 8, H 4, K 2, D 32), for every ``--seq`` length:

- ``autodiff``: the same masked softmax attention written plainly and differentiated by JAX (the reference
  the hand-written backward replaces);
- ``attend``: the library's attention with its hand-written (FlashAttention-equation) backward, all keys;
- ``blockwise n``: ``attention.attend_blockwise`` (the portable default: online softmax, recomputing
  backward) with blocks of ``n`` rows; the CPU path switches to it from ``cpu_backend.BLOCKWISE_FROM`` queries;
- ``causal n``: ``attend_causal`` with ``n`` query blocks (each block multiplies only the keys up to its own
  end); the row of ``causal_blocks(T)``, the count the library picks, is marked ``*``.

Prints the median milliseconds of ``--repeats`` calls (after one compiling call) and each row's time relative
to ``attend``, all measured in the same run. ``--forward-only`` times the forward pass alone (evaluation).

    python experiments/benchmarks/attention.py [--seq 128 512 2048] [--blocks 2 4 8 16] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.models import attention as A
from proxytune_jax.models import cpu_backend as C


def reference_attention(q, k, v, allowed, scale):
    """Plain grouped-query masked softmax attention, left to autodiff (same layout and math as ``attend``)."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, d)  # [B, T, K, G, D]
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(allowed[:, None, None], s, A.MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v)
    return out.reshape(b, t, h, d).astype(q.dtype)


def timed(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make(fn, forward_only: bool):
    if forward_only:
        return jax.jit(fn)

    def loss(q, k, v, allowed, g):
        return jnp.sum(fn(q, k, v, allowed) * g)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--blockwise", type=int, nargs="*", default=[64, 128, 256],
                    help="block sizes of attention.attend_blockwise rows (the portable path)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    b, h, kv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    print(f"{'forward' if args.forward_only else 'forward+backward'}, B {b}, H {h}, K {kv}, D {d}, "
          f"{jax.devices()[0].platform}; median of {args.repeats} calls")
    for t in args.seq:
        q = jnp.asarray(rng.standard_normal((b, t, h, d), np.float32))
        k = jnp.asarray(rng.standard_normal((b, kv, t, d), np.float32))
        v = jnp.asarray(rng.standard_normal((b, kv, t, d), np.float32))
        g = jnp.asarray(rng.standard_normal((b, t, h, d), np.float32))
        allowed = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        call_args = (q, k, v, allowed) if args.forward_only else (q, k, v, allowed, g)
        rows = [("autodiff", lambda q, k, v, m: reference_attention(q, k, v, m, scale)),
                ("attend", lambda q, k, v, m: A.attend(q, k, v, m, scale))]
        self_mask = A.SelfMask(jnp.ones((b, t), bool), jnp.broadcast_to(jnp.arange(t), (b, t)))
        for blk in args.blockwise:  # the portable path (mask from key_valid/positions: m is unused)
            if blk <= t:
                rows.append((f"blockwise {blk}",
                             lambda q, k, v, m, blk=blk: A.attend_blockwise(q, k, v, self_mask, scale, blk)))
        for n in args.blocks:
            if 2 <= n <= t:
                rows.append((f"causal {n}" + (" *" if n == C.causal_blocks(t) else ""),
                             lambda q, k, v, m, n=n: C.attend_causal(q, k, v, m, scale, num_blocks=n)))
        results = [(name, timed(make(fn, args.forward_only), call_args, args.repeats)) for name, fn in rows]
        ref = dict(results)["attend"]
        print(f"\nT {t} (causal_blocks(T) = {C.causal_blocks(t)})")
        for name, sec in results:
            print(f"  {name:<12} {sec * 1e3:8.2f} ms   {sec / ref:5.2f}x attend")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
