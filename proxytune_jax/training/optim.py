"""The optimizer: AdamW with linear warmup + cosine decay and global-norm clipping.

Gradient accumulation is done inside the train step (``make_train_step(..., grad_accum_steps=k)`` scans over
``k`` micro-batches and applies one update), not with ``optax.MultiSteps``: one jitted call per optimizer
step, and the accumulated gradient equals the big-batch gradient because micro-batch gradients are weighted
by their number of loss tokens.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import optax

from proxytune_jax.errors import UserError
from proxytune_jax.sharding import path_to_str


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyperparameters. The learning rate rises linearly from 0 to ``learning_rate`` over
    ``warmup_steps`` and then follows a cosine down to ``learning_rate * min_lr_ratio`` at ``total_steps``
    (0: the run's own number of steps, filled in by ``TrainConfig.optim_config()`` and ``training.fit``).
    ``grad_clip_norm <= 0`` disables clipping. Weight decay skips 1-D parameters (norm scales, biases)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0

    def validate(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        for name in ("weight_decay", "b1", "b2", "eps", "grad_clip_norm"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"optim.{name} must be a finite number, got {getattr(self, name)}")
        if self.weight_decay < 0 or not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps <= 0:
            raise UserError(f"need weight_decay >= 0, 0 <= b1, b2 < 1 and eps > 0; got weight_decay="
                            f"{self.weight_decay}, b1={self.b1}, b2={self.b2}, eps={self.eps}")
        if self.total_steps < 1:
            raise UserError(f"total_steps (the run's number of steps) must be >= 1, got {self.total_steps} (0 is "
                            "resolved to the run's steps by TrainConfig.optim_config() and training.fit)")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise UserError(f"warmup_steps must be in [0, total_steps={self.total_steps}) (the cosine needs at least "
                            f"one step after the warmup), got {self.warmup_steps}; lower optim.warmup_steps or "
                            "train for more steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 then cosine decay to ``learning_rate * min_lr_ratio``."""
    config.validate()
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,  # optax counts the warmup inside decay_steps
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def decay_mask(params) -> object:
    """True for parameters that get weight decay: matrices (ndim >= 2) that are not norm scales."""
    def one(path, leaf):
        name = path_to_str(path)
        return getattr(leaf, "ndim", 0) >= 2 and not re.search(r"norm|ln_", name)
    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm`` -> AdamW (decoupled weight decay on matrices) with the schedule above."""
    schedule = learning_rate_schedule(config)
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
