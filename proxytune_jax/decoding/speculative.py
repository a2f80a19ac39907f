"""Speculative fused decoding inside one jitted loop: a cheap drafter proposes, the fused models verify.

Any per-token fusion rule (proxy-tuning, DExperts, EFT, contrastive decoding, ..., or ``plain`` with a separate
drafter: ordinary speculative decoding) decodes in **rounds** (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"). Per round and row ``b`` with ``n_b`` tokens generated, the newest one ``y`` not yet
in the fused models' caches:

1. **draft**: the drafter (by default the smallest fused model, e.g. proxy-tuning's expert; or a separate model
   on the same tokenizer) proposes ``d_1..d_k`` with ``k`` one-token forwards on its **own** cache, each
   ``d_i ~ q_i = softmax(process(s^D_i))`` (the sampler's banned ids / temperature / top-k / top-p applied to
   the drafter's logits), or ``argmax`` when greedy;
2. **verify**: every fused model reads ``[y, d_1, .., d_K]`` in ONE ``[B, K + 1]`` forward; position ``i``
   gives the fused scores ``f_i = combine(rule, ..., step = n_b + i)`` (a per-token α schedule or gate sees the
   index of the token it scores) and ``p_i = softmax(process(f_i))``, exactly the distribution the
   non-speculative loop (:mod:`engine`) samples token ``n_b + i`` from;
3. **accept**: greedy: the longest prefix with ``d_{i+1} = argmax f_i``, then ``argmax f_a``; sampling:
   ``d_{i+1}`` accepted with probability ``min(1, p_i(d) / q_{i+1}(d))``, the first rejection at ``a`` replaced
   by a draw from ``norm(max(0, p_a - q_{a+1}))`` and a fully accepted run followed by a bonus draw from
   ``p_k``. The emitted tokens then follow ``p`` exactly (the cited papers' theorem), so greedy output equals
   the non-speculative loop's token for token and sampled output has its distribution;
4. **emit** the ``a_b + 1`` tokens of each row token by token (EOS, stop strings, ``max_new_tokens``; tokens
   after a stop are dropped) and **roll back** every cache per row (:meth:`KVCache.rollback`) so it holds
   exactly the emitted tokens except the newest.

Rows accept different numbers of tokens, so every cache carries one write cursor per row
(:meth:`KVCache.with_row_lengths`). When all ``k`` drafts were accepted the drafter has not read ``d_k``: the
next round's first drafter forward reads ``[d_k, y]`` (``[B, 2]``), otherwise ``[y, pad]`` with the pad masked
out and logits read at index 0 -- one static shape, no wasted cache slot.

``k`` is fixed per call (``draft_len``), or adapted per row (``adaptive=True``): ``k_b`` starts at ``K``,
grows by one (up to ``K``) after a round that accepted all ``k_b`` drafts and shrinks by one (down to 1) after a
round that accepted fewer than ``k_b / 2``; drafting then runs ``max_b k_b`` steps and positions past ``k_b``
are never accepted. Per-row statistics (rounds, drafted, accepted) come back in :class:`SpeculativeStats`.

Sizes: the fused caches need ``L + max_new_tokens + K`` slots, the drafter's ``L_d + max_new_tokens + K + 1``
(:data:`EXTRA_SLOTS` covers both); a finished row keeps its cursors still.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from proxytune_jax.decoding import fusion
from proxytune_jax.decoding.engine import (DecodeOutput, _choose, _forward, _run_groups, stack_caches,
                                           unstack_cache)
from proxytune_jax.decoding.sampling import (NEG_INF, SamplingParams, apply_banned, fold_in, is_row_keys,
                                             process_scores)
from proxytune_jax.decoding.stopping import (EOS, LENGTH, RUNNING, STOP_STRING, StopCriteria, init_byte_window,
                                             is_eos, push_and_match)
from proxytune_jax.errors import UserError
from proxytune_jax.models.cache import KVCache

EXTRA_SLOTS = 2  # cache slots beyond prompt + max_new_tokens + K (the drafter's two-token first step)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeculativeStats:
    """Per row: rounds it took part in, draft tokens proposed to it and accepted by the fused models."""

    rounds: jax.Array  # [B] int32
    drafted: jax.Array  # [B] int32 (rounds * K with a fixed K)
    accepted: jax.Array  # [B] int32



def _probs(scores: jax.Array, sampling: SamplingParams) -> jax.Array:
    """[..., V] scores -> the sampler's distribution (banned -> temperature -> top-k -> top-p -> softmax),
    uniform where every score was removed (as ``sampling.choose_tokens`` falls back)."""
    shape = scores.shape
    final = process_scores(scores.reshape(-1, shape[-1]), sampling)
    final = jnp.where(jnp.all(final == NEG_INF, axis=-1, keepdims=True), 0.0, final)
    return jax.nn.softmax(final, axis=-1).reshape(shape)


def _row_uniform(key, b: int) -> jax.Array:
    if is_row_keys(key):
        return jax.vmap(jax.random.uniform)(key)  # [B]
    return jax.random.uniform(key, (b,))


def _row_categorical(key, logits: jax.Array) -> jax.Array:
    if is_row_keys(key):
        return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _draft_token(scores, sampling, key):
    """Drafter scores [B, V] -> (token [B], q [B, V]): a draw from q when sampling, argmax (banned removed)
    when greedy. q is what acceptance divides by."""
    q = _probs(scores, sampling)
    greedy = jnp.argmax(apply_banned(scores, sampling.banned), axis=-1).astype(jnp.int32)
    drawn = _row_categorical(key, jnp.log(q))
    return jnp.where(sampling.temperature > 0, drawn, greedy), q


def _accept(fused, drafts, q, k_eff, sampling, key):
    """fused [B, K+1, V] scores, drafts [B, K], q [B, K, V], k_eff [B] -> (accepted a [B], token z [B]).

    Greedy: a = longest prefix with d_{i+1} == argmax f_i, z = argmax f_a. Sampling: rejection sampling
    (accept with prob min(1, p/q); residual norm(max(0, p - q)) at the first rejection; bonus p_k)."""
    b, k = drafts.shape
    within = jnp.arange(k)[None, :] < k_eff[:, None]  # [B, K]

    def leading(ok):  # [B, K] bool -> number of leading Trues
        return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)

    def greedy(_):
        g = jnp.argmax(apply_banned(fused, sampling.banned), axis=-1).astype(jnp.int32)  # [B, K+1]
        a = leading((drafts == g[:, :k]) & within)
        return a, jnp.take_along_axis(g, a[:, None], axis=1)[:, 0]

    def sample(_):
        p = _probs(fused, sampling)  # [B, K+1, V]
        p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, K]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]  # [B, K]; > 0: d was drawn from q
        u = jax.vmap(lambda i: _row_uniform(fold_in(key, i), b), out_axes=1)(jnp.arange(k))  # [B, K]
        a = leading((u * q_d < p_d) & within)
        p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V]
        q_a = jnp.take_along_axis(q, jnp.minimum(a, k - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
        resid = jnp.maximum(p_a - q_a, 0.0)
        mass = jnp.sum(resid, axis=-1, keepdims=True)
        rejected = (a < k_eff)[:, None] & (mass > 0)
        dist = jnp.where(rejected, resid / jnp.where(mass > 0, mass, 1.0), p_a)
        z = _row_categorical(fold_in(key, k), jnp.where(dist > 0, jnp.log(dist), NEG_INF))
        return a, z

    return jax.lax.cond(sampling.temperature > 0, sample, greedy, None)


def speculative_loop(graphdefs, params, prompt_ids, prompt_masks, caches, drafter_params, drafter_ids,
                     drafter_mask, drafter_cache, fusion_params, sampling: SamplingParams, stop: StopCriteria, key,
                     adaptive=False, *, drafter_graphdef, rule: str, vocab_size: int, max_new_tokens: int,
                     draft_len: int, pad_id: int = 0, groups: tuple[tuple[int, ...], ...] | None = None):
    """Pure speculative decode (module doc). Fused models as in :func:`engine.decode_loop` (caches with
    ``L_i + max_new_tokens + draft_len + EXTRA_SLOTS`` slots); the drafter: ``drafter_params`` of
    ``drafter_graphdef``, its prompt ``drafter_ids``/``drafter_mask`` ``[B, L_d]`` and its own empty cache
    (``L_d + max_new_tokens + draft_len + EXTRA_SLOTS`` slots). ``draft_len`` (K, static) >= 1; ``adaptive``
    (a traced bool: both settings share one compiled program) adapts k per row.
    -> ``(DecodeOutput, SpeculativeStats, caches, drafter_cache)``."""
    n_models = len(graphdefs)
    groups = tuple((i,) for i in range(n_models)) if groups is None else groups
    b = prompt_ids[0].shape[0]
    n, k = max_new_tokens, draft_len
    rows = jnp.arange(b)

    # prefill: fused models as the plain loop does, then the drafter; token 0 chosen exactly as there
    group_caches = [caches[m[0]] if len(m) == 1 else stack_caches([caches[i] for i in m]) for m in groups]
    logits, fused_caches = _run_groups(graphdefs, params, groups, prompt_ids, prompt_masks, group_caches,
                                       shared_input=False)
    fused_caches = tuple(c.with_row_lengths() for c in fused_caches)
    _, d_cache = _forward(drafter_graphdef, drafter_params, drafter_ids, drafter_mask, drafter_cache)
    d_cache = d_cache.with_row_lengths()
    token0, _ = _choose(logits, fusion_params, sampling, fold_in(key, 0), jnp.int32(0), rule=rule,
                        vocab_size=vocab_size, analysis=False)

    def emit(i, a, emitted, rec):
        """Record token i of each row's accepted run (live where i <= a and the row has not finished)."""
        tokens, num, finished, reason, window = rec
        live = (i <= a) & ~finished
        tok = emitted[:, i]
        t = jnp.minimum(num, n - 1)  # this token's index in the row's output
        tokens = tokens.at[rows, t].set(jnp.where(live, tok, tokens[rows, t]))
        eos_hit = is_eos(tok, stop) & live
        new_window, stop_hit = push_and_match(window, tok, stop)
        window = jnp.where(live[:, None], new_window, window)
        stop_hit = stop_hit & live & ~eos_hit
        len_hit = (num == n - 1) & live & ~eos_hit & ~stop_hit
        reason = jnp.where(eos_hit, EOS, jnp.where(stop_hit, STOP_STRING, jnp.where(len_hit, LENGTH, reason)))
        return tokens, num + live.astype(jnp.int32), finished | eos_hit | stop_hit | len_hit, reason, window

    rec0 = (jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool),
            jnp.full((b,), RUNNING, jnp.int32), init_byte_window(b, stop))
    rec0 = emit(0, jnp.zeros((b,), jnp.int32), token0[:, None], rec0)
    stats0 = SpeculativeStats(*(jnp.zeros((b,), jnp.int32) for _ in range(3)))
    k0 = jnp.full((b,), k, jnp.int32)

    def round_(state):
        r, last, pending, need, k_eff, fcs, dc, rec, stats = state
        tokens, num, finished, _, _ = rec
        live0 = ~finished  # rows taking part in this round
        rkey = fold_in(key, r + 1)
        f_len, d_len = fcs[0].length, dc.length  # [B] cursors at the round's start
        k_round = k_eff  # [B] drafts proposed to each row this round
        n_draft = jnp.max(jnp.where(live0, k_eff, 1))

        def draft_scores(lgs):
            return lgs[:, :vocab_size].astype(jnp.float32)

        # draft step 1: [pending, last] where the drafter lacks `pending`, else [last, (masked pad)]
        ids2 = jnp.where(need[:, None], jnp.stack([pending, last], 1), jnp.stack([last, last], 1))  # [B, 2]
        mask2 = jnp.stack([jnp.ones((b,), bool), need], 1)  # [B, 2]
        lg, dc = _forward(drafter_graphdef, drafter_params, ids2, mask2, dc, last_only=False)  # [B, 2, V_d]
        dc = dc.rollback(d_len + 1 + need.astype(jnp.int32))
        d1, q1 = _draft_token(draft_scores(lg[rows, need.astype(jnp.int32)]), sampling, fold_in(rkey, 0))
        drafts = jnp.zeros((b, k), jnp.int32).at[:, 0].set(d1)  # [B, K]
        qs = jnp.zeros((b, k, vocab_size), jnp.float32).at[:, 0].set(q1)  # [B, K, V]

        def draft_cond(c):
            return c[0] < n_draft

        def draft_body(c):
            i, drafts, qs, dc = c
            lg, dc = _forward(drafter_graphdef, drafter_params, drafts[:, i - 1][:, None], jnp.ones((b, 1), bool),
                              dc)  # [B, V_d]
            d, q = _draft_token(draft_scores(lg), sampling, fold_in(rkey, i))
            return i + 1, drafts.at[:, i].set(d), qs.at[:, i].set(q), dc

        _, drafts, qs, dc = jax.lax.while_loop(draft_cond, draft_body, (jnp.int32(1), drafts, qs, dc))

        # verify: every fused model reads [last, d_1..d_K] in one forward
        ids = jnp.concatenate([last[:, None], drafts], axis=1)  # [B, K+1]
        lgs, fcs = _run_groups(graphdefs, params, groups, ids, jnp.ones((b, k + 1), bool), list(fcs),
                               shared_input=True, last_only=False)  # per model [B, K+1, V_i]
        flat = [x[..., :vocab_size].astype(jnp.float32).reshape(b * (k + 1), vocab_size) for x in lgs]
        step = (num[:, None] + jnp.arange(k + 1)[None, :]).reshape(-1)  # [B*(K+1)]: generated-token index
        fused = fusion.combine(rule, flat, fusion_params, step).reshape(b, k + 1, vocab_size)
        a, z = _accept(fused, drafts, qs, k_eff, sampling, fold_in(rkey, k))

        # emit a + 1 tokens per row, token by token
        emitted = jnp.concatenate([drafts, jnp.full((b, 1), pad_id, jnp.int32)], axis=1)  # [B, K+1]
        emitted = emitted.at[rows, a].set(z)
        rec = jax.lax.fori_loop(0, k + 1, lambda i, rc: emit(i, a, emitted, rc), rec)

        # roll back: fused caches keep [.., last, d_1..d_a]; the drafter keeps [.., last, d_1..d_min(a, k-1)]
        # and, when all k_eff drafts were accepted, lacks d_k (read first next round)
        all_in = a == k_eff
        fcs = tuple(c.rollback(jnp.where(live0, f_len + 1 + a, f_len)) for c in fcs)
        d_keep = d_len + need.astype(jnp.int32) + 1 + jnp.minimum(a, k_eff - 1)
        dc = dc.rollback(jnp.where(live0, d_keep, d_len))
        pending = jnp.where(live0, drafts[rows, jnp.maximum(k_eff - 1, 0)], pending)
        need = jnp.where(live0, all_in, need)
        last = jnp.where(live0, z, last)
        grown = jnp.where(all_in, jnp.minimum(k_eff + 1, k), k_eff)
        adapted = jnp.where(2 * a < k_eff, jnp.maximum(k_eff - 1, 1), grown)
        k_eff = jnp.where(live0 & adaptive, adapted, k_eff)
        live_i = live0.astype(jnp.int32)
        stats = SpeculativeStats(rounds=stats.rounds + live_i, drafted=stats.drafted + live_i * k_round,
                                 accepted=stats.accepted + live_i * a)
        return r + 1, last, pending, need, k_eff, fcs, dc, rec, stats

    def cond(state):
        return ~jnp.all(state[7][2])

    state0 = (jnp.int32(0), token0, token0, jnp.zeros((b,), bool), k0, fused_caches, d_cache, rec0, stats0)
    _, _, _, _, _, fcs, dc, rec, stats = jax.lax.while_loop(cond, round_, state0)
    final_caches = [None] * n_models
    for members, cache in zip(groups, fcs):
        for i, c in zip(members, [cache] if len(members) == 1 else unstack_cache(cache, len(members))):
            final_caches[i] = c
    tokens, num, _, reason, _ = rec
    out = DecodeOutput(tokens=tokens, num_tokens=num, finish_reason=reason, analysis=None)
    return out, stats, tuple(final_caches), dc


