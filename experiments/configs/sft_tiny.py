"""Supervised fine-tuning of a tiny model on prompt/response pairs (loss on the response tokens), CPU-sized.

Make the models and data first:  python experiments/configs/make_tiny.py runs/tiny
Then:  proxytune train --config experiments/configs/sft_tiny.py --workdir runs/sft_tiny
"""
from proxytune_jax.training.config import TrainConfig

config = TrainConfig(
    objective="sft",
    student="runs/tiny/student",
    train_file="runs/tiny/train.jsonl",
    eval_file="runs/tiny/eval.jsonl",
    max_length=32,
    batch_size=8,
    steps=200,
    learning_rate=3e-3,
    warmup_steps=10,
    save_every=50,
    log_every=10,
    eval_every=100,
    steps_per_call=4,  # 4 optimizer steps per jitted call: same updates, less per-call overhead on a CPU
)
