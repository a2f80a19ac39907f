"""A LoRA-tuned small expert next to the fully tuned one: proxy-tuning the toy world's base-large with each.

For every world seed: the demo's toy world (built or reused from the demo's cache), a LoRA adapter on base-small
trained on the very instruction data tuned-small was tuned on (same rows, replay documents, steps, batch size,
label smoothing and data-order seed; only the adapter is trained, at ``--set lr=``), saved as a PEFT folder
(``WORLD/lora-tuned-small``, loadable by ``proxytune generate --expert-adapter``), then greedy accuracy on every
held-out question of: base-large, tuned-small, LoRA-tuned-small, proxy-tuned-large with the full expert and
proxy-tuned-large with the LoRA expert (α = 1; anti-expert base-small). Mean ± std (sample std) over world seeds.

    python experiments/toyworld_lora_expert.py [--world-seeds 0 1 2] [--cache-dir DIR]
        [--out runs/toyworld_lora_expert] [--set r=4 --set alpha=8 --set lr=1e-2 --set targets=all-linear]
    python experiments/toyworld_lora_expert.py --world-seeds 0 --export-cli runs/toy_cli   # the CLI path's files

Reproduces: the practice the LoRA paper (Hu et al. 2021, arXiv 2106.09685) enables for proxy-tuning (Liu et al.
2024): a low-rank adapter as the small tuned expert. Hardware: a 2-core CPU, about 1½ minutes per cached world
(the adapter trains in ~15 s, the decodes take the rest). Mesh: one device (the models are tiny).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

ROWS = ("base-large", "tuned-small", "lora-tuned-small", "proxy-tuned-large (full expert)",
        "proxy-tuned-large (LoRA expert)", "tuned-large")


@dataclasses.dataclass(frozen=True)
class LoraExpertConfig:
    r: int = 4  # of hidden size 24: 2,688 trainable params of base-small's 9,792
    alpha: float = 8.0
    lr: float = 1e-2  # LoRA takes a larger rate than full tuning (the small model's full rate is 3e-3)
    targets: str = "all-linear"  # comma-separated module names, or all-linear
    steps: int = 0  # 0: the full tuning's steps


def _parse_sets(items) -> LoraExpertConfig:
    cfg = LoraExpertConfig()
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set {item}: unknown key {key!r}; one of {', '.join(types)}")
        cast = {"int": int, "float": float, "str": str}[types[key]]
        cfg = dataclasses.replace(cfg, **{key: cast(raw)})
    return cfg


def run_world(seed: int, smoke: bool, cache_dir, out: Path, lc: LoraExpertConfig) -> dict:
    from proxytune_jax.commands.demo import configs
    from proxytune_jax.models import lora
    from proxytune_jax.models.peft_io import save_adapter
    from proxytune_jax.toyworld.build import MODEL_NAMES, build_toyworld, instruction_data
    from proxytune_jax.toyworld.evaluate import generate
    from proxytune_jax.toyworld.train import STEPS_PER_CALL
    from proxytune_jax.training import SFT, fit
    from flax import nnx

    cfg = configs(smoke, seed)
    tw = build_toyworld(cfg.toyworld, cache_dir)
    tc = tw.config
    models = {name: tw.load(name) for name in MODEL_NAMES}
    data = instruction_data(tc, tw.world, tw.tokenizer)
    tune = dataclasses.replace(tc.tune, seed=tc.seed + 1, learning_rate=lc.lr,
                               steps=lc.steps or tc.tune.steps)  # the full tuning's seed, steps and batch
    lcfg = lora.LoraConfig(r=lc.r, alpha=lc.alpha, target_modules=tuple(lc.targets.split(",")))
    t0 = time.perf_counter()
    res = fit(models["base-small"], data, SFT(label_smoothing=tc.label_smoothing_small), steps=tune.steps,
              batch_size=tune.batch_size, optim=tune.optim(), seeds=(tune.seed,), steps_per_call=STEPS_PER_CALL,
              progress=False, lora=lcfg, desc="LoRA-tune small")
    train_s = time.perf_counter() - t0
    adapter = res.adapters[0]
    base_params = nnx.to_pure_dict(nnx.split(models["base-small"])[1])
    folder = out / f"world{seed}" / "lora-tuned-small"
    save_adapter(folder, adapter, lcfg, base_params, models["base-small"].config,
                 base_model_name_or_path=str(tw.model_path("base-small")))
    tw.tokenizer.save_pretrained(folder)
    lora_small = res.model  # unmerged: shares base-small's arrays (the anti-expert's)

    qs, tok = list(tw.world.heldout), tw.tokenizer
    acc = {}
    for name, model, chat in (("base-large", models["base-large"], False),
                              ("tuned-small", models["tuned-small"], True), ("lora-tuned-small", lora_small, True),
                              ("tuned-large", models["tuned-large"], True)):
        acc[name] = generate([model], tok, qs, chat=[chat]).accuracy
    for label, expert in (("full expert", models["tuned-small"]), ("LoRA expert", lora_small)):
        acc[f"proxy-tuned-large ({label})"] = generate(
            [models["base-large"], expert, models["base-small"]], tok, qs, chat=[False, True, False],
            rule="proxy_tuning", fusion_params={"alpha": 1.0}).accuracy
    n_train = lora.num_params(adapter)
    n_full = lora.num_params(base_params)
    return {**acc, "n": len(qs), "lora_train_s": train_s, "trainable_params": n_train, "full_params": n_full,
            "final_loss": float(res.metrics["loss"][0, -1]), "adapter_dir": str(folder),
            "base_small_dir": str(tw.model_path("base-small")), "base_large_dir": str(tw.model_path("base-large"))}


CLI_CONFIG = """\
# proxytune train --config {dir}/lora_expert.py --workdir {dir}/lora_expert
# A LoRA adapter on the toy world's base-small, tuned on its instruction data (plain prompts) + replayed documents.
from proxytune_jax.models.lora import LoraConfig
from proxytune_jax.training import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, SFT, TrainConfig

