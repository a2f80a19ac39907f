"""Training: objectives as strategies, typed configs, sharded jitted steps, and the one training loop.

Modules (one idea each):
  ``objectives``  the ``Objective`` interface and the registry (SFT, online / chunked / offline-logit
                  distillation, offline FIRST top-k, Bayesian KD, TAID, on-policy GKD, a proxy-tuned
                  teacher); ``register_objective`` adds one
  ``config``      ``TrainConfig``: a tree of typed dataclasses, config files and dotted ``--set`` overrides
  ``state``       ``TrainState`` pytree (step, params, opt_state, rng, objective state) and its shardings
  ``optim``       AdamW + warmup/cosine + global-norm clipping (``OptimConfig``, ``make_optimizer``)
  ``step``        ``make_train_step`` / ``make_eval_step`` (jit, explicit shardings, donated state,
                  gradient accumulation); ``make_multi_step`` (several steps per jitted call)
  ``trainer``     ``run_steps`` (the loop every training goes through) and ``fit`` (in-memory arrays,
                  several seeds at once by ``vmap``)
  ``data``        JSONL -> tokenized, padded or packed, deterministic and resumable batches
  ``topk_cache``  offline teacher top-k caches aligned with a JSONL file
  ``loop``        ``train(config, workdir)``: files, checkpoints, resume, metrics, export
  ``reporting``   metric writers (metrics.jsonl, TensorBoard, W&B; ``register_writer``) and ``run_info``
  ``profiling``   ``--profile STEPS``: a ``jax.profiler`` trace of chosen steps
  ``gen_eval``    generation-based evaluation during training (decode + exact match / ROUGE)
  ``curves``      train / eval curves of runs from their metrics.jsonl (``proxytune plot``)
"""
from proxytune_jax.training.config import (CheckpointConfig, DataConfig, GenEvalConfig, ModelConfig, ReportConfig,
                                           TrainConfig, apply_overrides, load_config)
from proxytune_jax.training.data import Batches, DataPosition, load_batches, read_jsonl, tokenize_records
from proxytune_jax.training.objectives import (OBJECTIVES, SFT, TAID, Bayesian, DataContext, LossTerm, Objective,
                                               OfflineLogits, OfflineTopK, OnlineDistillation,
                                               OnlineDistillationChunked, OnPolicyDistillation, ProxyTunedTeacher,
                                               get_objective, register_objective)
from proxytune_jax.training.optim import OptimConfig, learning_rate_schedule, make_optimizer
from proxytune_jax.training.state import (TrainState, abstract_train_state, create_train_state, init_train_state,
                                          split_params, train_state_shardings)
from proxytune_jax.training.step import make_eval_step, make_multi_step, make_train_step, mean_metrics
from proxytune_jax.training.trainer import FitResult, batch_orders, fit, run_steps


def train(config, workdir, **kwargs):
    """``training.loop.train``: run or resume ``config`` in ``workdir`` (imported lazily: it pulls in orbax)."""
    from proxytune_jax.training.loop import train as _train
    return _train(config, workdir, **kwargs)


__all__ = [
    "TrainConfig", "ModelConfig", "DataConfig", "CheckpointConfig", "ReportConfig", "GenEvalConfig", "apply_overrides", "load_config", "Batches",
    "DataPosition", "load_batches", "read_jsonl", "tokenize_records", "OBJECTIVES", "Objective", "DataContext",
    "LossTerm", "SFT", "OnlineDistillation", "OnlineDistillationChunked", "OfflineLogits", "OfflineTopK",
    "Bayesian", "TAID", "OnPolicyDistillation", "ProxyTunedTeacher", "get_objective", "register_objective", "OptimConfig", "learning_rate_schedule", "make_optimizer",
    "TrainState", "abstract_train_state", "create_train_state", "init_train_state", "split_params",
    "train_state_shardings", "make_train_step", "make_multi_step", "make_eval_step", "mean_metrics", "FitResult",
    "batch_orders", "fit", "run_steps", "train",
]
