"""How the toy world trains: its step budgets (``FitConfig``) handed to the library's trainer.

Every model of the toy world -- the four base/tuned models and the distillation students -- is trained by
``proxytune_jax.training.fit`` with an objective of the registry (``training.objectives``): the same train
step, optimizer and objectives as ``proxytune train``. ``FitConfig`` is the part of a toy-world config that
says how long and how fast; ``train_models`` maps it onto ``fit``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

STEPS_PER_CALL = 8  # optimizer steps per jitted call: the toy models are tiny, so per-call costs weigh


@dataclasses.dataclass(frozen=True)
class FitConfig:
    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0

    def optim(self):
        """AdamW + warmup-cosine to 0.1× (``training.OptimConfig``) over ``steps``."""
        from proxytune_jax.training.optim import OptimConfig
        return OptimConfig(learning_rate=self.learning_rate, warmup_steps=min(self.warmup_steps, self.steps - 1),
                           total_steps=self.steps, weight_decay=self.weight_decay, min_lr_ratio=0.1)


def train_models(model, data: dict[str, np.ndarray], objective, config: FitConfig, *,
                 seeds: Sequence[int] | None = None, frozen_models: dict | None = None, desc: str = "train",
                 progress: bool = True):
    """``training.fit`` of ``model`` on ``data`` with ``objective`` for each seed (default: ``config.seed``),
    all seeds at once. Returns the ``training.FitResult`` (``.models`` per seed, ``.metrics`` per step)."""
    from proxytune_jax.training import fit
    return fit(model, data, objective, steps=config.steps, batch_size=config.batch_size, optim=config.optim(),
               seeds=tuple(seeds) if seeds is not None else (config.seed,), frozen_models=frozen_models,
               steps_per_call=STEPS_PER_CALL, progress=progress, desc=desc)
