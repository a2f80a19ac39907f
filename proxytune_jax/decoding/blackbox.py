"""Proxy-tuning a base that is out of reach: a **black-box base** known only through its top-k log-probs.

The base is anything behind the small :class:`TopKBase` protocol -- ``topk(texts, ids) -> TopK [B, k]``: the
next-token top k of each prefix (``texts[b]``: the prompt plus the text generated so far; ``ids[b]``: the same
prefix as base-tokenizer ids, for implementations that can take ids). Three implementations:

* :class:`LocalTopKBase` -- a local model reduced to its top k (tests; measures what k loses). By default it
  reads the exact token ids; ``from_text=True`` re-encodes the text, as a server does.
* :class:`OpenAICompletionsBase` -- an OpenAI-compatible ``/v1/completions`` server (vLLM, ...): one request per
  step for the batch (``prompt`` = the list of prefix texts, ``max_tokens=1``, ``logprobs=k``, ``echo=false``,
  ``temperature=0``), a response cache keyed by prefix text, retries with exponential backoff; ``urllib`` only.
* :class:`ReplayTopKBase` -- recorded responses (JSONL, one ``{"prefix", "ids", "logprobs", "tokens"}`` per
  prefix), written by :class:`RecordingTopKBase` around any other base; a prefix not in the file is an error
  naming it.

API token strings become ids through ``training.recorded_teacher.token_id_map`` (bytes, raw token, unique decoded
text). Decoding (:class:`BlackBoxGenerator`): the base is queried **outside jit, once per step** for the live
rows (the declared exception to "no Python loops over tokens"); the small expert / anti-expert pair runs in one
jitted step with KV caches (prefill, then per step: fuse, choose, stop, append), batched. The base's TopK becomes a
dense ``[B, V]`` log-prob row through ``TopK.to_log_probs(V, tail=...)``:

* ``tail="uniform"`` -- the tail mass ``1 − Σ_top-k p`` spread evenly over the unlisted ids; the small pair's
  offset can still promote an unlisted token.
* ``tail="drop"`` -- the support restricted to the base's top k (renormalized); proxy-tuning only re-ranks them.

``DEFAULT_TAIL`` is ``uniform``, chosen by ``experiments/toyworld_blackbox.py`` (README, *A base out of reach*):
over world seeds 0-2 (V = 67, α = 1), ``uniform`` stays within the seed spread of full logits from k = 2 on
(k = 1: −0.015 ± 0.018 accuracy), while ``drop`` falls to the base alone (−0.68 to −0.71 at every k ≤ 20): the
tokens proxy-tuning needs are often outside the untuned base's top k. With ``k = V`` both equal full logits.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxytune_jax.decoding import fusion
from proxytune_jax.decoding.engine import Decoder, _run_groups, stack_caches
from proxytune_jax.decoding.prompts import bucket_length, encode_prompt, left_pad
from proxytune_jax.decoding.sampling import SamplingParams, choose_tokens, fold_in
from proxytune_jax.decoding.stopping import (EOS, LENGTH, RUNNING, STOP_STRING, FINISH_REASONS, init_byte_window,
                                             is_eos, make_stop_criteria, push_and_match, trim_at_stop)
from proxytune_jax.errors import UserError
from proxytune_jax.topk import TAILS, TopK

DEFAULT_TAIL = "uniform"


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else "…" + text[-n:])


class TopKBase(Protocol):
    """A next-token distribution known by its top k. ``topk`` returns ``TopK`` with ids ``[B, k]`` (base
    tokenizer ids, ``-1`` for an empty slot) and full-vocabulary log-probs ``[B, k]`` (NumPy)."""

    k: int

    def topk(self, texts: Sequence[str], ids: Sequence[Sequence[int]]) -> TopK: ...


# ------------------------------------------------------------------------------------------------ local


@functools.lru_cache(maxsize=16)
def _last_logits_fn(graphdef):
    def f(params, ids, last):
        logits, _ = nnx.merge(graphdef, params)(ids)  # [B, L, V]; right-padded: causal, pads come after
        return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return jax.jit(f)


class LocalTopKBase:
    """A local model reduced to its top ``k`` next-token log-probs (a full forward per step, no cache; prefixes
    right-padded to a bucketed length). ``from_text``: encode ``texts`` with ``tokenizer`` (as a server does)
    instead of reading ``ids``. ``vocab_size``: the id range kept (default: the tokenizer's)."""

    def __init__(self, model, tokenizer, k: int, *, from_text: bool = False, vocab_size: int | None = None):
        self.graphdef, self.params = nnx.split(model)
        self.tokenizer, self.k, self.from_text = tokenizer, int(k), from_text
        self.vocab_size = int(vocab_size or min(len(tokenizer), model.config.vocab_size))
        self.context = int(model.config.max_position_embeddings)
        if not 1 <= self.k <= self.vocab_size:
            raise UserError(f"k must lie in [1, {self.vocab_size}], got {k}")

    def logits(self, texts, ids) -> np.ndarray:
        """``[B, V]`` next-token logits of each prefix."""
        out, n = self._padded_logits(texts, ids)
        return np.asarray(out)[:n]

    def _padded_logits(self, texts, ids):
        """(``[R, V]`` logits on the device, rows padded to a power of two R ≥ B, B)."""
        seqs = [encode_prompt(self.tokenizer, t) for t in texts] if self.from_text else [list(s) for s in ids]
        width = bucket_length(max(len(s) for s in seqs), cap=self.context)
        if width > self.context:
            raise UserError(f"a prefix of {width} tokens exceeds the base's context of {self.context}; lower "
                            "--max-new-tokens or shorten the prompt")
        rows = bucket_length(len(seqs), min_bucket=1)  # rows padded to a power of two: few compiles as rows finish
        batch = np.zeros((rows, width), np.int32)
        for b, s in enumerate(seqs):
            batch[b, :len(s)] = s
        last = np.zeros((rows,), np.int32)
        last[:len(seqs)] = [len(s) - 1 for s in seqs]
        return _last_logits_fn(self.graphdef)(self.params, jnp.asarray(batch), jnp.asarray(last)), len(seqs)

    def topk(self, texts, ids) -> TopK:
        logits, n = self._padded_logits(texts, ids)
        top = TopK.from_logits(logits[:, :self.vocab_size], self.k)  # on the padded rows: one compile per bucket
        return TopK(np.asarray(top.ids)[:n], np.asarray(top.logp)[:n])


# ---------------------------------------------------------------------------------------------- parsing


class TokenMapper:
    """API token strings -> ids of ``tokenizer`` (``recorded_teacher.token_id_map``), and back for records."""

    def __init__(self, tokenizer):
        from proxytune_jax.training.recorded_teacher import token_id_map
        self.tokenizer = tokenizer
        self.maps = token_id_map(tokenizer)

    def to_id(self, token: str, token_bytes=None) -> int | None:
        from proxytune_jax.training.recorded_teacher import _to_id
        return _to_id(token, token_bytes, self.maps)


def alternatives_to_topk(alts: Sequence[tuple[str, float]], k: int, mapper: TokenMapper, where: str):
    """``[(token string, logprob)]`` (any order) -> ``(ids [k], logp [k])`` descending. More than ``k`` entries
    (servers add the sampled token: up to ``k + 1``) keep the top ``k``; fewer is an error; so is a string
    that maps to no id."""
    alts = sorted(((str(t), float(lp)) for t, lp in alts), key=lambda x: -x[1])
    if len(alts) < k:
        raise UserError(f"{where}: {len(alts)} top-logprob entries, but k = {k}; lower --base-topk to "
                        f"{max(len(alts), 1)} or less (a server caps it, e.g. vLLM --max-logprobs, OpenAI 20)")
    ids, lps = [], []
    for tok, lp in alts:
        i = mapper.to_id(tok)
        if i is None:
            raise UserError(f"{where}: the API token {tok!r} is not a token of the base tokenizer; pass the "
                            "tokenizer of the served model (--target) so its strings map to ids")
        if i in ids:  # two strings of one id: keep the larger
            continue
        ids.append(i)
        lps.append(lp)
        if len(ids) == k:
            break
    if len(ids) < k:
        raise UserError(f"{where}: only {len(ids)} distinct tokens among the top-logprob entries, k = {k}; lower "
                        "--base-topk")
    if not all(np.isfinite(lps)) or max(lps) > 1e-3:
        raise UserError(f"{where}: log-probs must be finite and <= 0, got {lps}")
    return np.asarray(ids, np.int32), np.minimum(np.asarray(lps, np.float32), 0.0)


# --------------------------------------------------------------------------------------------- HTTP API


class OpenAICompletionsBase:
    """An OpenAI-compatible completions server (``{url}/v1/completions``). ``tokenizer``: the served model's.

    One POST per step for all uncached prefixes; a response cache keyed by prefix text (a prefix is asked once);
    ``retries`` retries with backoff ``backoff · 2^i`` seconds on connection errors, timeouts, 429 and 5xx."""

    def __init__(self, url: str, model: str, tokenizer, k: int, *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, api_key: str | None = None):
        if not 1 <= int(k) <= 20:
            raise UserError(f"--base-topk must lie in [1, 20] (the OpenAI API's top_logprobs cap), got {k}")
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1/completions"):
            self.url += "/completions" if self.url.endswith("/v1") else "/v1/completions"
        self.model, self.k, self.timeout, self.retries, self.backoff = model, int(k), timeout, retries, backoff
        self.api_key = api_key
        self.mapper = TokenMapper(tokenizer)
        self.cache: dict[str, tuple[np.ndarray, np.ndarray, list]] = {}
        self.requests = 0

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                self.requests += 1
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code}: {detail}"
                    continue
                raise UserError(f"{self.url} refused the request (HTTP {e.code}: {detail}); check --base-model "
                                f"{self.model!r} and that the server serves completions with logprobs") from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError:
                raise UserError(f"{self.url} answered with something that is not JSON; is --base-api the "
                                "server's base URL (e.g. http://localhost:8000)?") from None
        raise UserError(f"could not reach the base at {self.url} after {self.retries + 1} tries ({last}); start the "
                        "server or fix --base-api, or replay recorded responses with --base-replay FILE")

    def topk(self, texts, ids=None) -> TopK:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            resp = self._post({"model": self.model, "prompt": todo, "max_tokens": 1, "logprobs": self.k,
                               "echo": False, "temperature": 0.0})
            choices = resp.get("choices") if isinstance(resp, dict) else None
            if not isinstance(choices, list) or len(choices) != len(todo):
                raise UserError(f"{self.url}: expected {len(todo)} choices (one per prompt), got "
                                f"{len(choices) if isinstance(choices, list) else choices!r}")
            for pos, ch in enumerate(choices):
                j = ch.get("index", pos) if isinstance(ch, dict) else -1
                if not isinstance(j, int) or not 0 <= j < len(todo):
                    raise UserError(f"{self.url}: choice {pos} has no valid \"index\" for {len(todo)} prompts; the "
                                    "server must answer an OpenAI completions request with one choice per prompt")
                where = f"{self.url} answer for prefix {_short(todo[j])}"
                try:
                    first = ch["logprobs"]["top_logprobs"][0]
                except (KeyError, IndexError, TypeError):
                    raise UserError(f"{where}: no logprobs.top_logprobs[0]; the server must support completions "
                                    "with logprobs=k") from None
                alts = list((first or {}).items())
                i, lp = alternatives_to_topk(alts, self.k, self.mapper, where)
                self.cache[todo[j]] = (i, lp, [[t, float(v)] for t, v in alts])
        return TopK(np.stack([self.cache[t][0] for t in texts]), np.stack([self.cache[t][1] for t in texts]))

    def tokens_of(self, text: str) -> list:
        return self.cache[text][2]


