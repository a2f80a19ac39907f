"""CNN/DailyMail summarization (Hermann et al. 2015; See et al. 2017 version 3.0.0) from published files.

Formats accepted: the Hugging Face ``cnn_dailymail`` ``3.0.0`` parquet export (``article``, ``highlights``,
``id``) or the same fields in JSON/JSONL.

Prompt (our choice; GPT-2 zero-shot summarization convention of Radford et al. 2019): ``"{article}\\nTL;DR:"``
for every model (GPT-2 has no chat template). ``max_article_words`` (default 400) truncates the article so
prompt + summary fit GPT-2's 1024-token context. The reference is the highlights with their line breaks
turned into spaces.

Metric: ROUGE-1/2/L F-measure (``rouge-score``, stemming on) of the output against the highlights, used for
the small-guided-by-large fusions (direct, temperature-scaled, low-confidence masking; ``docs/methods.md`` §1.5).
"""
from __future__ import annotations

import os
from typing import Sequence

from proxytune_jax.data.files import load_records, take
from proxytune_jax.data.prompts import PromptExample, as_str, user_turn
from proxytune_jax.errors import UserError

DATASET = "CNN/DailyMail"
FIELDS = ("article", "highlights")
PROMPT_SUFFIX = "\nTL;DR:"
STOP_STRINGS = ("\n\n",)
MAX_NEW_TOKENS = 100
METRIC = "rouge"


def load_cnn_dailymail(
    path: str, *, split: str | None = "test", max_examples: int | None = None, max_article_words: int | None = 400,
) -> list[PromptExample]:
    """CNN/DailyMail articles with the ``TL;DR:`` prompt; reference = highlights (one line)."""
    if os.path.isfile(os.fspath(path)):
        split = None
    ds = take(load_records(path, dataset=DATASET, required=FIELDS, split=split), max_examples)
    out = []
    for i, r in enumerate(ds):
        article = as_str(r["article"], dataset=DATASET, field_name="article", index=i).strip()
        highlights = as_str(r["highlights"], dataset=DATASET, field_name="highlights", index=i)
        if max_article_words is not None:
            article = " ".join(article.split()[:max_article_words])
        prompt = article + PROMPT_SUFFIX
        out.append(PromptExample(
            id=str(r.get("id") or f"cnndm-{i}"), prompt=prompt, messages=user_turn(prompt),
            response_prefix="", reference=" ".join(highlights.split()), meta={},
        ))
    return out


def score_rouge(examples: Sequence[PromptExample], outputs: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure with Porter stemming (the usual CNN/DailyMail setting), via
    :func:`proxytune_jax.eval.rouge`."""
    from proxytune_jax.eval.rouge import rouge

    if len(examples) != len(outputs):
        raise UserError(f"{len(examples)} examples but {len(outputs)} outputs; give one output per example")
    scores = rouge([o.strip() for o in outputs], [ex.reference for ex in examples], use_stemmer=True)
    return {**scores, "n": len(outputs)}
