"""`proxytune demo`: the toy world end to end on a CPU -- proxy-tuning and distillation, honestly measured.

First run trains the toy world's tokenizer and four Llama models (cached under ``--cache-dir``, default
``~/.cache/proxytune_jax/toyworld``); later runs reuse them. Writes to ``--out`` (default ./proxytune_demo):
``results.json`` (every number in the printed tables), ``alpha_sweep.png``, ``reliability_sft_vs_first.png``,
``examples.md`` (completions side by side).
"""
from __future__ import annotations

import dataclasses
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
    transfer: object  # toyworld.transfer.TransferConfig: the distillation regime

def configs(quick: bool, world_seed: int) -> DemoConfig:
    """The full demo, or the ``--quick`` smoke-test version (a tiny world; its numbers mean little)."""
    from proxytune_jax.toyworld.build import ModelSize, ToyWorldConfig
    from proxytune_jax.toyworld.proxy import ALPHAS
    from proxytune_jax.toyworld.distill import DEFAULT_FIT
    from proxytune_jax.toyworld.train import FitConfig
    from proxytune_jax.toyworld.transfer import TransferConfig
    from proxytune_jax.toyworld.world import WorldConfig

    if quick:
        world = WorldConfig(num_people=60, corpus_docs=600, tune_examples=160,
                            eval_questions=24, seed=world_seed)
        tw = ToyWorldConfig(world=world, small=ModelSize(16, 1, 2, 32), large=ModelSize(32, 1, 2, 64),
                            pretrain=FitConfig(steps=60, batch_size=32, learning_rate=3e-3, warmup_steps=5),
                            tune=FitConfig(steps=20, batch_size=32, learning_rate=1e-3, warmup_steps=2),
                            seed=world_seed)
        return DemoConfig(tw, FitConfig(steps=8, batch_size=32, learning_rate=1e-3, warmup_steps=1),
                          (0.5, 1.0, 2.0), 2, TransferConfig(n_gold=40, n_transfer_people=10, n_eval=24))
    # The full world is ToyWorldConfig's defaults (see toyworld/build.py for why each size is what it is).
    tw = ToyWorldConfig(world=WorldConfig(seed=world_seed), seed=world_seed)
    return DemoConfig(tw, DEFAULT_FIT, ALPHAS, 4, TransferConfig())


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


_COLUMNS = (("accuracy", "accuracy"), ("agreement", "agreement"), ("fact_recall", "fact recall"),
            ("nll", "NLL/token"), ("ece", "ECE"), ("kl_teacher_student", "KL(t‖s)"))


def _distillation_report(table: dict, seeds) -> list[str]:
    """The distillation table (mean ± std over seeds), the reference models, and a one-line reading of each
    declared comparison (paired bootstrap interval over questions, against the seed spread)."""
    from proxytune_jax.toyworld.distill import reading
    from proxytune_jax.toyworld.transfer import PRIMARY_COMPARISON, SECONDARY_COMPARISONS

    t = table["teacher"]
    lines = [f"distillation with a transfer set: {t['n_gold']} gold examples + {t['n_transfer']} teacher-labelled "
             f"prompts (teacher label accuracy {t['transfer_label_accuracy']:.2f}); {t['n_eval']} held-out "
             f"two-person questions; mean ± std over seeds {list(seeds)}; teacher-forced metrics on the gold "
             "answers, accuracy by greedy generation"]
    rows = [[m["label"]] + [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k, _ in _COLUMNS]
            for m in table["methods"].values()]
    rows += [[f"({name})"] + [f"{r[k]:.3f}" for k, _ in _COLUMNS] for name, r in table["reference"].items()]
    lines.append(_table(["objective"] + [h for _, h in _COLUMNS], rows))
    lines.append(f"FIRST teacher temperature τ fitted on dev questions: {t['first_temperature']:.3f}")
    diffs = table["differences"]
    for a, b in (PRIMARY_COMPARISON,) + tuple(SECONDARY_COMPARISONS):
        key = f"{a} - {b}"
        if key not in diffs:
            continue
        tag = "PRIMARY " if (a, b) == PRIMARY_COMPARISON else ""
        metrics = ("accuracy", "agreement", "fact_recall") if tag else ("accuracy", "agreement", "nll", "ece")
        parts = []
        for k in metrics:
            spread = (max(table["methods"][a][k]["std"], table["methods"][b][k]["std"]) if len(seeds) > 1
                      else None)
            parts.append(f"{k} {reading(diffs[key][k], spread)}")
        lines.append(f"{tag}{table['methods'][a]['label']} − {table['methods'][b]['label']}: " + "; ".join(parts))
    return lines