config = TrainConfig(
    model=ModelConfig(student="{dir}/base-small",
                      lora=LoraConfig(r={r}, alpha={alpha}, target_modules=({targets},))),
    data=DataConfig(train_file="{dir}/train.jsonl", max_length={max_length}, batch_size={batch}),
    objective=SFT(label_smoothing={smoothing}),
    optim=OptimConfig(learning_rate={lr}, warmup_steps={warmup}, weight_decay=0.0),
    checkpoint=CheckpointConfig(save_every={steps}),
    steps={steps}, steps_per_call=8, log_every=100, seed={seed},
)
"""


def export_cli(seed: int, smoke: bool, cache_dir, folder: Path, lc: LoraExpertConfig) -> Path:
    """Files for the command-line path on the toy world: base-small/ and base-large/ with the tokenizer,
    train.jsonl (the instruction data as plain prompt/response rows + the replayed documents as text rows),
    heldout.jsonl (prompts + answers, for ``proxytune generate`` and ``proxytune eval``) and lora_expert.py (a
    TrainConfig for ``proxytune train``)."""
    import numpy as np
    from proxytune_jax.commands.demo import configs
    from proxytune_jax.atomic import write_text_atomic
    from proxytune_jax.toyworld.build import build_toyworld

    tw = build_toyworld(configs(smoke, seed).toyworld, cache_dir)
    tc = tw.config
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("base-small", "base-large"):
        dst = folder / name
        dst.mkdir(exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            (dst / f).write_bytes((tw.model_path(name) / f).read_bytes())
        tw.tokenizer.save_pretrained(dst)
    rows = [{"prompt": q.question, "response": q.answer} for q in tw.world.tune]
    n_replay = int(round(tc.replay_ratio * len(tw.world.tune)))  # the same documents as the build's replay
    pick = np.random.default_rng(tc.seed).choice(len(tw.world.corpus), size=n_replay, replace=False)
    rows += [{"text": tw.world.corpus[i]} for i in pick]
    write_text_atomic(folder / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(folder / "heldout.jsonl", "".join(
        json.dumps({"prompt": q.question, "answer": q.answer}) + "\n" for q in tw.world.heldout))
    steps = lc.steps or tc.tune.steps
    write_text_atomic(folder / "lora_expert.py", CLI_CONFIG.format(
        dir=folder, r=lc.r, alpha=lc.alpha, targets=", ".join(repr(t) for t in lc.targets.split(",")),
        max_length=tc.max_length, batch=tc.tune.batch_size, smoothing=tc.label_smoothing_small, lr=lc.lr,
        warmup=min(tc.tune.warmup_steps, steps - 1), steps=steps, seed=tc.seed + 1))
    return folder


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the demo's cache")
    ap.add_argument("--smoke", action="store_true", help="the demo's --quick world, seed 0 only, few LoRA steps")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="r, alpha, lr, targets (comma list or all-linear), steps (0 = the full tuning's)")
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_lora_expert"),
                    help="output folder: results/toyworld_lora_expert.json and a PEFT adapter per world")
    ap.add_argument("--export-cli", type=Path, default=None, metavar="DIR",
                    help="only write the command-line files of the first world seed to DIR (see the README) and exit")
    args = ap.parse_args(argv)
    lc = _parse_sets(args.sets)
    if args.smoke:
        args.world_seeds = args.world_seeds[:1]
        args.cache_dir = args.cache_dir or args.out / "cache"
        lc = dataclasses.replace(lc, steps=lc.steps or 40)
    if args.export_cli is not None:
        folder = export_cli(args.world_seeds[0], args.smoke, args.cache_dir, args.export_cli, lc)
        print(f"wrote {folder}: base-small/, base-large/, train.jsonl, heldout.jsonl, lora_expert.py")
        return {"export_cli": str(folder)}
    args.out.mkdir(parents=True, exist_ok=True)

    per_seed = {}
    for seed in args.world_seeds:
        per_seed[seed] = run_world(seed, args.smoke, args.cache_dir, args.out, lc)
        r = per_seed[seed]
        print(f"world seed {seed}: " + "  ".join(f"{k} {r[k]:.3f}" for k in ROWS)
              + f"  (LoRA: {r['trainable_params']:,} of {r['full_params']:,} params, {r['lora_train_s']:.0f} s)",
              flush=True)

    def mean_std(key):
        xs = [per_seed[s][key] for s in per_seed]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    print("\n| world seed | " + " | ".join(ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    for s, r in per_seed.items():
        print(f"| {s} | " + " | ".join(f"{r[k]:.3f}" for k in ROWS) + " |")
    print("| mean ± std | " + " | ".join("%.3f ± %.3f" % mean_std(k) for k in ROWS) + " |")
    diffs = [per_seed[s]["proxy-tuned-large (LoRA expert)"] - per_seed[s]["proxy-tuned-large (full expert)"]
             for s in per_seed]
    print("LoRA expert − full expert (proxy-tuned-large): " + ", ".join(f"{d:+.3f}" for d in diffs))
    results = {"config": dataclasses.asdict(lc), "per_seed": per_seed,
               "mean_std": {k: mean_std(k) for k in ROWS}, "lora_minus_full": diffs}
    from proxytune_jax.atomic import write_json_atomic
    (args.out / "results").mkdir(exist_ok=True)
    write_json_atomic(args.out / "results" / "toyworld_lora_expert.json", results)
    return results


if __name__ == "__main__":
    main()
