"""Online distillation of a tiny student from a tiny teacher (forward KL), CPU-sized.

Make the models and data first:  python experiments/configs/make_tiny.py runs/tiny
Then:  proxytune train --config experiments/configs/distill_tiny.py --workdir runs/distill_tiny
"""
from proxytune_jax.training import (CheckpointConfig, DataConfig, ModelConfig, OnlineDistillation, OptimConfig, TrainConfig)

config = TrainConfig(
    model=ModelConfig(student="runs/tiny/student"),
    data=DataConfig(train_file="runs/tiny/train.jsonl", eval_file="runs/tiny/eval.jsonl", max_length=32, batch_size=8),
    objective=OnlineDistillation(teacher="runs/tiny/teacher", loss="forward_kl", loss_params={"temperature": 1.0}),
    steps=200,
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=10),
    checkpoint=CheckpointConfig(save_every=50),
    log_every=10,
    eval_every=100,
    steps_per_call=4,  # 4 optimizer steps per jitted call: same updates, less per-call overhead on a CPU
)
