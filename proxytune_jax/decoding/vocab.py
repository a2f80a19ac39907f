"""Vocabulary alignment across the models of one decode (``docs/methods.md`` §1.8).

Checkpoints of one family often pad their embedding matrices differently (Llama-2 32000 vs 32001, Qwen 151936
vs 152064), and chat checkpoints add tokens past the base vocabulary. We combine over the **shared id range**
``[0, V)`` with ``V = min(min_i len(tokenizer_i), min_i model_vocab_i)``, after checking that every tokenizer
maps each id in that range to the same token string. Ids past a tokenizer's real vocabulary (padded embedding
rows, added chat tokens not shared by all) are outside ``[0, V)``, so they are never chosen. Tokenizers that
disagree inside the range are genuinely different: :func:`align_vocabularies` refuses them with a UserError.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from proxytune_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class VocabAlignment:
    size: int  # V: the shared id range [0, V) combined and sampled over
    model_vocab_sizes: tuple[int, ...]  # each model's logits width (embedding rows, maybe padded)
    tokenizer_sizes: tuple[int, ...]  # each tokenizer's real vocabulary, added tokens included


def tokenizer_size(tokenizer) -> int:
    """The real vocabulary of a transformers tokenizer (base vocab + added tokens)."""
    return len(tokenizer)


def align_vocabularies(tokenizers: Sequence, model_vocab_sizes: Sequence[int],
                       names: Sequence[str] | None = None) -> VocabAlignment:
    """Check the tokenizers agree on their shared id range and return it.

    ``tokenizers[i]`` belongs to the model whose logits have width ``model_vocab_sizes[i]``; ``names`` (for
    messages) defaults to ``model 0, model 1, ...``. Raises UserError naming the first differing id."""
    if len(tokenizers) != len(model_vocab_sizes):
        raise ValueError("one tokenizer per model")
    names = list(names or [f"model {i}" for i in range(len(tokenizers))])
    tok_sizes = tuple(tokenizer_size(t) for t in tokenizers)
    size = min(min(tok_sizes), min(int(v) for v in model_vocab_sizes))
    if size <= 0:
        raise UserError("an empty vocabulary: check the tokenizer files of " + ", ".join(names))
    ids = list(range(size))
    ref = tokenizers[0].convert_ids_to_tokens(ids)
    for tok, name in zip(tokenizers[1:], names[1:]):
        if tok is tokenizers[0]:
            continue
        other = tok.convert_ids_to_tokens(ids)
        if other != ref:
            first = next(i for i, (a, b) in enumerate(zip(ref, other)) if a != b)
            raise UserError(
                f"{names[0]} and {name} use different tokenizers (id {first} is {ref[first]!r} vs "
                f"{other[first]!r}); decoding-time tuning combines next-token scores id by id, so all models "
                "must share one tokenizer: pick checkpoints of the same family (or, for proxy-tuning with a base on "
                "another tokenizer, `proxytune generate --cross-tokenizer`)")
    return VocabAlignment(size=size, model_vocab_sizes=tuple(int(v) for v in model_vocab_sizes),
                          tokenizer_sizes=tok_sizes)
