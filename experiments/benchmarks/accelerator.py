"""Accelerator benchmark (issue #23): one prepared script, random weights, prints one table.

1. HBM bandwidth, measured in this run (a large bf16 array read and written by a jitted elementwise op).
2. Decoding, proxy-tuned (1B-shaped target + 125M-shaped expert/anti-expert) vs plain (the target alone), bf16,
   greedy, batch 1 and 16: tokens/s and fraction of the HBM roofline (ideal step = bytes of all weights read
   once per step + the KV cache / measured bandwidth).
3. Online distillation train step, 1B student / 3B teacher at T 2048 (``make_train_step``, forward KL, bf16
   compute on fp32 master weights, ``--remat``): MFU = tokens/s x model FLOPs per token / peak FLOP/s, with
   model FLOPs per token = 6 N_student + 2 N_teacher + attention (causal: 6 L H Dh T for the student's
   forward+backward, 2 L H Dh T for the teacher's forward), peak from ``PEAK_FLOPS`` by device kind (named in
   the output; "unknown" -> no MFU).
4. KD loss at V 128k: ``losses.chunked.chunked_loss`` vs the plain ``loss_from_hidden`` (value+grad): time
   and peak (temp) memory from XLA's compiled memory analysis.

Runs from a source checkout under whatever jax is installed (``PYTHONPATH=. python
experiments/benchmarks/accelerator.py``); every section catches its own failure and prints it, so one
missing feature on a newer jax costs one row, not the run. ``--tiny`` runs the same code on CPU-sized shapes
in seconds (the tests run it). Budget on one H100: < 5 min (compiles dominate).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

# dense bf16 peak FLOP/s by device_kind substring (first match wins; vendor datasheets, no sparsity)
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
)

FULL = dict(
    target=dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8),  # ~1.2B
    small=dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),  # ~125M at V 32k
    student=dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8),
    teacher=dict(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8),  # ~3B
    vocab=32000, decode_vocab=32000, prompt=128, new=128, batches=(1, 16), train_batch=4, train_seq=2048,
    kd_positions=4096, kd_hidden=2048, kd_vocab=128256, bw_bytes=2 << 30,
)
TINY = dict(
    target=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    small=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
    student=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    teacher=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    vocab=256, decode_vocab=256, prompt=8, new=8, batches=(2,), train_batch=2, train_seq=32,
    kd_positions=64, kd_hidden=32, kd_vocab=1024, bw_bytes=8 << 20,
)


def peak_flops(kind: str) -> float | None:
    return next((f for name, f in PEAK_FLOPS if name.lower() in kind.lower()), None)


def n_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes/s of a jitted ``x * 2`` over ``n_bytes`` of bf16 (each byte read once and written once)."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x * 2)
    return 2 * n_bytes / best_time(lambda: f(x), repeats)


def decode_rows(S, bw, repeats):
    from flax import nnx

    from proxytune_jax.decoding.engine import Decoder
    from proxytune_jax.decoding.stopping import make_stop_criteria
    from proxytune_jax.models import init_model, small_llama_config

    common = dict(vocab_size=S["decode_vocab"], max_positions=S["prompt"] + S["new"] + 8, pad_token_id=None)
    target = init_model(small_llama_config(**common, **S["target"]), seed=0, dtype=jnp.bfloat16)
    expert = init_model(small_llama_config(**common, **S["small"]), seed=1, dtype=jnp.bfloat16)
    anti = init_model(small_llama_config(**common, **S["small"]), seed=2, dtype=jnp.bfloat16)
    p_t, p_s = (n_params(nnx.state(m, nnx.Param)) for m in (target, expert))
    rows = [("params", f"target {p_t / 1e6:.0f}M, pair {p_s / 1e6:.0f}M x2 (bf16)")]
    no_eos = make_stop_criteria([])
    rng = np.random.default_rng(0)
    decoders = {"plain": ([target], "plain"), "proxy-tuned": ([target, expert, anti], "proxy_tuning")}
    for b in S["batches"]:
        prompt = rng.integers(3, S["decode_vocab"], size=(b, S["prompt"])).astype(np.int32)
        mask = np.ones_like(prompt, bool)
        tps = {}
        for name, (models, rule) in decoders.items():
            dec = Decoder(models, rule)
            def run(dec=dec, k=len(models)):
                return dec.generate([(prompt, mask)] * k, max_new_tokens=S["new"], stop=no_eos).tokens
            sec = best_time(run, repeats)
            step = sec / S["new"]
            weights = 2 * (p_t + (2 * p_s if rule != "plain" else 0))
            kv = sum(2 * 2 * b * (S["prompt"] + S["new"] / 2) * m.config.num_hidden_layers
                     * m.config.num_key_value_heads * m.config.head_dim for m in models)
            tps[name] = b * S["new"] / sec
            roof = (weights + kv) / bw / step
            rows.append((f"decode {name} b={b}", f"{tps[name]:9.1f} tok/s   {roof:5.2f} of HBM roofline"))
        rows.append((f"decode proxy/plain b={b}", f"{tps['plain'] / tps['proxy-tuned']:5.2f}x time per token "
                     f"(weights ratio {(p_t + 2 * p_s) / p_t:.2f})"))
    return rows


def train_rows(S, kind, repeats, remat):
    from proxytune_jax.models import init_model, partition_rules, small_llama_config
    from proxytune_jax.sharding import MeshConfig, make_mesh, put_global_batch, shard_tree
    from proxytune_jax.training.objectives import OnlineDistillation
    from proxytune_jax.training.optim import OptimConfig, make_optimizer
    from proxytune_jax.training.state import init_train_state, split_params
    from proxytune_jax.training.step import make_train_step

    b, t, v = S["train_batch"], S["train_seq"], S["vocab"]
    scfg = dataclasses.replace(small_llama_config(v, max_positions=t, **S["student"]), remat=remat)
    tcfg = small_llama_config(v, max_positions=t, **S["teacher"])
    g, params = split_params(init_model(scfg, seed=0))  # fp32 master weights
    tg, tparams = split_params(init_model(tcfg, seed=1, dtype=jnp.bfloat16))
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    opt = make_optimizer(OptimConfig(learning_rate=1e-4, total_steps=100))
    state = init_train_state(params, opt, rules=partition_rules(scfg), mesh=mesh)
    objective = OnlineDistillation(teacher="t", loss="forward_kl", ce_weight=0.1).loss_fn(g, {"teacher": tg})
    step = make_train_step(objective, opt, mesh, state_shardings=jax.tree.map(lambda x: x.sharding, state),
                           frozen={"teacher": shard_tree(tparams, partition_rules(tcfg), mesh)},
                           compute_dtype=jnp.bfloat16)
    ids = np.random.default_rng(0).integers(3, v, (b, t)).astype(np.int32)  # T a multiple of 128 (kernels)
    batch = put_global_batch({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)},
                             mesh)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]
    sec = best_time(run, repeats)
    n_s, n_t = n_params(params), n_params(tparams)
    attn = lambda c: c.num_hidden_layers * c.num_attention_heads * c.head_dim * t  # noqa: E731
    flops_tok = 6 * n_s + 2 * n_t + 6 * attn(scfg) + 2 * attn(tcfg)
    tps = b * t / sec
    peak = peak_flops(kind)
    mfu = f"{tps * flops_tok / peak:.1%} MFU (peak {peak / 1e12:.0f} TFLOP/s bf16 for {kind!r})" if peak else \
        f"MFU n/a (no peak FLOP/s for {kind!r})"
    return [("train params", f"student {n_s / 1e6:.0f}M fp32 master / bf16 compute, teacher {n_t / 1e6:.0f}M bf16, "
             f"B {b} T {t}, remat {remat}"),
            ("train step", f"{sec * 1e3:9.1f} ms  {tps:9.0f} tok/s  {tps * flops_tok / 1e12:7.2f} TFLOP/s  {mfu}")]


def kd_rows(S, repeats):
    from proxytune_jax.losses.chunked import chunked_loss, loss_from_hidden

    n, d, v = S["kd_positions"], S["kd_hidden"], S["kd_vocab"]
    r = np.random.default_rng(0)
    sh, th = (jnp.asarray(r.normal(size=(n, d)), jnp.bfloat16) for _ in range(2))
    sw, tw = (jnp.asarray(0.02 * r.normal(size=(v, d)), jnp.bfloat16) for _ in range(2))
    rows = []
    for name, fn in (("plain", loss_from_hidden), ("chunked", chunked_loss)):
        f = jax.jit(jax.value_and_grad(lambda sh, sw, fn=fn: fn("forward_kl", sh, sw, th, tw), argnums=(0, 1)))
        temp = f.lower(sh, sw).compile().memory_analysis().temp_size_in_bytes
        sec = best_time(lambda f=f: f(sh, sw), repeats)
        rows.append((f"KD loss {name}", f"{sec * 1e3:9.1f} ms   peak temp {temp / 2**20:9.1f} MiB  "
                     f"({n} positions, V {v}, value+grad)"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes (seconds), same code")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--remat", default="matmuls", help="student remat policy of the train step")
    ap.add_argument("--skip", nargs="*", default=[], choices=["decode", "train", "kd"])
    args = ap.parse_args(argv)
    S = TINY if args.tiny else FULL
    dev = jax.devices()[0]
    kind = dev.device_kind
    from proxytune_jax.models import backend
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {kind!r} x{len(jax.devices())}, "
          f"compute path {backend.current()!r}{' (--tiny)' if args.tiny else ''}")
    rows = []
    bw = bandwidth(S["bw_bytes"], args.repeats)
    rows.append(("HBM bandwidth (measured)", f"{bw / 1e9:9.1f} GB/s"))
    sections = (("decode", lambda: decode_rows(S, bw, args.repeats)),
                ("train", lambda: train_rows(S, kind, args.repeats, args.remat)),
                ("kd", lambda: kd_rows(S, args.repeats)))
    for name, fn in sections:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            rows.extend(fn())
        except Exception as e:  # noqa: BLE001 -- one failed section must not cost the others
            traceback.print_exc()
            rows.append((name, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        print(f"[{name}: {time.perf_counter() - t0:.1f}s]", flush=True)
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
