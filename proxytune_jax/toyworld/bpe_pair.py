"""A second tokenizer for the toy world and a small tuned / untuned pair trained with it: the setting of
cross-tokenizer proxy-tuning (``decoding.cross_tokenizer``, issue #18), where the large base reads the world's
word-level tokenizer and the small pair a byte-level BPE.

The second tokenizer is a **byte-level BPE** (GPT-2's byte alphabet, ``tokenizers.BpeTrainer``) trained on the
same texts as the world's tokenizer (``build.tokenizer_texts``) with :data:`BPE_VOCAB_SIZE` entries: the 256
bytes, the world's special tokens and ~57 merges, so frequent words are one token and rarer name syllables
split into two (``"Ġne"`` → ``"Ġn" "e"``): the two tokenizers segment the same text differently and share no
ids. Training is deterministic (the same texts give the same merges). Words carry their leading space
(``"Ġcoins"``), every string encodes, and the text round-trips (``decode(encode(text)) == text``; the
``transformers`` clean-up of spaces before punctuation is off), as cross-tokenizer fusion requires.

The pair is the world's small pair retrained on this tokenizer with the same recipe (``build.train_pair``:
the small size, pretraining, instruction tuning with replay, label smoothing, seeds), except that each
response is encoded as the text that follows the prompt (``" " + answer``: a byte-level BPE's words carry their
space; the word-level tokenizer ignores it). Cached under the world's folder, ``<world>/bpe<V>-v<version>/``,
with ``manifest.json`` written last (an interrupted build is redone).

>>> tw = build_toyworld(ToyWorldConfig())
>>> pair = build_bpe_pair(tw)                      # trains on first use (~a minute on 2 cores), then cached
>>> expert, anti = pair.load("tuned-small"), pair.load("base-small")
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Iterable

from proxytune_jax.atomic import write_json_atomic, write_text_atomic
from proxytune_jax.errors import UserError
from proxytune_jax.toyworld.build import ToyWorld, instruction_data, tokenizer_texts, train_pair
from proxytune_jax.toyworld.data import encode_corpus
from proxytune_jax.toyworld.tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIALS, UNK

BPE_VOCAB_SIZE = 320  # fixed before any measurement: ~1.2 tokens per word on the world's texts
BPE_VERSION = 1  # bump when the recipe changes (invalidates the cached pairs)
PAIR_NAMES = ("base-small", "tuned-small")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE):
    """A byte-level BPE of ``vocab_size`` entries trained on ``texts``; returns a
    ``transformers.PreTrainedTokenizerFast`` with the world tokenizer's special tokens and chat template, that
    prepends ``<bos>`` when ``add_special_tokens=True`` and pads on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIALS):
        raise UserError(f"a byte-level BPE needs vocab_size >= {256 + len(SPECIALS)} (256 bytes and "
                        f"{len(SPECIALS)} special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclasses.dataclass
class BpePair:
    """A built pair: the second tokenizer and the folders of ``base-small`` and ``tuned-small``."""

    tokenizer: object
    root: Path
    timings: dict

    def model_path(self, name: str) -> Path:
        if name not in PAIR_NAMES:
            raise UserError(f"unknown model of the BPE pair {name!r}; one of {PAIR_NAMES}")
        return self.root / name

    def load(self, name: str):
        from proxytune_jax import load_pretrained
        return load_pretrained(self.model_path(name))


def build_bpe_pair(tw: ToyWorld, vocab_size: int = BPE_VOCAB_SIZE, *, progress: bool = True,
                   log=print) -> BpePair:
    """Train (first run) or load (later runs) the second tokenizer and its small pair for the built world
    ``tw`` (same world, same texts, same small-model recipe as ``build.build_toyworld``)."""
    from transformers import AutoTokenizer

    root = tw.root / f"bpe{int(vocab_size)}-v{BPE_VERSION}"
    manifest = root / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        return BpePair(AutoTokenizer.from_pretrained(root / "tokenizer"), root,
                       {"cached": True, **info.get("timings", {})})
    if root.exists():  # an interrupted build
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log(f"building the toy world's BPE pair in {root} (first run only; later runs reuse it)")
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer(tokenizer_texts(tw.world), vocab_size)
    tok.save_pretrained(root / "tokenizer")
    corpus = encode_corpus(tok, tw.world.corpus)
    sft = instruction_data(tw.config, tw.world, tok, corpus, response_prefix=" ")
    width = max(corpus["input_ids"].shape[1], sft["input_ids"].shape[1])
    if width > tw.config.max_length:
        raise UserError(f"BPE-encoded toy world sequences ({width} tokens) exceed max_length "
                        f"{tw.config.max_length}; raise the vocabulary size or ToyWorldConfig.max_length")
    timings = {"data_s": time.perf_counter() - t0}
    timings.update(train_pair(tw.config, "small", tok, corpus, sft, root, progress=progress))
    for name in PAIR_NAMES:
        write_text_atomic(root / name / "README.md",
                          f"# toy world {name}, byte-level BPE of {vocab_size}\n\nBuilt by "
                          f"proxytune_jax.toyworld.bpe_pair.build_bpe_pair; world config digest "
                          f"{tw.config.digest()}.\n")
    timings["total_s"] = time.perf_counter() - t0
    write_json_atomic(manifest, {"world_digest": tw.config.digest(), "vocab_size": int(vocab_size),
                                 "version": BPE_VERSION, "timings": timings})  # last: marks the build done
    return BpePair(AutoTokenizer.from_pretrained(root / "tokenizer"), root, {"cached": False, **timings})


__all__ = ["BPE_VOCAB_SIZE", "BpePair", "PAIR_NAMES", "build_bpe_pair", "train_bpe_tokenizer"]
