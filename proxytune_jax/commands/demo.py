"""`proxytune demo`: the toy world end to end on a CPU -- proxy-tuning and distillation, honestly measured.

First run trains the toy world's tokenizer and four Llama models (cached under ``--cache-dir``, default
``~/.cache/proxytune_jax/toyworld``); later runs reuse them. Writes to ``--out`` (default ./proxytune_demo):
``results.json`` (every number in the printed tables), ``alpha_sweep.png``, ``reliability_sft_vs_first.png``,
``examples.md`` (completions side by side).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from proxytune_jax.errors import UserError


def add_arguments(parser):
    parser.add_argument("--out", type=Path, default=Path("proxytune_demo"), help="output folder (default ./proxytune_demo)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the trained toy models are cached (default ~/.cache/proxytune_jax/toyworld)")
    parser.add_argument("--quick", action="store_true", help="a smaller world and fewer steps (about a minute)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="distillation seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the toy world and its models")
    parser.add_argument("--skip-distillation", action="store_true", help="only the proxy-tuning part")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    toyworld: object  # ToyWorldConfig
    distill: object  # FitConfig of each student
    alphas: tuple[float, ...]
    n_examples: int


def configs(quick: bool, world_seed: int) -> DemoConfig:
    """The full demo, or the ``--quick`` smoke-test version (a tiny world; its numbers mean little)."""
    from proxytune_jax.toyworld.build import ModelSize, ToyWorldConfig
    from proxytune_jax.toyworld.proxy import ALPHAS
    from proxytune_jax.toyworld.train import FitConfig
    from proxytune_jax.toyworld.world import WorldConfig

    if quick:
        world = WorldConfig(num_people=60, corpus_docs=600, tune_examples=160,
                            eval_questions=24, seed=world_seed)
        tw = ToyWorldConfig(world=world, small=ModelSize(16, 1, 2, 32), large=ModelSize(32, 1, 2, 64),
                            pretrain=FitConfig(steps=60, batch_size=32, learning_rate=3e-3, warmup_steps=5),
                            tune=FitConfig(steps=20, batch_size=32, learning_rate=1e-3, warmup_steps=2),
                            seed=world_seed)
        return DemoConfig(tw, FitConfig(steps=8, batch_size=32, learning_rate=1e-3, warmup_steps=1),
                          (0.5, 1.0, 2.0), 2)
    # The full world is ToyWorldConfig's defaults (see toyworld/build.py for why each size is what it is).
    tw = ToyWorldConfig(world=WorldConfig(seed=world_seed), seed=world_seed)
    return DemoConfig(tw, FitConfig(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10), ALPHAS, 4)


def _mean_std(xs):
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _table(headers, rows) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def run(args) -> int:
    t_start = time.perf_counter()
    from proxytune_jax.eval import plot_reliability_diagram
    from proxytune_jax.toyworld.build import build_toyworld
    from proxytune_jax.toyworld.distill import LABELS, METHODS, distill_cached
    from proxytune_jax.toyworld.proxy import plot_alpha_sweep, run_proxy_tuning

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder")
    progress = not args.no_progress
    cfg = configs(args.quick, args.world_seed)
    tw_config, distill_fit, n_examples = cfg.toyworld, cfg.distill, cfg.n_examples
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2))

    tw = build_toyworld(tw_config, args.cache_dir, progress=progress)
    t_built = time.perf_counter()
    models = {name: tw.load(name) for name in ("base-small", "base-large", "tuned-small", "tuned-large")}
    questions = list(tw.world.heldout)

    # ---------------------------------------------------------------------------------- proxy-tuning
    print(f"\nproxy-tuning on {len(questions)} held-out questions (people never seen in instruction tuning)...")
    pt = run_proxy_tuning(models, tw.tokenizer, questions, alphas=cfg.alphas)
    plot_alpha_sweep(pt, out / "alpha_sweep.png")
    rows = [(name, f"{pt.accuracy[name]:.3f}") for name in
            ("base-small", "base-large", "tuned-small", "proxy-tuned-large", "tuned-large")]
    print(_table(["model", "accuracy"], rows))
    print(f"gap closed (proxy − base)/(tuned − base): {pt.gap_closed:.3f}   "
          f"tokens whose top-1 changed vs base-large: {pt.top1_changed_share:.3f}   n = {pt.n_questions}")
    print("α sweep: " + "  ".join(f"{a:.1f}:{v:.2f}" for a, v in pt.alpha_sweep.items()))

    ex_names = ("base-large", "tuned-small", "proxy-tuned-large", "tuned-large")
    examples = []
    for i in range(min(n_examples, len(questions))):
        examples.append({"question": questions[i].question, "reference": questions[i].answer,
                         **{name: pt.completions[name][i] for name in ex_names}})
    md = ["# Example completions (greedy, held-out questions)\n"]
    for ex in examples:
        md.append(f"## {ex['question']}\n\n| model | completion |\n|---|---|\n| reference | {ex['reference']} |")
        md += [f"| {name} | {ex[name].replace('|', '/')} |" for name in ex_names]
        md.append("")
    (out / "examples.md").write_text("\n".join(md) + "\n")
    print(f"\nexample: {examples[0]['question']}")
    for name in ex_names:
        print(f"  {name:>18}: {examples[0][name]}")

    results = {
        "config": {"quick": bool(args.quick), "world_seed": args.world_seed, "toyworld": tw_config.to_dict(),
                   "cache": str(tw.root)},
        "proxy_tuning": {"n_questions": pt.n_questions, "accuracy": pt.accuracy,
                         # null when undefined (tuned-large and base-large score the same)
                         "gap_closed": None if math.isnan(pt.gap_closed) else pt.gap_closed,
                         "top1_changed_share": pt.top1_changed_share,
                         "alpha_sweep": {f"{a:.1f}": v for a, v in pt.alpha_sweep.items()}},
        "examples": examples,
    }

    # ---------------------------------------------------------------------------------- distillation
    if not args.skip_distillation:
        print(f"\ndistillation: student = base-small, teacher = tuned-large, seeds {list(seeds)}...")
        t_distill = time.perf_counter()
        scores, info = distill_cached(tw.root, tw.config.digest(), models["base-small"], models["tuned-large"],
                                      models["tuned-small"], tw.tokenizer, list(tw.world.tune), questions,
                                      methods=METHODS, seeds=seeds, fit_config=distill_fit, progress=progress)
        if info["cached"]:
            print("(distillation table reused from the cache)")
        table, drows = {}, []
        for method in METHODS:
            per_seed = scores[method]
            entry = {"label": LABELS[method], "per_seed": {}}
            for key in ("accuracy", "nll", "ece10", "ece15"):
                m, sd = _mean_std([getattr(per_seed[s], key) for s in seeds])
                entry[key] = {"mean": m, "std": sd}
            for s in seeds:
                sc = per_seed[s]
                entry["per_seed"][str(s)] = {"accuracy": sc.accuracy, "nll": sc.nll, "ece10": sc.ece10,
                                             "ece15": sc.ece15}
            table[method] = entry
            drows.append([LABELS[method]] + [f"{entry[k]['mean']:.3f} ± {entry[k]['std']:.3f}"
                                             for k in ("accuracy", "nll", "ece10", "ece15")])
        print(_table(["objective", "accuracy", "NLL/token", "ECE (10 bins)", "ECE (15 bins)"], drows))
        print(f"FIRST teacher temperature τ (fitted on held-out answers): {info['first_teacher_temperature']:.3f} "
              f"(renormalize), {info['first_tail_teacher_temperature']:.3f} (tail bucket)")
        import numpy as np

        curves = {name: (np.concatenate([scores[m][s].confidences for s in seeds]),
                         np.concatenate([scores[m][s].correct for s in seeds]))
                  for name, m in (("SFT", "sft"), ("FIRST top-5", "first_top5"),
                                  ("FIRST top-5 + tail bucket", "first_top5_tail"))}
        plot_reliability_diagram(curves, out / "reliability_sft_vs_first.png", n_bins=10,
                                 title="Student calibration on held-out answers (all seeds)")
        results["distillation"] = {"student": "base-small", "teacher": "tuned-large", "seeds": list(seeds),
                                   "n_questions": len(questions), "steps": distill_fit.steps,
                                   "first_teacher_temperature": info["first_teacher_temperature"],
                                   "first_tail_teacher_temperature": info["first_tail_teacher_temperature"],
                                   "cached": bool(info["cached"]), "seconds": time.perf_counter() - t_distill,
                                   "methods": table}

    results["timings"] = {"toyworld_cached": bool(tw.timings.get("cached")),
                          "toyworld_build_s": t_built - t_start, "total_s": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}/results.json, alpha_sweep.png, examples.md"
          + ("" if args.skip_distillation else ", reliability_sft_vs_first.png")
          + f" in {results['timings']['total_s']:.0f} s")
    return 0