# --------------------------------------------------------------------------------------- record / replay


class RecordingTopKBase:
    """Wraps a base; every prefix it answers is kept and :meth:`save` writes them (plus any rows already in
    ``path``) as JSONL, atomically: ``{"prefix", "ids", "logprobs", "tokens"}`` per line."""

    def __init__(self, inner: TopKBase, path: str | Path, tokenizer):
        self.inner, self.path, self.tokenizer, self.k = inner, Path(path), tokenizer, inner.k
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            self.rows = {r["prefix"]: r for r in _read_replay(self.path)}

    def topk(self, texts, ids) -> TopK:
        top = self.inner.topk(texts, ids)
        for b, t in enumerate(texts):
            i = [int(x) for x in np.asarray(top.ids[b])]
            self.rows[t] = {"prefix": t, "ids": i, "logprobs": [float(x) for x in np.asarray(top.logp[b])],
                            "tokens": self.tokenizer.convert_ids_to_tokens([max(x, 0) for x in i])}
        return top

    def save(self) -> Path:
        from proxytune_jax.atomic import open_atomic
        with open_atomic(self.path) as f:
            for r in self.rows.values():
                f.write(json.dumps({k: v for k, v in r.items() if k != "_line"}, ensure_ascii=False) + "\n")
        return self.path


