"""The demo's two tables across world seeds: proxy-tuning (proxy-tuned-large vs base-large and tuned-small on
held-out questions, against the seed-to-seed spread) and distillation on the transfer-set regime (every method,
3 student seeds per world; the declared primary comparison, word-level KD vs SFT on gold, per world).

Builds (or reuses from the demo's cache) the toy world for each ``--world-seeds`` value with the demo's own
configuration, runs the proxy-tuning comparison (α = 1, greedy, every held-out question), and prints one row
per seed, mean ± std (sample std), and the margins of proxy-tuned-large over each baseline against the spread.

    python experiments/toyworld_seeds.py [--world-seeds 0 1 2] [--cache-dir DIR] [--out runs/toyworld_seeds]
                                         [--skip-distillation]

Reproduces: the pattern of proxy-tuning's main results (Liu et al. 2024, Table 1: the proxy-tuned base beats
the untuned base and the small tuned expert, closing most of the gap to the directly tuned large model), in the
toy world of ``proxytune demo``; and the transfer-set distillation setting of Hinton et al. 2015 / Kim & Rush
2016 (``proxytune_jax.toyworld.transfer``). Hardware: a 2-core CPU; about 3½ minutes per world on the first run
(training the world and the 33 students), seconds per world once cached. Mesh: one device (the models are tiny).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from proxytune_jax.commands.demo import configs
from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld
from proxytune_jax.toyworld.distill import distill_cached
from proxytune_jax.toyworld.proxy import run_proxy_tuning

ROWS = ("base-large", "tuned-small", "proxy-tuned-large", "tuned-large")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--skip-distillation", action="store_true", help="only the proxy-tuning table")
    ap.add_argument("--smoke", action="store_true", help="the demo's --quick world, seed 0 only, cached in --out")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_seeds"),
                    help="output folder: results/toyworld_seeds.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.world_seeds = args.world_seeds[:1]
        args.cache_dir = args.cache_dir or args.out / "cache"

    per_seed, distill = {}, {}
    for seed in args.world_seeds:
        cfg = configs(args.smoke, seed)
        tw = build_toyworld(cfg.toyworld, args.cache_dir)
        models = {name: tw.load(name) for name in MODEL_NAMES}
        pt = run_proxy_tuning(models, tw.tokenizer, list(tw.world.heldout), alphas=(1.0,))
        per_seed[seed] = {**{k: pt.accuracy[k] for k in ROWS}, "gap_closed": pt.gap_closed,
                          "top1_changed": pt.top1_changed_share, "n": pt.n_questions}
        print(f"world seed {seed}: " + "  ".join(f"{k} {per_seed[seed][k]:.3f}" for k in ROWS), flush=True)
        if not args.skip_distillation:
            table = distill_cached(tw.root, tw.config.digest(), models["base-small"], models["tuned-large"],
                                   models["tuned-small"], tw.tokenizer, tw.world, seeds=(0,) if args.smoke else
                                   (0, 1, 2), fit_config=cfg.distill, transfer_config=cfg.transfer)
            distill[seed] = {k: v for k, v in table.items() if k != "_arrays"}

    def mean_std(key):
        xs = [per_seed[s][key] for s in per_seed]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    print("\n| world seed | " + " | ".join(ROWS) + " | gap closed | top-1 changed | n |")
    print("|---" * (len(ROWS) + 4) + "|")
    for s, r in per_seed.items():
        print(f"| {s} | " + " | ".join(f"{r[k]:.3f}" for k in ROWS)
              + f" | {r['gap_closed']:.3f} | {r['top1_changed']:.3f} | {r['n']} |")
    print("| mean ± std | " + " | ".join("%.3f ± %.3f" % mean_std(k) for k in ROWS) + " | | | |")

    summary = {}
    for baseline in ("base-large", "tuned-small"):
        margins = [per_seed[s]["proxy-tuned-large"] - per_seed[s][baseline] for s in per_seed]
        spread = max(mean_std("proxy-tuned-large")[1], mean_std(baseline)[1])
        summary[baseline] = {"margins": margins, "spread": spread, "holds": bool(min(margins) > spread)}
        print(f"proxy-tuned-large − {baseline}: per seed {', '.join(f'{m:+.3f}' for m in margins)}; "
              f"largest seed-to-seed std {spread:.3f}; smallest margin > spread: {min(margins) > spread}")
    results = {"per_seed": per_seed, "summary": summary}
    if distill:
        results["distillation"] = distill
        print_distillation(distill)
    path = args.out / "results" / "toyworld_seeds.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return results


def print_distillation(distill: dict) -> None:
    """Per method: the mean over student seeds in each world, and the mean ± std of those over worlds; then the
    primary comparison's paired difference and interval per world."""
    from proxytune_jax.toyworld.distill import LABELS
    from proxytune_jax.toyworld.transfer import PRIMARY_COMPARISON

    worlds = list(distill)
    keys = ("accuracy", "agreement", "fact_recall", "nll", "ece")
    print("\n| objective | " + " | ".join(f"{k} (worlds {', '.join(map(str, worlds))}; mean ± std)" for k in keys)
          + " |")
    print("|---" * (len(keys) + 1) + "|")
    for method in distill[worlds[0]]["methods"]:
        cells = []
        for k in keys:
            xs = [distill[w]["methods"][method][k]["mean"] for w in worlds]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(" / ".join(f"{x:.3f}" for x in xs) + f"; {statistics.mean(xs):.3f} ± {sd:.3f}")
        print(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    a, b = PRIMARY_COMPARISON
    for w in worlds:
        d = distill[w]["differences"].get(f"{a} - {b}")
        if d:
            print(f"world {w}: {a} − {b}: " + "; ".join(
                f"{k} {d[k]['diff']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]"
                for k in ("accuracy", "agreement", "fact_recall")))


if __name__ == "__main__":
    main()
