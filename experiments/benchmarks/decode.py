"""Decoding speed: proxy-tuned and plain decoding, our jitted engine vs a PyTorch/transformers
re-implementation of the official proxy-tuning loop, on the same random weights, in one run.

The PyTorch peer is the real algorithm, not a strawman: three ``LlamaForCausalLM`` models, one KV cache each
(``past_key_values``), sequential forwards per step, logits combined ``s_M + (s_M+ - s_M-)`` (α = 1, the
official code adds raw logits), greedy, ``torch.inference_mode``. Both sides decode ``--new`` tokens after a
``--prompt``-token random prompt, at batch 1 and 8 (no EOS stop, so every row runs the full length).

Roofline: decoding at small batch is bound by reading the weights once per step, so the ideal step time is
``weight bytes per step / read bandwidth`` (bandwidth measured here by reducing a large array);
``fraction = ideal step time / measured step time``. Expected proxy cost over plain decoding:
``(P_target + 2 P_small) / P_target``.

    python experiments/benchmarks/decode.py            # 220M Llama-shaped target, 35M pair, vocab 32000, fp32
    python experiments/benchmarks/decode.py --tiny     # a seconds-long smoke run of the same code
    python experiments/benchmarks/decode.py --speculative 2 4 8 [--speculative-only]
        # speculative vs non-speculative proxy-tuning on the same weights (``speculative_rows``)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.decoding.engine import Decoder
from proxytune_jax.decoding.stopping import make_stop_criteria
from proxytune_jax.models import init_model, small_llama_config
from proxytune_jax.models.hf_io import save_pretrained

SIZES = {  # small_llama_config arguments (head_dim = hidden_size / num_heads = 64; full multi-head attention)
    # ~220M: 12 layers x 12.8M + 2 x 32.8M embeddings/head (untied, like Llama-2)
    "target": dict(hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16),
    # ~35M: 6 layers x 1.8M + 2 x 12.3M
    "small": dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6),
}
TINY = {  # head_dim 32
    "target": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4),
    "small": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
}


def n_params(model) -> int:
    from flax import nnx
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def read_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes/s of reading a large float32 array: the best of an XLA reduction, XLA matrix-vector products
    over a 1 GiB matrix in both orientations (the access pattern of a decode step: ``v @ W`` and ``W @ v``, the
    latter being what ``layers.dense`` does with few rows) and a NumPy sum, each best of a few."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    w = x.reshape(8192, -1)
    v = jnp.ones((1, 8192), jnp.float32)
    u = jnp.ones((w.shape[1], 1), jnp.float32)
    best = 0.0
    for f, args in ((jax.jit(jnp.sum), (x,)), (jax.jit(jnp.matmul), (v, w)), (jax.jit(jnp.matmul), (w, u))):
        f(*args).block_until_ready()
        for _ in range(5):
            t = time.perf_counter()
            f(*args).block_until_ready()
            best = max(best, n_bytes / (time.perf_counter() - t))
    a = np.ones(n_bytes // 4, np.float32)
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = max(best, n_bytes / (time.perf_counter() - t))
    del x, w, a
    return best


def torch_loop(models, prompt, n_new: int, proxy: bool):
    """The official proxy-tuning loop: sequential forwards, one KV cache per model, raw logits summed."""
    import torch
    b = prompt.shape[0]
    attn = torch.ones_like(prompt)
    inputs = [prompt] * len(models)
    pasts = [None] * len(models)
    out = []
    with torch.inference_mode():
        for _ in range(n_new):
            logits = []
            for i, m in enumerate(models):
                o = m(input_ids=inputs[i], attention_mask=attn, past_key_values=pasts[i], use_cache=True)
                pasts[i] = o.past_key_values
                logits.append(o.logits[:, -1, :])
            scores = logits[0] + (logits[1] - logits[2]) if proxy else logits[0]
            tok = torch.argmax(scores, dim=-1)
            out.append(tok)
            inputs = [tok[:, None]] * len(models)
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype)], dim=1)
    return torch.stack(out, 1)


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` wall times (the least disturbed run on a shared machine)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3, help="timed JAX runs (best of), after the compiling one")
    ap.add_argument("--torch-repeats", type=int, default=1, help="timed PyTorch runs (best of), after a warm-up")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--speculative", type=int, nargs="*", default=[], metavar="K",
                    help="also time speculative proxy-tuning (the expert drafting K tokens per round)")
    ap.add_argument("--speculative-only", action="store_true", help="skip the PyTorch comparison")
    args = ap.parse_args()
    if args.speculative_only:
        return speculative_rows(args)

    import torch
    from transformers import AutoModelForCausalLM

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sizes = TINY if args.tiny else SIZES
    common = dict(vocab_size=32000 if not args.tiny else 512, max_positions=256, pad_token_id=None)
    target = init_model(small_llama_config(**common, **sizes["target"]), seed=0)
    expert = init_model(small_llama_config(**common, **sizes["small"]), seed=1)
    anti = init_model(small_llama_config(**common, **sizes["small"]), seed=2)
    p_t, p_s = n_params(target), n_params(expert)
    print(f"load average at start: {os.getloadavg()} (the machine is shared: figures are noisy)")
    print(f"params: target {p_t / 1e6:.1f}M, small {p_s / 1e6:.1f}M (x2); fp32; torch threads "
          f"{torch.get_num_threads()}, jax devices {jax.devices()}")

    with tempfile.TemporaryDirectory() as tmp:  # the same weights for PyTorch, via our HF export
        torch_models = []
        for name, m in (("target", target), ("expert", expert), ("anti", anti)):
            save_pretrained(m, Path(tmp) / name)
            torch_models.append(AutoModelForCausalLM.from_pretrained(Path(tmp) / name,
                                                                     dtype=torch.float32).eval())
    bandwidth = read_bandwidth()
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")

    decoders = {"proxy": Decoder([target, expert, anti], "proxy_tuning"), "plain": Decoder([target], "plain")}
    no_eos = make_stop_criteria([])
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batches:
        prompt = rng.integers(3, common["vocab_size"], size=(b, args.prompt)).astype(np.int32)
        mask = np.ones_like(prompt, bool)
        for kind, dec in decoders.items():
            k = len(dec.graphdefs)
            run = lambda: dec.generate([(prompt, mask)] * k, max_new_tokens=args.new, stop=no_eos)  # noqa: E731
            t0 = time.perf_counter()
            ours_tokens = run().tokens
            compile_s = time.perf_counter() - t0
            t_jax = timed(run, args.repeats)
            tm = torch_models if kind == "proxy" else torch_models[:1]
            tp = torch.from_numpy(prompt.astype(np.int64))
            torch_loop(tm, tp, 2, kind == "proxy")  # warm-up
            t0 = time.perf_counter()
            ref = torch_loop(tm, tp, args.new, kind == "proxy").numpy()
            t_torch = time.perf_counter() - t0
            if args.torch_repeats > 1:
                t_torch = min(t_torch, timed(lambda: torch_loop(tm, tp, args.new, kind == "proxy"),
                                             args.torch_repeats - 1))
            agree = float(np.mean(ref == ours_tokens))
            weight_bytes = 4 * (p_t + 2 * p_s if kind == "proxy" else p_t)
            ideal_step = weight_bytes / bandwidth
            rows.append(dict(kind=kind, batch=b, jax_tps=b * args.new / t_jax, torch_tps=b * args.new / t_torch,
                             jax_step=t_jax / args.new, torch_step=t_torch / args.new,
                             jax_roof=ideal_step / (t_jax / args.new), torch_roof=ideal_step / (t_torch / args.new),
                             compile_s=compile_s, agree=agree))
            r = rows[-1]
            print(f"  {kind:5s} b={b}: jax {r['jax_tps']:7.1f} tok/s, torch {r['torch_tps']:7.1f} tok/s, "
                  f"first call {compile_s:.1f}s, token agreement {agree:.3f}", flush=True)

    print("\n| rule  | batch | JAX tok/s | PyTorch tok/s | JAX / PyTorch | JAX roofline | PyTorch roofline |"
          " token agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['batch']} | {r['jax_tps']:.1f} | {r['torch_tps']:.1f} | "
              f"{r['jax_tps'] / r['torch_tps']:.2f}x | {r['jax_roof']:.2f} | {r['torch_roof']:.2f} | "
              f"{r['agree']:.3f} |")
    print(f"load average at end: {os.getloadavg()}")
    expected = (p_t + 2 * p_s) / p_t
    print(f"\nexpected proxy/plain cost (P_target + 2 P_small) / P_target = {expected:.3f}")
    for b in args.batches:
        pr = next(r for r in rows if r["kind"] == "proxy" and r["batch"] == b)
        pl = next(r for r in rows if r["kind"] == "plain" and r["batch"] == b)
        for side in ("jax", "torch"):
            cost = pr[f"{side}_step"] / pl[f"{side}_step"]
            print(f"  batch {b} {side:5s}: proxy/plain step time {cost:.3f} ({cost / expected - 1:+.1%} vs expected)")
    if args.speculative:
        speculative_rows(args)


def speculative_rows(args) -> list[dict]:
    """Speculative vs non-speculative proxy-tuning on the same random weights (JAX only), greedy.

    Random models agree with each other about as often as chance, so the measured acceptance is near zero and
    the measured speed is the worst case. What carries over is the cost of one round in non-speculative steps,
    ``round time / step time``: speculative decoding is faster on this machine wherever the tokens per round
    (measured on trained models, ``experiments/toyworld_speculative.py``) exceed it (the break-even column)."""
    sizes = TINY if args.tiny else SIZES
    common = dict(vocab_size=32000 if not args.tiny else 512, max_positions=256, pad_token_id=None)
    models = [init_model(small_llama_config(**common, **sizes[name]), seed=seed)
              for name, seed in (("target", 0), ("small", 1), ("small", 2))]
    dec = Decoder(models, "proxy_tuning")
    no_eos = make_stop_criteria([])
    rng = np.random.default_rng(0)
    rows = []
    print(f"\nspeculative proxy-tuning (expert drafting), greedy, random weights; load {os.getloadavg()}")
    for b in args.batches:
        prompt = rng.integers(3, common["vocab_size"], size=(b, args.prompt)).astype(np.int32)
        batch = [(prompt, np.ones_like(prompt, bool))] * 3
        ref = dec.generate(batch, max_new_tokens=args.new, stop=no_eos)
        t_ref = timed(lambda: dec.generate(batch, max_new_tokens=args.new, stop=no_eos), args.repeats)
        for k in args.speculative:
            run = lambda: dec.generate(batch, max_new_tokens=args.new, stop=no_eos, speculative=k)  # noqa: E731
            res = run()
            assert np.array_equal(res.tokens, ref.tokens), f"k={k}, batch {b}: greedy tokens differ"
            t = timed(run, args.repeats)
            rep = res.speculative
            rounds = float(rep.rounds.max())  # the batch runs until its slowest row is done
            round_steps = (t / rounds) / (t_ref / args.new)
            rows.append(dict(batch=b, k=k, tps=b * args.new / t, ref_tps=b * args.new / t_ref,
                             acceptance=rep.acceptance_rate, tokens_per_round=rep.tokens_per_round,
                             round_steps=round_steps))
    print("| batch | K | non-speculative tok/s | speculative tok/s | speed-up | acceptance | tokens / round | "
          "round cost (non-speculative steps) = break-even tokens / round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['k']} | {r['ref_tps']:.1f} | {r['tps']:.1f} | {r['tps'] / r['ref_tps']:.2f}x | "
              f"{r['acceptance']:.3f} | {r['tokens_per_round']:.2f} | {r['round_steps']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
