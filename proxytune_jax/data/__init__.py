"""Evaluation and training data from local files in the published formats (never downloaded).

One module per dataset; each returns :class:`PromptExample` lists carrying the plain prompt (base and
anti-expert) and the chat messages + response prefix (expert), with the paper's prompt format, and names the
metric it is scored with. ``TASKS`` (``tasks.py``) lists loader, stop strings, token budget and scorer per task.
"""
from proxytune_jax.data.alpaca import alpaca_eval_outputs, load_alpaca_eval
from proxytune_jax.data.cnn_dailymail import load_cnn_dailymail
from proxytune_jax.data.dolly import load_dolly
from proxytune_jax.data.files import load_records
from proxytune_jax.data.glue import GLUE_TASKS, glue_metrics, load_glue, verbalizer_token_ids
from proxytune_jax.data.gsm8k import load_gsm8k
from proxytune_jax.data.humaneval import load_humaneval
from proxytune_jax.data.prompts import PromptExample, chat_prompt, write_prompts_jsonl
from proxytune_jax.data.tasks import TASKS, TaskSpec, get_task_spec, load_task, score_task
from proxytune_jax.data.toxigen import load_toxigen
from proxytune_jax.data.triviaqa import load_triviaqa
from proxytune_jax.data.truthfulqa import load_truthfulqa_generation, load_truthfulqa_mc

__all__ = [
    "PromptExample", "chat_prompt", "write_prompts_jsonl", "load_records", "TASKS", "TaskSpec", "get_task_spec",
    "load_task", "score_task", "load_gsm8k", "load_alpaca_eval", "alpaca_eval_outputs",
    "load_truthfulqa_generation", "load_truthfulqa_mc", "load_toxigen", "load_triviaqa", "load_cnn_dailymail",
    "load_humaneval", "load_dolly", "GLUE_TASKS", "load_glue", "glue_metrics", "verbalizer_token_ids",
]
