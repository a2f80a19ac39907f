"""Continuations of one model sampled *inside* a jitted program (the rollouts of on-policy distillation).

``rollout(graphdef, params, prompt_ids, prompt_mask, key, ...)`` is the engine's ``decode_loop`` with the
``plain`` rule on one model: prefill of the left-padded prompts into a fresh KV cache, then a
``lax.while_loop`` of one-token steps until every row has stopped (EOS or ``max_new_tokens``). It is pure and
traceable, so a train step can call it on the current student parameters (under ``stop_gradient``).

``prompts_of(batch)`` cuts the prompts out of a training batch: a row ``[pads | prompt | target]`` becomes
``[pads | prompt]`` re-aligned to the right edge (left-padded, as the decoder reads prompts);
``append_rollout(...)`` builds the batch ``[pads | prompt | sampled tokens | pads]`` whose ``loss_mask``
covers the sampled tokens (EOS included).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from proxytune_jax.decoding.engine import DecodeOutput, decode_loop, eos_ids_of
from proxytune_jax.decoding.sampling import SamplingParams
from proxytune_jax.decoding.stopping import make_stop_criteria


def rollout(graphdef: nnx.GraphDef, params, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array, *,
            max_new_tokens: int, temperature: float | jax.Array = 1.0, pad_id: int = 0,
            eos_ids: tuple[int, ...] | None = None) -> DecodeOutput:
    """Sample ``max_new_tokens`` (at most) per row from the model ``(graphdef, params)`` after left-padded
    prompts ``[B, L]``, at ``temperature`` (0: greedy). ``eos_ids`` default to the model config's."""
    model = nnx.merge(graphdef, params)
    config = model.config  # static
    b, length = prompt_ids.shape
    eos = tuple(eos_ids_of(config)) if eos_ids is None else tuple(eos_ids)
    cache = model.init_cache(b, length + max_new_tokens)
    sampling = SamplingParams.create(config.vocab_size)
    sampling = SamplingParams(temperature=jnp.asarray(temperature, jnp.float32), top_k=sampling.top_k,
                              top_p=sampling.top_p, banned=sampling.banned)
    out, _ = decode_loop((graphdef,), (params,), (prompt_ids,), (prompt_mask,), (cache,), {}, sampling,
                         make_stop_criteria(eos), key, rule="plain", vocab_size=config.vocab_size,
                         max_new_tokens=max_new_tokens, pad_id=pad_id)
    return out


def prompts_of(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(ids, mask) [B, T]``: each row's tokens before its first target (``loss_mask``) token, left-padded to
    the row's full width (a row without a target keeps all its real tokens)."""
    ids, attn, lm = batch["input_ids"], batch["attention_mask"] > 0, batch["loss_mask"] > 0
    width = ids.shape[1]
    pos = jnp.arange(width)
    is_target = lm & attn
    first = jnp.where(jnp.any(is_target, axis=1), jnp.argmax(is_target, axis=1), width)  # [B]
    keep = attn & (pos[None, :] < first[:, None])
    shift = (width - first)[:, None]  # move the prompt's end to the right edge
    src = pos[None, :] - shift  # [B, T]
    valid = src >= 0
    src = jnp.clip(src, 0, width - 1)
    new_ids = jnp.where(valid, jnp.take_along_axis(ids, src, axis=1), 0)
    new_mask = valid & jnp.take_along_axis(keep, src, axis=1)
    return jnp.where(new_mask, new_ids, 0).astype(ids.dtype), new_mask


def append_rollout(prompt_ids: jax.Array, prompt_mask: jax.Array, out: DecodeOutput) -> dict:
    """The training rows ``[prompt | sampled tokens]`` ``[B, L + N]``: ``attention_mask`` on the real prompt
    tokens and the ``num_tokens`` sampled ones, ``loss_mask`` on the sampled ones."""
    n = out.tokens.shape[1]
    sampled = jnp.arange(n)[None, :] < out.num_tokens[:, None]  # [B, N]
    ids = jnp.concatenate([prompt_ids, jnp.where(sampled, out.tokens, 0).astype(prompt_ids.dtype)], axis=1)
    attn = jnp.concatenate([prompt_mask, sampled], axis=1)
    loss = jnp.concatenate([jnp.zeros_like(prompt_mask), sampled], axis=1)
    return {"input_ids": ids, "attention_mask": attn.astype(jnp.int32), "loss_mask": loss.astype(jnp.int32)}


__all__ = ["append_rollout", "prompts_of", "rollout"]
