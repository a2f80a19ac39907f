"""Speculative proxy-tuning in the toy world: acceptance, tokens per round and speed against non-speculative
proxy-tuning, over world seeds, and the cost projection to Llama-2 13B with a 7B pair (issue #17, item 3).

For each ``--world-seeds`` value: the demo's toy world (built or reused from the demo's cache); proxy-tuning
(base-large + α·(tuned-small − base-small), α = 1, the expert on its chat template, every held-out question,
``MAX_NEW_TOKENS`` new tokens) decoded non-speculatively and speculatively with the expert (tuned-small) as
drafter, for K in ``--ks`` and K = max(``--ks``) adaptive; plus plain speculative decoding of base-large drafted
by base-small. Per setting:

* acceptance rate (accepted / proposed drafts) and tokens per verification round, greedy and sampled
  (temperature 1), from ``TextGenerator.speculative_report``;
* greedy: every completion must equal non-speculative decoding's (asserted: the tests check it on random models,
  this on trained ones);
* tokens/s of speculative and non-speculative proxy-tuning, greedy, at batch "all" (every question in one batch,
  as the evaluation decodes) and batch 1 (the first ``--latency-prompts`` questions one at a time), best of
  ``--repeats`` runs after a compiling one. The toy models are tiny, so a step costs dispatch and loop overhead,
  not weight reads: these ratios say nothing about large models. The projection does that: weight bytes per
  token (``experiments/benchmarks/speculative_cost.py``) from the mean tokens per round measured here.

Prints per-world rows, mean ± std (sample std) over worlds, and the projection; writes
``results/toyworld_speculative.json``.

    python experiments/toyworld_speculative.py [--world-seeds 0 1 2] [--ks 2 4 8] [--cache-dir DIR]
                                               [--out runs/toyworld_speculative] [--smoke]

Reproduces: no paper table (speculative decoding: Leviathan et al. 2023, Chen et al. 2023; here verified
against the fused proxy-tuning distribution of Liu et al. 2024). Hardware: a 2-core CPU, a few minutes per world
once cached. Mesh: one device.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from proxytune_jax.commands.demo import configs  # noqa: E402
from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld  # noqa: E402


def mean_std(xs):
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def best_time(fn, repeats: int):
    """(best wall time of ``repeats`` runs after a compiling one, the last output)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_world(models, tok, questions, ks, repeats: int, latency_prompts: int) -> dict:
    from proxytune_jax.decoding.pipeline import TextGenerator
    from proxytune_jax.toyworld.evaluate import MAX_NEW_TOKENS

    prompts = [q.question for q in questions]
    fused = TextGenerator([models["base-large"], models["tuned-small"], models["base-small"]], [tok] * 3,
                          "proxy_tuning", chat_template=[False, True, False])
    plain = TextGenerator([models["base-large"]], [tok], "plain", drafter=models["base-small"], drafter_tokenizer=tok)
    batches = {"all": (prompts, len(prompts)), "1": (prompts[:latency_prompts], 1)}

    def decode(gen, ps, bs, temperature=0.0, k=0, adaptive=False):
        return gen.generate(ps, max_new_tokens=MAX_NEW_TOKENS, batch_size=bs, fusion_params={"alpha": 1.0},
                            temperature=temperature, seed=0, speculative=k, adaptive_speculative=adaptive)

    out = {"acceptance": {}, "speed": {}}
    ref, plain_tps = {}, {}
    for b, (ps, bs) in batches.items():
        t, got = best_time(lambda: decode(fused, ps, bs), repeats)
        ref[b] = [c.completion for c in got]
        plain_tps[b] = sum(len(c.token_ids) for c in got) / t
    out["speed"]["non-speculative"] = plain_tps
    for k, adaptive in [(k, False) for k in ks] + [(max(ks), True)]:
        name = f"proxy k={k}" + (" adaptive" if adaptive else "")
        for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            got = decode(fused, prompts, len(prompts), temperature, k, adaptive)
            if temperature == 0:
                differ = sum(g.completion != r for g, r in zip(got, ref["all"]))
                assert differ == 0, f"{name}: {differ} greedy completions differ from non-speculative decoding"
            rep = fused.speculative_report
            out["acceptance"][f"{name} {mode}"] = (rep.acceptance_rate, rep.tokens_per_round)
        speed = {}
        for b, (ps, bs) in batches.items():
            t, got = best_time(lambda: decode(fused, ps, bs, 0.0, k, adaptive), repeats)
            assert [c.completion for c in got] == ref[b], f"{name}, batch {b}: greedy completions differ"
            speed[b] = sum(len(c.token_ids) for c in got) / t / plain_tps[b]
        out["speed"][name] = speed
    for k in ks:
        plain.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts), speculative=k)
        rep = plain.speculative_report
        out["acceptance"][f"plain k={k} greedy"] = (rep.acceptance_rate, rep.tokens_per_round)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs (best of), after a compiling one")
    ap.add_argument("--latency-prompts", type=int, default=16, help="questions decoded one at a time (batch 1)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--smoke", action="store_true", help="the demo's --quick world, seed 0, k = 2 only")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_speculative"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.world_seeds, args.ks = args.world_seeds[:1], [2]
        args.cache_dir = args.cache_dir or args.out / "cache"
        args.repeats, args.latency_prompts = 1, 2

    from speculative_cost import print_projection

    per_seed = {}
    for seed in args.world_seeds:
        tw = build_toyworld(configs(args.smoke, seed).toyworld, args.cache_dir)
        models = {name: tw.load(name) for name in MODEL_NAMES}
        per_seed[seed] = run_world(models, tw.tokenizer, list(tw.world.heldout), args.ks, args.repeats,
                                   args.latency_prompts)
        print(f"world seed {seed}: " + ", ".join(f"{k} acc {a:.3f} tpr {t:.2f}"
                                                 for k, (a, t) in per_seed[seed]["acceptance"].items()), flush=True)
    seeds = args.world_seeds

    print(f"\nAcceptance, α = 1 (worlds {' / '.join(map(str, seeds))}; greedy completions identical to "
          "non-speculative decoding in every world)")
    print("| decode | acceptance (worlds) | mean ± std | tokens per round, mean ± std |")
    print("|---|---|---|---|")
    rows = {}
    for key in per_seed[seeds[0]]["acceptance"]:
        acc = [per_seed[s]["acceptance"][key][0] for s in seeds]
        tpr = [per_seed[s]["acceptance"][key][1] for s in seeds]
        rows[key] = {"acceptance": mean_std(acc), "tokens_per_round": mean_std(tpr), "per_world": acc}
        print(f"| {key} | {' / '.join(f'{a:.3f}' for a in acc)} | {rows[key]['acceptance'][0]:.3f} ± "
              f"{rows[key]['acceptance'][1]:.3f} | {rows[key]['tokens_per_round'][0]:.2f} ± "
              f"{rows[key]['tokens_per_round'][1]:.2f} |")

    speed = {}
    nonspec = {b: mean_std([per_seed[s]["speed"]["non-speculative"][b] for s in seeds]) for b in ("all", "1")}
    print(f"\nSpeed, greedy, toy models (dispatch-bound); non-speculative proxy-tuning: batch all "
          f"{nonspec['all'][0]:.0f} ± {nonspec['all'][1]:.0f} tokens/s, batch 1 {nonspec['1'][0]:.0f} ± "
          f"{nonspec['1'][1]:.0f} tokens/s")
    print("| decode | speed-up, batch all | speed-up, batch 1 |")
    print("|---|---|---|")
    for key in per_seed[seeds[0]]["speed"]:
        if key == "non-speculative":
            continue
        speed[key] = {b: mean_std([per_seed[s]["speed"][key][b] for s in seeds]) for b in ("all", "1")}
        print(f"| {key} | {speed[key]['all'][0]:.2f}x ± {speed[key]['all'][1]:.2f} | "
              f"{speed[key]['1'][0]:.2f}x ± {speed[key]['1'][1]:.2f} |")

    measured = {mode: {k: rows[f"proxy k={k} {mode}"]["tokens_per_round"][0] for k in args.ks}
                for mode in ("greedy", "sampled")}
    projection = print_projection(measured, f"the toy world, mean over worlds {seeds}")
    from proxytune_jax.atomic import write_json_atomic
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    result = {"world_seeds": seeds, "ks": args.ks, "rows": rows, "speed": speed, "non_speculative_tps": nonspec,
              "projection": projection, "per_seed": {str(s): v for s, v in per_seed.items()}}
    write_json_atomic(args.out / "results" / "toyworld_speculative.json", result)
    print(f"wrote {args.out / 'results' / 'toyworld_speculative.json'}")
    return result


if __name__ == "__main__":
    main()
