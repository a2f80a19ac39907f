"""Cross-tokenizer proxy-tuning: a base and a small expert / anti-expert pair with **different tokenizers**,
aligned through text (issue #18, item 3; first version: greedy, measured only in the tests so far).

The choice: **token-level alignment on the base's candidates, each scored as a text continuation** (not
byte-level marginalisation). At every step the base proposes its top k next tokens (a :class:`TopKBase`, so
black-box bases work too); each candidate is a string ``c`` (its decoded text). The small models score the same
string as a continuation of the text generated so far, through their own tokenizer:

    log p_S(c | text) = log P_S(P_S + enc_S(g + c)) − log P_S(P_S + enc_S(g))

with ``P_S`` the small model's encoded prompt (its chat template for the expert), ``g`` the generated text and
``enc_S`` its tokenizer's canonical encoding (the two sums run from the first position where the encodings of
``g`` and ``g + c`` differ, so a merge across the boundary is scored correctly). This is the canonical-encoding
approximation of the byte-level marginal (which would sum over every segmentation of ``c``); it needs one small
forward per candidate and no vocabulary mapping. The fused choice is

    argmax_c  log p_base(c) + α · (log p_E(c | text) − log p_A(c | text))     over the base's top k.

The base's EOS maps to the small models' EOS (scored as their EOS token at the current position). Each small
model's stream is always its own tokenizer's encoding of the prompt and of the text (re-encoded every step,
full forward, no KV cache); the base reads its own chosen token ids, so at α = 0 the output is exactly the
base's own greedy decoding. The generated text is kept as bytes: a candidate that only adds part of a UTF-8
character (a byte token of a byte-level BPE), or a special token, adds no text yet, so the pair gives it no
offset (it keeps the base's score) and the small streams see the character once it is whole. The small
tokenizer must round-trip the text (``decode(encode(text)) == text``: any byte-level BPE); otherwise the
alignment fails with an error naming the position and the fix. The support is the base's top k: with a local base pass ``k = V`` for
full-logit proxy-tuning (the toy world showed a dropped tail loses the gain when the tokens the pair needs are
outside the top k, README *A base out of reach*).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxytune_jax.decoding import alpha_control, fusion
from proxytune_jax.decoding.prompts import bucket_length, encode_prompt
from proxytune_jax.errors import UserError


@functools.lru_cache(maxsize=16)
def _token_logprobs_fn(graphdef):
    def f(params, ids):
        logits, _ = nnx.merge(graphdef, params)(ids)  # [R, W, V]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        return jnp.take_along_axis(lp, nxt[..., None], axis=-1)[..., 0]  # [R, W]: log p(ids[t+1] | ids[:t+1])
    return jax.jit(f)


class TextScorer:
    """A local model scoring text continuations through its own tokenizer (see the module doc)."""

    def __init__(self, model, tokenizer, *, chat_template: bool = False):
        self.graphdef, self.params = nnx.split(model)
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.context = int(model.config.max_position_embeddings)
        eos = tokenizer.eos_token_id
        self.eos_id = int(eos) if eos is not None else None

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def stream(self, prompt_ids: list[int], text: str, where: str = "") -> list[int]:
        """This model's stream: its encoded prompt, then its tokenizer's encoding of the generated text (which
        must round-trip: decode(encode(text)) == text, else the alignment through text fails)."""
        ids = self.encode_text(text)
        back = self.tokenizer.decode(ids, skip_special_tokens=False)
        if back != text:
            pos = next((i for i, (x, y) in enumerate(zip(back, text)) if x != y), min(len(back), len(text)))
            raise UserError(f"{where or 'text'}: the small models' tokenizer does not round-trip the text at "
                            f"character {pos} ({text[max(0, pos - 10):pos + 10]!r} came back as "
                            f"{back[max(0, pos - 10):pos + 10]!r}); cross-tokenizer fusion aligns through text, so "
                            "use small models with a byte-level tokenizer (every string encodes)")
        return list(prompt_ids) + ids

    def sequence_logprobs(self, seqs: Sequence[list[int]], starts: Sequence[int]) -> np.ndarray:
        """``[R]``: Σ_{t ≥ start} log p(seq[t] | seq[:t]) for each sequence (one padded, jitted forward)."""
        width = bucket_length(max(len(s) for s in seqs))
        if width > self.context:
            raise UserError(f"a stream of {max(len(s) for s in seqs)} tokens exceeds the small model's context of "
                            f"{self.context}; lower --max-new-tokens or shorten the prompt")
        rows = bucket_length(len(seqs), min_bucket=1)
        batch = np.zeros((rows, width), np.int32)
        for i, s in enumerate(seqs):
            batch[i, :len(s)] = s
        lp = np.asarray(_token_logprobs_fn(self.graphdef)(self.params, jnp.asarray(batch)), np.float64)
        out = np.zeros(len(seqs))
        for i, (s, st) in enumerate(zip(seqs, starts)):
            out[i] = lp[i, st - 1:len(s) - 1].sum() if len(s) > st else 0.0
        return out

    def continuation_logprobs(self, prompt_ids: list[int], text: str, conts: Sequence[str | None],
                              where: str = "") -> np.ndarray:
        """``[C]`` log p(c | prompt, text) for each continuation string; ``None`` means this model's EOS."""
        base = self.stream(prompt_ids, text, where)
        seqs, starts = [], []
        for c in conts:
            s = base + [self.eos_id] if c is None else self.stream(prompt_ids, text + c, where)
            p = len(prompt_ids)
            while p < min(len(s), len(base)) and s[p] == base[p]:
                p += 1
            seqs.append(s)
            starts.append(p)
        lp_new = self.sequence_logprobs(seqs, starts)
        # the part of the old stream that the continuation re-segmented (empty in the usual case)
        lp_old = self.sequence_logprobs([base] * len(seqs), starts) if any(p < len(base) for p in starts) else 0.0
        return lp_new - lp_old


