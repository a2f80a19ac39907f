"""Black-box proxy-tuning in the toy world: what a base known only by its top-k log-probs loses against the
full-logit base, for k = 1, 2, 5, 10, 20 and both treatments of the tokens outside the top k, over world seeds
(issue #18, items 1-2).

For each ``--world-seeds`` value: the demo's toy world (built or reused from the demo's cache); full-logit
proxy-tuning (base-large + α·(tuned-small − base-small), α = 1, greedy, the expert on its chat template, every
held-out question) through the usual engine; then the same with base-large reduced to its top k
(``decoding.blackbox.LocalTopKBase`` on the exact token ids, so only the top-k truncation differs) and the small
pair in the black-box decoder, with the tail spread uniformly (``uniform``) or dropped (``drop``: the support
restricted to the base's top k). Also base-large alone and, as a check of the decoder, k = V (must equal full
logits). Prints accuracy per world, mean ± std (sample std) and the paired difference to full logits, with
k/V; writes ``results/toyworld_blackbox.json``. ``decoding.blackbox.DEFAULT_TAIL`` was chosen from this table.

    python experiments/toyworld_blackbox.py [--world-seeds 0 1 2] [--cache-dir DIR] [--out runs/toyworld_blackbox]
                                            [--smoke]

Reproduces: no paper table (proxy-tuning, Liu et al. 2024, assumes the base's full logits); the setting is the
API-served base of issue #18. Hardware: a 2-core CPU; about a minute per world once cached (the base is queried
outside jit at every step). Mesh: one device.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from proxytune_jax.commands.demo import configs
from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld

KS = (1, 2, 5, 10, 20)
TAILS = ("uniform", "drop")


def mean_std(xs):
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_world(models, tok, questions, ks) -> dict:
    from proxytune_jax.decoding.blackbox import BlackBoxGenerator, LocalTopKBase
    from proxytune_jax.eval import accuracy
    from proxytune_jax.toyworld.evaluate import MAX_NEW_TOKENS, generate

    prompts, answers = [q.question for q in questions], [q.answer for q in questions]
    base, expert, anti = models["base-large"], models["tuned-small"], models["base-small"]
    v = min(len(tok), base.config.vocab_size)
    acc = {"base-large": generate([base], tok, questions, chat=[False]).accuracy,
           "full logits": generate([base, expert, anti], tok, questions, chat=[False, True, False],
                                   rule="proxy_tuning", fusion_params={"alpha": 1.0}).accuracy}
    for tail in TAILS:
        for k in list(ks) + [v]:
            if k == v and tail == "drop":
                continue  # at k = V there is no tail: the same row as uniform
            gen = BlackBoxGenerator(LocalTopKBase(base, tok, k), expert, anti, tok, tail=tail,
                                    expert_chat_template=True)
            outs = gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts),
                                fusion_params={"alpha": 1.0})
            acc[f"k={'V' if k == v else k} {tail}"] = accuracy([o.completion for o in outs], answers)
    return {"accuracy": acc, "vocab_size": v, "n": len(questions)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--smoke", action="store_true", help="the demo's --quick world, seed 0 only, k = 1 and 5")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_blackbox"))
    args = ap.parse_args(argv)
    ks = KS
    if args.smoke:
        args.world_seeds = args.world_seeds[:1]
        args.cache_dir = args.cache_dir or args.out / "cache"
        ks = (1, 5)

    per_seed = {}
    for seed in args.world_seeds:
        tw = build_toyworld(configs(args.smoke, seed).toyworld, args.cache_dir)
        models = {name: tw.load(name) for name in MODEL_NAMES}
        per_seed[seed] = run_world(models, tw.tokenizer, list(tw.world.heldout), ks)
        print(f"world seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[seed]["accuracy"].items()),
              flush=True)

    seeds = list(per_seed)
    v = per_seed[seeds[0]]["vocab_size"]
    summary = {}
    print(f"\nV = {v} (toy vocabulary); α = 1; {per_seed[seeds[0]]['n']} held-out questions per world")
    print(f"| base | k/V | {' | '.join(f'world {s}' for s in seeds)} | mean ± std | − full logits (mean ± std) |")
    print("|---" * (len(seeds) + 4) + "|")
    for name in per_seed[seeds[0]]["accuracy"]:
        xs = [per_seed[s]["accuracy"][name] for s in seeds]
        diffs = [x - per_seed[s]["accuracy"]["full logits"] for x, s in zip(xs, seeds)]
        (m, sd), (dm, dsd) = mean_std(xs), mean_std(diffs)
        k = name.split()[0][2:] if name.startswith("k=") else None
        kv = "" if k is None else ("1" if k == "V" else f"{int(k) / v:.3f}")
        summary[name] = {"per_seed": xs, "mean": m, "std": sd, "diff_vs_full": diffs, "diff_mean": dm,
                         "diff_std": dsd, "k_over_V": kv}
        print(f"| {name} | {kv} | " + " | ".join(f"{x:.3f}" for x in xs)
              + f" | {m:.3f} ± {sd:.3f} | {dm:+.3f} ± {dsd:.3f} |")
    results = {"per_seed": per_seed, "summary": summary, "vocab_size": v}
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    from proxytune_jax.atomic import write_json_atomic
    write_json_atomic(out / "toyworld_blackbox.json", results)
    print(f"wrote {out / 'toyworld_blackbox.json'}")
    return results


if __name__ == "__main__":
    main()