def _read_replay(path: Path) -> list[dict]:
    from proxytune_jax.jsonl import iter_jsonl
    rows = []
    for n, row in iter_jsonl(path, what="base replay file", example='{"prefix": "...", "ids": [...], '
                                                                    '"logprobs": [...]}'):
        if not isinstance(row, dict) or not isinstance(row.get("prefix"), str) or not isinstance(
                row.get("logprobs"), list) or not (isinstance(row.get("ids"), list) or
                                                   isinstance(row.get("tokens"), list)):
            raise UserError(f"{path}:{n}: each line needs \"prefix\" (text), \"logprobs\" and \"ids\" or \"tokens\" "
                            "lists; record the file with --base-record")
        rows.append({**row, "_line": n})
    return rows


class ReplayTopKBase:
    """Answers from a file written by :class:`RecordingTopKBase` (ids, or API token strings mapped through
    ``tokenizer``). A prefix not in the file, or a row with fewer than ``k`` entries, is an error naming it."""

    def __init__(self, path: str | Path, tokenizer, k: int):
        self.path, self.k = Path(path), int(k)
        if not self.path.is_file():
            raise UserError(f"--base-replay {self.path} does not exist; record it first with --base-record")
        self.mapper = TokenMapper(tokenizer)
        self.vocab = len(tokenizer)
        self.rows = {r["prefix"]: r for r in _read_replay(self.path)}

    def _row(self, text):
        r = self.rows.get(text)
        if r is None:
            raise UserError(f"--base-replay {self.path}: no recorded answer for the prefix {_short(text)}; record "
                            "it (run once against the API with --base-record FILE) or replay the same prompts, "
                            "--max-new-tokens and settings as the recording")
        where = f"{self.path}:{r['_line']}"
        lps = r["logprobs"]
        if len(lps) < self.k:
            raise UserError(f"{where}: {len(lps)} log-probs for k = {self.k}; replay with --base-topk {len(lps)}")
        if "ids" in r:
            ids = [int(i) for i in r["ids"]]
            if len(ids) != len(lps) or any(not 0 <= i < self.vocab for i in ids):
                raise UserError(f"{where}: \"ids\" must be as long as \"logprobs\" and lie in [0, {self.vocab})")
            return np.asarray(ids[:self.k], np.int32), np.asarray(lps[:self.k], np.float32)
        return alternatives_to_topk(list(zip(r["tokens"], lps)), self.k, self.mapper, where)

    def topk(self, texts, ids=None) -> TopK:
        got = [self._row(t) for t in texts]
        return TopK(np.stack([g[0] for g in got]), np.stack([g[1] for g in got]))


