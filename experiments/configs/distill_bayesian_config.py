"""Config of ``experiments/distill_bayesian.py``: Bayesian KD from a teacher-generated corpus (black-box teacher)."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig
from proxytune_jax.training import Bayesian, CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig


@dataclass(frozen=True)
class DistillBayesianConfig:
    teacher: str = "checkpoints/Llama-2-70b-chat-hf"  # stands in for the closed model: only its text is used
    proxy_init: str = "checkpoints/Llama-2-13b-hf"  # proxy M, first fine-tuned on the teacher corpus
    student: str = "checkpoints/Llama-2-7b-hf"
    train_data: str = "data/gsm8k/train.jsonl"  # prompts the teacher answers (GSM8K train questions)
    eval_data: str = "data/gsm8k/test.jsonl"
    corpus: str | None = None  # an existing teacher corpus JSONL {"prompt", "response"}: skip generation
    max_corpus_examples: int | None = None
    teacher_max_new_tokens: int = 512
    # training settings shared by the proxy SFT, the student SFT baseline and the Bayesian student (the script
    # fills in model.student, data.train_file, the objective and the seed)
    train: TrainConfig = TrainConfig(
        model=ModelConfig(param_dtype="bfloat16"),
        data=DataConfig(max_length=768, batch_size=64),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=15, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(save_every=100),
        steps=500, log_every=10)
    # the Bayesian student's objective (its proxy is set to the fine-tuned proxy by the script); the paper's
    # values of n, γ, m, K, α, β are not verified here (Chen et al. 2024, arXiv 2401.07013 v1; the formulas are in
    # proxytune_jax.losses.bayesian)
    bayesian: Bayesian = Bayesian(ngram_n=3, gamma=2.0, posterior_bins=16, posterior_samples=8, alpha=0.5, beta=0.5)
    max_eval_examples: int | None = None
    eval_max_new_tokens: int = 512
    batch_size: int = 8  # decoding batch
    dtype: str = "bfloat16"
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1)
    out_dir: str = "results/distill_bayesian"
    seed: int = 0


CONFIG = DistillBayesianConfig()