@dataclasses.dataclass
class CrossCompletion:
    prompt: str
    completion: str
    base_token_ids: list[int]
    finish_reason: str  # "eos" | "length"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class CrossTokenizerGenerator:
    """Greedy proxy-tuning of ``base`` (a ``TopKBase`` over ``base_tokenizer``) with an expert / anti-expert pair
    on another tokenizer (``small_tokenizer``). ``alpha`` may carry a per-token schedule / gate
    (:mod:`alpha_control`; the gate reads the pair's distributions over the base's candidates)."""

    def __init__(self, base, base_tokenizer, expert, anti_expert, small_tokenizer, *,
                 expert_chat_template: bool = False):
        self.base, self.base_tok = base, base_tokenizer
        self.expert = TextScorer(expert, small_tokenizer, chat_template=expert_chat_template)
        self.anti = TextScorer(anti_expert, small_tokenizer)
        self.base_eos = {int(base_tokenizer.eos_token_id)} if base_tokenizer.eos_token_id is not None else set()
        self._table = None
        if self.base_eos and self.expert.eos_id is None:
            raise UserError("the small models' tokenizer has no EOS token; the base's EOS cannot be aligned")

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, fusion_params: dict | None = None
                 ) -> list[CrossCompletion]:
        fp = {k: np.asarray(v) for k, v in fusion.resolve_params("proxy_tuning", fusion_params).items()}
        return [self._one(p, max_new_tokens, fp) for p in prompts]

    def _one(self, prompt, n, fp) -> CrossCompletion:
        base_ids = encode_prompt(self.base_tok, prompt)
        p_e = encode_prompt(self.expert.tokenizer, prompt, chat_template=self.expert.chat_template)
        p_a = encode_prompt(self.anti.tokenizer, prompt)
        raw, chosen, reason = b"", [], "length"
        for t in range(n):
            text = whole_chars(raw)  # the text so far, without a trailing partial UTF-8 character
            top = self.base.topk([prompt + text], [base_ids + chosen])
            ids, lps = np.asarray(top.ids)[0], np.asarray(top.logp, np.float64)[0]
            keep = [j for j, i in enumerate(ids) if i >= 0]
            conts: list[str | None] = []
            for j in keep:
                i = int(ids[j])
                if i in self.base_eos:
                    conts.append(None)
                else:
                    new = whole_chars(raw + self._bytes(i))
                    conts.append(new[len(text):])  # "" while a character is incomplete, or a special token
            scored = [c for c in conts if c != ""]
            offset = np.zeros(len(conts))
            alpha = float(fp["alpha"])
            if scored:
                where = f"prompt {prompt[:40]!r}, generated token {t}"
                lp_e = self.expert.continuation_logprobs(p_e, text, scored, where=where)
                lp_a = self.anti.continuation_logprobs(p_a, text, scored, where=where)
                if alpha_control.is_active(fp):
                    alpha = float(alpha_control.effective_alpha(
                        fp, jnp.asarray(_normalize(lp_e))[None], jnp.asarray(_normalize(lp_a))[None], t)[0, 0])
                offset[[q for q, c in enumerate(conts) if c != ""]] = lp_e - lp_a
            scores = lps[keep] + (alpha * offset if alpha != 0 else 0.0)
            j = int(np.argmax(scores))
            tok = int(ids[keep[j]])
            chosen.append(tok)
            if conts[j] is None:
                reason = "eos"
                break
            raw += self._bytes(tok)
        return CrossCompletion(prompt, raw.decode("utf-8", errors="replace"), chosen, reason)

    def _bytes(self, i: int) -> bytes:
        if self._table is None:
            from proxytune_jax.decoding.stopping import token_byte_table
            self._table = token_byte_table(self.base_tok, len(self.base_tok))
        table, lens = self._table
        return bytes(table[i, :lens[i]].astype(np.uint8).tolist()) if i < len(lens) else b""


def whole_chars(raw: bytes) -> str:
    """The complete UTF-8 characters of ``raw`` (a trailing partial character left out; invalid bytes -> U+FFFD)."""
    import codecs
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=False)


def _normalize(lp: np.ndarray) -> np.ndarray:
    """Log-probs renormalized over the candidates (the gate's distributions)."""
    m = lp.max()
    return (lp - (m + np.log(np.exp(lp - m).sum()))).astype(np.float32)


__all__ = ["CrossCompletion", "CrossTokenizerGenerator", "TextScorer"]
