"""Proxy-tune Llama-2-13B with Llama-2-7B-chat (expert) and Llama-2-7B (anti-expert).

Reproduces: Liu et al. 2024, "Tuning Language Models by Proxy" (arXiv 2401.08565), instruction-tuning
results (AlpacaFarm, GSM, ToxiGen, TruthfulQA; Llama-2, α = 1, greedy):
    13B base → proxy-tuned → 13B-chat:  AlpacaFarm win% 2.1 → 83.4 → 87.3;  GSM 6.6 → 26.4 → 32.4
    (70B: 3.7 → 88.0 → 90.4; 9.6 → 32.0 → 51.8 — set ``base``/``tuned`` to the 70B folders).
    Gap closed (mean over tasks of (proxy − base)/(tuned − base)): 91.1% (13B), 88.1% (70B).
    Only 13–25% of top-1 tokens change vs the base (reported here as ``top1_changed``).
Runs three settings per task: the base alone (plain prompt), proxy-tuning (base and anti-expert see the plain
prompt, the expert its chat template + response prefix) and, when ``tuned`` is set, the tuned target alone
(chat prompt). Metrics per task from ``proxytune_jax.data.TASKS``; AlpacaEval outputs are written in the
``alpaca_eval`` format for the external GPT-4 judge, ToxiGen outputs for an external toxicity classifier.

Hardware: 13B + 2×7B in bf16 ≈ 54 GB of weights (+ the 13B-chat run afterwards): one 80 GB GPU, or a TPU
v4-8 / v5e-8. 70B: ≥ 4×80 GB GPUs or a TPU v4-32 / v5e-16 slice.
Mesh: ``MeshConfig(data=1, fsdp=-1, tensor=1)``: every model's params FSDP-sharded over all devices,
batch split over ``data × fsdp`` (the decoder places the KV caches with the same rules); on one device no mesh.

    python experiments/proxy_tune_llama2.py --set max_examples=200 --set batch_size=16
    python experiments/proxy_tune_llama2.py --smoke        # tiny random models, tiny data, CPU, ~20 s
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (choose_config, script_entry, Timer, describe_devices, generate_texts,  # noqa: E402
                                 load_model_and_tokenizer, load_task_examples, make_mesh_or_none, parse_args,
                                 print_table, smoke_setup, write_results)
from experiments.configs.proxy_tune_llama2_config import CONFIG, ProxyTuneConfig  # noqa: E402


def smoke_config(root: str) -> ProxyTuneConfig:
    paths, _ = smoke_setup(root, kinds=[("base", "llama", 48, 0), ("expert", "llama", 32, 1),
                                        ("anti_expert", "llama", 32, 2), ("tuned", "llama", 48, 3)])
    tasks = tuple((t, paths[t]) for t in ("gsm8k", "alpaca_eval"))  # every task: see the data tests
    return ProxyTuneConfig(base=paths["base"], expert=paths["expert"], anti_expert=paths["anti_expert"],
                           tuned=paths["tuned"], tasks=tasks, max_examples=2, max_new_tokens=6, batch_size=2,
                           dtype="float32", out_dir=os.path.join(root, "results"))


def score(task: str, examples, outputs, out_dir: str, setting: str) -> dict:
    from proxytune_jax.data import alpaca, get_task_spec, score_task, write_prompts_jsonl

    spec = get_task_spec(task)
    write_prompts_jsonl(examples, os.path.join(out_dir, task, "prompts.jsonl"))
    with open(os.path.join(out_dir, task, f"{setting}.outputs.jsonl"), "w") as f:
        for ex, out in zip(examples, outputs):
            f.write(json.dumps({"id": ex.id, "output": out, "reference": ex.reference}) + "\n")
    if task == "alpaca_eval":
        alpaca.alpaca_eval_outputs(examples, outputs, setting, os.path.join(out_dir, task, f"{setting}.json"))
    if spec.scorer is None:
        return {"note": spec.note}
    return score_task(task, examples, outputs)


PRIMARY = {"gsm8k": "exact_match", "truthfulqa": "rougeL_acc", "truthfulqa_mc": "mc_accuracy",
           "triviaqa": "exact_match"}


def run(config: ProxyTuneConfig) -> dict:
    from proxytune_jax.decoding.pipeline import TextGenerator
    from proxytune_jax.eval.tuning import gap_closed

    print(f"devices: {describe_devices()}")
    mesh = make_mesh_or_none(config.mesh)
    base, tok_b = load_model_and_tokenizer(config.base, config.dtype, mesh)
    expert, tok_e = load_model_and_tokenizer(config.expert, config.dtype, mesh)
    anti, tok_a = load_model_and_tokenizer(config.anti_expert, config.dtype, mesh)
    base_gen = TextGenerator([base], [tok_b], "plain", names=["base"], mesh=mesh)
    # checks that the three tokenizers agree on the shared id range (align_vocabularies)
    proxy_gen = TextGenerator([base, expert, anti], [tok_b, tok_e, tok_a], "proxy_tuning",
                              names=["base", "expert", "anti-expert"], mesh=mesh)

    data = {t: load_task_examples(t, p, max_examples=config.max_examples, system_prompt=config.system_prompt)
            for t, p in config.tasks}
    results: dict = {"config": dataclasses.asdict(config), "devices": describe_devices(), "tasks": {}}

    def decode(generator, views, task, **kw):
        from proxytune_jax.data import get_task_spec

        spec = get_task_spec(task)
        n_new = config.max_new_tokens or spec.max_new_tokens
        return generate_texts(generator, views, data[task], max_new_tokens=n_new,
                              stop_strings=spec.stop_strings, batch_size=config.batch_size, seed=config.seed,
                              desc=f"{task}", **kw)

    for task, _ in config.tasks:
        r = results["tasks"].setdefault(task, {})
        with Timer() as t:
            outs, _ = decode(base_gen, ["plain"], task)
        r["base"] = {**score(task, data[task], outs, config.out_dir, "base"), "seconds": t.seconds}
        with Timer() as t:
            outs, changed = decode(proxy_gen, ["plain", "chat", "plain"], task,
                                   fusion_params={"alpha": config.alpha}, analysis=True)
        r["proxy"] = {**score(task, data[task], outs, config.out_dir, "proxy"), "seconds": t.seconds,
                      "top1_changed": changed}
    del proxy_gen, base_gen, expert, anti, base
    gc.collect()

    if config.tuned:
        tuned, tok_t = load_model_and_tokenizer(config.tuned, config.dtype, mesh)
        tuned_gen = TextGenerator([tuned], [tok_t], "plain", names=["tuned"], mesh=mesh)
        for task, _ in config.tasks:
            with Timer() as t:
                outs, _ = decode(tuned_gen, ["chat"], task)
            results["tasks"][task]["tuned"] = {**score(task, data[task], outs, config.out_dir, "tuned"),
                                               "seconds": t.seconds}

    rows, base_s, proxy_s, tuned_s = [], {}, {}, {}
    for task, r in results["tasks"].items():
        key = PRIMARY.get(task)
        row = {"task": task, "metric": key or "external judge"}
        for setting in ("base", "proxy", "tuned"):
            row[setting] = r.get(setting, {}).get(key) if key else None
        row["top1_changed"] = r["proxy"]["top1_changed"]
        rows.append(row)
        if key and "tuned" in r:
            base_s[task], proxy_s[task], tuned_s[task] = r["base"][key], r["proxy"][key], r["tuned"][key]
    if tuned_s:
        results["gap_closed"] = gap_closed(base_s, proxy_s, tuned_s)
    print_table(rows, title=f"proxy-tuning (alpha={config.alpha})")
    if "gap_closed" in results:
        print(f"gap closed (mean over scored tasks): {results['gap_closed']:.3f}")
    print("results:", write_results(config.out_dir, "proxy_tune_llama2", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "proxy_tune"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
