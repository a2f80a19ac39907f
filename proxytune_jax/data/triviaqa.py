"""TriviaQA (Joshi et al. 2017) questions from their published files (no evidence documents: closed book).

Formats accepted:
- JSON lines ``{"question": str, "answers": [str, ...]}`` (the proxy-tuning release's ``dev.jsonl``);
- the Hugging Face ``trivia_qa`` parquet export (``rc.nocontext``): ``question`` and
  ``answer = {"value", "aliases", "normalized_aliases", ...}``; the gold set is value + aliases.

Prompt (proxy-tuning official evaluation, same for every model, no chat template since the experts are
task-finetuned base models): ``"Question: {question}\\nAnswer:"``. Generation stops at a blank line, at most
20 new tokens. The dev split is used because test answers are hidden.

Metric: exact match: the stripped, lower-cased output is one of the stripped, lower-cased gold answers
(official proxy-tuning scoring; no SQuAD-style article/punctuation normalisation).
"""
from __future__ import annotations

import os
from typing import Sequence

from proxytune_jax.data.files import load_records, take
from proxytune_jax.data.prompts import PromptExample, as_str, user_turn
from proxytune_jax.errors import UserError

DATASET = "TriviaQA"
FIELDS = ("question", ("answers", "answer"))
STOP_STRINGS = ("\n\n",)
MAX_NEW_TOKENS = 20
METRIC = "triviaqa_exact_match"


def _gold(r: dict, index: int) -> list[str]:
    if r.get("answers") is not None:
        answers = r["answers"]
        answers = [answers] if isinstance(answers, str) else list(answers)
    else:
        a = r["answer"]
        if isinstance(a, str):
            answers = [a]
        elif isinstance(a, dict):
            answers = [a.get("value")] + list(a.get("aliases") or []) + list(a.get("normalized_aliases") or [])
        else:
            answers = []
    answers = [str(x) for x in answers if x]
    if not answers:
        raise UserError(f"{DATASET}: record {index} has no gold answer (fields answers or answer.value/aliases)")
    return list(dict.fromkeys(answers))


def load_triviaqa(path: str, *, split: str | None = "validation", max_examples: int | None = None) -> list[PromptExample]:
    """TriviaQA closed-book questions; reference = list of gold answers."""
    if os.path.isfile(os.fspath(path)):
        split = None
    ds = take(load_records(path, dataset=DATASET, required=FIELDS, split=split), max_examples)
    out = []
    for i, r in enumerate(ds):
        q = as_str(r["question"], dataset=DATASET, field_name="question", index=i).strip()
        prompt = f"Question: {q}\nAnswer:"
        out.append(PromptExample(
            id=str(r.get("question_id") or f"triviaqa-{i}"), prompt=prompt, messages=user_turn(prompt),
            response_prefix="", reference=_gold(r, i), meta={"question": q},
        ))
    return out


def score_exact_match(examples: Sequence[PromptExample], outputs: Sequence[str]) -> dict:
    """Official TriviaQA scoring: lower-cased stripped output in lower-cased stripped gold answers."""
    if len(examples) != len(outputs):
        raise UserError(f"{len(examples)} examples but {len(outputs)} outputs; give one output per example")
    hits = [o.strip().lower() in {a.strip().lower() for a in ex.reference} for ex, o in zip(examples, outputs)]
    return {"exact_match": sum(hits) / max(len(hits), 1), "n": len(hits)}


def sft_records(path: str, *, split: str | None = "train", max_examples: int | None = None) -> list[dict]:
    """TriviaQA as ``{"prompt", "response"}`` records for ``proxytune train``: ``"Question: q\\nAnswer:"`` and
    ``" " + first gold answer`` (the value for the HF layout)."""
    return [{"prompt": ex.prompt, "response": " " + ex.reference[0]}
            for ex in load_triviaqa(path, split=split, max_examples=max_examples)]
