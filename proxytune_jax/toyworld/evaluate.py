"""Evaluation in the toy world through the library's decoding engine (``proxytune_jax.decoding``):
greedy generation for single models and proxy-tuned ensembles, scored with GSM-style exact match.

Prompts follow the official proxy-tuning convention (Liu et al. 2024; ``docs/methods.md`` §1.7): tuned models
(experts) read the question through the tokenizer's chat template; base models and the anti-expert read the
plain question.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from proxytune_jax.eval import accuracy, extract_answer
from proxytune_jax.toyworld.world import Question

MAX_NEW_TOKENS = 32


@dataclasses.dataclass
class Generations:
    completions: list[str]
    accuracy: float
    changed_share: float | None = None  # share of generated tokens whose top-1 differs from the base's


def generate(models: Sequence, tokenizer, questions: Sequence[Question], *, chat: Sequence[bool],
             rule: str = "plain", fusion_params: dict | None = None, batch_size: int | None = None,
             analysis: bool = False, generator=None, mesh=None) -> Generations:
    """Greedy completions of ``questions`` by ``models`` combined with ``rule``; ``chat[i]`` says whether
    model i reads the chat template. Pass ``generator`` (a ``TextGenerator``) to reuse its compiled program.
    ``mesh``: decode on it, each batch split over its ``data x fsdp`` devices (the default batch, all questions,
    is rounded up to a multiple of them; the padding rows are dropped)."""
    from proxytune_jax.decoding.pipeline import TextGenerator

    gen = generator or TextGenerator(list(models), [tokenizer] * len(models), rule, chat_template=list(chat),
                                     mesh=mesh)
    prompts = [q.question for q in questions]
    bs = batch_size or len(prompts)
    if batch_size is None and gen.decoder.mesh is not None:
        shards = gen.decoder.mesh.shape["data"] * gen.decoder.mesh.shape["fsdp"]
        bs = -(-bs // shards) * shards
    outs = gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=bs, fusion_params=fusion_params,
                        analysis=analysis)
    texts = [o.completion for o in outs]
    acc = accuracy(texts, [q.answer for q in questions])
    changed = None
    if analysis:
        flags = [c for o in outs for c in o.analysis["changed"]]
        changed = float(np.mean(flags)) if flags else float("nan")
    return Generations(texts, acc, changed)


def correct_flags(completions: Sequence[str], questions: Sequence[Question]) -> list[bool]:
    return [extract_answer(c) is not None and extract_answer(c) == str(q.target)
            for c, q in zip(completions, questions)]
