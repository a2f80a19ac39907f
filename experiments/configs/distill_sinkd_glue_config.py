"""Config of ``experiments/distill_sinkd_glue.py``: SinKD on GLUE with causal LMs classifying by verbalizer."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig


@dataclass(frozen=True)
class SinkdGlueConfig:
    task: str = "sst2"  # any classification task of proxytune_jax.data.glue.GLUE_TASKS
    data: str = "data/glue"  # folder holding {task}/train-*.parquet and {task}/validation-*.parquet
    teacher: str = "checkpoints/Llama-2-7b-hf"
    student: str = "checkpoints/TinyLlama-1.1B"  # same tokenizer as the teacher
    teacher_steps: int = 500  # fine-tune the teacher on the task first (CE on class logits); 0 = use as is
    student_steps: int = 1000
    settings: tuple[str, ...] = ("ce", "kd", "kd_sinkd")  # student objectives compared
    batch_size: int = 32
    max_length: int = 128
    learning_rate: float = 2e-5
    warmup_steps: int = 50
    kd_alpha: float = 0.9  # α·τ²·KL + (1−α)·CE
    kd_temperature: float = 2.0
    sinkhorn_beta: float = 0.8  # β of the paper's α·KD + (1−α)·CE + β·Sinkhorn
    sinkhorn_weight: float = 0.001  # the released code's w inside the Sinkhorn term (GLUE)
    sinkhorn_temperature: float = 2.0
    sinkhorn_epsilon: float = 0.1
    sinkhorn_iters: int = 20
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    param_dtype: str = "bfloat16"
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1)
    out_dir: str = "results/distill_sinkd_glue"
    seed: int = 0


CONFIG = SinkdGlueConfig()
