"""A black-box teacher from recorded API responses: OpenAI-style ``top_logprobs`` → a FIRST top-k cache.

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

so that ``offline_topk`` (FIRST) trains a student on it. The teacher must share the student's tokenizer:
tokens are mapped to ids by their ``bytes`` when the response gives them (chat completions do), else by the
tokenizer's raw token strings, else by the decoded text when only one id has it; the generated tokens must
be exactly the tokenizer's encoding of the generated text, otherwise the record is refused with its line number (models with other tokenizers need a cross-tokenizer
alignment, not this module). Alternatives that map to no id are left out of the top-k (their mass joins
the tail).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.jsonl import iter_jsonl


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


def build_api_topk_cache(responses_file: str | Path, tokenizer, out_dir: str | Path, *, k: int = 5,
                         data_out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>`` (the top-k cache) and ``data_out`` (default ``<out_dir>/train.jsonl``) from recorded
    responses; returns ``(cache_dir, data_file)``. See the module docstring."""
    from proxytune_jax.losses.first import TopKCacheWriter
    from proxytune_jax.training.data import _encode

    out_dir = Path(out_dir)
    data_out = Path(data_out) if data_out else out_dir / "train.jsonl"
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token_id; the training file ends every response with it")
    maps = token_id_map(tokenizer)
    vocab = len(tokenizer)
    records = []
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
        expected = _encode(tokenizer, text, False)
        if None in ids or ids != expected:
            raise UserError(f"{where}: the generated tokens are not this tokenizer's encoding of the generated text "
                            "(another tokenizer, or a non-canonical tokenization); distill with the teacher's own "
                            "tokenizer or drop the record")
        prompt_ids = _encode(tokenizer, obj["prompt"], True)
        n = len(prompt_ids) + len(ids) + 1  # + EOS, as training.data tokenizes the record
        top_ids = np.full((n, k), -1, np.int32)
        top_logp = np.full((n, k), -np.inf, np.float32)
        for j, entries in enumerate(alts):  # the position predicting generated token j
            kept: dict[int, float] = {}
            for (token, token_bytes), value in entries:
                i = _to_id(token, token_bytes, maps)
                if i is not None and i not in kept and math.isfinite(value) and value <= 0:
                    kept[i] = value
            for slot, (i, v) in enumerate(list(kept.items())[:k]):
                top_ids[len(prompt_ids) - 1 + j, slot], top_logp[len(prompt_ids) - 1 + j, slot] = i, v
        records.append(({"prompt": obj["prompt"], "response": text}, top_ids, top_logp))
    if not records:
        raise UserError(f"{responses_file} holds no records")
    with TopKCacheWriter(out_dir, k=k, vocab_size=vocab) as writer:
        for _, ids, logp in records:
            writer.add(ids, logp)
    data_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_out.with_name(data_out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, _, _ in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_out)
    return out_dir, data_out


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


__all__ = ["build_api_topk_cache", "parse_response", "token_id_map"]