_STATIC = ("graphdefs", "drafter_graphdef", "rule", "vocab_size", "max_new_tokens", "draft_len", "pad_id", "groups")
speculative_jit = jax.jit(speculative_loop, static_argnames=_STATIC, donate_argnames=("caches", "drafter_cache"))

__all__ = ["EXTRA_SLOTS", "SpeculativeReport", "SpeculativeStats", "check_drafter_vocab", "check_speculative", "default_drafter_index",
           "generate", "speculative_jit", "speculative_loop"]


# ------------------------------------------------------------------------------------------ host wrapper


@dataclasses.dataclass
class SpeculativeReport:
    """Host-side acceptance statistics of one speculative call (``DecodeResult.speculative``), per row."""

    draft_len: int  # K (the maximum with adaptive k)
    rounds: np.ndarray  # [B]
    drafted: np.ndarray  # [B] draft tokens proposed
    accepted: np.ndarray  # [B] draft tokens accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens over all rows (``accepted / (rounds * K)`` with a fixed K)."""
        return float(self.accepted.sum() / max(1, self.drafted.sum()))

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verification round (accepted drafts + the one fused token), over all rows."""
        return float((self.accepted.sum() + self.rounds.sum()) / max(1, self.rounds.sum()))

    def to_json(self) -> dict:
        return {"draft_len": self.draft_len, "rounds": int(self.rounds.sum()), "drafted": int(self.drafted.sum()),
                "accepted": int(self.accepted.sum()), "acceptance_rate": round(self.acceptance_rate, 6),
                "tokens_per_round": round(self.tokens_per_round, 6)}


def default_drafter_index(decoder) -> int:
    """The fused model with the fewest parameters (ties: the lowest index after the base), e.g. proxy-tuning's
    expert; None for a single model (rule ``plain`` needs a separate drafter)."""
    if len(decoder.graphdefs) == 1:
        return None
    sizes = {}
    for gi, members in enumerate(decoder.groups):
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(decoder.params[gi]))
        for i in members:
            sizes[i] = total // len(members)
    return min(sizes, key=lambda i: (sizes[i], i == 0, i))


def _member_params(decoder, i):
    """Model ``i``'s own params (sliced once from its group's stacked params and kept on the decoder)."""
    store = decoder.__dict__.setdefault("_speculative_params", {})
    if i not in store:
        gi = next(g for g, members in enumerate(decoder.groups) if i in members)
        members = decoder.groups[gi]
        p = decoder.params[gi]
        store[i] = p if len(members) == 1 else jax.tree.map(lambda x: x[members.index(i)], p)
    return store[i]


def _separate_drafter(decoder, drafter):
    """(graphdef, params, config, dtype) of a drafter model outside the fusion, split (and placed) once."""
    from flax import nnx
    from proxytune_jax.sharding import tree_shardings
    store = decoder.__dict__.setdefault("_speculative_drafters", {})
    if id(drafter) not in store:
        graphdef, params = nnx.split(drafter)
        if decoder.mesh is not None:
            from proxytune_jax.decoding.engine import partition_rules_of
            params = jax.device_put(params, tree_shardings(params, partition_rules_of(drafter), decoder.mesh))
        store[id(drafter)] = (drafter, graphdef, params)  # the model kept alive: its id stays unique
    _, graphdef, params = store[id(drafter)]
    return graphdef, params, drafter.config, getattr(drafter, "dtype", jnp.float32)


def check_speculative(rule_name: str, num_models: int, draft_len, *, has_drafter: bool, analysis: bool = False,
                      record_topk: int = 0) -> None:
    """UserErrors for what speculative decoding cannot do, each naming the fix (no model needed: the command
    calls it before loading weights)."""
    if isinstance(draft_len, bool) or not isinstance(draft_len, (int, np.integer)) or draft_len < 1:
        raise UserError(f"speculative draft length k must be an integer >= 1, got {draft_len!r}; pass e.g. "
                        "--speculative 4 (or leave it out for non-speculative decoding)")
    if rule_name == "small_large_kl":
        raise UserError("rule small_large_kl optimizes its logits per step and cannot verify drafted tokens; drop "
                        "--speculative or pick another rule")
    if analysis or record_topk:
        raise UserError("--analysis and --topk-cache record every decoding step, which speculative decoding skips; "
                        "drop --speculative to record them")
    if not has_drafter and num_models == 1:
        raise UserError(f"rule {rule_name!r} decodes one model: speculative decoding needs a separate drafter "
                        "(--drafter DIR, a small model on the same tokenizer)")


def check_drafter_vocab(drafter, vocab_size: int) -> None:
    if int(drafter.config.vocab_size) < vocab_size:
        raise UserError(f"the drafter's vocabulary ({drafter.config.vocab_size} ids) does not cover the fused "
                        f"models' shared range of {vocab_size} ids; pick a drafter on the same tokenizer")


def generate(decoder, prompts, *, max_new_tokens: int, draft_len: int, drafter=None, drafter_prompt=None,
             adaptive: bool = False, fusion_params=None, sampling=None, stop=None, seed: int = 0, pad_id: int = 0,
             row_ids=None):
    """``Decoder.generate(..., speculative=K)``: one speculative call -> ``DecodeResult`` with
    ``.speculative`` (a :class:`SpeculativeReport`). The drafter reads ``drafter_prompt`` (default: the base's,
    model 0's, prompt), or its own prompt when it is one of the fused models."""
    import contextlib
    from proxytune_jax.decoding.engine import _to_host
    check_speculative(decoder.rule.name, len(decoder.graphdefs), draft_len, has_drafter=drafter is not None)
    if drafter is not None:
        check_drafter_vocab(drafter, decoder.vocab_size)
    ids, masks, fp, sampling, stop, keys = decoder._inputs(prompts, fusion_params, sampling, stop, seed, row_ids)
    b = ids[0].shape[0]
    extra = draft_len + EXTRA_SLOTS
    if drafter is None:
        j = default_drafter_index(decoder)
        graphdef, params = decoder.graphdefs[j], _member_params(decoder, j)
        config, dtype = decoder.configs[j], decoder._dtypes[j]
        d_ids, d_mask = ids[j], masks[j]
    else:
        graphdef, params, config, dtype = _separate_drafter(decoder, drafter)
        d_ids, d_mask = ((ids[0], masks[0]) if drafter_prompt is None else
                         (decoder._place_batch(np.asarray(drafter_prompt[0], np.int32)),
                          decoder._place_batch(np.asarray(drafter_prompt[1], bool))))
        if d_ids.shape[0] != b:
            raise UserError(f"drafter_prompt has {d_ids.shape[0]} rows for a batch of {b}; give one per row")
    contexts = [int(c.max_position_embeddings) for c in decoder.configs] + [int(config.max_position_embeddings)]
    lengths = [x.shape[1] for x in ids] + [d_ids.shape[1]]
    for length, ctx in zip(lengths, contexts):
        if length + max_new_tokens + extra > ctx:
            raise UserError(f"speculative decoding needs prompt ({length}) + max_new_tokens ({max_new_tokens}) + "
                            f"k + {EXTRA_SLOTS} ({extra}) cache slots, more than a model's context of {ctx}; "
                            "lower --speculative or --max-new-tokens, or shorten the prompt")
    # per-row cursors from the start: the donated caches then match the returned ones buffer for buffer
    caches = tuple(c.with_row_lengths() for c in decoder.init_caches(b, lengths[:-1], max_new_tokens + extra))
    d_cache = KVCache.zeros(num_layers=config.num_hidden_layers, batch_size=b,
                            max_length=lengths[-1] + max_new_tokens + extra,
                            num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                            dtype=jnp.dtype(dtype)).with_row_lengths()
    ctx = jax.set_mesh(decoder.mesh) if decoder.mesh is not None else contextlib.nullcontext()
    with ctx:
        out, stats, _, _ = speculative_jit(
            graphdefs=decoder.graphdefs, params=decoder.params, prompt_ids=ids, prompt_masks=masks, caches=caches,
            drafter_params=params,
            drafter_ids=d_ids, drafter_mask=d_mask, drafter_cache=d_cache, fusion_params=fp, sampling=sampling,
            stop=stop, key=keys, drafter_graphdef=graphdef, rule=decoder.rule.name,
            vocab_size=decoder.vocab_size, max_new_tokens=int(max_new_tokens), draft_len=int(draft_len),
            adaptive=jnp.asarray(bool(adaptive)), pad_id=int(pad_id), groups=decoder.groups)
    result = _to_host(out)
    stats = jax.device_get(stats)
    result.speculative = SpeculativeReport(int(draft_len), np.asarray(stats.rounds), np.asarray(stats.drafted),
                                           np.asarray(stats.accepted))
    return result
