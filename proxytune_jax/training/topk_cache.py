"""Offline FIRST-style teacher caches aligned with the training data, and their use in batches.

A cache for a JSONL file holds one sequence per example, in file order (``proxytune_jax.losses.first``
format: top-k ids int32 + full-vocabulary log-probs float16, memory-mapped). Entry ``j`` of sequence ``i`` is
the teacher's top-k at input position ``j`` of example ``i`` (its prediction of token ``j + 1``), computed on
the example alone with the same tokenization as ``training.data``; the last entry (after EOS) is unused.
Sequences keep the full example length (they are not cut at ``max_length``).

Build one (teacher forward in batches, jitted):
    python -m proxytune_jax.training.topk_cache --teacher DIR --data train.jsonl --out cache_dir [--k 5]
or ``build_topk_cache(...)`` from Python. In packed batches the student sees examples concatenated while the
teacher saw each one alone (the cache is per example); padded batches match exactly.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from proxytune_jax.errors import UserError
from proxytune_jax.training.data import Example, read_jsonl, tokenize_records


def build_topk_cache(teacher_dir: str | Path, data_file: str | Path, out: str | Path, *, k: int = 5,
                     tokenizer: Any = None, batch_size: int = 8, max_length: int | None = None) -> Path:
    """Run the teacher (a folder or a Hub id) over every example of ``data_file`` and write its top-k cache
    to ``out``."""
    from flax import nnx
    from transformers import AutoTokenizer

    from proxytune_jax.losses.first import TopKCacheWriter, topk_from_logits
    from proxytune_jax.models.hf_io import load_pretrained
    from proxytune_jax.models.hub import resolve_model_path
    from proxytune_jax.training.state import split_params

    teacher_dir = resolve_model_path(teacher_dir, what="teacher")  # a folder or a Hub id
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(teacher_dir)
    teacher = load_pretrained(teacher_dir)
    limit = max_length or teacher.config.max_position_embeddings
    examples = tokenize_records(read_jsonl(data_file), tokenizer, max_length=limit, path=data_file)
    too_long = [i for i, e in enumerate(examples) if len(e.ids) > teacher.config.max_position_embeddings]
    if too_long:
        raise UserError(f"{data_file}: {len(too_long)} examples are longer than the teacher's "
                        f"max_position_embeddings={teacher.config.max_position_embeddings}; shorten them")
    graphdef, params = split_params(teacher)

    @jax.jit
    def topk(params, ids, mask):
        logits, _ = nnx.merge(graphdef, params)(ids, mask)
        t = topk_from_logits(logits, k)
        return t.ids, t.logp

    width = max(len(e.ids) for e in examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with TopKCacheWriter(out, k=k, vocab_size=teacher.config.vocab_size) as writer:
        for lo in tqdm(range(0, len(examples), batch_size), desc="teacher top-k", unit="batch"):
            chunk = examples[lo:lo + batch_size]
            ids = np.full((batch_size, width), pad, np.int32)
            mask = np.zeros((batch_size, width), np.int32)
            for r, e in enumerate(chunk):  # left padding, like training batches
                ids[r, width - len(e.ids):], mask[r, width - len(e.ids):] = e.ids, 1
            t_ids, t_logp = jax.device_get(topk(params, jnp.asarray(ids), jnp.asarray(mask)))
            for r, e in enumerate(chunk):
                writer.add(t_ids[r, width - len(e.ids):], t_logp[r, width - len(e.ids):])
    return Path(out)


class TopKAttacher:
    """Adds ``topk_ids [B, T, k]`` int32 and ``topk_logp [B, T, k]`` float32 to host batches by their
    ``token_index``. Positions without a token (pads) get a harmless uniform entry (ids 0..k-1, log(1/k))."""

    def __init__(self, cache_dir: str | Path, examples: Sequence[Example], *, name: str = "data"):
        from proxytune_jax.losses.first import TopKCache
        self.cache = TopKCache(cache_dir)
        lengths = np.asarray(self.cache.sequences[:, 2]) if len(self.cache) else np.zeros(0, np.int64)
        want = np.asarray([len(e.ids) for e in examples])
        if len(lengths) != len(want) or not np.array_equal(lengths, want):
            bad = next((i for i in range(min(len(lengths), len(want))) if lengths[i] != want[i]), None)
            detail = (f"example {bad} has {want[bad]} tokens but the cache holds {lengths[bad]}" if bad is not None
                      else f"the cache holds {len(lengths)} sequences for {len(want)} examples")
            raise UserError(f"top-k cache {cache_dir} does not match {name} ({detail}); rebuild it with "
                            "build_topk_cache on this file and tokenizer")
        self.offsets = np.asarray([e.token_offset for e in examples], np.int64)
        self.k = self.cache.k

    def __call__(self, batch: dict) -> dict:
        index = batch["token_index"]  # [B, T]
        B, T = index.shape
        ids = np.broadcast_to(np.arange(self.k, dtype=np.int32), (B, T, self.k)).copy()
        logp = np.full((B, T, self.k), -np.log(self.k), np.float32)
        flat = index.reshape(-1)
        valid = np.nonzero(flat >= 0)[0]
        ex = np.searchsorted(self.offsets, flat[valid], side="right") - 1
        pos = flat[valid] - self.offsets[ex]
        ids_f, logp_f = ids.reshape(-1, self.k), logp.reshape(-1, self.k)
        for e in np.unique(ex):
            sel = ex == e
            seq = self.cache[int(e)]
            ids_f[valid[sel]] = seq.ids[pos[sel]]
            logp_f[valid[sel]] = seq.logp[pos[sel]].astype(np.float32)
        return {**batch, "topk_ids": ids, "topk_logp": logp}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a FIRST top-k teacher cache aligned with a JSONL file.")
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    out = build_topk_cache(args.teacher, args.data, args.out, k=args.k, batch_size=args.batch_size)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
