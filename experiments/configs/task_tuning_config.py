"""Config of ``experiments/task_tuning.py``: train a Llama-2-7B task expert (``proxytune_jax.training.train``),
then proxy-tune Llama-2-13B and -70B with it (anti-expert: the untuned 7B)."""
from __future__ import annotations

from dataclasses import dataclass

from proxytune_jax.sharding import MeshConfig
from proxytune_jax.training import (SFT, CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig)


@dataclass(frozen=True)
class TaskTuningConfig:
    task: str = "gsm8k"  # "gsm8k" or "triviaqa"
    train_data: str = "data/gsm8k/train.jsonl"
    eval_data: str = "data/gsm8k/test.jsonl"
    small_base: str = "checkpoints/Llama-2-7b-hf"  # fine-tuned into the expert; also the anti-expert
    bases: tuple[tuple[str, str], ...] = (("13B", "checkpoints/Llama-2-13b-hf"),
                                          ("70B", "checkpoints/Llama-2-70b-hf"))
    expert: str | None = None  # an already trained expert folder: skip training
    # the expert's training run, full fine-tuning (model.student and data.train_file are filled in by the script)
    train: TrainConfig = TrainConfig(
        model=ModelConfig(param_dtype="bfloat16"),
        data=DataConfig(max_length=512, batch_size=64),
        objective=SFT(),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=7, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),  # params, moments and batch FSDP-sharded over all devices
        checkpoint=CheckpointConfig(save_every=50),
        steps=234, log_every=10)
    alpha: float = 1.0
    max_examples: int | None = None
    max_new_tokens: int | None = None  # None: the task's budget (GSM 512, TriviaQA 20)
    batch_size: int = 8
    dtype: str = "bfloat16"
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1)
    out_dir: str = "results/task_tuning"
    seed: int = 0


CONFIG = TaskTuningConfig()
