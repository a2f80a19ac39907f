"""FIRST: offline distillation from a cached top-5 teacher, with the teacher's temperature as calibration.

Reproduces: Shum et al. 2024, "FIRST: Teach A Reliable Large Language Model Through Efficient Trustworthy
Distillation" (arXiv 2408.12168): the student distilled from the teacher's top-5 (ids + log-probs from a
full-vocabulary softmax, "knowledge concentration") with the teacher temperature chosen on held-out data
("reliability maximization") is better calibrated (lower ECE) than one trained at τ = 1, at a small fraction
of the storage of full distributions (120 TB → 1.2 GB in the paper's setting). The paper's
table reports accuracy and ECE on multiple-choice benchmarks (e.g. BoolQ, CSQA); its numbers are not restated
here (for instance, on CSQA the paper's fine-tuned 7B has an ECE of 21.6% at 28.3% accuracy).
Steps: (1) ``proxytune_jax.training.topk_cache.build_topk_cache`` runs the teacher once over the train and
eval files (top-k int32 ids + float16 log-probs, memory-mapped shards); (2) ``proxytune_jax.losses.first.
fit_temperature`` picks τ per mode by minimizing the teacher's held-out NLL over the cached top-k;
(3) ``proxytune_jax.training.train`` of ``config.train`` with an ``OfflineTopK`` objective per run
(``renormalize`` at τ = 1 as the uncalibrated ablation, ``renormalize`` and ``tail_bucket`` at the fitted τ); (4) response-token NLL, accuracy and ECE
(10/15 bins) of the teacher and every student on the eval file, and a reliability diagram PNG; (5) zero-shot
accuracy and ECE of the class probabilities on ``mc_tasks`` (BoolQ by default: verbalizer "yes"/"no" of
``proxytune_jax.data.glue``), the paper's reliability measure.

Hardware: caching a 13B teacher and fine-tuning a 7B student in bf16: 8×80 GB GPUs or a TPU v4-32 / v5e-32
(the teacher is not needed during training: only the cache is read).
Mesh: training ``train.mesh = MeshConfig(data=1, fsdp=-1, tensor=1)`` (params, moments, batch FSDP-sharded);
the cache pass runs the teacher jitted
on the default device placement.

    python experiments/distill_first.py
    python experiments/distill_first.py --set train.steps=500 --set k=10
    python experiments/distill_first.py --smoke
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (script_entry, Timer, config_record, describe_devices,  # noqa: E402
                                 encode_classification, choose_config, parse_args, predict_class_logits, print_table,
                                 run_config, smoke_setup, smoke_train, token_calibration, train_run, write_jsonl,
                                 write_results)
from experiments.configs.distill_first_config import CONFIG, DistillFirstConfig  # noqa: E402


def smoke_config(root: str) -> DistillFirstConfig:
    paths, _ = smoke_setup(root, kinds=[("teacher", "llama", 48, 0), ("student", "llama", 32, 1)])
    rows = [{"instruction": "Name three colors .", "context": "", "response": "Red , blue and green ."},
            {"instruction": "Say hello in French .", "context": "", "response": "Bonjour ."}]
    data = write_jsonl(os.path.join(root, "data", "dolly", "train.jsonl"), rows * 2)
    return DistillFirstConfig(teacher=paths["teacher"], student=paths["student"], train_data=data, eval_data=data,
                              runs=(("renormalize_tau1", "renormalize", False), ("tail_bucket", "tail_bucket", True)),
                              train=smoke_train(), mc_tasks=(("boolq", paths["boolq"]),), cache_batch_size=2,
                              eval_batch_size=2,
                              out_dir=os.path.join(root, "results"))


def held_out_teacher(cache_dir: str, data_file: str, tokenizer, max_length: int):
    """Flattened cached teacher entries at the response positions of ``data_file`` and their targets."""
    from proxytune_jax.losses.first import TopKCache, TopKTeacher
    from proxytune_jax.training.data import read_jsonl, tokenize_records

    cache = TopKCache(cache_dir)
    examples = tokenize_records(read_jsonl(data_file), tokenizer, max_length=max_length, path=data_file)
    ids, logp, targets = [], [], []
    for i, ex in enumerate(examples):
        seq = cache[i]
        keep = np.asarray(ex.loss_mask[1:], bool)  # entry j predicts token j + 1; response tokens only
        ids.append(np.asarray(seq.ids[:-1])[keep])
        logp.append(np.asarray(seq.logp[:-1], np.float32)[keep])
        targets.append(np.asarray(ex.ids[1:])[keep])
    return TopKTeacher(np.concatenate(ids), np.concatenate(logp)), np.concatenate(targets), cache.vocab_size


def mc_calibration(model_path: str, task_name: str, data_path: str, *, max_examples, max_length: int,
                   batch_size: int) -> dict:
    """Zero-shot accuracy and ECE (10/15 bins) of the class probabilities (verbalizer logits, glue.py)."""
    from proxytune_jax import load_pretrained
    from proxytune_jax.data.glue import get_task, load_glue, verbalizer_token_ids
    from proxytune_jax.eval.calibration import expected_calibration_error, top1_confidence_and_correct
    from proxytune_jax.training.state import split_params
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    task = get_task(task_name)
    data = encode_classification(load_glue(task.name, data_path, max_examples=max_examples), tok, max_length)
    graphdef, params = split_params(load_pretrained(model_path))
    logits = predict_class_logits(graphdef, params, data, tuple(verbalizer_token_ids(task, tok)), batch_size)
    conf, corr = top1_confidence_and_correct(logits, data["labels"])
    return {"accuracy": float(corr.mean()), "ece10": expected_calibration_error(conf, corr, 10),
            "ece15": expected_calibration_error(conf, corr, 15), "n": int(len(corr))}


def run(config: DistillFirstConfig) -> dict:
    from proxytune_jax.data import dolly
    from proxytune_jax.eval.calibration import plot_reliability_diagram
    from proxytune_jax.losses.first import TopKCache, fit_temperature
    from proxytune_jax.training import OfflineTopK
    from proxytune_jax.training.topk_cache import build_topk_cache
    from transformers import AutoTokenizer

    print(f"devices: {describe_devices()}")
    os.makedirs(config.out_dir, exist_ok=True)
    train_file = write_jsonl(os.path.join(config.out_dir, "train.jsonl"), dolly.sft_records(config.train_data))
    eval_file = write_jsonl(os.path.join(config.out_dir, "eval.jsonl"),
                            dolly.sft_records(config.eval_data, max_examples=config.max_eval_examples))
    max_length = config.train.data.max_length
    caches = {}
    with Timer() as t:
        for name, path in (("train", train_file), ("eval", eval_file)):
            out = os.path.join(config.out_dir, f"topk_cache_{name}")
            if not os.path.exists(os.path.join(out, "index.json")):  # reuse a finished cache
                build_topk_cache(config.teacher, path, out, k=config.k, batch_size=config.cache_batch_size,
                                 max_length=max_length)
            caches[name] = out
    train_cache = TopKCache(caches["train"])
    results: dict = {"config": config_record(config), "cache_seconds": t.seconds,
                     "cache": {"k": train_cache.k, "num_sequences": len(train_cache),
                               "bytes": sum(f.stat().st_size for f in Path(caches["train"]).iterdir())},
                     "runs": {}}
    tok = AutoTokenizer.from_pretrained(config.teacher)
    held, targets, vocab = held_out_teacher(caches["eval"], eval_file, tok, max_length)

    teacher_cal = token_calibration(config.teacher, eval_file, max_length=max_length,
                                    batch_size=config.eval_batch_size)
    curves = {"teacher": teacher_cal.pop("_curve")}
    results["teacher"] = teacher_cal
    rows = [{"model": "teacher", "tau": None, **{k: teacher_cal[k] for k in ("nll", "accuracy", "ece10", "ece15")}}]
    for name, mode, calibrate in config.runs:
        tau = fit_temperature(held, targets, mode=mode, vocab_size=vocab) if calibrate else 1.0
        objective = OfflineTopK(topk_cache=caches["train"], mode=mode, temperature=float(tau))
        run = run_config(config.train, student=config.student, train_file=train_file, objective=objective,
                         seed=config.seed)
        with Timer() as t:
            trained = train_run(run, os.path.join(config.out_dir, name))
        final = str(trained.export_dir)
        cal = token_calibration(final, eval_file, max_length=max_length, batch_size=config.eval_batch_size)
        curves[name] = cal.pop("_curve")
        with open(trained.workdir / "metrics.jsonl") as f:  # the file, not last_metrics: a resumed run too
            last = [line for line in f if line.strip()][-1]
        results["runs"][name] = {**cal, "path": final, "mode": mode, "temperature": tau, "train_seconds": t.seconds,
                                 "final_loss": json.loads(last).get("loss", float("nan"))}
        rows.append({"model": f"student:{name}", "tau": tau, **{k: cal[k] for k in ("nll", "accuracy", "ece10", "ece15")}})
    models = {"teacher": config.teacher, **{name: results["runs"][name]["path"] for name, _, _ in config.runs}}
    mc_rows = []
    for task_name, path in config.mc_tasks:
        for name, model_path in models.items():
            scores = mc_calibration(model_path, task_name, path, max_examples=config.mc_max_examples,
                                    max_length=max_length, batch_size=config.eval_batch_size)
            (results["teacher"] if name == "teacher" else results["runs"][name]).setdefault("mc", {})[task_name] = scores
            mc_rows.append({"task": task_name, "model": name, **scores})
    if mc_rows:
        print_table(mc_rows, title="multiple choice (zero-shot, class probabilities)")
    png = os.path.join(config.out_dir, "reliability.png")
    plot_reliability_diagram(curves, png, n_bins=10, title="FIRST students vs teacher (response tokens)")
    results["reliability_png"] = png
    print_table(rows, title=f"FIRST top-{config.k}: held-out response tokens")
    print("results:", write_results(config.out_dir, "distill_first", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "first"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
