"""Per-token α in the toy world: α schedules over generated tokens and gates on the small pair's uncertainty
against constant α, over world seeds (issue #18, item 4).

For each ``--world-seeds`` value: the demo's toy world (built or reused from the demo's cache), the usual
proxy-tuning trio (base-large + α·(tuned-small − base-small), the expert on its chat template, greedy, every
held-out question), the constant-α sweep of ``toyworld.proxy.ALPHAS`` plus the single models, and then at
α = 1 every setting of :data:`SETTINGS` -- a grid fixed before any run (the issue's three schedule kinds and
two gate kinds, thresholds spread over the observed range of a tiny model's entropy in nats; no setting was
added or dropped after seeing the numbers). All settings share one compiled program (schedules and gates are
traced hyperparameters). Prints one row per setting: accuracy per world seed, mean ± std (sample std) and the
paired difference to constant α, mean ± std; writes ``results/toyworld_alpha_schedules.json`` and the α-sweep
figure with its per-token panel ``alpha_sweep_per_token.png``.

    python experiments/toyworld_alpha_schedules.py [--world-seeds 0 1 2] [--cache-dir DIR]
                                                   [--out runs/toyworld_alpha_schedules] [--smoke]

Reproduces: no paper table; proxy-tuning (Liu et al. 2024) with a constant α is the reference, and the schedules
/ gates are this library's extension (``proxytune_jax.decoding.alpha_control``). Hardware: a 2-core CPU; seconds
per world once the world is cached (each full world takes minutes to build on first use). Mesh: one device.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from proxytune_jax.commands.demo import configs
from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld

SETTINGS = (
    ("constant", None),
    ("linear:8", None), ("linear:16", None), ("linear:32", None),
    ("step:4:0", None), ("step:8:0", None), ("step:8:0.5", None),
    (None, "entropy:0.25"), (None, "entropy:0.5"), (None, "entropy:1"), (None, "entropy:2"),
    (None, "disagreement:0.1"), (None, "disagreement:0.25"), (None, "disagreement:0.5"), (None, "disagreement:1"),
)


def label(schedule, gate) -> str:
    return " + ".join(x for x in (schedule, gate) if x)


def mean_std(xs):
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_world(models, tokenizer, questions, alphas) -> dict:
    from proxytune_jax.decoding.alpha_control import control_params
    from proxytune_jax.decoding.pipeline import TextGenerator
    from proxytune_jax.toyworld.evaluate import generate
    from proxytune_jax.toyworld.proxy import run_proxy_tuning

    pt = run_proxy_tuning(models, tokenizer, questions, alphas=alphas)
    gen = TextGenerator([models["base-large"], models["tuned-small"], models["base-small"]], [tokenizer] * 3,
                        "proxy_tuning", chat_template=[False, True, False])
    per_token = {}
    for schedule, gate in SETTINGS:
        g = generate(None, tokenizer, questions, chat=(), generator=gen,
                     fusion_params={"alpha": 1.0, **control_params(schedule, gate)})
        per_token[label(schedule, gate)] = g.accuracy
    return {"singles": {k: pt.accuracy[k] for k in ("base-large", "tuned-small", "tuned-large")},
            "constant_alpha": {str(a): v for a, v in pt.alpha_sweep.items()}, "per_token": per_token,
            "n": pt.n_questions}


def plot(per_seed: dict, path: Path) -> None:
    """The α-sweep figure (mean ± std over worlds) with its per-token panel (``toyworld.proxy.plot_alpha_sweep``)."""
    from proxytune_jax.toyworld.proxy import ProxyResults, plot_alpha_sweep

    seeds = list(per_seed)
    alphas = list(per_seed[seeds[0]]["constant_alpha"])
    sweep = {float(a): mean_std([per_seed[s]["constant_alpha"][a] for s in seeds]) for a in alphas}
    acc = {k: mean_std([per_seed[s]["singles"][k] for s in seeds])[0] for k in per_seed[seeds[0]]["singles"]}
    res = ProxyResults(per_seed[seeds[0]]["n"], acc, float("nan"), float("nan"),
                       {a: m for a, (m, _) in sweep.items()}, {})
    per_token = {k: mean_std([per_seed[s]["per_token"][k] for s in seeds]) for k in per_seed[seeds[0]]["per_token"]}
    plot_alpha_sweep(res, path, sweep_std={a: sd for a, (_, sd) in sweep.items()}, per_token=per_token,
                     title_suffix=f"; mean ± std over world seeds {', '.join(map(str, seeds))}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--smoke", action="store_true", help="the demo's --quick world, seed 0 only")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_alpha_schedules"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.world_seeds = args.world_seeds[:1]
        args.cache_dir = args.cache_dir or args.out / "cache"

    per_seed = {}
    for seed in args.world_seeds:
        cfg = configs(args.smoke, seed)
        tw = build_toyworld(cfg.toyworld, args.cache_dir)
        models = {name: tw.load(name) for name in MODEL_NAMES}
        per_seed[seed] = run_world(models, tw.tokenizer, list(tw.world.heldout), cfg.alphas)
        print(f"world seed {seed}: constant α=1 {per_seed[seed]['per_token']['constant']:.3f}", flush=True)

    seeds = list(per_seed)
    summary = {}
    print(f"\n| setting (α = 1) | {' | '.join(f'world {s}' for s in seeds)} | mean ± std | − constant (mean ± std) |")
    print("|---" * (len(seeds) + 3) + "|")
    for name in per_seed[seeds[0]]["per_token"]:
        xs = [per_seed[s]["per_token"][name] for s in seeds]
        diffs = [x - per_seed[s]["per_token"]["constant"] for x, s in zip(xs, seeds)]
        m, sd = mean_std(xs)
        dm, dsd = mean_std(diffs)
        summary[name] = {"per_seed": xs, "mean": m, "std": sd, "diff_vs_constant": diffs, "diff_mean": dm,
                         "diff_std": dsd}
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in xs) + f" | {m:.3f} ± {sd:.3f} | {dm:+.3f} ± {dsd:.3f} |")
    for k in per_seed[seeds[0]]["singles"]:
        print(f"{k}: %.3f ± %.3f" % mean_std([per_seed[s]["singles"][k] for s in seeds]))
    results = {"per_seed": per_seed, "summary": summary}
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    from proxytune_jax.atomic import write_json_atomic
    write_json_atomic(out / "toyworld_alpha_schedules.json", results)
    plot(per_seed, out / "alpha_sweep_per_token.png")
    print(f"wrote {out / 'toyworld_alpha_schedules.json'} and {out / 'alpha_sweep_per_token.png'}")
    return results


if __name__ == "__main__":
    main()
