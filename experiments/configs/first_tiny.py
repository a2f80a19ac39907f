"""Offline distillation from the teacher's top-k cache (FIRST, tail-bucket mode), CPU-sized.

Make the models, data and caches first:  python experiments/configs/make_tiny.py runs/tiny
(or build a cache yourself: python -m proxytune_jax.training.topk_cache --teacher T --data F.jsonl --out DIR)
Then:  proxytune train --config experiments/configs/first_tiny.py --workdir runs/first_tiny
"""
from proxytune_jax.training import (CheckpointConfig, DataConfig, ModelConfig, OfflineTopK, OptimConfig, TrainConfig)

config = TrainConfig(
    model=ModelConfig(student="runs/tiny/student"),
    data=DataConfig(train_file="runs/tiny/train.jsonl", eval_file="runs/tiny/eval.jsonl", max_length=32, batch_size=8),
    objective=OfflineTopK(topk_cache="runs/tiny/topk_train", eval_topk_cache="runs/tiny/topk_eval", mode="tail_bucket",
                          temperature=1.0,  # teacher calibration temperature (see losses.fit_temperature)
                          ce_weight=0.5),
    steps=200,
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=10),
    checkpoint=CheckpointConfig(save_every=50),
    log_every=10,
    eval_every=100,
    steps_per_call=4,  # 4 optimizer steps per jitted call: same updates, less per-call overhead on a CPU
)
