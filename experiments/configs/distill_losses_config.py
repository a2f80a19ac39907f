"""Config of ``experiments/distill_losses.py``: online distillation with each loss of ``proxytune_jax.losses``."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig
from proxytune_jax.training import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig


@dataclass(frozen=True)
class DistillLossesConfig:
    teacher: str = "checkpoints/gpt2-xl-dolly-sft"  # GPT-2 XL (1.5B) fine-tuned on Dolly (MiniLLM setting)
    student: str = "checkpoints/gpt2-dolly-sft"  # GPT-2 base (124M), SFT-initialized
    train_data: str = "data/dolly/train.jsonl"  # databricks-dolly-15k records
    eval_data: str = "data/dolly/valid.jsonl"  # held-out records (MiniLLM holds out 500)
    # (loss name, loss_params) -- every divergence registered in proxytune_jax.losses.LOSSES; a
    # hyperparameter not given keeps the loss's own default (temperature 1 for all of these)
    losses: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
        ("forward_kl", ()), ("reverse_kl", ()), ("js_divergence", ()), ("tv_distance", ()),
        ("skew_forward_kl", (("alpha", 0.1),)), ("skew_reverse_kl", (("alpha", 0.1),)),
        ("generalized_jsd", (("beta", 0.5),)), ("adaptive_kl", (("mu", 0.5),)), ("uld", ()),
        ("hinton_kd", (("alpha", 0.5),)),  # α·τ²·KL + (1−α)·CE
    )
    kd_weight: float = 1.0  # OnlineDistillation: kd_weight · loss + ce_weight · CE
    ce_weight: float = 0.0
    # training settings shared by every run (the script fills in model.student, data.train_file, the
    # OnlineDistillation objective of each loss and the seed)
    train: TrainConfig = TrainConfig(
        model=ModelConfig(param_dtype="float32"),
        data=DataConfig(max_length=512, batch_size=32),
        optim=OptimConfig(learning_rate=5e-5, warmup_steps=100),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),  # data parallel, params replicated
        checkpoint=CheckpointConfig(save_every=500),
        steps=2000, log_every=50)
    max_eval_examples: int | None = 500
    max_new_tokens: int = 256
    batch_size: int = 16  # decoding batch
    dtype: str = "float32"
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=1, tensor=1)
    out_dir: str = "results/distill_losses"
    seed: int = 0


CONFIG = DistillLossesConfig()
