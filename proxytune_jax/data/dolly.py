"""databricks-dolly-15k (and Alpaca-style instruction files) for the distillation recipes.

Format accepted: the release ``databricks-dolly-15k.jsonl`` with ``instruction``, ``context``, ``response``,
``category`` (Alpaca-style files with ``instruction``, ``input``, ``output`` also work).

Prompt (the MiniLLM / DistiLLM evaluation convention, the usual setting for comparing KD losses on Dolly):
``"Below is an instruction that describes a task. Write a response that appropriately completes the
request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{context}\\n\\n### Response:\\n"`` (the
Input block is left out when the context is empty), the same for teacher and student.

Metric: ROUGE-L F-measure of the greedy response against the reference (``proxytune_jax.eval.rouge``).
"""
from __future__ import annotations

from proxytune_jax.data.files import load_records, take
from proxytune_jax.data.prompts import PromptExample, as_str, user_turn
from proxytune_jax.errors import UserError

DATASET = "Dolly"
FIELDS = ("instruction", ("response", "output"))
HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n")
MAX_NEW_TOKENS = 256
METRIC = "rougeL"


def format_prompt(instruction: str, context: str = "") -> str:
    body = f"### Instruction:\n{instruction.strip()}\n\n"
    if context and context.strip():
        body += f"### Input:\n{context.strip()}\n\n"
    return HEADER + body + "### Response:\n"


def load_dolly(path: str, *, split: str | None = None, max_examples: int | None = None) -> list[PromptExample]:
    """Instruction examples; reference = the gold response."""
    ds = take(load_records(path, dataset=DATASET, required=FIELDS, split=split), max_examples)
    out = []
    for i, r in enumerate(ds):
        instruction = as_str(r["instruction"], dataset=DATASET, field_name="instruction", index=i)
        context = r.get("context") or r.get("input") or ""
        response = r.get("response") if r.get("response") is not None else r.get("output")
        if not isinstance(response, str) or not response.strip():
            raise UserError(f"{DATASET}: record {i} has an empty response; expected fields "
                            "instruction, context, response")
        prompt = format_prompt(instruction, context)
        out.append(PromptExample(id=f"dolly-{i}", prompt=prompt, messages=user_turn(prompt), response_prefix="",
                                 reference=response.strip(), meta={"category": r.get("category")}))
    return out


def sft_records(path: str, *, max_examples: int | None = None) -> list[dict]:
    """``{"prompt", "response"}`` records for ``proxytune train`` (SFT or distillation on the responses)."""
    return [{"prompt": ex.prompt, "response": ex.reference} for ex in load_dolly(path, max_examples=max_examples)]


def score_rouge_l(examples, outputs) -> dict:
    from proxytune_jax.eval.rouge import rouge

    if len(examples) != len(outputs):
        raise UserError(f"{len(examples)} examples but {len(outputs)} outputs; give one output per example")
    return {"rougeL": rouge([o.strip() for o in outputs], [ex.reference for ex in examples])["rougeL"],
            "n": len(outputs)}