# ------------------------------------------------------------------------------------------------ decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    tokens: jax.Array  # [B, N]
    num: jax.Array  # [B]
    finished: jax.Array  # [B]
    reason: jax.Array  # [B]
    window: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdefs", "groups"), donate_argnames=("caches",))
def _prefill(params, ids, masks, caches, *, graphdefs, groups):
    group_caches = [caches[m[0]] if len(m) == 1 else stack_caches([caches[i] for i in m]) for m in groups]
    logits, new = _run_groups(graphdefs, params, groups, ids, masks, group_caches, shared_input=False)
    return logits, tuple(new)


@functools.partial(jax.jit, static_argnames=("graphdefs", "groups", "vocab_size", "tail", "pad_id"),
                   donate_argnames=("caches", "state"))
def _step(params, caches, small_logits, base_ids, base_logp, valid, fusion_params, sampling, stop, key, t, state,
          *, graphdefs, groups, vocab_size, tail, pad_id):
    """One step: base TopK -> dense, fuse with the small pair, choose, update stopping, append to the pair."""
    base_ids = jnp.where((base_ids >= 0) & (base_ids < vocab_size), base_ids, -1)
    dense = TopK(base_ids, jnp.where(base_ids >= 0, base_logp, -jnp.inf)).to_log_probs(vocab_size, tail=tail)
    dense = jnp.where(valid[:, None], dense, 0.0)  # rows without a base answer (finished): anything finite
    sliced = [dense] + [x[:, :vocab_size].astype(jnp.float32) for x in small_logits]
    scores = fusion.combine("proxy_tuning", sliced, fusion_params, t)
    token = choose_tokens(scores, sampling, fold_in(key, t))
    n = state.tokens.shape[1]
    finished = state.finished
    token = jnp.where(finished, pad_id, token)
    tokens = state.tokens.at[:, t].set(token)
    eos_hit = is_eos(token, stop) & ~finished
    window, stop_hit = push_and_match(state.window, token, stop)
    stop_hit = stop_hit & ~finished & ~eos_hit
    len_hit = (t == n - 1) & ~finished & ~eos_hit & ~stop_hit
    reason = jnp.where(eos_hit, EOS, jnp.where(stop_hit, STOP_STRING, jnp.where(len_hit, LENGTH, state.reason)))
    num = state.num + (~finished).astype(jnp.int32)
    state = _State(tokens, num, finished | eos_hit | stop_hit | len_hit, reason, window)
    ones = jnp.ones((token.shape[0], 1), bool)
    lgs, caches = _run_groups(graphdefs, params, groups, token[:, None], ones, list(caches), shared_input=True)
    return token, lgs, tuple(caches), state


