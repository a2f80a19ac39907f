"""Config of ``experiments/distill_first.py``: FIRST offline top-5 distillation with teacher calibration."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig
from proxytune_jax.training import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig


@dataclass(frozen=True)
class DistillFirstConfig:
    teacher: str = "checkpoints/Llama-2-13b-chat-hf"  # any instruction-tuned teacher of the student's family
    student: str = "checkpoints/Llama-2-7b-hf"
    train_data: str = "data/dolly/train.jsonl"  # instruction records (dolly / alpaca layout)
    eval_data: str = "data/dolly/valid.jsonl"  # held-out records: temperature fit + calibration metrics
    k: int = 5  # top-k kept per position (the paper's 5)
    # (name, mode, calibrate): calibrate = fit the teacher temperature on eval_data (else τ = 1)
    runs: tuple[tuple[str, str, bool], ...] = (("renormalize_tau1", "renormalize", False),
                                               ("renormalize", "renormalize", True),
                                               ("tail_bucket", "tail_bucket", True))
    # the students' training settings (the script fills in model.student, data.train_file, the OfflineTopK
    # objective of each run and the seed); data.max_length is also the row length of the caches
    train: TrainConfig = TrainConfig(
        model=ModelConfig(param_dtype="bfloat16"),
        data=DataConfig(max_length=512, batch_size=64),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=30, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(save_every=200),
        steps=1000, log_every=20)
    # multiple-choice reliability (the paper's accuracy + ECE on e.g. BoolQ): (GLUE/SuperGLUE task, local path)
    mc_tasks: tuple[tuple[str, str], ...] = (("boolq", "data/super_glue/boolq"),)
    mc_max_examples: int | None = 1000
    cache_batch_size: int = 8
    max_eval_examples: int | None = 500
    eval_batch_size: int = 8
    out_dir: str = "results/distill_first"
    seed: int = 0


CONFIG = DistillFirstConfig()
