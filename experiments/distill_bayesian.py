"""Bayesian knowledge distillation from a black-box teacher: prior from the teacher's corpus, posterior from
a proxy model's samples.

Reproduces: Chen et al. 2024, "Knowledge Distillation of Black-Box Large Language Models" (arXiv 2401.07013
v1): GPT-4 teacher → LLaMA-33B proxy → LLaMA-7B/13B student on BBH, ARC, AGIEval, MMLU,
CSQA and GSM8K; this recipe runs the GSM8K column with open models (the teacher is used only through its
generated text, as a closed API would be). The paper's numbers are not restated here.
Loss: ``mean_t [CE_t + α·KL(p̂_t ‖ q_t) + β·KL(E(P|M)_t ‖ q_t)]`` with the
n-gram prior p̂ of the corpus (window n, blend γ) and the posterior from K proxy samples over an m-point grid;
objective ``proxytune_jax.training.Bayesian`` (the γ, n, m, K, α, β defaults are ours: the paper's values are
unverified).
Steps: (1) the teacher answers the GSM8K train questions (greedy, chat prompt) → corpus C of prompt/response
records; (2) the proxy is fine-tuned on C (``training.train`` with ``SFT``); (3) two students on C: SFT (hard labels
only, the "traditional" baseline) and Bayesian KD with the tuned proxy; (4) GSM8K test exact match of both.
Every training run is ``config.train`` (a ``TrainConfig``) completed with its model, data and objective.

Hardware: generating with a 70B teacher and fine-tuning a 13B proxy / 7B student in bf16: 8×80 GB GPUs or a
TPU v4-64 / v5e-64 slice (each stage runs alone; models are freed between stages).
Mesh: decoding ``MeshConfig(data=1, fsdp=-1, tensor=1)``; training ``train.mesh``, the same FSDP layout.

    python experiments/distill_bayesian.py --set max_corpus_examples=2000
    python experiments/distill_bayesian.py --set bayesian.alpha=0.8 --set train.steps=200
    python experiments/distill_bayesian.py --smoke
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (script_entry, Timer, config_record, describe_devices,  # noqa: E402
                                 generate_texts, load_model_and_tokenizer, make_mesh_or_none, choose_config,
                                 parse_args, print_table, run_config, smoke_setup, smoke_train, train_run,
                                 write_jsonl, write_results)
from experiments.configs.distill_bayesian_config import CONFIG, DistillBayesianConfig  # noqa: E402


def smoke_config(root: str) -> DistillBayesianConfig:
    from proxytune_jax.training import Bayesian

    paths, _ = smoke_setup(root, kinds=[("teacher", "llama", 48, 0), ("proxy", "llama", 48, 2),
                                        ("student", "llama", 32, 1)])
    bayes = Bayesian(ngram_n=2, gamma=2.0, posterior_bins=8, posterior_samples=2, alpha=0.5, beta=0.5)
    return DistillBayesianConfig(teacher=paths["teacher"], proxy_init=paths["proxy"], student=paths["student"],
                                 train_data=paths["gsm8k_train"], eval_data=paths["gsm8k"], max_corpus_examples=4,
                                 teacher_max_new_tokens=8, train=smoke_train(), bayesian=bayes, max_eval_examples=2,
                                 eval_max_new_tokens=5, batch_size=2, dtype="float32",
                                 out_dir=os.path.join(root, "results"))


def teacher_corpus(config: DistillBayesianConfig, mesh) -> str:
    """The teacher's greedy answers to the train questions as prompt/response JSONL (the corpus C)."""
    from proxytune_jax.data import gsm8k
    from proxytune_jax.decoding.pipeline import TextGenerator

    path = os.path.join(config.out_dir, "teacher_corpus.jsonl")
    if os.path.exists(path):
        return path
    examples = gsm8k.load_gsm8k(config.train_data, split="train", max_examples=config.max_corpus_examples)
    model, tok = load_model_and_tokenizer(config.teacher, config.dtype, mesh)
    view = "chat" if getattr(tok, "chat_template", None) else "plain"
    outs, _ = generate_texts(TextGenerator([model], [tok], "plain", names=["teacher"], mesh=mesh), [view], examples,
                             max_new_tokens=config.teacher_max_new_tokens, stop_strings=gsm8k.STOP_STRINGS,
                             batch_size=config.batch_size, seed=config.seed, desc="teacher corpus")
    rows = [{"prompt": ex.prompt, "response": " " + o.strip()} for ex, o in zip(examples, outs) if o.strip()]
    if not rows:
        from proxytune_jax.errors import UserError

        raise UserError(f"the teacher {config.teacher} produced only empty answers; check its prompt format "
                        "(chat template) and teacher_max_new_tokens")
    if len(rows) < len(examples):
        print(f"teacher corpus: dropped {len(examples) - len(rows)} empty answers")
    del model
    gc.collect()
    return write_jsonl(path, rows)


def gsm_exact_match(model_path: str, config: DistillBayesianConfig, mesh, name: str) -> dict:
    from proxytune_jax.data import gsm8k, score_task
    from proxytune_jax.decoding.pipeline import TextGenerator

    examples = gsm8k.load_gsm8k(config.eval_data, max_examples=config.max_eval_examples)
    model, tok = load_model_and_tokenizer(model_path, config.dtype, mesh)
    outs, _ = generate_texts(TextGenerator([model], [tok], "plain", names=[name], mesh=mesh), ["plain"], examples,
                             max_new_tokens=config.eval_max_new_tokens, stop_strings=gsm8k.STOP_STRINGS,
                             batch_size=config.batch_size, seed=config.seed, desc=name)
    del model
    gc.collect()
    return score_task("gsm8k", examples, outs)


def run(config: DistillBayesianConfig) -> dict:
    from proxytune_jax.training import SFT

    print(f"devices: {describe_devices()}")
    mesh = make_mesh_or_none(config.mesh)
    os.makedirs(config.out_dir, exist_ok=True)
    with Timer() as t:
        corpus = config.corpus or teacher_corpus(config, mesh)
    with open(corpus) as f:
        corpus_size = sum(1 for line in f if line.strip())
    results: dict = {"config": config_record(config), "corpus": corpus, "corpus_size": corpus_size,
                     "corpus_seconds": t.seconds, "runs": {}}
    with Timer() as t:
        proxy_run = run_config(config.train, student=config.proxy_init, train_file=corpus, objective=SFT(),
                               seed=config.seed)
        proxy = str(train_run(proxy_run, os.path.join(config.out_dir, "proxy_sft")).export_dir)
    results["proxy"] = {"path": proxy, "train_seconds": t.seconds}
    students = {"sft": SFT(), "bayesian": dataclasses.replace(config.bayesian, proxy=proxy)}
    rows = []
    for name, objective in students.items():
        run = run_config(config.train, student=config.student, train_file=corpus, objective=objective,
                         seed=config.seed)
        with Timer() as t:
            final = str(train_run(run, os.path.join(config.out_dir, f"student_{name}")).export_dir)
        score = gsm_exact_match(final, config, mesh, name)
        results["runs"][name] = {**score, "path": final, "train_seconds": t.seconds}
        rows.append({"student": name, "gsm8k_exact_match": score["exact_match"], "train_seconds": t.seconds})
    print_table(rows, title=f"Bayesian KD vs SFT on the teacher corpus ({corpus_size} examples)")
    print("results:", write_results(config.out_dir, "distill_bayesian", results))
    return results


def main(argv=None) -> dict:
    return run(choose_config(parse_args(__doc__, argv), CONFIG, smoke_config, "bayes"))


if __name__ == "__main__":
    sys.exit(script_entry(main))
