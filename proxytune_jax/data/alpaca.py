"""AlpacaFarm / AlpacaEval instructions from their published files.

Formats accepted:
- AlpacaEval ``alpaca_eval.json``: a JSON array of ``{"instruction", "output", "generator", "dataset"}``
  (805 prompts; ``output`` is the text-davinci-003 reference the judge compares against);
- AlpacaFarm evaluation set (``alpaca_farm_evaluation.json`` or the HF parquet export): records
  ``{"instruction", "input", "output", ...}``; a non-empty ``input`` is appended to the instruction after a
  blank line (AlpacaFarm's own rendering of instruction + input);
- any JSON/JSONL/Parquet file with at least ``instruction``.

Prompt (proxy-tuning official evaluation): the plain instruction, **no template**, for base and anti-expert;
the expert gets the instruction as its user turn in its chat template, no response prefix.

Metric: win rate against the reference outputs judged by GPT-4 (the ``alpaca_eval`` package,
``alpaca_eval_gpt4_0314`` annotator) - an external, paid judge that this library does not call.
:func:`alpaca_eval_outputs` writes the model outputs in the format ``alpaca_eval --model_outputs`` reads.
Paper anchors (Liu et al. 2024, Llama-2, α = 1; ``docs/methods.md`` §1.10): 13B/70B base 2.1/3.7 →
proxy-tuned 83.4/88.0 → chat 87.3/90.4 win%.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from proxytune_jax.data.files import load_records, take
from proxytune_jax.data.prompts import PromptExample, as_str, user_turn
from proxytune_jax.atomic import open_atomic
from proxytune_jax.errors import UserError

DATASET = "AlpacaFarm/AlpacaEval"
FIELDS = ("instruction",)
STOP_STRINGS = ("\n\nComment:",)  # Llama-2 base degenerates into comment threads (official stop sequence)
MAX_NEW_TOKENS = 2048
METRIC = "alpaca_eval_win_rate"


def load_alpaca_eval(
    path: str,
    *,
    split: str | None = "eval",
    max_examples: int | None = None,
    system_prompt: str | None = None,
) -> list[PromptExample]:
    """AlpacaFarm/AlpacaEval prompts; reference = the file's reference ``output`` when present (else None)."""
    if not _is_file(path) and os.path.isfile(os.path.join(path, "alpaca_eval.json")):
        path = os.path.join(path, "alpaca_eval.json")  # the AlpacaEval release folder
    split = split if split and not _is_file(path) else None
    ds = take(load_records(path, dataset=DATASET, required=FIELDS, split=split), max_examples)
    out = []
    for i, r in enumerate(ds):
        instruction = as_str(r["instruction"], dataset=DATASET, field_name="instruction", index=i).strip()
        extra = r.get("input")
        text = instruction + ("\n\n" + extra.strip() if isinstance(extra, str) and extra.strip() else "")
        out.append(
            PromptExample(
                id=f"alpaca-{i}",
                prompt=text,
                messages=user_turn(text, system_prompt),
                response_prefix="",
                reference=r.get("output"),
                meta={"instruction": instruction, "dataset": r.get("dataset"), "input": extra or ""},
            )
        )
    return out


def _is_file(path: str) -> bool:
    return os.path.isfile(os.fspath(path))


def alpaca_eval_outputs(
    examples: Sequence[PromptExample], outputs: Sequence[str], generator: str, path: str
) -> str:
    """Write ``[{"instruction", "output", "generator", "dataset"}]`` for ``alpaca_eval --model_outputs``."""
    if len(examples) != len(outputs):
        raise UserError(f"{len(examples)} examples but {len(outputs)} outputs; give one output per example")
    rows = [
        {
            "instruction": ex.meta.get("instruction", ex.prompt),
            "output": out.strip(),
            "generator": generator,
            "dataset": ex.meta.get("dataset") or "",
        }
        for ex, out in zip(examples, outputs)
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open_atomic(path) as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
    return path
