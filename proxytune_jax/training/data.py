"""Training data: JSONL records -> tokenized examples -> deterministic, resumable batches.

Records are one JSON object per line, either ``{"prompt": ..., "response": ...}`` (loss on the response
tokens and the closing EOS only) or ``{"text": ...}`` (loss on every token after the first). Blank lines are
skipped; anything else that is wrong raises ``UserError`` naming the file and the line.

Tokenization: ``prompt`` with the tokenizer's special tokens (e.g. BOS), ``response`` without, then EOS. An
example longer than ``max_length`` is cut at the end (a warning counts them).

Batches (host NumPy, ``[B, T]`` with ``T = max_length``):
  ``input_ids`` int32, ``attention_mask`` int32 (1 = real token), ``loss_mask`` int32 (1 = this token is a
  training target, i.e. the logits at ``t - 1`` are scored against it). ``token_index`` int64 (each token's
  index in the flattened token stream of the data file, -1 for pads) lets offline teacher caches line up.
* padded: one example per row, **left-padded** (the models' convention; positions come from the mask).
* packed: the epoch's examples are concatenated and cut into rows of exactly ``T`` tokens; the last partial
  row of an epoch is dropped. The models take no segment ids, so attention crosses example boundaries
  inside a row (GPT-style packing; each example ends with EOS).

Order: epoch ``e`` visits the examples in ``np.random.default_rng([seed, e]).permutation(n)`` (or in file
order when ``shuffle=False``). Step ``s`` reads batch ``s % batches_per_epoch`` of epoch
``s // batches_per_epoch``, so the data position is a pure function of the step; it is still saved in each
checkpoint (``DataPosition``) and checked on resume.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.jsonl import iter_jsonl


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] int32, 1 = training target
    token_offset: int  # index of ids[0] in the data file's flattened token stream


@dataclasses.dataclass(frozen=True)
class DataPosition:
    epoch: int
    batch_index: int  # within the epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_jsonl(path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
               text_field: str = "text") -> list[dict]:
    """Read and validate records. Returns dicts with either ``prompt``/``response`` or ``text`` (str), each
    with ``line`` (1-based line number) for later error messages."""
    path = Path(path)
    example = f'{{"{prompt_field}": "...", "{response_field}": "..."}} or {{"{text_field}": "..."}}'
    records = []
    for lineno, obj in iter_jsonl(path, what="data file", example=example):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}; write "
                            f"{{\"{prompt_field}\": ..., \"{response_field}\": ...}} or {{\"{text_field}\": ...}}")
        if prompt_field in obj or response_field in obj:
            for key in (prompt_field, response_field):
                if key not in obj:
                    raise UserError(f"{where}: record has no \"{key}\" field; prompt/response records need both")
                if not isinstance(obj[key], str):
                    raise UserError(f"{where}: \"{key}\" must be a string, got {type(obj[key]).__name__}")
            if not obj[response_field]:
                raise UserError(f"{where}: \"{response_field}\" is empty, so the record has nothing to learn; "
                                "remove it or fill it in")
            records.append({"prompt": obj[prompt_field], "response": obj[response_field], "line": lineno})
        elif text_field in obj:
            if not isinstance(obj[text_field], str) or not obj[text_field]:
                raise UserError(f"{where}: \"{text_field}\" must be a non-empty string")
            records.append({"text": obj[text_field], "line": lineno})
        else:
            raise UserError(f"{where}: record has none of the fields \"{prompt_field}\"/\"{response_field}\" "
                            f"or \"{text_field}\" (it has {sorted(obj)}); rename the fields or set the "
                            "field names in the config")
    if not records:
        raise UserError(f"data file {path} holds no records")
    return records


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=special))
    return list(tokenizer(text, add_special_tokens=special))


def tokenize_records(records: Sequence[dict], tokenizer: Any, *, max_length: int,
                     eos_token_id: int | None = None, path: str | Path = "<data>") -> list[Example]:
    """Tokenize validated records into ``Example``s (see the module docstring for the conventions)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token_id; set one (tokenizer.eos_token = ...) or pass "
                        "eos_token_id")
    examples, offset, cut = [], 0, 0
    for rec in records:
        if "text" in rec:
            ids = _encode(tokenizer, rec["text"], True) + [eos]
            mask = [0] + [1] * (len(ids) - 1)
        else:
            p = _encode(tokenizer, rec["prompt"], True)
            r = _encode(tokenizer, rec["response"], False) + [eos]
            ids, mask = p + r, [0] * len(p) + [1] * len(r)
        if len(ids) < 2:
            raise UserError(f"{path}:{rec['line']}: the record tokenizes to fewer than 2 tokens")
        examples.append(Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32), offset))
        offset += len(ids)
        cut += len(ids) > max_length
    if cut:
        warnings.warn(f"{path}: {cut} of {len(examples)} examples are longer than max_length={max_length} "
                      "tokens and are cut at the end", stacklevel=2)
    return examples


