"""Memory-lean distillation: per-position losses from final hidden states and LM-head weights, in chunks.

The plain path builds student and teacher logits ``[B, T, V]`` in float32 (``h @ W.T``), and reverse mode keeps
several such arrays alive (logits, softmaxes, their cotangents): at ``B·T = 4096`` and ``V = 128k`` each one is
2 GiB. Here the positions are flattened, padded to a multiple of ``chunk_size`` and scanned over
(``lax.scan``); only ``[chunk_size, V]`` logits ever exist.

Two variants, same value and gradient as ``loss_from_hidden`` (the plain reference):

- ``chunked_loss`` (default choice): a ``custom_vjp`` whose forward scan also computes, chunk by chunk, the
  gradient of the chunk's loss sum w.r.t. the chunk logits and immediately contracts it into
  ``d student_hidden`` (``[c, V] @ [V, D]``) and an accumulated ``d student_weight`` (``[V, D]``). Nothing is
  recomputed, so it costs the same matmuls as the plain path. The **teacher is a constant**: its hidden states
  and weight get a zero cotangent (the plain reference applies ``stop_gradient`` to the teacher too). Without
  differentiation it runs a value-only scan. First-order reverse mode only (no ``jvp``/Hessians).
- ``chunked_loss_remat``: ``lax.scan`` over a ``jax.checkpoint``-ed chunk body; ordinary autodiff, so it is
  differentiable w.r.t. all four arrays (teacher included) and to any order, at the price of recomputing each
  chunk's logits in the backward pass (~1.5× the matmul work).

The loss is named (``"forward_kl"``, …, see ``losses.LOSSES``, those with a per-position form) or given as a per-position function
``fn(student_logits [c, V], teacher_logits [c, Vt], **position_args_chunk, **hyper) -> [c]``. Per-position
side inputs such as ``labels`` go in ``position_args`` (arrays shaped like the positions) and are chunked
alongside. Masked positions get zero logits before the loss (as in the plain path), and the result is
``Σ m·ℓ / max(Σ m, 1)``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.losses._common import F32, as_mask, masked_mean, zero_masked

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # ~64 MiB per [chunk, V] float32 temporary


def lm_logits(hidden, weight) -> jax.Array:
    """float32 logits ``hidden [..., D] @ weight [V, D].T -> [..., V]`` (the LM head stored ``[V, D]`` like HF's
    ``lm_head.weight`` and a tied embedding; bf16 inputs accumulate in fp32; float64 inputs, as in
    finite-difference checks under x64, stay float64)."""
    dt = jnp.promote_types(jnp.result_type(hidden, weight), F32)
    return jnp.einsum("...d,vd->...v", hidden, weight, preferred_element_type=dt).astype(dt)


def resolve_per_position(loss):
    """A per-position loss function: the ``per_position`` of a ``losses.LOSSES`` entry with full-logit teacher,
    by name, or a callable ``fn(student_logits, teacher_logits, **kw) -> [positions]``."""
    if callable(loss):
        return loss
    from proxytune_jax.losses.registry import get_loss
    return get_loss(loss, teacher="logits", per_position=True).per_position


def _check_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight):
    if student_hidden.shape[-1] != student_weight.shape[-1]:
        raise UserError(f"student hidden size {student_hidden.shape[-1]} != LM-head columns "
                        f"{student_weight.shape[-1]}; pass the head weight as [V, D] (HF lm_head.weight or the "
                        "tied embedding; model.lm_head_weight() returns it).")
    if teacher_hidden.shape[-1] != teacher_weight.shape[-1]:
        raise UserError(f"teacher hidden size {teacher_hidden.shape[-1]} != LM-head columns "
                        f"{teacher_weight.shape[-1]}; pass the head weight as [V, D] (HF lm_head.weight or the "
                        "tied embedding; model.lm_head_weight() returns it).")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise UserError(f"student positions {student_hidden.shape[:-1]} != teacher positions "
                        f"{teacher_hidden.shape[:-1]}; pass hidden states for the same positions.")


def loss_from_hidden(loss, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, *,
                     position_args=None, **hyper):
    """Plain reference path: full ``[..., V]`` float32 logits, teacher under ``stop_gradient``, masked mean."""
    fn = resolve_per_position(loss)
    _check_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight)
    m = as_mask(mask, student_hidden.shape[:-1])
    s = lm_logits(student_hidden, student_weight)
    t = jax.lax.stop_gradient(lm_logits(teacher_hidden, teacher_weight))
    per = fn(zero_masked(s, m), zero_masked(t, m), **(position_args or {}), **hyper)
    return masked_mean(per, m)


def default_chunk_size(num_positions: int, vocab_size: int) -> int:
    """Positions per chunk so that one ``[chunk, V]`` float32 array is about 64 MiB (at least 8 rows)."""
    return int(max(8, min(num_positions, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))))


def _to_chunks(x, n, n_pad, chunk):
    """``[N, ...] -> [n_chunks, chunk, ...]`` with zero padding."""
    if n_pad != n:
        x = jnp.pad(x, [(0, n_pad - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n_pad // chunk, chunk) + x.shape[1:])


def _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, position_args, chunk_size):
    _check_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight)
    lead = student_hidden.shape[:-1]
    m = as_mask(mask, lead)
    n = int(math.prod(lead))
    vocab = max(student_weight.shape[0], teacher_weight.shape[0])
    chunk = default_chunk_size(n, vocab) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}.")
    chunk = min(chunk, max(n, 1))
    n_pad = -(-max(n, 1) // chunk) * chunk
    pos = {}
    for k, v in (position_args or {}).items():
        v = jnp.asarray(v)
        if v.shape[: len(lead)] != lead:
            raise UserError(f"position_args[{k!r}] has shape {v.shape}; it must start with the positions {lead}.")
        pos[k] = _to_chunks(v.reshape((n,) + v.shape[len(lead):]), n, n_pad, chunk)
    hs = _to_chunks(student_hidden.reshape(n, student_hidden.shape[-1]), n, n_pad, chunk)  # n may be 0
    ht = _to_chunks(teacher_hidden.reshape(n, teacher_hidden.shape[-1]), n, n_pad, chunk)
    mc = _to_chunks(m.reshape(n), n, n_pad, chunk)
    return lead, n, m, hs, ht, mc, pos


def _chunk_total(fn, s_logits, t_logits, m_c, pos_c):
    per = fn(zero_masked(s_logits, m_c), zero_masked(t_logits, m_c), **pos_c)
    return jnp.sum(jnp.where(m_c, per, 0.0))


def _float0_like(x):
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _zero_cotangent(x):
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return _float0_like(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_total(fn, hs, ws, ht, wt, mc, pos):
    def body(total, xs):
        h, h_t, m_c, pos_c = xs
        val = _chunk_total(fn, lm_logits(h, ws), lm_logits(h_t, wt), m_c, pos_c)
        return total + val, None

    total, _ = jax.lax.scan(body, jnp.zeros((), _acc_dtype(hs, ws)), (hs, ht, mc, pos))
    return total


def _acc_dtype(h, w):
    return jnp.promote_types(jnp.result_type(h, w), F32)


def _fused_total_fwd(fn, hs, ws, ht, wt, mc, pos):
    def body(carry, xs):
        total, dw = carry
        h, h_t, m_c, pos_c = xs
        t_logits = lm_logits(h_t, wt)
        val, g = jax.value_and_grad(lambda s: _chunk_total(fn, s, t_logits, m_c, pos_c))(lm_logits(h, ws))
        dh = jnp.matmul(g, ws.astype(acc)).astype(hs.dtype)  # [c, V] @ [V, D]
        dw = dw + jnp.einsum("cv,cd->vd", g, h.astype(acc))  # [V, D]
        return (total + val, dw), dh

    acc = _acc_dtype(hs, ws)
    init = (jnp.zeros((), acc), jnp.zeros(ws.shape, acc))
    (total, dw), dhs = jax.lax.scan(body, init, (hs, ht, mc, pos))
    return total, (dhs, dw.astype(ws.dtype), ht, wt, mc, pos)


def _fused_total_bwd(fn, res, g):
    dhs, dw, ht, wt, mc, pos = res
    acc = jnp.promote_types(g.dtype, F32)
    g = g.astype(acc)
    return ((dhs.astype(acc) * g).astype(dhs.dtype), (dw.astype(acc) * g).astype(dw.dtype),
            jnp.zeros_like(ht), jnp.zeros_like(wt), _zero_cotangent(mc), jax.tree.map(_zero_cotangent, pos))


_fused_total.defvjp(_fused_total_fwd, _fused_total_bwd)


def chunked_loss(loss, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, *,
                 chunk_size=None, position_args=None, **hyper):
    """Masked-mean per-position loss from hidden states, chunked, with a fused (no-recompute) gradient.

    Args:
      loss: a name from ``losses.LOSSES`` with a per-position form (``"forward_kl"``, ``"hinton_kd"``, …) or a per-position function.
      student_hidden: ``[..., D]`` final (normed) student hidden states; ``student_weight``: ``[V, D]``.
      teacher_hidden: ``[..., Dt]``; ``teacher_weight``: ``[Vt, Dt]`` — treated as constants (zero gradient).
      mask: ``[...]`` valid positions (None = all).
      chunk_size: positions per chunk (default: ~64 MiB per ``[chunk, V]`` float32 array).
      position_args: dict of per-position side inputs (e.g. ``{"labels": labels}``), chunked alongside.
      **hyper: keyword hyperparameters of the loss (``temperature``, ``alpha``, ``beta``, …).
    Returns:
      scalar float32, equal (value and gradient w.r.t. the student arrays) to ``loss_from_hidden``.
    """
    fn = functools.partial(resolve_per_position(loss), **hyper)
    lead, n, m, hs, ht, mc, pos = _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                           position_args, chunk_size)
    total = _fused_total(fn, hs, student_weight, ht, teacher_weight, mc, pos)
    count = jnp.sum(m.astype(F32))
    return total / jnp.maximum(count, 1.0)


def chunked_loss_remat(loss, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, *,
                       chunk_size=None, position_args=None, **hyper):
    """Same as ``chunked_loss`` via ``lax.scan`` + ``jax.checkpoint`` and ordinary autodiff.

    Differentiable w.r.t. every array (the teacher too, unlike ``chunked_loss``) and to any order; the backward
    pass recomputes each chunk's logits.
    """
    fn = functools.partial(resolve_per_position(loss), **hyper)
    lead, n, m, hs, ht, mc, pos = _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                           position_args, chunk_size)

    @jax.checkpoint
    def chunk_value(ws, wt, h, h_t, m_c, pos_c):
        return _chunk_total(fn, lm_logits(h, ws), lm_logits(h_t, wt), m_c, pos_c)

    def body(total, xs):
        h, h_t, m_c, pos_c = xs
        return total + chunk_value(student_weight, teacher_weight, h, h_t, m_c, pos_c), None

    total, _ = jax.lax.scan(body, jnp.zeros((), _acc_dtype(hs, student_weight)), (hs, ht, mc, pos))
    count = jnp.sum(m.astype(F32))
    return total / jnp.maximum(count, 1.0)


__all__ = ["chunked_loss", "chunked_loss_remat", "loss_from_hidden", "lm_logits", "resolve_per_position",
           "default_chunk_size"]
