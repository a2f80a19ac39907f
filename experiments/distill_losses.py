"""Distil a student from a teacher with every divergence of ``proxytune_jax.losses`` and compare ROUGE-L.

Reproduces: the loss comparison of MiniLLM (Gu et al. 2024, reverse KL) and DistiLLM (Ko et al. 2024, skew
KL/RKL) in their instruction-following setting: GPT-2 XL teacher → GPT-2 student on databricks-dolly-15k,
ROUGE-L of greedy responses on held-out Dolly prompts (the "Dolly" column of their main results tables; the
numbers are not restated here). The library's other divergences (``proxytune_jax.losses``) run in the same setting:
generalized JSD (GKD, Agarwal et al. 2024), adaptive KL (Wu et al. 2024), ULD (Boizard et al. 2024), JS, TVD.
Here every loss is trained on the *teacher's distribution over the dataset's responses* (objective
``proxytune_jax.training.OnlineDistillation``: the teacher runs inside the step; the papers' on-policy /
student-generated variants are out of scope), so the losses are compared under one data regime.
Per loss: ``config.train`` (a ``TrainConfig``) with ``OnlineDistillation(teacher, loss, loss_params)`` is run with
``proxytune_jax.training.train`` (resumable), the exported student is decoded greedily on the eval prompts
(``proxytune_jax.data.dolly`` prompt) and scored with ``proxytune_jax.eval.rouge``. The teacher and the initial
student are scored as references.

Hardware: GPT-2 XL teacher (fp32 6 GB) + GPT-2 student training: one 24-80 GB GPU or a TPU v4-8 / v5e-8.
Mesh: training ``train.mesh = MeshConfig(data=-1)`` (data parallel, params replicated); decoding
``MeshConfig(data=-1)``.

    python experiments/distill_losses.py --set 'losses=[["reverse_kl", []]]'
    python experiments/distill_losses.py --set 'losses=[["forward_kl", [["temperature", 2.0]]]]' --set ce_weight=0.5
    python experiments/distill_losses.py --smoke
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (script_entry, Timer, config_record, describe_devices,  # noqa: E402
                                 generate_texts, load_model_and_tokenizer, make_mesh_or_none, choose_config,
                                 parse_args, print_table, run_config, smoke_setup, smoke_train, train_run,
                                 write_jsonl, write_results)
from experiments.configs.distill_losses_config import CONFIG, DistillLossesConfig  # noqa: E402


def smoke_config(root: str) -> DistillLossesConfig:
    paths, _ = smoke_setup(root, kinds=[("teacher", "llama", 48, 0), ("student", "llama", 32, 1)])
    rows = [{"instruction": "Name three colors .", "context": "", "response": "Red , blue and green .",
             "category": "open_qa"},
            {"instruction": "Say hello in French .", "context": "", "response": "Bonjour .", "category": "open_qa"}]
    data = write_jsonl(os.path.join(root, "data", "dolly", "train.jsonl"), rows * 2)
    return DistillLossesConfig(teacher=paths["teacher"], student=paths["student"], train_data=data, eval_data=data,
                               losses=(("forward_kl", ()), ("skew_reverse_kl", (("alpha", 0.1),))),
                               train=smoke_train(),
                               max_eval_examples=2, max_new_tokens=4, batch_size=2,
                               out_dir=os.path.join(root, "results"))


def train_student(config: DistillLossesConfig, loss: str, loss_params: dict, train_file: str) -> str:
    """Online distillation of the student with ``loss`` (``loss_params`` over its defaults); -> the exported
    student folder."""
    from proxytune_jax.training import OnlineDistillation

    objective = OnlineDistillation(teacher=config.teacher, loss=loss, loss_params=dict(loss_params),
                                   kd_weight=config.kd_weight, ce_weight=config.ce_weight)
    run = run_config(config.train, student=config.student, train_file=train_file, objective=objective,
                     seed=config.seed)
    return str(train_run(run, os.path.join(config.out_dir, loss)).export_dir)


def run(config: DistillLossesConfig) -> dict:
    import gc

    from proxytune_jax.data import dolly
    from proxytune_jax.decoding.pipeline import TextGenerator

    print(f"devices: {describe_devices()}")
    train_file = write_jsonl(os.path.join(config.out_dir, "train.jsonl"), dolly.sft_records(config.train_data))
    examples = dolly.load_dolly(config.eval_data, max_examples=config.max_eval_examples)
    mesh = make_mesh_or_none(config.mesh)

    def score(path: str, name: str) -> dict:
        model, tok = load_model_and_tokenizer(path, config.dtype, mesh)
        with Timer() as t:
            generator = TextGenerator([model], [tok], "plain", names=[name], mesh=mesh)
            outs, _ = generate_texts(generator, ["plain"], examples,
                                     max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                     seed=config.seed, desc=name)
        del model
        gc.collect()
        return {**dolly.score_rouge_l(examples, outs), "decode_seconds": t.seconds, "sample": outs[:2]}

    results: dict = {"config": config_record(config), "runs": {}}
    results["runs"]["teacher"] = score(config.teacher, "teacher")
    results["runs"]["student_init"] = score(config.student, "student_init")
    for loss, params in config.losses:
        with Timer() as t:
            final = train_student(config, loss, dict(params), train_file)
        results["runs"][loss] = {**score(final, loss), "train_seconds": t.seconds, "loss_params": dict(params)}
    rows = [{"run": k, "rougeL": 100 * v["rougeL"]} for k, v in results["runs"].items()]
    print_table(rows, title=f"Dolly ROUGE-L (x100), n={len(examples)}")
    print("results:", write_results(config.out_dir, "distill_losses", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "losses"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
