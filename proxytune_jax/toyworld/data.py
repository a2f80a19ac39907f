"""Token arrays for the toy world: raw-corpus documents for pretraining and chat-formatted instruction
examples (loss on the response only) for tuning and distillation. Rows are left-padded (the library's
convention), ``loss_mask[b, t] = 1`` marks tokens whose prediction is trained (the token at ``t`` is
predicted from position ``t - 1``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from proxytune_jax.toyworld.world import Question


def _left_pad(rows: Sequence[list[int]], loss_starts: Sequence[int], pad_id: int, width: int | None = None):
    width = width or max(len(r) for r in rows)
    n = len(rows)
    ids = np.full((n, width), pad_id, np.int32)
    attn = np.zeros((n, width), np.int32)
    loss = np.zeros((n, width), np.int32)
    for i, (row, start) in enumerate(zip(rows, loss_starts)):
        row = row[-width:]
        off = width - len(row)
        ids[i, off:] = row
        attn[i, off:] = 1
        loss[i, off + max(start, 1):] = 1  # the first token of a row is never predicted
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def encode_corpus(tokenizer, documents: Sequence[str]) -> dict[str, np.ndarray]:
    """``<bos> document <eos>`` per row; every token after ``<bos>`` is trained."""
    rows = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in documents]
    return _left_pad(rows, [1] * len(rows), tokenizer.pad_token_id)


def chat_prompt_ids(tokenizer, question: Question) -> list[int]:
    """The tokenizer's chat template around the question (the tuned models' prompt; the template holds
    ``<bos>``), tokenized like ``proxytune_jax.decoding.prompts.encode_prompt`` does."""
    from proxytune_jax.decoding.prompts import encode_prompt

    return encode_prompt(tokenizer, question.question, chat_template=True)


def plain_prompt_ids(tokenizer, question: Question) -> list[int]:
    """``<bos>`` + the plain question (what base models and the anti-expert see)."""
    from proxytune_jax.decoding.prompts import encode_prompt

    return encode_prompt(tokenizer, question.question, chat_template=False)


def encode_instructions(tokenizer, questions: Sequence[Question], *, responses: Sequence[str] | None = None,
                        width: int | None = None, response_prefix: str = "") -> dict[str, np.ndarray]:
    """Chat prompt + response + ``<eos>``; only response tokens (and ``<eos>``) are trained. ``responses``
    replaces the gold answers (e.g. teacher-generated text). ``response_prefix`` is put before each response's
    text (``" "`` for a byte-level BPE, whose words carry their leading space, so the response is encoded as the
    text that follows the prompt)."""
    rows, starts = [], []
    for i, q in enumerate(questions):
        prompt = chat_prompt_ids(tokenizer, q)
        answer = q.answer if responses is None else responses[i]
        resp = tokenizer(response_prefix + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + resp)
        starts.append(len(prompt))
    return _left_pad(rows, starts, tokenizer.pad_token_id, width)


def encode_prompts(tokenizer, questions: Sequence[Question], *, chat: bool) -> dict[str, np.ndarray]:
    """Left-padded prompts only (chat template or plain)."""
    rows = [chat_prompt_ids(tokenizer, q) if chat else plain_prompt_ids(tokenizer, q) for q in questions]
    return _left_pad(rows, [len(r) for r in rows], tokenizer.pad_token_id)


def concat(*datasets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stack left-padded datasets row-wise, re-padding on the left to the widest (pad id from the first row's
    padding is not needed: padded slots are masked out by ``attention_mask``)."""
    width = max(d["input_ids"].shape[1] for d in datasets)
    out = {}
    for key in datasets[0]:
        parts = []
        for d in datasets:
            x = d[key]
            pad = np.zeros((x.shape[0], width - x.shape[1]), x.dtype)
            parts.append(np.concatenate([pad, x], axis=1))
        out[key] = np.concatenate(parts, axis=0)
    return out
