"""Config of ``experiments/distill_first.py``: FIRST offline top-5 distillation with teacher calibration."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    train: dict = field(default_factory=lambda: dict(
        max_length=512, batch_size=64, steps=1000, learning_rate=2e-5, warmup_steps=30, weight_decay=0.0,
        param_dtype="bfloat16", mesh_data=1, mesh_fsdp=-1, save_every=200, log_every=20))
    # multiple-choice reliability (the paper's accuracy + ECE on e.g. BoolQ): (GLUE/SuperGLUE task, local path)
    mc_tasks: tuple[tuple[str, str], ...] = (("boolq", "data/super_glue/boolq"),)
    mc_max_examples: int | None = 1000
    cache_batch_size: int = 8
    max_eval_examples: int | None = 500
    eval_batch_size: int = 8
    out_dir: str = "results/distill_first"
    seed: int = 0


CONFIG = DistillFirstConfig()
