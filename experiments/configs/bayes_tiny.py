"""Bayesian KD from a "closed-source" teacher: train.jsonl plays the teacher's generated corpus (n-gram prior),
the tiny teacher model plays the proxy M sampled for the posterior. CPU-sized.

Make the models and data first:  python experiments/configs/make_tiny.py runs/tiny
Then:  proxytune train --config experiments/configs/bayes_tiny.py --workdir runs/bayes_tiny
"""
from proxytune_jax.training.config import TrainConfig

config = TrainConfig(
    objective="bayesian",
    student="runs/tiny/student",
    proxy="runs/tiny/teacher",
    train_file="runs/tiny/train.jsonl",
    eval_file="runs/tiny/eval.jsonl",
    ngram_n=2,
    gamma=2.0,
    posterior_bins=100,
    posterior_samples=8,
    alpha=0.5,
    beta=0.5,
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