def run(args) -> int:
    from proxytune_jax._quiet import silence_transformers_torch_notice
    silence_transformers_torch_notice()  # before anything imports transformers: torch is optional here
    t_start = time.perf_counter()
    from proxytune_jax.eval import plot_reliability_diagram
    from proxytune_jax.atomic import write_json_atomic, write_text_atomic
    from proxytune_jax.toyworld.build import build_toyworld
    from proxytune_jax.toyworld.distill import LABELS, METHODS, distill_cached
    from proxytune_jax.toyworld.transfer import PRIMARY_COMPARISON
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
    print(f"proxy-tuning on {len(questions)} held-out questions...")
    pt = run_proxy_tuning(models, tw.tokenizer, questions, alphas=cfg.alphas)
    plot_alpha_sweep(pt, out / "alpha_sweep.png")
    rows = [(name, f"{pt.accuracy[name]:.3f}") for name in
            ("base-small", "base-large", "tuned-small", "proxy-tuned-large", "tuned-large")]
    report = [f"proxy-tuning on {len(questions)} held-out questions (people never seen in instruction tuning), "
              "α = 1, greedy:", _table(["model", "accuracy"], rows),
              f"gap closed (proxy − base)/(tuned − base): {pt.gap_closed:.3f}   "
              f"tokens whose top-1 changed vs base-large: {pt.top1_changed_share:.3f}   n = {pt.n_questions}",
              "α sweep: " + "  ".join(f"{a:.1f}:{v:.2f}" for a, v in pt.alpha_sweep.items())]

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
    write_text_atomic(out / "examples.md", "\n".join(md) + "\n")
    report.append(f"\nexample: {examples[0]['question']}")
    report += [f"  {name:>18}: {examples[0][name]}" for name in ex_names]

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
        tc = cfg.transfer
        print(f"\ndistillation with a transfer set (Hinton et al. 2015): student = base-small, teacher = tuned-large;"
              f" {tc.n_gold} gold examples + {tc.n_transfer_people} unlabeled prompts the teacher answers; "
              f"evaluated on {tc.n_eval} two-person questions about the transfer people; seeds {list(seeds)}...")
        t_distill = time.perf_counter()
        table = distill_cached(tw.root, tw.config.digest(), models["base-small"], models["tuned-large"],
                               models["tuned-small"], tw.tokenizer, tw.world, methods=METHODS, seeds=seeds,
                               fit_config=distill_fit, transfer_config=tc,
                               references={"base-small (untrained)": models["base-small"],
                                           "tuned-small": models["tuned-small"]},
                               progress=progress)
        distill_lines = _distillation_report(table, seeds)
        plot_reliability_diagram({LABELS[m]: table["_arrays"][m] for m in ("sft_gold", "word_kd", "first_top5",
                                                                           "first_top5_tau1")},
                                 out / "reliability_sft_vs_first.png", n_bins=10,
                                 title="Student calibration (all seeds)")
        results["distillation"] = {"student": "base-small", "teacher": "tuned-large", "seeds": list(seeds),
                                   "steps": distill_fit.steps, "transfer": dataclasses.asdict(tc),
                                   "primary_comparison": list(PRIMARY_COMPARISON),
                                   "cached": bool(table["cached"]), "seconds": time.perf_counter() - t_distill,
                                   **{k: v for k, v in table.items() if k not in ("_arrays", "cached")}}
        report += ["", *distill_lines]

    results["timings"] = {"toyworld_cached": bool(tw.timings.get("cached")),
                          "toyworld_build_s": t_built - t_start, "total_s": time.perf_counter() - t_start}
    write_json_atomic(out / "results.json", results)
    print("\n".join(report))  # the tables, after every progress bar has finished
    print(f"\nwrote {out}/results.json, alpha_sweep.png, examples.md"
          + ("" if args.skip_distillation else ", reliability_sft_vs_first.png")
          + f" in {results['timings']['total_s']:.0f} s")
    return 0
