"""Online distillation of a tiny student from a tiny teacher (forward KL), CPU-sized.

Make the models and data first:  python experiments/configs/make_tiny.py runs/tiny
Then:  proxytune train --config experiments/configs/distill_tiny.py --workdir runs/distill_tiny
"""
from proxytune_jax.training.config import TrainConfig

config = TrainConfig(
    objective="online_distillation",
    student="runs/tiny/student",
    teacher="runs/tiny/teacher",
    train_file="runs/tiny/train.jsonl",
    eval_file="runs/tiny/eval.jsonl",
    loss="forward_kl",
    temperature=1.0,
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
