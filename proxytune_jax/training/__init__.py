"""Training: sharded jitted train steps, objectives, data pipeline, and the `proxytune train` loop.

Modules (one idea each):
  ``state``       ``TrainState`` pytree (step, params, opt_state, rng, extras) and its shardings
  ``optim``       AdamW + warmup/cosine + global-norm clipping (``OptimConfig``, ``make_optimizer``)
  ``objectives``  pure ``loss_fn(params, frozen, batch, rng, extras) -> (loss, metrics)``: SFT, online
                  distillation (any loss of ``proxytune_jax.losses``), offline FIRST top-k, Bayesian KD
  ``step``        ``make_train_step`` / ``make_eval_step`` (jit, explicit shardings, donated state,
                  gradient accumulation); ``make_multi_step`` (several steps per jitted call)
  ``data``        JSONL -> tokenized, padded or packed, deterministic and resumable batches
  ``topk_cache``  offline teacher top-k caches aligned with a JSONL file
  ``config``      ``TrainConfig`` dataclass, config files and ``--set`` overrides
  ``loop``        ``train(config, workdir)``: checkpoints, resume, metrics, export
"""
from proxytune_jax.training.config import TrainConfig, load_config
from proxytune_jax.training.data import Batches, DataPosition, load_batches, read_jsonl, tokenize_records
from proxytune_jax.training.objectives import (bayesian_objective, offline_topk_objective,
                                               online_distillation_chunked_objective,
                                               online_distillation_objective, sft_objective)
from proxytune_jax.training.optim import OptimConfig, learning_rate_schedule, make_optimizer
from proxytune_jax.training.state import (TrainState, abstract_train_state, create_train_state, init_train_state,
                                          split_params, train_state_shardings)
from proxytune_jax.training.step import make_eval_step, make_multi_step, make_train_step, mean_metrics

__all__ = [
    "TrainConfig", "load_config", "Batches", "DataPosition", "load_batches", "read_jsonl", "tokenize_records",
    "sft_objective", "online_distillation_objective", "online_distillation_chunked_objective",
    "offline_topk_objective", "bayesian_objective",
    "OptimConfig", "learning_rate_schedule", "make_optimizer", "TrainState", "abstract_train_state",
    "create_train_state", "init_train_state", "split_params", "train_state_shardings", "make_train_step",
    "make_multi_step", "make_eval_step", "mean_metrics",
]
