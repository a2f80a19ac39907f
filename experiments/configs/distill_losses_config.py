"""Config of ``experiments/distill_losses.py``: online distillation with each loss of ``proxytune_jax.losses``."""
from __future__ import annotations

from dataclasses import dataclass, field

from proxytune_jax.sharding import MeshConfig


@dataclass(frozen=True)
class DistillLossesConfig:
    teacher: str = "checkpoints/gpt2-xl-dolly-sft"  # GPT-2 XL (1.5B) fine-tuned on Dolly (MiniLLM setting)
    student: str = "checkpoints/gpt2-dolly-sft"  # GPT-2 base (124M), SFT-initialized
    train_data: str = "data/dolly/train.jsonl"  # databricks-dolly-15k records
    eval_data: str = "data/dolly/valid.jsonl"  # held-out records (MiniLLM holds out 500)
    # (loss name, loss kwargs) -- every divergence of docs/methods.md §2 with its paper default
    losses: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
        ("forward_kl", ()), ("reverse_kl", ()), ("js_divergence", ()), ("tv_distance", ()),
        ("skew_forward_kl", (("alpha", 0.1),)), ("skew_reverse_kl", (("alpha", 0.1),)),
        ("generalized_jsd", (("beta", 0.5),)), ("adaptive_kl", (("mu", 0.5),)), ("uld", ()),
        ("hinton_kd", (("alpha", 0.5),)),  # α·τ²·KL + (1−α)·CE
    )
    # `proxytune train` fields shared by every run (TrainConfig)
    train: dict = field(default_factory=lambda: dict(
        max_length=512, batch_size=32, steps=2000, learning_rate=5e-5, warmup_steps=100, temperature=1.0,
        kd_weight=1.0, ce_weight=0.0, param_dtype="float32", mesh_data=-1, save_every=500, log_every=50))
    max_eval_examples: int | None = 500
    max_new_tokens: int = 256
    batch_size: int = 16  # decoding batch
    dtype: str = "float32"
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=1, tensor=1)
    out_dir: str = "results/distill_losses"
    seed: int = 0


CONFIG = DistillLossesConfig()
