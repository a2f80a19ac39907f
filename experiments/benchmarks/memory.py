"""Temporary memory of a train step against sequence length, read from XLA's compiled memory analysis.

The step: forward of a Llama-shaped model (default: the issue's 4 layers, 8 heads, hidden 256, vocab 1024,
batch 1), mean token cross-entropy in float32, backward, one AdamW update. It is only lowered and compiled
(``jax.jit(step).lower(...).compile().memory_analysis()``) on abstract arrays, nothing is allocated or run,
so T 8k fits any machine. For every compute path (``models.backend.force``) and remat policy it prints the
temp bytes per token at each ``--seq`` and the growth from the first to the last length (linear memory gives
``last / first``, e.g. 16x for 512 -> 8k; the stored-P attention gives far more).

Paths: ``portable`` (what GPU/TPU fall back to without a fused kernel: einsum dense + ``attend_blockwise``),
``cpu`` (``models.cpu_backend``; attention stored-P below ``cpu_backend.BLOCKWISE_FROM`` queries, blockwise
from there), ``stored-P`` (the CPU path with the threshold disabled: the pre-issue-#23 attention at every T).

    PYTHONPATH=. python experiments/benchmarks/memory.py [--seq 512 1024 2048 4096 8192] [--remat none full]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from proxytune_jax.models import abstract_model, backend, cpu_backend, small_llama_config

MIB = 1 << 20


def llama_shaped(vocab=1024, hidden=256, layers=4, heads=8, kv_heads=8, max_positions=8192, remat="none"):
    cfg = small_llama_config(vocab, hidden, layers, heads, num_kv_heads=kv_heads, intermediate_size=4 * hidden,
                             max_positions=max_positions)
    return dataclasses.replace(cfg, remat=remat)


def train_step_temp_bytes(config, batch: int, seq: int, dtype=jnp.float32) -> int:
    """``temp_size_in_bytes`` of the compiled train step (loss, backward, AdamW) for ``[batch, seq]`` tokens,
    traced with the compute path in effect (``backend.current()``)."""
    graphdef, state = nnx.split(abstract_model(config, dtype))
    params = nnx.to_pure_dict(state)
    opt = optax.adamw(1e-3)
    opt_state = jax.eval_shape(opt.init, params)

    def step(params, opt_state, ids):
        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(ids[:, :-1])  # [B, T-1, V] f32
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    ids = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, ids).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@contextlib.contextmanager
def compute_path(name: str):
    if name == "stored-P":
        saved = cpu_backend.BLOCKWISE_FROM
        cpu_backend.BLOCKWISE_FROM = 1 << 62
        try:
            with backend.force("cpu"):
                yield
        finally:
            cpu_backend.BLOCKWISE_FROM = saved
    else:
        with backend.force(name):
            yield


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--paths", nargs="+", default=["stored-P", "portable", "cpu"])
    ap.add_argument("--remat", nargs="+", default=["none", "full"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-stored-p", type=int, default=4096, help="skip stored-P above this T (compile time)")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; Llama-shaped 4 layers, 8 heads, hidden 256, "
          f"vocab 1024, batch {args.batch}; temp MiB (KiB per token)")
    print(f"{'path':10s} {'remat':8s} " + " ".join(f"{'T ' + str(t):>18s}" for t in args.seq) + "   growth")
    for path in args.paths:
        for remat in args.remat:
            cfg = llama_shaped(remat=remat, max_positions=max(args.seq) + 1)
            cells, temps = [], []
            for t in args.seq:
                if path == "stored-P" and t > args.max_stored_p:
                    cells.append(f"{'-':>18s}")
                    continue
                with compute_path(path):
                    temp = train_step_temp_bytes(cfg, args.batch, t)
                temps.append((t, temp))
                cells.append(f"{temp / MIB:9.1f} ({temp / 1024 / (t * args.batch):6.1f})")
            (t0, m0), (t1, m1) = temps[0], temps[-1]
            print(f"{path:10s} {remat:8s} " + " ".join(cells) + f"   {m1 / m0:5.1f}x for {t1 // t0}x T", flush=True)


if __name__ == "__main__":
    main()
