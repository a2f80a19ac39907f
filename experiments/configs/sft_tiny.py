"""Supervised fine-tuning of a tiny model on prompt/response pairs (loss on the response tokens), CPU-sized.

Make the models and data first:  python experiments/configs/make_tiny.py runs/tiny
Then:  proxytune train --config experiments/configs/sft_tiny.py --workdir runs/sft_tiny
"""
from proxytune_jax.training import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig, SFT, TrainConfig)

config = TrainConfig(
    model=ModelConfig(student="runs/tiny/student"),
    data=DataConfig(train_file="runs/tiny/train.jsonl", eval_file="runs/tiny/eval.jsonl", max_length=32, batch_size=8),
    objective=SFT(),
    steps=200,
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=10),
    checkpoint=CheckpointConfig(save_every=50),
    log_every=10,
    eval_every=100,
    steps_per_call=4,  # 4 optimizer steps per jitted call: same updates, less per-call overhead on a CPU
)
