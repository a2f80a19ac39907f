"""Per-token cost of the placed decoder's host-driven loop next to the single-program loop, on simulated devices.

``decoding.placement.PlacedDecoder`` (each model on its own device group, one jitted step per group, the tokens
driven from Python) against ``engine.Decoder`` (every model in one ``lax.while_loop``), proxy-tuning greedy,
the same random weights, ``--new`` tokens after a ``--prompt``-token prompt, no EOS. On simulated CPU devices
(``--devices`` host devices sharing the same cores) the groups cannot compute side by side, so this measures only
what the placed loop *adds*: per-token dispatch, the logits exchange and the host loop. The overlap it buys on
real accelerators is not measured here.

    python experiments/benchmarks/placement.py            # tiny shapes, 8 simulated devices
    python experiments/benchmarks/placement.py --size small
"""
from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--placement", default="base=0-5:fsdp2xtensor3,expert=6,anti_expert=7")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after the compiling one")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import time

    import jax
    import numpy as np

    from proxytune_jax.decoding.engine import Decoder
    from proxytune_jax.decoding.placement import PlacedDecoder
    from proxytune_jax.decoding.stopping import make_stop_criteria
    from proxytune_jax.models import init_model, small_llama_config

    sizes = {"tiny": (dict(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=6),
                      dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)),
             "small": (dict(hidden_size=768, intermediate_size=2048, num_layers=6, num_heads=12),
                       dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4))}[args.size]
    vocab = 4096 if args.size == "small" else 256
    big, small = (small_llama_config(vocab_size=vocab, max_positions=512, **s) for s in sizes)
    models = [init_model(big, seed=0), init_model(small, seed=1), init_model(small, seed=2)]
    ids = np.random.default_rng(0).integers(3, vocab, size=(args.batch, args.prompt)).astype(np.int32)
    prompts = [(ids, np.ones_like(ids, bool))] * 3
    stop = make_stop_criteria([-1])  # no EOS: every row runs the full length
    rows = []
    for name, dec in (("one program (Decoder, 1 device)", Decoder(models, "proxy_tuning")),
                      (f"placed ({args.placement})", PlacedDecoder(models, "proxy_tuning",
                                                                   placement=args.placement))):
        ref = dec.generate(prompts, max_new_tokens=args.new, stop=stop)  # compiles
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = dec.generate(prompts, max_new_tokens=args.new, stop=stop)
            times.append((time.perf_counter() - t0) / args.new * 1e3)
        assert np.array_equal(out.tokens, ref.tokens)
        rows.append((name, np.mean(times), np.std(times), out.tokens))
    assert np.array_equal(rows[0][3], rows[1][3]), "placed decoding gave other tokens"
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, size {args.size}, "
          f"batch {args.batch}, {args.new} new tokens, mean ± std over {args.repeats} runs")
    for name, mean, std, _ in rows:
        print(f"  {name:60s} {mean:8.2f} ± {std:.2f} ms/token")
    print(f"  placed loop overhead: {rows[1][1] - rows[0][1]:+.2f} ms/token (identical tokens)")


if __name__ == "__main__":
    sys.exit(main())