@dataclasses.dataclass
class BlackBoxCompletion:
    prompt: str
    completion: str
    token_ids: list[int]
    finish_reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class BlackBoxGenerator:
    """Proxy-tuning ``base`` (a :class:`TopKBase`) with a local ``expert`` / ``anti_expert`` pair that shares
    the base's tokenizer. ``tail``: the treatment of the ids outside the base's top k (module doc).
    ``expert_chat_template``: the expert reads its prompt through the chat template (as in the paper)."""

    def __init__(self, base: TopKBase, expert, anti_expert, tokenizer, *, tail: str = DEFAULT_TAIL,
                 expert_chat_template: bool = False, eos_ids: Sequence[int] | None = None):
        if tail not in TAILS:
            raise UserError(f"tail must be one of {TAILS}, got {tail!r}")
        self.base, self.tokenizer, self.tail = base, tokenizer, tail
        self.small = Decoder([expert, anti_expert], "small_large_direct")  # only its params / groups / caches
        self.vocab_size = int(min(len(tokenizer), expert.config.vocab_size, anti_expert.config.vocab_size))
        self.chat = [expert_chat_template, False]
        from proxytune_jax.decoding.pipeline import eos_ids_for
        self.eos_ids = list(eos_ids) if eos_ids is not None else sorted(
            {e for m in (expert, anti_expert) for e in eos_ids_for(m.config, tokenizer)})
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0])
        self.contexts = [int(m.config.max_position_embeddings) for m in (expert, anti_expert)]

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                 fusion_params: dict | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, stop_strings: Sequence[str] = (), progress=None) -> list[BlackBoxCompletion]:
        fp = fusion.resolve_params("proxy_tuning", fusion_params)
        sampling = SamplingParams.create(self.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p)
        stop = make_stop_criteria(self.eos_ids, stop_strings, self.tokenizer, self.vocab_size)
        base_prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        streams = [[encode_prompt(self.tokenizer, p, chat_template=c) for p in prompts] for c in self.chat]
        lengths = [bucket_length(max(len(s) for s in ss), cap=ctx - max_new_tokens)
                   for ss, ctx in zip(streams, self.contexts)]
        out: list[BlackBoxCompletion] = []
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            rows = idx + [idx[-1]] * (batch_size - len(idx))
            res = self._decode_batch([prompts[r] for r in rows], [base_prompt_ids[r] for r in rows],
                                     [left_pad([s[r] for r in rows], n, self.pad_id) for s, n in zip(streams, lengths)],
                                     rows, max_new_tokens, fp, sampling, stop, seed)
            for j, r in enumerate(idx):
                ids, reason = res[j]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if stop_strings:
                    text, found = trim_at_stop(text, stop_strings)
                    reason = STOP_STRING if found else reason
                out.append(BlackBoxCompletion(prompts[r], text, ids, FINISH_REASONS[reason]))
            if progress is not None:
                progress(1)
        return out

    def _decode_batch(self, prompts, base_ids, batch, rows, n, fp, sampling, stop, seed):
        ids, masks, _, _, stop, keys = self.small._inputs(batch, None, sampling, stop, seed, rows)
        b = ids[0].shape[0]
        caches = self.small.init_caches(b, [x.shape[1] for x in ids], n)
        static = dict(graphdefs=self.small.graphdefs, groups=self.small.groups)
        logits, caches = _prefill(self.small.params, ids, masks, caches, **static)
        state = _State(jnp.full((b, n), self.pad_id, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool),
                       jnp.full((b,), RUNNING, jnp.int32), init_byte_window(b, stop))
        gen = [[] for _ in range(b)]
        finished = np.zeros(b, bool)
        k = self.base.k
        for t in range(n):
            live = [i for i in range(b) if not finished[i]]
            texts = [prompts[i] + self.tokenizer.decode(gen[i], skip_special_tokens=True) for i in live]
            top = self.base.topk(texts, [list(base_ids[i]) + gen[i] for i in live])
            t_ids, t_lp = np.asarray(top.ids), np.asarray(top.logp, np.float32)
            if t_ids.shape != (len(live), k) or t_lp.shape != (len(live), k):
                raise UserError(f"step {t}: the base returned top-k lists of shape {t_ids.shape} / {t_lp.shape}, "
                                f"expected ({len(live)}, {k}) (one list of k = {k} per live row); check its k")
            full_ids = np.zeros((b, k), np.int32)
            full_lp = np.full((b, k), -np.log(k), np.float32)
            full_ids[:] = np.arange(k)
            full_ids[live], full_lp[live] = t_ids, t_lp
            valid = np.zeros(b, bool)
            valid[live] = True
            token, logits, caches, state = _step(
                self.small.params, caches, logits, jnp.asarray(full_ids), jnp.asarray(full_lp), jnp.asarray(valid),
                fp, sampling, stop, keys, jnp.int32(t), state, vocab_size=self.vocab_size, tail=self.tail,
                pad_id=self.pad_id, **static)
            token = np.asarray(token)
            for i in live:
                gen[i].append(int(token[i]))
            finished = np.asarray(state.finished)
            if finished.all():
                break
        num, reason = np.asarray(state.num), np.asarray(state.reason)
        return [(gen[i][: int(num[i])], int(reason[i])) for i in range(b)]


__all__ = ["BlackBoxCompletion", "BlackBoxGenerator", "DEFAULT_TAIL", "LocalTopKBase", "OpenAICompletionsBase",
           "RecordingTopKBase", "ReplayTopKBase", "TokenMapper", "TopKBase", "alternatives_to_topk"]
