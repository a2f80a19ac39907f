"""Pieces every objective uses: the shifted targets of a batch, token cross-entropy, a model's logits.

Batch convention (``training.data``, ``toyworld.data``): ``input_ids``, ``attention_mask``, ``loss_mask``
``[B, T]``, rows left-padded. The logits at position ``t`` are scored against token ``t + 1``; position ``t``
counts when token ``t + 1`` is a training target (``loss_mask``) and both tokens are real
(``attention_mask``). Every loss is the mean over counted positions.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from proxytune_jax.models.layers import lm_logits


def shifted(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(labels [B, T-1] int32, mask [B, T-1] bool)``: the target of position t is token t+1."""
    ids, attn, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    labels = ids[:, 1:]
    mask = (lm[:, 1:] > 0) & (attn[:, 1:] > 0) & (attn[:, :-1] > 0)
    return labels, mask


def token_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                        label_smoothing: float = 0.0) -> jax.Array:
    """Mean over ``mask`` of the (label-smoothed) cross-entropy in fp32; 0 for an empty mask.

    With smoothing ε the target is ``(1 − ε)·onehot + ε·uniform``, so the per-token loss is
    ``(1 − ε)·(−log p_label) + ε·mean_v(−log p_v)`` (Szegedy et al. 2016).
    The label's log-prob is picked with a one-hot product, not a gather (the gradient of a gather is a scatter,
    which some backends run slowly; the product is one fused elementwise pass)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.sum(logp * jax.nn.one_hot(labels, logp.shape[-1], dtype=jnp.float32), axis=-1)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def model_logits(graphdef: nnx.GraphDef, params: Any, batch: dict) -> jax.Array:
    """Logits ``[B, T-1, V]`` (fp32) of the positions that predict tokens 1..T-1.

    The last position is dropped from the hidden states *before* the output projection (same values as
    slicing ``model(...)`` logits), so no ``[B, T, V]`` slice runs forward and no pad of the ``[B, T-1, V]``
    cotangent runs backward."""
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, T, D]
    return lm_logits(h[:, :-1], model.lm_head_weight())  # [B, T-1, V] float32


def frozen_logits(graphdef: nnx.GraphDef, params: Any, batch: dict, vocab_size: int) -> jax.Array:
    """A frozen model's ``model_logits`` under ``stop_gradient``, cut to the student's ``vocab_size`` ids (a
    teacher with a padded, larger vocabulary shares the student's tokenizer)."""
    return jax.lax.stop_gradient(model_logits(graphdef, params, batch)[..., :vocab_size])


def count(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask, dtype=jnp.int32)


# ------------------------------------------------------------------------------------------ distillation terms
@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One more weighted distillation term of an objective: ``weight · <loss>(student, teacher, mask,
    **params)``. ``max_rows > 0`` evaluates it on the first ``max_rows`` rows of the batch only (for batch-wise
    losses such as SinKD, whose cost grows with the square of the batch's positions)."""

    loss: str
    weight: float = 1.0
    params: dict = dataclasses.field(default_factory=dict)
    max_rows: int = 0


def row_masks(batch: dict, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(ce_mask, kd_mask)``: the positions the cross-entropy and the distillation terms count. A batch may
    carry per-row selectors ``ce_rows`` / ``kd_rows`` ``[B]`` (e.g. gold rows for CE, transfer-set rows for the
    teacher term); rows without a selector count for both."""
    ce = mask & (batch["ce_rows"][:, None] > 0) if "ce_rows" in batch else mask
    kd = mask & (batch["kd_rows"][:, None] > 0) if "kd_rows" in batch else mask
    return ce, kd


def resolve_terms(loss: str, loss_params: dict, extra_terms, *, teacher: str) -> list[tuple[Any, dict, float, int]]:
    """``[(LossSpec, hyperparameters, weight, max_rows)]`` for the main loss (weight 1) and ``extra_terms``;
    names, teacher kinds and hyperparameters checked (``UserError`` naming the fix)."""
    from proxytune_jax.losses.registry import get_loss

    out = []
    for name, params, weight, rows in [(loss, loss_params, 1.0, 0)] + [
            (t.loss, t.params, t.weight, t.max_rows) for t in extra_terms]:
        spec = get_loss(name, teacher=teacher)
        out.append((spec, spec.resolve(params), float(weight), int(rows)))
    return out


def distillation_loss(terms, student_logits, teacher, labels, mask) -> tuple[jax.Array, dict]:
    """``Σ weight · loss(student, teacher, mask, **hyper)`` over resolved ``terms``; returns the sum and each
    term by loss name (a name used twice gets a ``#i`` suffix)."""
    total, parts = 0.0, {}
    for i, (spec, hyper, weight, rows) in enumerate(terms):
        s, t, m, y = student_logits, teacher, mask, labels
        if rows:
            s, m, y = s[:rows], m[:rows], y[:rows]
            t = jax.tree.map(lambda x: x[:rows], t)
        extra = {"labels": y} if spec.uses_labels else {}
        value = spec.fn(s, t, m, **hyper, **extra)
        key = spec.name if spec.name not in parts else f"{spec.name}#{i}"
        parts[key] = value
        total = total + weight * value
    return total, parts
