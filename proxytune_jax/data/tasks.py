"""The evaluation tasks in one table: loader, generation settings, metric and scorer per task.

``TASKS[name]`` is a :class:`TaskSpec`; ``load_task(name, path, **kw)`` returns its examples and
``score_task(name, examples, outputs)`` its metrics. GLUE/SuperGLUE tasks are scored from class logits
(:func:`proxytune_jax.data.glue.glue_metrics`); ToxiGen needs an external classifier
(:func:`proxytune_jax.data.toxigen.score_toxicity`); AlpacaEval and HumanEval have external or opt-in judges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from proxytune_jax.data import alpaca, cnn_dailymail, dolly, gsm8k, humaneval, toxigen, triviaqa, truthfulqa
from proxytune_jax.data.prompts import PromptExample
from proxytune_jax.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """name; loader(path, **kw) -> examples; metric name; greedy-decoding settings; scorer or None (external)."""

    name: str
    loader: Callable[..., list[PromptExample]]
    metric: str
    stop_strings: tuple[str, ...]
    max_new_tokens: int
    scorer: Callable[[Sequence[PromptExample], Sequence[str]], dict] | None
    note: str = ""


def _score_gsm(examples, outputs):
    """GSM exact match (proxytune_jax.eval.answers: number after ``####``, else the last number)."""
    from proxytune_jax.eval.answers import accuracy

    return {"exact_match": accuracy([gsm8k.trim_output(o) for o in outputs], [ex.reference for ex in examples]),
            "n": len(outputs)}


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("gsm8k", gsm8k.load_gsm8k, gsm8k.METRIC, gsm8k.STOP_STRINGS, gsm8k.MAX_NEW_TOKENS, _score_gsm),
    TaskSpec("alpaca_eval", alpaca.load_alpaca_eval, alpaca.METRIC, alpaca.STOP_STRINGS, alpaca.MAX_NEW_TOKENS,
             None, "win rate needs the external GPT-4 judge: write outputs with alpaca.alpaca_eval_outputs"),
    TaskSpec("truthfulqa", truthfulqa.load_truthfulqa_generation, truthfulqa.GEN_METRIC, (),
             truthfulqa.GEN_MAX_NEW_TOKENS, truthfulqa.score_generation),
    TaskSpec("truthfulqa_mc", truthfulqa.load_truthfulqa_mc, truthfulqa.MC_METRIC, truthfulqa.MC_STOP_STRINGS,
             truthfulqa.MC_MAX_NEW_TOKENS, truthfulqa.score_mc),
    TaskSpec("toxigen", toxigen.load_toxigen, toxigen.METRIC, toxigen.STOP_STRINGS, toxigen.MAX_NEW_TOKENS,
             None, "needs a toxicity classifier: toxigen.score_toxicity(examples, outputs, classify)"),
    TaskSpec("triviaqa", triviaqa.load_triviaqa, triviaqa.METRIC, triviaqa.STOP_STRINGS, triviaqa.MAX_NEW_TOKENS,
             triviaqa.score_exact_match),
    TaskSpec("cnn_dailymail", cnn_dailymail.load_cnn_dailymail, cnn_dailymail.METRIC, cnn_dailymail.STOP_STRINGS,
             cnn_dailymail.MAX_NEW_TOKENS, cnn_dailymail.score_rouge),
    TaskSpec("dolly", dolly.load_dolly, dolly.METRIC, (), dolly.MAX_NEW_TOKENS, dolly.score_rouge_l),
    TaskSpec("humaneval", humaneval.load_humaneval, humaneval.METRIC, humaneval.STOP_STRINGS,
             humaneval.MAX_NEW_TOKENS, None, "executes code: humaneval.score_pass_at_k (sandbox only)"),
]}


def get_task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} (GLUE tasks: data.glue)")
    return TASKS[name]


def load_task(name: str, path: str, **kwargs) -> list[PromptExample]:
    return get_task_spec(name).loader(path, **kwargs)


def score_task(name: str, examples: Sequence[PromptExample], outputs: Sequence[str]) -> dict:
    spec = get_task_spec(name)
    if spec.scorer is None:
        raise UserError(f"task {name!r} has no built-in scorer: {spec.note}")
    return spec.scorer(examples, outputs)
