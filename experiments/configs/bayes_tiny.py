"""Bayesian KD from a "closed-source" teacher: train.jsonl plays the teacher's generated corpus (n-gram prior),
the tiny teacher model plays the proxy M sampled for the posterior. CPU-sized.

Make the models and data first:  python experiments/configs/make_tiny.py runs/tiny
Then:  proxytune train --config experiments/configs/bayes_tiny.py --workdir runs/bayes_tiny
"""
from proxytune_jax.training import (Bayesian, CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig)

config = TrainConfig(
    model=ModelConfig(student="runs/tiny/student"),
    data=DataConfig(train_file="runs/tiny/train.jsonl", eval_file="runs/tiny/eval.jsonl", max_length=32, batch_size=8),
    objective=Bayesian(proxy="runs/tiny/teacher", ngram_n=2, gamma=2.0, posterior_bins=100, posterior_samples=8, alpha=0.5,
                       beta=0.5),
    steps=200,
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=10),
    checkpoint=CheckpointConfig(save_every=50),
    log_every=10,
    eval_every=100,
    steps_per_call=4,  # 4 optimizer steps per jitted call: same updates, less per-call overhead on a CPU
)
