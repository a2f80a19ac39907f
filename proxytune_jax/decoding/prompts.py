"""Prompt tokenization (per model), left padding and length buckets.

* Each model tokenizes the prompt **its own way**: ``tokenizer(prompt)["input_ids"]`` (with that tokenizer's
  own BOS handling), or, where asked, through its own ``apply_chat_template`` as a single user turn with the
  generation prompt appended (the official proxy-tuning code does this for the expert only).
* Batches are **left-padded** (the cache contract): real tokens sit at the right end of each row.
* Padded lengths are rounded up to a bucket (the next power of two, at least ``min_bucket``) so a new
  prompt length reuses an already compiled program instead of compiling a new one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from proxytune_jax.errors import UserError


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool = False) -> list[int]:
    """Token ids of one prompt for one model (see module doc)."""
    if not chat_template:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat "
                        "template; drop --expert-chat-template or use a chat checkpoint")
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat_template: bool = False) -> list[list[int]]:
    return [encode_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]


def bucket_length(n: int, min_bucket: int = 8, cap: int | None = None) -> int:
    """The next power of two >= n (at least ``min_bucket``), never above ``cap`` (but never below n)."""
    b = max(min_bucket, 1 << max(0, int(n) - 1).bit_length())
    if cap is not None:
        b = min(b, cap)
    return max(b, int(n))


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> ``(ids [B, length] int32, mask [B, length] bool)`` with real tokens at the right end of each row."""
    ids = np.full((len(seqs), length), int(pad_id), np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for b, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence of length {len(s)} does not fit in {length}")
        if len(s):
            ids[b, length - len(s):] = np.asarray(s, np.int32)
            mask[b, length - len(s):] = True
    return ids, mask