class Batches:
    """Deterministic batches over a list of ``Example``s; ``batch(step)`` is a pure function of the step."""

    def __init__(self, examples: Sequence[Example], *, batch_size: int, max_length: int, pad_token_id: int,
                 seed: int = 0, shuffle: bool = True, pack: bool = False, name: str = "data"):
        if batch_size < 1 or max_length < 2:
            raise UserError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        self.examples = list(examples)
        self.batch_size, self.max_length, self.pad_token_id = batch_size, max_length, pad_token_id
        self.seed, self.shuffle, self.pack, self.name = seed, shuffle, pack, name
        self._epoch_cache: tuple[int, Any] | None = None
        if pack:
            total = sum(len(e.ids) for e in self.examples)
            rows = total // max_length
        else:
            rows = len(self.examples)
        self.batches_per_epoch = rows // batch_size
        if self.batches_per_epoch == 0:
            what = f"{total} tokens make {rows} packed rows" if pack else f"{rows} examples"
            raise UserError(f"{name}: {what}, fewer than one batch of {batch_size}; lower batch_size or add data")

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def position(self, step: int) -> DataPosition:
        return DataPosition(step // self.batches_per_epoch, step % self.batches_per_epoch)

    def _packed_epoch(self, epoch: int):
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        order = self.order(epoch)
        ids = np.concatenate([self.examples[i].ids for i in order])
        mask = np.concatenate([self.examples[i].loss_mask for i in order])
        index = np.concatenate([self.examples[i].token_offset + np.arange(len(self.examples[i].ids))
                                for i in order])
        n = (len(ids) // self.max_length) * self.max_length
        shape = (-1, self.max_length)
        rows = (ids[:n].reshape(shape), mask[:n].reshape(shape), index[:n].reshape(shape))
        self._epoch_cache = (epoch, rows)
        return rows

    def batch_at(self, position: DataPosition) -> dict[str, np.ndarray]:
        B, T = self.batch_size, self.max_length
        lo = position.batch_index * B
        if self.pack:
            ids, mask, index = (a[lo:lo + B] for a in self._packed_epoch(position.epoch))
            return {"input_ids": ids.astype(np.int32), "attention_mask": np.ones((B, T), np.int32),
                    "loss_mask": mask.astype(np.int32), "token_index": index.astype(np.int64)}
        out = {"input_ids": np.full((B, T), self.pad_token_id, np.int32),
               "attention_mask": np.zeros((B, T), np.int32), "loss_mask": np.zeros((B, T), np.int32),
               "token_index": np.full((B, T), -1, np.int64)}
        for row, i in enumerate(self.order(position.epoch)[lo:lo + B]):
            e = self.examples[i]
            n = min(len(e.ids), T)
            out["input_ids"][row, T - n:] = e.ids[:n]  # left padding
            out["attention_mask"][row, T - n:] = 1
            out["loss_mask"][row, T - n:] = e.loss_mask[:n]
            out["token_index"][row, T - n:] = e.token_offset + np.arange(n)
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.batch_at(self.position(step))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    def epoch_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over epoch 0 (for evaluation)."""
        for b in range(self.batches_per_epoch):
            yield self.batch_at(DataPosition(0, b))


def load_batches(path: str | Path, tokenizer: Any, *, batch_size: int, max_length: int, seed: int = 0,
                 shuffle: bool = True, pack: bool = False, pad_token_id: int | None = None,
                 eos_token_id: int | None = None, prompt_field: str = "prompt",
                 response_field: str = "response", text_field: str = "text") -> Batches:
    """``read_jsonl`` -> ``tokenize_records`` -> ``Batches`` in one call."""
    records = read_jsonl(path, prompt_field=prompt_field, response_field=response_field, text_field=text_field)
    examples = tokenize_records(records, tokenizer, max_length=max_length, eos_token_id=eos_token_id, path=path)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    return Batches(examples, batch_size=batch_size, max_length=max_length, pad_token_id=int(pad_token_id),
                   seed=seed, shuffle=shuffle, pack=pack, name=str(path))
