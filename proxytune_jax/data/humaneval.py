"""HumanEval (Chen et al. 2021) for the code-adaptation experiment (CodeLlama-7B-Python as expert).

Format accepted: the release file ``HumanEval.jsonl`` (or ``.jsonl.gz`` un-gzipped, or the HF parquet export)
with records ``{"task_id", "prompt", "canonical_solution", "test", "entry_point"}``.

Prompt (proxy-tuning official evaluation): the function signature + docstring (``prompt``) as is, for every
model (the experts are base code models, no chat template). Sampling at temperature 0.1, top-p 0.95,
n = 20 samples per problem, stop at ``"\\nclass"``, ``"\\ndef"``, ``"\\n#"``, ``"\\nif"``, ``"\\nprint"``.

Metric: unbiased pass@k (:func:`pass_at_k`) from functional correctness: :func:`check_completion` runs
``prompt + completion + test + check(entry_point)`` in a fresh Python subprocess with a timeout. This
**executes model-written code**: run it only in a sandbox (container, no credentials); it is opt-in in the
experiment scripts (``--execute-code``).
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from typing import Sequence

from proxytune_jax.data.files import load_records, take
from proxytune_jax.data.prompts import PromptExample, as_str, user_turn

DATASET = "HumanEval"
FIELDS = ("task_id", "prompt", "test", "entry_point")
STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_NEW_TOKENS = 512
TEMPERATURE = 0.1
TOP_P = 0.95
NUM_SAMPLES = 20
METRIC = "pass_at_k"


def load_humaneval(path: str, *, max_examples: int | None = None) -> list[PromptExample]:
    """HumanEval problems; reference = canonical solution; meta holds test and entry point."""
    ds = take(load_records(path, dataset=DATASET, required=FIELDS, split="test"), max_examples)
    out = []
    for i, r in enumerate(ds):
        prompt = as_str(r["prompt"], dataset=DATASET, field_name="prompt", index=i)
        out.append(PromptExample(
            id=str(r["task_id"]), prompt=prompt, messages=user_turn(prompt), response_prefix="",
            reference=r.get("canonical_solution"),
            meta={"test": r["test"], "entry_point": r["entry_point"]},
        ))
    return out


def truncate_completion(completion: str) -> str:
    """Cut a completion at the first stop string (the function body ends there)."""
    cut = len(completion)
    for s in STOP_STRINGS:
        j = completion.find(s)
        if j != -1:
            cut = min(cut, j)
    return completion[:cut]


def check_completion(example: PromptExample, completion: str, *, timeout: float = 10.0) -> bool:
    """Whether ``prompt + completion`` passes the problem's tests (fresh subprocess, ``timeout`` seconds).

    Executes untrusted code: sandbox it."""
    program = (example.prompt + truncate_completion(completion) + "\n\n" + example.meta["test"] + "\n\n"
               + f"check({example.meta['entry_point']})\n")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(program)
        script = f.name
    try:
        res = subprocess.run([sys.executable, script], capture_output=True, timeout=timeout)
        return res.returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k)/C(n, k) for n samples with c correct (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / m for m in range(n - c + 1, n + 1))


def score_pass_at_k(
    examples: Sequence[PromptExample], completions: Sequence[Sequence[str]], ks: Sequence[int] = (1,),
    *, timeout: float = 10.0,
) -> dict:
    """Mean pass@k over problems; ``completions[i]`` are the samples for problem i."""
    per_problem = []
    for ex, samples in zip(examples, completions):
        c = sum(check_completion(ex, s, timeout=timeout) for s in samples)
        per_problem.append((len(samples), c))
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in per_problem) / max(len(per_problem), 1) for k in ks}
