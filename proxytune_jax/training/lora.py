"""Training a LoRA adapter with any objective: the trained params are the adapter only.

With ``model.lora`` set (a ``models.lora.LoraConfig``), the train state's ``params`` are the adapter
(``{"...": {"lora_A": [r, in], "lora_B": [out, r]}}``), so the optimizer state and the checkpoints hold only
it; the student's base params travel as one more frozen model (role :data:`BASE_ROLE`), sharded by the model's
rules and never updated. Every objective works unchanged: :func:`wrap_loss_fn` rebuilds the student's params
inside the jitted step as ``models.lora.apply(base, adapter)`` (unmerged: ``W x + s·B A dropout(x)``, no
merged copy of any kernel) and calls the objective's own ``loss_fn`` with them; gradients reach the adapter
only. LoRA dropout draws from the step's PRNG key (folded with a constant), so it is reproducible and a
resumed run draws the same masks. Data the objective generates inside the step (on-policy samples) come from
the adapted student without dropout.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from proxytune_jax.models import lora

BASE_ROLE = "lora_base"  # the frozen base params of the LoRA student, in ``frozen``
_DROPOUT_SALT = 0x10A  # folded into the step key for the LoRA dropout masks


def _split(frozen: dict) -> tuple[Any, dict]:
    rest = dict(frozen)
    return rest.pop(BASE_ROLE), rest


def wrap_loss_fn(loss_fn: Callable, cfg: lora.LoraConfig) -> Callable:
    """``loss_fn(params, frozen, batch, rng, state)`` of the full student -> the same over the adapter."""
    def adapter_loss_fn(adapter, frozen, batch, rng, state):
        base, rest = _split(frozen)
        key = jax.random.fold_in(rng, _DROPOUT_SALT) if cfg.dropout > 0 else None
        return loss_fn(lora.apply(base, adapter, cfg, dropout_key=key), rest, batch, rng, state)
    return adapter_loss_fn


def wrap_generate(generate: Callable | None, cfg: lora.LoraConfig) -> Callable | None:
    """An objective's in-step ``generate(params, frozen, batch, rng)`` over the adapter (no dropout)."""
    if generate is None:
        return None

    def adapter_generate(adapter, frozen, batch, rng):
        base, rest = _split(frozen)
        return generate(lora.apply(base, adapter, cfg), rest, batch, rng)
    return adapter_generate


def trainable_fraction(adapter, base) -> float:
    return lora.num_params(adapter) / max(lora.num_params(base), 1)
