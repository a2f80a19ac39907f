"""A word-level tokenizer for the toy world, trained with the ``tokenizers`` library (``WordLevelTrainer``)
and saved in Hugging Face format (``PreTrainedTokenizerFast``, loadable with ``AutoTokenizer.from_pretrained``),
with a chat template that renders ``<bos><|user|> … <|assistant|>`` (BOS inside the template, like Llama-2's).

SentencePiece-style spaces (``Metaspace``: a word is ``▁word``, decoding restores the spaces), so text
round-trips exactly. Every word, number and invented name is one token: the toy world is about knowledge
and format, not about spelling.
"""
from __future__ import annotations

from typing import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK, "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a word-level tokenizer on ``texts`` (at most ``vocab_size`` entries); returns a ``transformers.PreTrainedTokenizerFast`` that prepends
    ``<bos>`` when ``add_special_tokens=True`` and pads on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast
