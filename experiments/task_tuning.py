"""Task tuning by proxy: fine-tune Llama-2-7B on GSM8K (or TriviaQA) with ``proxytune_jax.training.train``,
then proxy-tune Llama-2-13B and -70B with the tuned 7B as expert and the untuned 7B as anti-expert.

Reproduces: Liu et al. 2024 (arXiv 2401.08565), task-finetuning results (GSM and TriviaQA, 13B and 70B
bases; the tuned 7B expert alone and the base alone as references). The paper's numbers for this
table are not restated here; compare the printed accuracies with it.
Steps: (1) ``proxytune_jax.data.gsm8k.sft_records`` writes GSM8K train as prompt/response JSONL (the zero-shot
prompt ``Answer the following question. … Answer:`` and the worked solution ending in ``#### N``);
(2) the config's ``train`` (a ``TrainConfig``: objective ``SFT``, full fine-tuning) is completed with the
student and that file and run with ``proxytune_jax.training.train`` (resumable: rerun the script to continue);
(3) for every base: base alone, proxy-tuned, and the expert alone, all with the plain prompt (task experts have
no chat template); exact match per ``proxytune_jax.data.TASKS``.

Hardware: training the 7B (bf16 params + AdamW moments ≈ 42 GB + activations): 8×80 GB GPUs or a TPU v4-32 /
v5e-32 with FSDP; decoding with the 70B base: ≥ 4×80 GB GPUs or a TPU v4-32.
Mesh: training ``train.mesh = MeshConfig(data=1, fsdp=-1, tensor=1)`` (params, moments and batch FSDP-sharded
over all devices); decoding ``MeshConfig(data=1, fsdp=-1, tensor=1)``.

    python experiments/task_tuning.py                          # GSM8K
    python experiments/task_tuning.py --set task=triviaqa --set train_data=data/triviaqa/train.jsonl \\
        --set eval_data=data/triviaqa/dev.jsonl
    python experiments/task_tuning.py --set train.steps=100 --set train.optim.learning_rate=1e-5
    python experiments/task_tuning.py --smoke
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (Timer, choose_config, describe_devices, generate_texts,  # noqa: E402
                                 config_record, load_model_and_tokenizer, load_task_examples, make_mesh_or_none,
                                 parse_args, print_table, run_config, script_entry, smoke_setup, smoke_train,
                                 train_run, write_jsonl, write_results)
from experiments.configs.task_tuning_config import CONFIG, TaskTuningConfig  # noqa: E402


def smoke_config(root: str) -> TaskTuningConfig:
    from proxytune_jax.training import SFT

    paths, _ = smoke_setup(root, kinds=[("small", "llama", 32, 1), ("base", "llama", 48, 0)])
    train = dataclasses.replace(smoke_train(max_length=64), objective=SFT())
    return TaskTuningConfig(train_data=paths["gsm8k_train"], eval_data=paths["gsm8k"], small_base=paths["small"],
                            bases=(("tiny", paths["base"]),), train=train, max_examples=2, max_new_tokens=5,
                            batch_size=2, dtype="float32", out_dir=os.path.join(root, "results"))


def sft_records(config: TaskTuningConfig) -> list[dict]:
    from proxytune_jax.data import gsm8k, triviaqa
    from proxytune_jax.errors import UserError

    module = {"gsm8k": gsm8k, "triviaqa": triviaqa}.get(config.task)
    if module is None:
        raise UserError(f"task tuning supports gsm8k and triviaqa, got {config.task!r}")
    return module.sft_records(config.train_data, split="train")


def train_expert(config: TaskTuningConfig) -> str:
    """Write the SFT data and train the expert on it (``config.train``); -> the exported expert folder."""
    run_dir = os.path.join(config.out_dir, f"expert_{config.task}")
    train_file = write_jsonl(os.path.join(run_dir, "train.jsonl"), sft_records(config))
    run = run_config(config.train, student=config.small_base, train_file=train_file, seed=config.seed)
    return str(train_run(run, run_dir).export_dir)


def run(config: TaskTuningConfig) -> dict:
    from proxytune_jax.data import get_task_spec, score_task
    from proxytune_jax.decoding.pipeline import TextGenerator

    print(f"devices: {describe_devices()}")
    with Timer() as t_train:
        expert_path = config.expert or train_expert(config)
    results: dict = {"config": config_record(config), "expert": expert_path,
                     "train_seconds": t_train.seconds, "bases": {}}
    mesh = make_mesh_or_none(config.mesh)
    expert, tok_e = load_model_and_tokenizer(expert_path, config.dtype, mesh)
    anti, tok_a = load_model_and_tokenizer(config.small_base, config.dtype, mesh)
    spec = get_task_spec(config.task)
    examples = load_task_examples(config.task, config.eval_data, max_examples=config.max_examples)
    n_new = config.max_new_tokens or spec.max_new_tokens

    def evaluate(models, toks, names, rule="plain", params=None, analysis=False):
        generator = TextGenerator(models, toks, rule, names=names, mesh=mesh)
        outs, changed = generate_texts(generator, ["plain"] * len(toks), examples, max_new_tokens=n_new,
                                       stop_strings=spec.stop_strings, batch_size=config.batch_size,
                                       fusion_params=params, seed=config.seed, analysis=analysis)
        return {**score_task(config.task, examples, outs), "top1_changed": changed}

    rows = []
    results["expert_alone"] = evaluate([expert], [tok_e], ["expert"])
    for name, path in config.bases:
        base, tok_b = load_model_and_tokenizer(path, config.dtype, mesh)
        r = {"base": evaluate([base], [tok_b], ["base"]),
             "proxy": evaluate([base, expert, anti], [tok_b, tok_e, tok_a], ["base", "expert", "anti-expert"],
                               "proxy_tuning", {"alpha": config.alpha}, analysis=True)}
        results["bases"][name] = r
        rows.append({"base": name, "base_em": r["base"]["exact_match"], "proxy_em": r["proxy"]["exact_match"],
                     "expert_7b_em": results["expert_alone"]["exact_match"],
                     "top1_changed": r["proxy"]["top1_changed"]})
        del base
        gc.collect()
    print_table(rows, title=f"task tuning by proxy: {config.task} exact match (n={len(examples)})")
    print("results:", write_results(config.out_dir, "task_tuning", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "task"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
