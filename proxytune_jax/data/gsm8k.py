"""GSM8K (Cobbe et al. 2021) from its published files.

Formats accepted: the GitHub release ``grade_school_math/data/test.jsonl`` and the Hugging Face parquet
export (``main/test-00000-of-00001.parquet``); both hold records ``{"question": str, "answer": str}`` where
``answer`` is a worked solution ending in ``#### <number>``.

Prompt (our choice, following the proxy-tuning paper's released evaluation): **zero-shot**,

- plain (base, anti-expert): ``"Answer the following question.\\n\\nQuestion: {question}\\nAnswer:"``
- chat (expert): user turn ``"Answer the following question.\\n\\nQuestion: {question}"`` rendered with the
  tokenizer's chat template, then the response prefix ``"Answer:"``.

``n_shot > 0`` prepends exemplars from a train file as ``"Question: {q}\\nAnswer: {worked answer}\\n\\n"``
(the Llama-2 paper's 8-shot setting); the paper anchors (Liu et al. 2024, ``docs/methods.md`` §1.10:
13B base 6.6 → proxy 26.4 → chat 32.4) are zero-shot.

Metric: exact match of the number after ``####`` (else the last number) in the output, after cutting the
output where the base model starts a new question (``Answer the following question``, ``Question:``,
``Comment:``), see :func:`trim_output`; the gold is the number after ``####`` with thousands commas removed.
"""
from __future__ import annotations

import re

from proxytune_jax.data.files import load_records, take
from proxytune_jax.data.prompts import PromptExample, as_str, user_turn
from proxytune_jax.errors import UserError

DATASET = "GSM8K"
FIELDS = ("question", "answer")
INSTRUCTION = "Answer the following question.\n\n"
RESPONSE_PREFIX = "Answer:"
STOP_STRINGS = ("\n\nQuestion:", "Answer the following question", "\n\nComment:")
MAX_NEW_TOKENS = 512
METRIC = "gsm_exact_match"

_NUMBER_COMMA = re.compile(r"(\d),(\d)")


def gold_answer(solution: str, *, index: int = 0) -> str:
    """The final answer of a GSM8K worked solution: the text after ``####`` without thousands commas."""
    if "####" not in solution:
        raise UserError(f"{DATASET}: record {index} answer has no '#### <number>' final line: {solution[-80:]!r}")
    final = solution.split("####")[-1].strip()
    return _NUMBER_COMMA.sub(r"\1\2", final)


def trim_output(output: str) -> str:
    """Cut a generation where a base model starts a new question or comment (official proxy-tuning trim)."""
    for marker in ("Answer the following question", "Question:", "Comment:"):
        if marker in output:
            output = output.split(marker)[0]
    return output


def format_question(question: str, exemplars: list[tuple[str, str]] = ()) -> str:
    shots = "".join(f"Question: {q.strip()}\nAnswer: {a.strip()}\n\n" for q, a in exemplars)
    return INSTRUCTION + shots + "Question: " + question.strip()


def load_gsm8k(
    path: str,
    *,
    split: str = "test",
    max_examples: int | None = None,
    n_shot: int = 0,
    exemplars_path: str | None = None,
) -> list[PromptExample]:
    """GSM8K examples with the zero-shot (default) or ``n_shot`` prompt; reference = final number as str."""
    ds = take(load_records(path, dataset=DATASET, required=FIELDS, split=split), max_examples)
    exemplars: list[tuple[str, str]] = []
    if n_shot:
        if exemplars_path is None:
            raise UserError(f"{DATASET}: n_shot={n_shot} needs exemplars_path (e.g. the train.jsonl file)")
        ex_ds = take(load_records(exemplars_path, dataset=DATASET, required=FIELDS, split="train"), n_shot)
        exemplars = [(r["question"], r["answer"]) for r in ex_ds]  # keep "#### N": the metric reads it
    out = []
    for i, r in enumerate(ds):
        q = as_str(r["question"], dataset=DATASET, field_name="question", index=i)
        a = as_str(r["answer"], dataset=DATASET, field_name="answer", index=i)
        content = format_question(q, exemplars)
        out.append(
            PromptExample(
                id=f"gsm8k-{i}",
                prompt=content + "\n" + RESPONSE_PREFIX,
                messages=user_turn(content),
                response_prefix=RESPONSE_PREFIX,
                reference=gold_answer(a, index=i),
                meta={"solution": a},
            )
        )
    return out


def sft_records(path: str, *, split: str = "train", max_examples: int | None = None) -> list[dict]:
    """GSM8K train as ``{"prompt", "response"}`` records for ``proxytune train`` (SFT of a task expert): the
    zero-shot plain prompt and ``" " + worked solution`` (ending in ``#### N``, which the metric reads)."""
    ds = take(load_records(path, dataset=DATASET, required=FIELDS, split=split), max_examples)
    return [{"prompt": format_question(r["question"]) + "\n" + RESPONSE_PREFIX, "response": " " + r["answer"].strip()}
            for r in ds]
