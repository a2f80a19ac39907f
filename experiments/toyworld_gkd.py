"""GKD's grid and TAID on the toy world's transfer-set regime: supervised KD, sequence-level KD, mixed and
on-policy distillation (Agarwal et al. 2024, the grid of their Figure/Table on student-generated data), plus
TAID (Shing et al. 2025), each over 3 student seeds per world, next to SFT on gold.

Student = base-small, teacher = tuned-large, the rows of ``toyworld.transfer`` (gold rows with their answers,
transfer prompts answered by the teacher). Every method trains ``CE(gold rows) + D(transfer rows)`` for the
demo's steps; the grid keeps ``D`` = forward KL and changes only where the transfer rows' answers come from
(``toyworld.distill``: ``word_kd`` = supervised KD on the teacher's fixed answers, ``seq_kd`` = CE on them,
``gkd_mixed`` / ``gkd_on_policy`` = the student's own samples in 50% / 100% of the steps, drawn inside the
jitted step); ``gkd_on_policy_jsd`` uses GKD's generalized JSD (β 0.5). Reported per method: accuracy, top-1
agreement with the teacher, fact recall, NLL, ECE, KL(teacher‖student), all teacher-forced on the held-out
evaluation rows except accuracy (greedy exact match), mean ± std over student seeds, and the paired difference
to ``word_kd`` with its bootstrap interval; and the training time per step (the cost of sampling in the step).

    python experiments/toyworld_gkd.py [--world-seeds 0 1 2] [--cache-dir DIR] [--out runs/toyworld_gkd]
                                       [--smoke]

Reproduces: the grid of Agarwal et al. 2024 (GKD: supervised KD, sequence-level KD, mixed and on-policy
student data) and TAID (Shing et al. 2025) on the toy world's transfer-set regime.
Hardware: a 2-core CPU; about 4 minutes per world once the world is built (the demo's cache is reused).
Mesh: one device (the models are tiny). ``--smoke``: the demo's ``--quick`` world, one world and one student
seed, cached in ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from proxytune_jax.atomic import write_json_atomic

METHODS = ("sft_gold", "word_kd", "seq_kd", "gkd_mixed", "gkd_on_policy", "gkd_on_policy_jsd", "taid")
KEYS = ("accuracy", "agreement", "fact_recall", "nll", "ece", "kl_teacher_student")


def main(argv=None) -> dict:
    from proxytune_jax.commands.demo import configs
    from proxytune_jax.toyworld.transfer import SECONDARY_COMPARISONS
    from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld
    from proxytune_jax.toyworld.distill import LABELS, distill_cached

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_gkd"))
    ap.add_argument("--smoke", action="store_true", help="the quick world, one world and one seed (a test)")
    args = ap.parse_args(argv)
    seeds = (0,) if args.smoke else (0, 1, 2)
    if args.smoke:
        args.world_seeds = args.world_seeds[:1]
        args.cache_dir = args.cache_dir or args.out / "cache"

    results = {}
    for world_seed in args.world_seeds:
        cfg = configs(args.smoke, world_seed)
        tw = build_toyworld(cfg.toyworld, args.cache_dir)
        models = {name: tw.load(name) for name in MODEL_NAMES}
        table = distill_cached(tw.root, tw.config.digest(), models["base-small"], models["tuned-large"],
                               models["tuned-small"], tw.tokenizer, tw.world, methods=tuple(args.methods),
                               seeds=seeds, fit_config=cfg.distill, transfer_config=cfg.transfer, progress=not args.smoke)
        table = {k: v for k, v in table.items() if k != "_arrays"}
        steps = cfg.distill.steps
        print(f"\nworld seed {world_seed} (teacher: tuned-large, accuracy "
              f"{table['reference']['tuned-large (teacher)']['accuracy']:.3f}; "
              f"{'cached' if table.get('cached') else 'trained now'})")
        print("| method | " + " | ".join(KEYS) + " | s / step (3 seeds) |")
        print("|---" * (len(KEYS) + 2) + "|")
        for m in args.methods:
            row = table["methods"][m]
            cells = [f"{row[k]['mean']:.3f} ± {row[k]['std'] or 0.0:.3f}" for k in KEYS]
            per_step = table["seconds"][m]["train"] / steps
            print(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {per_step:.3f} |")
        results[world_seed] = table

    # paired differences against supervised KD (word_kd), per world: pooled over the 3 student seeds
    print("\ndeclared comparisons (toyworld.transfer): paired difference [bootstrap 95% interval over questions]")
    for world_seed, table in results.items():
        print(f"world {world_seed}:")
        for pair in SECONDARY_COMPARISONS:
            d = table["differences"].get(f"{pair[0]} - {pair[1]}")
            if pair[0] not in args.methods or not d:
                continue
            print(f"  {pair[0]} − {pair[1]}: " + "; ".join(
                f"{k} {d[k]['diff']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]"
                for k in ("accuracy", "agreement", "fact_recall")))
    if len(results) > 1:
        print("\n| method | " + " | ".join(f"{k} (mean over worlds ± std)" for k in KEYS[:3]) + " |")
        print("|---" * 4 + "|")
        for m in args.methods:
            cells = []
            for k in KEYS[:3]:
                xs = [results[w]["methods"][m][k]["mean"] for w in results]
                cells.append(f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}")  # ≥ 2 worlds here
            print(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    path = args.out / "results" / "toyworld_gkd.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results, indent=1)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
