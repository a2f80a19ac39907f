"""Speculative proxy-tuning in the toy world: how many drafted tokens the fused model accepts (issue #17, item 1).

For each ``--world-seeds`` value: the demo's toy world (built or reused from the demo's cache); proxy-tuning
(base-large + α·(tuned-small − base-small), α = 1, the expert on its chat template, every held-out question)
decoded non-speculatively and speculatively with the expert (tuned-small) as drafter for k in ``--ks``, greedy
(the completions must be identical: checked) and sampled (temperature 1); and plain speculative decoding of
base-large drafted by base-small. Prints per world the acceptance rate (accepted / drafted tokens) and the tokens
emitted per verification round, then mean ± std over worlds; writes ``results/toyworld_speculative.json``.
Speed is not measured here: the toy models are dispatch-bound (see ``experiments/benchmarks/decode.py``).

    python experiments/toyworld_speculative.py [--world-seeds 0 1 2] [--ks 1 2 4] [--cache-dir DIR]
                                               [--out runs/toyworld_speculative] [--smoke]

Reproduces: no paper table (speculative decoding: Leviathan et al. 2023, Chen et al. 2023; here verified
against the fused proxy-tuning distribution). Hardware: a 2-core CPU, about a minute per world once cached.
Mesh: one device.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from proxytune_jax.commands.demo import configs
from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld


def mean_std(xs):
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_world(models, tok, questions, ks) -> dict:
    from proxytune_jax.decoding.pipeline import TextGenerator
    from proxytune_jax.toyworld.evaluate import MAX_NEW_TOKENS

    prompts = [q.question for q in questions]
    bs = len(prompts)
    fused = TextGenerator([models["base-large"], models["tuned-small"], models["base-small"]], [tok] * 3,
                          "proxy_tuning", chat_template=[False, True, False])
    plain = TextGenerator([models["base-large"]], [tok], "plain", drafter=models["base-small"], drafter_tokenizer=tok)
    out = {}
    ref = [c.completion for c in fused.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=bs,
                                                fusion_params={"alpha": 1.0})]
    for k in ks:
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            got = fused.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=bs, fusion_params={"alpha": 1.0},
                                 temperature=temperature, speculative=k)
            if temperature == 0:
                same = sum(g.completion == r for g, r in zip(got, ref))
                assert same == len(ref), f"k={k}: {len(ref) - same} greedy completions differ"
            rep = fused.speculative_report
            out[f"proxy k={k} {name}"] = (rep.acceptance_rate, rep.tokens_per_round)
        plain.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=bs, speculative=k)
        rep = plain.speculative_report
        out[f"plain k={k} greedy"] = (rep.acceptance_rate, rep.tokens_per_round)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--smoke", action="store_true", help="the demo's --quick world, seed 0, k = 2 only")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_speculative"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.world_seeds, args.ks = args.world_seeds[:1], [2]
        args.cache_dir = args.cache_dir or args.out / "cache"

    per_seed = {}
    for seed in args.world_seeds:
        tw = build_toyworld(configs(args.smoke, seed).toyworld, args.cache_dir)
        models = {name: tw.load(name) for name in MODEL_NAMES}
        per_seed[seed] = run_world(models, tw.tokenizer, list(tw.world.heldout), args.ks)
        print(f"world seed {seed}: " + ", ".join(f"{k} acc {a:.3f} tpr {t:.2f}" for k, (a, t) in per_seed[seed].items()),
              flush=True)

    print("\n| decode | acceptance (worlds) | mean ± std | tokens per round, mean ± std |")
    print("|---|---|---|---|")
    rows = {}
    for key in per_seed[args.world_seeds[0]]:
        acc = [per_seed[s][key][0] for s in args.world_seeds]
        tpr = [per_seed[s][key][1] for s in args.world_seeds]
        rows[key] = {"acceptance": mean_std(acc), "tokens_per_round": mean_std(tpr), "per_world": acc}
        print(f"| {key} | {' / '.join(f'{a:.3f}' for a in acc)} | {rows[key]['acceptance'][0]:.3f} ± "
              f"{rows[key]['acceptance'][1]:.3f} | {rows[key]['tokens_per_round'][0]:.2f} ± "
              f"{rows[key]['tokens_per_round'][1]:.2f} |")
    from proxytune_jax.atomic import write_json_atomic
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    result = {"world_seeds": args.world_seeds, "ks": args.ks, "rows": rows,
              "per_seed": {str(s): v for s, v in per_seed.items()}}
    write_json_atomic(args.out / "results" / "toyworld_speculative.json", result)
    return result


if __name__ == "__main__":
    main()
