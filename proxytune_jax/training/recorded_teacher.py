"""Teachers known by recorded top-k: API responses (OpenAI-style ``top_logprobs``) or the decoding engine's
generations (``record_topk``, e.g. proxy-tuned decoding) → a training file and a FIRST top-k cache.

A closed model behind an OpenAI-compatible server (OpenAI, vLLM, TGI, ...) answers prompts and, asked for
``logprobs``, returns for every generated token the top-k alternatives with their log-probs. Recorded to a
JSONL file, one line per prompt::

    {"prompt": "...", "response": <the server's JSON response>}

both response formats are read: *completions* (``choices[0].text`` and ``choices[0].logprobs`` with
``tokens`` and ``top_logprobs`` as a list of ``{token: logprob}``) and *chat completions*
(``choices[0].message.content`` and ``choices[0].logprobs.content``, a list of ``{token, logprob,
top_logprobs: [{token, logprob}]}``). ``build_api_topk_cache`` turns the file into

- a training file ``{"prompt": ..., "response": <the generated text>}`` per line (what ``proxytune train``
  reads), and
- a top-k cache aligned with it (``losses.first`` format; the shared ``topk.TopK`` per position): the
  teacher's top-k at the position before each generated token; positions without teacher information (the
  prompt, the end-of-sequence position, which APIs do not score) have empty rows and are not distilled.

so that ``offline_topk`` (FIRST) trains a student on it. The decoding engine records the same thing for its
fused distribution (``TextGenerator.generate(..., record_topk=k)``, ``proxytune generate --topk-cache DIR``;
``answers_from_completions``), including the step that chose EOS. The teacher must share the student's tokenizer:
tokens are mapped to ids by their ``bytes`` when the response gives them (chat completions do), else by the
tokenizer's raw token strings, else by the decoded text when only one id has it; the generated tokens must
be exactly the tokenizer's encoding of the generated text, otherwise the record is refused with its line number (models with other tokenizers need a cross-tokenizer
alignment, not this module). Alternatives that map to no id are left out of the top-k (their mass joins
the tail).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.atomic import open_atomic
from proxytune_jax.jsonl import iter_jsonl
from proxytune_jax.topk import TopK


def token_id_map(tokenizer) -> tuple[dict[bytes, int], dict[str, int], dict[str, int]]:
    """``(token bytes -> id, raw token string -> id, decoded string -> id)`` over the tokenizer's vocabulary.
    A decoded string that several ids share (``"�"`` for every partial UTF-8 byte) maps to no id: only the
    bytes (which OpenAI-style responses carry) can tell those apart."""
    from proxytune_jax.decoding.stopping import token_byte_table

    n = len(tokenizer)
    table, lens = token_byte_table(tokenizer, n)
    by_bytes: dict[bytes, int] = {}
    for i in range(n):
        if lens[i]:
            by_bytes.setdefault(bytes(table[i, :lens[i]].astype(np.uint8).tolist()), i)
    raw = {str(t): int(i) for t, i in tokenizer.get_vocab().items()}
    decoded: dict[str, int] = {}
    shared: set[str] = set()
    for i in range(n):
        text = tokenizer.decode([i])
        if text in decoded:
            shared.add(text)
        decoded.setdefault(text, i)
    return by_bytes, raw, {t: i for t, i in decoded.items() if t not in shared}


def _to_id(token: str, token_bytes, maps) -> int | None:
    """The id of an API token: by its bytes when given, else its raw token string, else its (unique) text."""
    by_bytes, raw, decoded = maps
    if token_bytes:
        found = by_bytes.get(bytes(token_bytes))
        if found is not None:
            return found
    if token in raw:  # special tokens (no text bytes) and servers that return raw token strings
        return raw[token]
    return decoded.get(token)


def parse_response(response: dict, where: str):
    """``(generated text, generated tokens, per token its [(alternative, logprob)])`` of one recorded completions
    or chat-completions response; a token is ``(string, bytes or None)``."""
    try:
        choice = response["choices"][0]
        lp = choice["logprobs"]
        if lp is None:
            raise KeyError("logprobs")
        if "content" in lp and isinstance(lp["content"], list):  # chat completions
            text = choice["message"]["content"]
            tokens = [(e["token"], e.get("bytes")) for e in lp["content"]]
            alts = [[((a["token"], a.get("bytes")), float(a["logprob"])) for a in e.get("top_logprobs") or []]
                    for e in lp["content"]]
        else:  # completions
            text = choice["text"]
            tokens = [(t, None) for t in lp["tokens"]]
            alts = [sorted((((t, None), float(v)) for t, v in (d or {}).items()), key=lambda x: -x[1])
                    for d in lp["top_logprobs"]]
    except (KeyError, IndexError, TypeError) as e:
        raise UserError(f"{where}: not an OpenAI-style response with logprobs (missing {e}); record responses with "
                        "logprobs enabled (completions: logprobs=k; chat: logprobs=true, top_logprobs=k)") from None
    if len(alts) != len(tokens):
        raise UserError(f"{where}: {len(tokens)} tokens but {len(alts)} top_logprobs entries")
    return text, tokens, alts


@dataclasses.dataclass
class TeacherAnswer:
    """One recorded answer: the prompt, the generated text and tokens (EOS excluded), and ``topk`` ``[m, k]``:
    the teacher's top-k before each generated token (``m = len(token_ids)``, or one more when the step that
    chose EOS was recorded too)."""

    prompt: str
    text: str
    token_ids: list[int]
    topk: TopK
    where: str


def answers_from_responses(responses_file: str | Path, tokenizer, *, k: int = 5) -> list[TeacherAnswer]:
    """Parse recorded OpenAI-style responses (see the module docstring) into ``TeacherAnswer``s."""
    maps = token_id_map(tokenizer)
    answers = []
    for lineno, obj in iter_jsonl(Path(responses_file), what="recorded responses",
                                  example='{"prompt": "...", "response": {"choices": [...]}}'):
        where = f"{responses_file}:{lineno}"
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(
                obj.get("response"), dict):
            raise UserError(f"{where}: expected {{\"prompt\": str, \"response\": {{...}}}}")
        text, tokens, alts = parse_response(obj["response"], where)
        if not text:
            raise UserError(f"{where}: the response is empty; remove the record")
        ids = [_to_id(t, b, maps) for t, b in tokens]
        top_ids = np.full((len(alts), k), -1, np.int32)
        top_logp = np.full((len(alts), k), -np.inf, np.float32)
        for j, entries in enumerate(alts):  # the alternatives for generated token j
            kept: dict[int, float] = {}
            for (token, token_bytes), value in entries:
                i = _to_id(token, token_bytes, maps)
                if i is not None and i not in kept and math.isfinite(value) and value <= 0:
                    kept[i] = value
            for slot, (i, v) in enumerate(list(kept.items())[:k]):
                top_ids[j, slot], top_logp[j, slot] = i, v
        answers.append(TeacherAnswer(obj["prompt"], text, [-1 if i is None else i for i in ids],
                                     TopK(top_ids, top_logp), where))
    if not answers:
        raise UserError(f"{responses_file} holds no records")
    return answers


def answers_from_completions(completions, eos_ids=()) -> list[TeacherAnswer]:
    """``TeacherAnswer``s from ``TextGenerator.generate(..., record_topk=k)`` completions (the decoding
    engine's fused distribution, e.g. proxy-tuning's): a trailing EOS is dropped from the tokens, its step's
    top-k kept (training data end every response with EOS)."""
    out = []
    for i, c in enumerate(completions):
        if c.topk is None:
            raise UserError("the completions carry no top-k; generate with record_topk=k (--topk-cache)")
        ids = list(c.token_ids)
        if ids and c.finish_reason == "eos" and ids[-1] in set(eos_ids):
            ids = ids[:-1]
        out.append(TeacherAnswer(c.prompt, c.completion, ids, c.topk, f"completion {i}"))
    return out


def write_teacher_cache(answers: Sequence[TeacherAnswer], tokenizer, out_dir: str | Path, *,
                        data_out: str | Path | None = None, skip_mismatched: bool = False) -> tuple[Path, Path, int]:
    """Write the training file (``data_out``, default ``<out_dir>/train.jsonl``: ``{"prompt", "response"}``
    per answer) and the top-k cache aligned with it (``<out_dir>``): the teacher's top-k for generated token j
    at the position before it; unscored positions empty. An answer whose tokens are not the tokenizer's
    encoding of its text is refused (or, with ``skip_mismatched``, left out and counted).
    Returns ``(cache_dir, data_file, skipped)``."""
    from proxytune_jax.losses.first import TopKCacheWriter
    from proxytune_jax.training.data import _encode

    out_dir = Path(out_dir)
    data_out = Path(data_out) if data_out else out_dir / "train.jsonl"
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token_id; the training file ends every response with it")
    rows, skipped = [], 0
    for a in answers:
        if not a.text or a.token_ids != _encode(tokenizer, a.text, False):
            if skip_mismatched:
                skipped += 1
                continue
            raise UserError(f"{a.where}: the generated tokens are not this tokenizer's encoding of the generated "
                            "text (another tokenizer, or a non-canonical tokenization); distill with the teacher's "
                            "own tokenizer or drop the record")
        prompt_ids = _encode(tokenizer, a.prompt, True)
        k = a.topk.k
        n = len(prompt_ids) + len(a.token_ids) + 1  # + EOS, as training.data tokenizes the record
        top_ids = np.full((n, k), -1, np.int32)
        top_logp = np.full((n, k), -np.inf, np.float32)
        m = min(len(a.topk.ids), len(a.token_ids) + 1)
        top_ids[len(prompt_ids) - 1:len(prompt_ids) - 1 + m] = np.asarray(a.topk.ids)[:m]
        top_logp[len(prompt_ids) - 1:len(prompt_ids) - 1 + m] = np.asarray(a.topk.logp, np.float32)[:m]
        rows.append(({"prompt": a.prompt, "response": a.text}, top_ids, top_logp))
    if not rows:
        raise UserError("no answer is left to write (every one was skipped)")
    with TopKCacheWriter(out_dir, k=rows[0][1].shape[1], vocab_size=len(tokenizer)) as writer:
        for _, ids, logp in rows:
            writer.add(ids, logp)
    data_out.parent.mkdir(parents=True, exist_ok=True)
    with open_atomic(data_out) as f:
        for rec, _, _ in rows:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out_dir, data_out, skipped


def build_api_topk_cache(responses_file: str | Path, tokenizer, out_dir: str | Path, *, k: int = 5,
                         data_out: str | Path | None = None) -> tuple[Path, Path]:
    """Recorded responses -> ``(cache_dir, data_file)`` (``answers_from_responses`` + ``write_teacher_cache``)."""
    cache, data, _ = write_teacher_cache(answers_from_responses(responses_file, tokenizer, k=k), tokenizer, out_dir,
                                         data_out=data_out)
    return cache, data


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Recorded OpenAI-style responses with top_logprobs -> a training "
                                            "file and its FIRST top-k cache (train with objective offline_topk).")
    p.add_argument("--responses", required=True, help="JSONL of {\"prompt\": ..., \"response\": <server JSON>}")
    p.add_argument("--tokenizer", required=True, help="the teacher's (= the student's) tokenizer: a folder or Hub id")
    p.add_argument("--out", required=True, help="the cache folder")
    p.add_argument("--data-out", default=None, help="the training file (default: <out>/train.jsonl)")
    p.add_argument("--k", type=int, default=5)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from proxytune_jax.models.hub import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer, what="tokenizer"))
    cache, data = build_api_topk_cache(args.responses, tok, args.out, k=args.k, data_out=args.data_out)
    print(f"wrote {cache} and {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["TeacherAnswer", "answers_from_completions", "answers_from_responses", "build_api_topk_cache",
           "parse_response", "token_id_map", "write_teacher_cache"]

