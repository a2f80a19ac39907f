"""Negative log-likelihood / perplexity on response tokens, and multiple-choice scoring by log-likelihood.

Shift convention: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``. A response mask ``[B, T]`` marks the
tokens being scored (1 on response tokens of ``input_ids``, 0 on prompt and padding); the first position is
never scored (nothing predicts it). Log-probabilities are computed in float32 with ``log_softmax``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Log-probability [B, T-1] of each next token: ``log softmax(logits[:, t])[input_ids[:, t+1]]``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]


def response_nll(logits: jax.Array, input_ids: jax.Array, response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of −log p over response tokens, number of response tokens): scalars, for exact pooling over batches."""
    m = response_mask[:, 1:].astype(jnp.float32)  # [B, T-1]
    lp = jnp.where(m > 0, token_logprobs(logits, input_ids), 0.0)
    return -jnp.sum(lp * m), jnp.sum(m)


def mean_nll(total_nll: float, n_tokens: float) -> float:
    """Mean NLL per token (nats) from pooled sums; NaN when no token was scored."""
    return float(total_nll) / float(n_tokens) if n_tokens > 0 else float("nan")


def perplexity(total_nll: float, n_tokens: float) -> float:
    """``exp(mean NLL per response token)``; NaN when no token was scored."""
    return float(np.exp(mean_nll(total_nll, n_tokens)))


def sequence_logprob(logits: jax.Array, input_ids: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Summed log-probability [B] of the masked tokens of each row (a choice's log-likelihood)."""
    m = response_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(jnp.where(m > 0, token_logprobs(logits, input_ids), 0.0) * m, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _choice_scores(graphdef, state, input_ids, attention_mask, response_mask):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    logits, _ = model(input_ids, attention_mask)
    return sequence_logprob(logits, input_ids, response_mask), jnp.sum(response_mask[:, 1:], axis=-1)


def encode_prompt_choice_pairs(tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]]):
    """Left-padded ``(input_ids, attention_mask, response_mask, owner)`` for every (prompt, choice) pair;
    ``owner[i]`` is the prompt index of row i. The choice is tokenized as a continuation of the prompt text
    (prompt tokens + choice tokens, no special tokens in between)."""
    rows, owners, n_prompt = [], [], []
    for i, (prompt, opts) in enumerate(zip(prompts, choices)):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        for opt in opts:
            c_ids = tokenizer(opt, add_special_tokens=False)["input_ids"]
            rows.append(bos + p_ids + c_ids)
            n_prompt.append(len(bos) + len(p_ids))
            owners.append(i)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), width), pad, np.int32)
    attn = np.zeros((len(rows), width), np.int32)
    resp = np.zeros((len(rows), width), np.int32)
    for r, (row, k) in enumerate(zip(rows, n_prompt)):
        ids[r, width - len(row):] = row
        attn[r, width - len(row):] = 1
        resp[r, width - len(row) + k:] = 1
    return ids, attn, resp, np.asarray(owners)


def multiple_choice_scores(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], *,
                           length_normalize: bool = False, batch_size: int = 64) -> list[list[float]]:
    """Log-likelihood of each choice given its prompt (summed over the choice's tokens, or averaged per token
    when ``length_normalize``). Works with any model following the models contract."""
    from flax import nnx

    ids, attn, resp, owners = encode_prompt_choice_pairs(tokenizer, prompts, choices)
    graphdef, state = nnx.split(model)
    scores, counts = [], []
    for s in range(0, len(ids), batch_size):
        lp, n = _choice_scores(graphdef, state, jnp.asarray(ids[s:s + batch_size]),
                               jnp.asarray(attn[s:s + batch_size]), jnp.asarray(resp[s:s + batch_size]))
        scores.append(np.asarray(lp))
        counts.append(np.asarray(n))
    flat = np.concatenate(scores)
    if length_normalize:
        flat = flat / np.maximum(np.concatenate(counts), 1)
    out: list[list[float]] = [[] for _ in prompts]
    for owner, value in zip(owners, flat):
        out[owner].append(float(value))
    return out


def multiple_choice_accuracy(scores: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Share of questions whose highest-scoring choice is the gold index (ties go to the first choice)."""
    if len(scores) == 0:
        return float("nan")
    return float(np.mean([int(np.argmax(s)) == g for s, g in zip(scores, gold)]))
