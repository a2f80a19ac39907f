"""Cross-tokenizer proxy-tuning: a base and a small expert / anti-expert pair with **different tokenizers**,
aligned through text (issue #18, item 3).

The choice: **token-level alignment on the base's candidates, each scored as a text continuation** (not
byte-level marginalisation). At every step the base proposes its top k next tokens (a :class:`TopKBase`, so
black-box bases work too); each candidate is a string ``c`` (its decoded text). The small models score the same
string as a continuation of the text generated so far, through their own tokenizer:

    log p_S(c | text) = log P_S(P_S + enc_S(g + c)) − log P_S(P_S + enc_S(g))

with ``P_S`` the small model's encoded prompt (its chat template for the expert), ``g`` the generated text and
``enc_S`` its tokenizer's canonical encoding (the two sums run from the first position where the encodings of
``g`` and ``g + c`` differ, so a merge across the boundary is scored correctly). This is the canonical-encoding
approximation of the byte-level marginal (which would sum over every segmentation of ``c``); it needs one small
forward per candidate and no vocabulary mapping. The fused score of candidate ``c`` is

    s(c) = log p_base(c) + α · (log p_E(c | text) − log p_A(c | text))     over the base's top k,

and the next token is ``argmax_c s(c)`` (greedy) or a draw from ``softmax(s / T)`` over the candidates after
top-k / top-p (``decoding.sampling``, the engine's order: temperature -> top-k -> top-p -> categorical), with
one key per row, ``fold_in(fold_in(key(seed), row_id), t)`` (the engine's convention: a prompt's sample depends
on the seed, its row id and the step only, never on its batch).

The base's EOS maps to the small models' EOS (scored as their EOS token at the current position). Each small
model's stream is always its own tokenizer's encoding of the prompt and of the text (re-encoded every step,
full forward, no KV cache); the base reads its own chosen token ids, so at α = 0 the output is exactly the
base's own greedy decoding. The generated text is kept as bytes: a candidate that only adds part of a UTF-8
character (a byte token of a byte-level BPE), or a special token, adds no text yet, so the pair gives it no
offset (it keeps the base's score) and the small streams see the character once it is whole. The small
tokenizer must round-trip the text (``decode(encode(text)) == text``: any byte-level BPE); otherwise the
alignment fails with an error naming the position and the fix. The support is the base's top k: with a local
base pass ``k = V`` for full-logit proxy-tuning (the toy world showed a dropped tail loses the gain when the
tokens the pair needs are outside the top k, README *A base out of reach*).

Batching: the prompts of a batch decode together, rows finishing independently (EOS, ``max_new_tokens`` or a
stop string); per step the base is asked once for the live rows and every live row's candidates are scored in
one chunked, jitted forward per small model. The loop over steps runs on the host (the base is outside jit; the
declared exception to "no Python loops over tokens", as in ``decoding.blackbox``).

Measured in the toy world (``experiments/toyworld_cross_tokenizer.py``, README *A base out of reach*; world
seeds 0-2, α = 1): base-large on the word-level tokenizer with a small pair on a byte-level BPE reaches 0.668 ±
0.075 accuracy against 0.773 ± 0.063 with the same-tokenizer pair (base-large alone 0.095 ± 0.036); most lost
answers part ways at a candidate the small tokenizer splits into several pieces, whose summed log-ratio is large.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxytune_jax.decoding import alpha_control, fusion
from proxytune_jax.decoding.prompts import bucket_length, encode_prompt
from proxytune_jax.decoding.sampling import SamplingParams, choose_tokens, fold_in
from proxytune_jax.decoding.stopping import trim_at_stop
from proxytune_jax.errors import UserError

TOKENS_PER_CALL = 1 << 15  # rows × width of one scoring forward (the candidates of a step come in chunks)


@functools.lru_cache(maxsize=16)
def _token_logprobs_fn(graphdef):
    def f(params, ids):
        logits, _ = nnx.merge(graphdef, params)(ids)  # [R, W, V]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        return jnp.take_along_axis(lp, nxt[..., None], axis=-1)[..., 0]  # [R, W]: log p(ids[t+1] | ids[:t+1])
    return jax.jit(f)


def _round_trip_error(text: str, back: str, where: str) -> UserError:
    pos = next((i for i, (x, y) in enumerate(zip(back, text)) if x != y), min(len(back), len(text)))
    return UserError(f"{where or 'text'}: the small models' tokenizer does not round-trip the text at "
                     f"character {pos} ({text[max(0, pos - 10):pos + 10]!r} came back as "
                     f"{back[max(0, pos - 10):pos + 10]!r}); cross-tokenizer fusion aligns through text, so "
                     "use small models with a byte-level tokenizer (every string encodes)")


def encode_texts(tokenizer, texts: Sequence[str], wheres: Sequence[str] | None = None) -> list[list[int]]:
    """The canonical encodings of ``texts`` (no special tokens), checked to round-trip
    (``decode(encode(text)) == text``, else an error naming ``wheres[i]`` and the character)."""
    todo = [t for t in texts if t]
    ids = list(tokenizer(todo, add_special_tokens=False)["input_ids"]) if todo else []
    backs = tokenizer.batch_decode(ids, skip_special_tokens=False) if ids else []
    out, j = [], 0
    for i, t in enumerate(texts):
        if not t:
            out.append([])
            continue
        if backs[j] != t:
            raise _round_trip_error(t, backs[j], wheres[i] if wheres else "")
        out.append(list(ids[j]))
        j += 1
    return out


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
        return list(prompt_ids) + encode_texts(self.tokenizer, [text], [where])[0]

    def sequence_logprobs(self, seqs: Sequence[list[int]], starts: Sequence[int]) -> np.ndarray:
        """``[R]``: Σ_{t ≥ start} log p(seq[t] | seq[:t]) for each sequence (padded, jitted forwards of at most
        :data:`TOKENS_PER_CALL` tokens; rows and width rounded up to powers of two so shapes repeat)."""
        longest = max(len(s) for s in seqs)
        if longest > self.context:
            raise UserError(f"a stream of {longest} tokens exceeds the small model's context of {self.context}; "
                            "lower --max-new-tokens or shorten the prompt")
        width = bucket_length(longest, cap=self.context)
        per_call = 1 << max(0, (TOKENS_PER_CALL // width).bit_length() - 1)  # a power of two
        # one row count per width: a full chunk, or the next power of two when everything fits in less
        rows = per_call if len(seqs) > per_call else bucket_length(len(seqs), min_bucket=8)
        fn = _token_logprobs_fn(self.graphdef)
        out = np.zeros(len(seqs))
        for lo in range(0, len(seqs), per_call):
            part = seqs[lo:lo + per_call]
            batch = np.zeros((rows, width), np.int32)
            for i, s in enumerate(part):
                batch[i, :len(s)] = s
            lp = np.asarray(fn(self.params, jnp.asarray(batch)), np.float64)[:len(part)]  # [R, W]
            pos = np.arange(width)[None, :]
            st = np.asarray(starts[lo:lo + per_call])[:, None]
            n = np.asarray([len(s) for s in part])[:, None]
            out[lo:lo + len(part)] = np.where((pos >= st - 1) & (pos < n - 1), lp, 0.0).sum(axis=1)
        return out

    def continuation_logprobs_batch(self, requests: Sequence[tuple[list[int], list[int], list]]) -> list[np.ndarray]:
        """``requests[r] = (prompt_ids, text_ids, cont_ids)``: the encoded prompt, the encoding of the text so far
        and, per continuation ``c``, the encoding of ``text + c`` (``None``: this model's EOS). Returns, per
        request, ``[C]`` log p(c | prompt, text), all requests scored in one chunked pass."""
        seqs, starts, olds, counts = [], [], [], []
        for prompt_ids, text_ids, conts in requests:
            base = list(prompt_ids) + list(text_ids)
            for c in conts:
                s = base + [self.eos_id] if c is None else list(prompt_ids) + list(c)
                p = len(prompt_ids)
                while p < min(len(s), len(base)) and s[p] == base[p]:
                    p += 1
                seqs.append(s)
                starts.append(p)
                olds.append(base)
            counts.append(len(conts))
        if not seqs:
            return [np.zeros(0) for _ in requests]
        lp = self.sequence_logprobs(seqs, starts)
        # the part of the old stream that a continuation re-segmented (empty in the usual case)
        redo = [i for i, (p, b) in enumerate(zip(starts, olds)) if p < len(b)]
        if redo:
            lp[redo] -= self.sequence_logprobs([olds[i] for i in redo], [starts[i] for i in redo])
        return list(np.split(lp, np.cumsum(counts)[:-1]))

    def continuation_logprobs(self, prompt_ids: list[int], text: str, conts: Sequence[str | None],
                              where: str = "") -> np.ndarray:
        """``[C]`` log p(c | prompt, text) for each continuation string; ``None`` means this model's EOS."""
        texts = [text] + [text + c for c in conts if c is not None]
        enc = encode_texts(self.tokenizer, texts, [where] * len(texts))
        it = iter(enc[1:])
        cont_ids = [None if c is None else next(it) for c in conts]
        return self.continuation_logprobs_batch([(prompt_ids, enc[0], cont_ids)])[0]


@dataclasses.dataclass
class CrossCompletion:
    prompt: str
    completion: str
    base_token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Row:
    """One prompt's decoding state on the host."""

    prompt: str
    base_ids: list[int]  # the base's encoded prompt
    expert_ids: list[int]  # the expert's encoded prompt (its chat template if asked)
    anti_ids: list[int]
    raw: bytes = b""  # the generated text's bytes
    chosen: list = dataclasses.field(default_factory=list)  # the base's chosen ids
    reason: str | None = None  # set when the row finishes


@jax.jit
def _sample_candidates(scores, sampling, keys, t):
    """scores [R, k] (fused, -inf on empty slots), keys [R] typed -> [R] candidate index drawn per row."""
    return choose_tokens(scores, sampling, fold_in(keys, t))


class CrossTokenizerGenerator:
    """Proxy-tuning of ``base`` (a ``TopKBase`` over ``base_tokenizer``) with an expert / anti-expert pair on
    another tokenizer (``small_tokenizer``), batched, greedy or sampled. ``alpha`` may carry a per-token schedule
    / gate (:mod:`alpha_control`; the gate reads the pair's distributions over the base's candidates)."""

    def __init__(self, base, base_tokenizer, expert, anti_expert, small_tokenizer, *,
                 expert_chat_template: bool = False):
        self.base, self.base_tok = base, base_tokenizer
        self.small_tok = small_tokenizer
        self.expert = TextScorer(expert, small_tokenizer, chat_template=expert_chat_template)
        self.anti = TextScorer(anti_expert, small_tokenizer)
        self.base_eos = {int(base_tokenizer.eos_token_id)} if base_tokenizer.eos_token_id is not None else set()
        self._table: list[bytes] | None = None
        if self.base_eos and self.expert.eos_id is None:
            raise UserError("the small models' tokenizer has no EOS token; the base's EOS cannot be aligned")

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                 fusion_params: dict | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, stop_strings: Sequence[str] = (), row_ids: Sequence[int] | None = None,
                 progress=None) -> list[CrossCompletion]:
        """Completions of ``prompts``, ``batch_size`` rows at a time. ``temperature == 0`` is greedy; otherwise
        row ``b`` samples with the key ``(seed, row_ids[b])`` (default: its index in ``prompts``), so its output
        does not depend on the batch size or its place in the batch. ``stop_strings`` end a row at the first
        one (cut from the completion)."""
        if max_new_tokens < 1 or batch_size < 1:
            raise UserError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
        if not (temperature >= 0 and np.isfinite(temperature)) or top_k < 0 or not 0 < top_p <= 1:
            raise UserError(f"temperature must be finite and >= 0, top_k >= 0 and top_p in (0, 1]; got "
                            f"{temperature}, {top_k}, {top_p}")
        rows = list(range(len(prompts))) if row_ids is None else [int(r) for r in row_ids]
        if len(rows) != len(prompts):
            raise UserError(f"row_ids must give one id per prompt ({len(prompts)}), got {len(rows)}")
        fp = {k: np.asarray(v) for k, v in fusion.resolve_params("proxy_tuning", fusion_params).items()}
        sampling = SamplingParams.create(self.base.k, temperature=temperature, top_k=top_k, top_p=top_p)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.asarray(rows, jnp.uint32))
        out: list[CrossCompletion] = []
        for lo in range(0, len(prompts), batch_size):
            hi = min(lo + batch_size, len(prompts))
            out += self._decode_batch(list(prompts[lo:hi]), keys[lo:hi], max_new_tokens, fp, sampling,
                                      float(temperature) > 0, [s for s in stop_strings if s])
            if progress is not None:
                progress(1)
        return out

    def _decode_batch(self, prompts, keys, n, fp, sampling, sample, stops) -> list[CrossCompletion]:
        rows = [_Row(p, encode_prompt(self.base_tok, p),
                     encode_prompt(self.small_tok, p, chat_template=self.expert.chat_template),
                     encode_prompt(self.small_tok, p)) for p in prompts]
        k = self.base.k
        for t in range(n):
            live = [i for i, r in enumerate(rows) if r.reason is None]
            if not live:
                break
            texts = [whole_chars(rows[i].raw) for i in live]  # the text so far, without a partial character
            top = self.base.topk([rows[i].prompt + x for i, x in zip(live, texts)],
                                 [rows[i].base_ids + rows[i].chosen for i in live])
            ids, lps = np.asarray(top.ids), np.asarray(top.logp, np.float64)
            if ids.shape != (len(live), k) or lps.shape != (len(live), k):
                raise UserError(f"step {t}: the base returned top-k lists of shape {ids.shape} / {lps.shape}, "
                                f"expected ({len(live)}, {k}) (one list of k = {k} per live row); check its k")
            scores = self._fused_scores([rows[i] for i in live], texts, ids, lps, t, fp)  # [L, k]
            if sample:
                width = bucket_length(len(live), min_bucket=1)  # rows padded to a power of two: few compiles
                padded = np.zeros((width, k), np.float32)
                padded[:len(live)] = scores
                live_keys = keys[jnp.asarray(live + [live[0]] * (width - len(live)))]
                pick = np.asarray(_sample_candidates(jnp.asarray(padded), sampling, live_keys, jnp.int32(t)))
            else:
                pick = np.argmax(scores, axis=1)  # float64 on the host
            for q, i in enumerate(live):
                self._append(rows[i], int(ids[q, pick[q]]), t, n, stops)
        return [self._completion(r, stops) for r in rows]

    def _fused_scores(self, rows, texts, ids, lps, t, fp) -> np.ndarray:
        """``[L, k]`` fused scores of the live rows' candidates (``-inf`` on empty slots, id ``-1``)."""
        conts: list[list] = []  # per row and slot: None (EOS), "" (no whole character yet), a string, or False
        for r, text, row_ids in zip(rows, texts, ids):
            cs = []
            for i in row_ids:
                i = int(i)
                if i < 0:
                    cs.append(False)
                elif i in self.base_eos:
                    cs.append(None)
                else:
                    cs.append(whole_chars(r.raw + self._bytes(i))[len(text):])
            conts.append(cs)
        valid = np.asarray([[c is not False for c in cs] for cs in conts])
        if not valid.any(axis=1).all():
            raise UserError(f"step {t}: the base returned no token id for a row; check the base's answers")
        scored = np.asarray([[c is None or bool(c) for c in cs] for cs in conts])  # [L, k]
        lp_e = np.zeros(ids.shape)
        lp_a = np.zeros(ids.shape)
        if scored.any():
            # one encoding per distinct text (expert and anti-expert share the tokenizer), round-trip checked
            wheres: dict[str, str] = {}  # each distinct text -> where it first occurs (insertion-ordered)
            for r, text, cs in zip(rows, texts, conts):
                for x in [text] + [text + c for c in cs if c]:
                    wheres.setdefault(x, f"prompt {r.prompt[:40]!r}, generated token {t}")
            enc = dict(zip(wheres, encode_texts(self.small_tok, list(wheres), list(wheres.values()))))
            for scorer, prompt_of, out in ((self.expert, "expert_ids", lp_e), (self.anti, "anti_ids", lp_a)):
                reqs = [(getattr(r, prompt_of), enc[text],
                         [None if c is None else enc[text + c] for c in cs if c is None or c])
                        for r, text, cs in zip(rows, texts, conts)]
                for q, got in enumerate(scorer.continuation_logprobs_batch(reqs)):
                    out[q, scored[q]] = got
        offset = np.where(scored, lp_e - lp_a, 0.0)
        alpha = np.full((len(rows),), float(fp["alpha"]))
        if alpha_control.is_active(fp):
            e, a = _normalize(lp_e, scored), _normalize(lp_a, scored)
            alpha = np.asarray(alpha_control.effective_alpha(fp, jnp.asarray(e), jnp.asarray(a), t)[:, 0],
                               np.float64)
        fused = lps + np.where(alpha[:, None] != 0, alpha[:, None] * offset, 0.0)
        return np.where(valid, fused, -np.inf)

    def _append(self, row: _Row, tok: int, t: int, n: int, stops) -> None:
        row.chosen.append(tok)
        if tok in self.base_eos:
            row.reason = "eos"
            return
        row.raw += self._bytes(tok)
        if stops and trim_at_stop(whole_chars(row.raw), stops)[1]:
            row.reason = "stop"
        elif t == n - 1:
            row.reason = "length"

    def _completion(self, row: _Row, stops) -> CrossCompletion:
        text = row.raw.decode("utf-8", errors="replace")
        if stops:
            text = trim_at_stop(text, stops)[0]
        return CrossCompletion(row.prompt, text, list(row.chosen), row.reason or "length")

    def _bytes(self, i: int) -> bytes:
        if self._table is None:
            from proxytune_jax.decoding.stopping import token_byte_table
            table, lens = token_byte_table(self.base_tok, len(self.base_tok))
            self._table = [bytes(table[j, :lens[j]].astype(np.uint8).tolist()) for j in range(len(lens))]
        return self._table[i] if i < len(self._table) else b""


def whole_chars(raw: bytes) -> str:
    """The complete UTF-8 characters of ``raw`` (a trailing partial character left out; invalid bytes -> U+FFFD)."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=False)


def _normalize(lp: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """``[L, k]`` log-probs renormalized over each row's scored candidates (the gate's distributions; ``-inf``
    elsewhere, a uniform row where nothing is scored: its offset is zero anyway)."""
    x = np.where(scored, lp, -np.inf)
    m = np.max(np.where(scored, lp, -np.inf), axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = m + np.log(np.maximum(np.exp(x - m).sum(axis=1, keepdims=True), 1e-300))
    out = np.where(scored, x - z, -np.inf)
    return np.where(scored.any(axis=1, keepdims=True), out, -np.log(lp.shape[1])).astype(np.float32)


__all__ = ["CrossCompletion", "CrossTokenizerGenerator", "TextScorer", "encode_texts", "whole_chars"]
