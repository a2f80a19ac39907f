"""One evaluation example with the two prompt views proxy-tuning needs.

Proxy-tuning (Liu et al. 2024, official code; ``docs/methods.md`` §1.7) gives the **base** and
**anti-expert** the plain prompt and the **expert** (a chat model) its chat template around the same request,
followed by a response prefix such as ``"Answer:"``. A :class:`PromptExample` therefore carries both views:

- ``prompt``: the plain text for base / anti-expert / any untuned model;
- ``messages`` + ``response_prefix``: the chat turn(s) for the expert; :func:`chat_prompt` renders them with
  the tokenizer's own ``apply_chat_template`` (never a hard-coded format) and appends the prefix, separated
  by one space unless the template already ends in whitespace (the official convention).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from proxytune_jax.atomic import open_atomic
from proxytune_jax.errors import UserError


@dataclass(frozen=True)
class PromptExample:
    """One prompt with its gold reference.

    id: stable identifier (from the file when it has one, else ``"{dataset}-{index}"``).
    prompt: plain prompt (base and anti-expert view).
    messages: chat messages for the expert, ``({"role": "user", "content": ...},)``.
    response_prefix: text appended after the rendered chat template (``""`` for none).
    reference: the gold answer; its type depends on the task (str, list of str, int label, ...).
    meta: extra per-example fields (e.g. TruthfulQA's correct/incorrect answers, ToxiGen's target group).
    """

    id: str
    prompt: str
    messages: tuple[dict, ...]
    response_prefix: str = ""
    reference: Any = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "messages": list(self.messages),
            "response_prefix": self.response_prefix,
            "reference": self.reference,
            "meta": self.meta,
        }


def user_turn(content: str, system_prompt: str | None = None) -> tuple[dict, ...]:
    """Chat messages for a single user request (optionally preceded by a system prompt)."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": content})
    return tuple(messages)


def append_prefix(rendered: str, response_prefix: str) -> str:
    """Append the response prefix after a rendered chat template: no separator when the template ends in a
    space or newline, else one space (the official proxy-tuning convention, e.g. ``"[/INST] Answer:"``)."""
    if not response_prefix:
        return rendered
    if rendered and rendered[-1] in (" ", "\n"):
        return rendered + response_prefix
    return rendered + " " + response_prefix


def chat_prompt(example: PromptExample, tokenizer) -> str:
    """The expert's prompt: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` + prefix.

    The rendered text may already contain the BOS token (Llama-2's template starts with ``<s>``): tokenize
    it with ``add_special_tokens=False``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the expert's tokenizer has no chat template; give a chat model's tokenizer (or set "
            "tokenizer.chat_template), or use the plain prompt for every model"
        )
    rendered = tokenizer.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True)
    return append_prefix(rendered, example.response_prefix)


def write_prompts_jsonl(examples: Iterable[PromptExample], path: str) -> str:
    """Write examples as JSON lines (one :meth:`PromptExample.to_json` per line); returns the path.

    The ``prompt`` field is the plain prompt, so the file is also a valid ``proxytune generate --prompts``
    input (that command wraps the expert's copy of the plain prompt in its chat template when asked; the
    experiment scripts instead give the expert ``messages`` + ``response_prefix``, as the paper does)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open_atomic(path) as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    return path


def as_str(value: Any, *, dataset: str, field_name: str, index: int) -> str:
    """A record's text field, with a clear error for a null or non-text value."""
    if not isinstance(value, str):
        raise UserError(f"{dataset}: record {index} has {field_name}={value!r}; expected a string")
    return value


def ids_from(records: Sequence[dict], key: str | None, dataset: str) -> list[str]:
    """Per-record ids: the ``key`` field when present, else ``"{dataset}-{index}"``."""
    out = []
    for i, r in enumerate(records):
        v = r.get(key) if key else None
        out.append(str(v) if v is not None else f"{dataset}-{i}")
    return out
