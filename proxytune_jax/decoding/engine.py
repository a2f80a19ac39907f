"""The multi-model decoding engine: one jitted program decodes any number of models in lockstep.

``decode_loop`` (pure) does, inside a single ``jax.jit``:

1. **prefill**: each model reads its own left-padded prompt ``[B, L_i]`` into its own KV cache (models may see
   different prompt formats, e.g. the expert's chat template), giving next-token logits ``[B, V_i]``;
2. **choose** token 0: slice every model's logits to the shared vocabulary ``[0, V)``, combine them with the
   fusion rule (:mod:`fusion`), sample (:mod:`sampling`), update per-row stopping (:mod:`stopping`);
3. a ``lax.while_loop`` of decode steps: every chosen token is appended to **all** streams (one ``[B, 1]``
   forward per model on its own cache), then the next token is chosen. The loop ends when every row has
   finished (EOS id, stop string, or ``max_new_tokens``); finished rows stop changing (they emit ``pad_id``).

Static (compile-time): the models' graph definitions, the rule name, ``V``, ``max_new_tokens``, ``analysis``,
``pad_id`` and the array shapes (prompt lengths are bucketed by :mod:`prompts`, so they rarely change).
Traced: parameters, prompts, caches, the rule's hyperparameters (α, λ, T, θ, weights, ...), the sampling knobs,
the stop criteria and the PRNG key -- so an α sweep is a loop over one compiled program, or one ``jax.vmap``-ed
call (:func:`decode_sweep`).

The caches are donated (the decode updates them in place) and returned; :class:`Decoder` places params and
caches on an optional mesh with the models' partition rules (batch over ``data x fsdp``, KV heads over
``tensor``), so the same code spreads a large target over many devices. Models of the same architecture
(the usual expert / anti-expert pair) run as one ``vmap``-ed forward over stacked params (half the ops per
step for the pair, same bytes read); ``Decoder(group_same_architecture=False)`` turns that off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from proxytune_jax.decoding import fusion
from proxytune_jax.decoding.sampling import SamplingParams, choose_tokens, fold_in
from proxytune_jax.decoding.stopping import (EOS, LENGTH, RUNNING, STOP_STRING, StopCriteria, init_byte_window,
                                             is_eos, make_stop_criteria, push_and_match)
from proxytune_jax.errors import UserError
from proxytune_jax.models.cache import KVCache
from proxytune_jax.sharding import BATCH_AXES, tree_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepAnalysis:
    """Per generated token (``-1`` / ``0`` once a row has finished). M = number of models, in rule order."""

    top1: jax.Array  # [B, N, M] int32: each model's own top-1 id
    chosen_prob: jax.Array  # [B, N, M] float32: each model's probability of the chosen token
    changed: jax.Array  # [B, N] bool: the combined top-1 differs from model 0's (the base) top-1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    tokens: jax.Array  # [B, N] int32; pad_id after a row finished (the EOS id itself is kept)
    num_tokens: jax.Array  # [B] int32: tokens generated per row (EOS included)
    finish_reason: jax.Array  # [B] int32: stopping.EOS / STOP_STRING / LENGTH
    analysis: StepAnalysis | None
    # with ``record_topk = k``: the fused distribution's top k before each generated token (log_softmax of the
    # rule's scores, before sampling's banned ids / temperature / top-k / top-p): ids [B, N, k] (-1 once a
    # row has finished) and log-probs [B, N, k] -- a top-k teacher cache of the fused model
    topk_ids: jax.Array | None = None
    topk_logp: jax.Array | None = None


def _forward(graphdef, params, ids, mask, cache, last_only=True):
    model = nnx.merge(graphdef, params)
    logits, cache = model(ids, mask, cache)
    return (logits[:, -1, :] if last_only else logits), cache  # [B, V_i] (last_only) or [B, T, V_i]


_CACHE_AXES = KVCache(k=0, v=0, mask=0, length=None)  # a group's caches share one write cursor


def stack_caches(caches: Sequence[KVCache]) -> KVCache:
    """Per-model caches of one group -> one cache with a leading model axis (they share the write cursor)."""
    return KVCache(k=tuple(jnp.stack(x) for x in zip(*[c.k for c in caches])),
                   v=tuple(jnp.stack(x) for x in zip(*[c.v for c in caches])),
                   mask=jnp.stack([c.mask for c in caches]), length=caches[0].length)


def unstack_cache(cache: KVCache, n: int) -> list[KVCache]:
    return [KVCache(k=tuple(x[j] for x in cache.k), v=tuple(x[j] for x in cache.v), mask=cache.mask[j],
                    length=cache.length) for j in range(n)]


def _group_forward(graphdef, params, ids, mask, cache, *, shared_input: bool, last_only: bool = True):
    """Forward of a group of same-architecture models as one ``vmap`` over a stacked leading model axis
    (``params`` and ``cache`` stacked). One set of (batched) matmuls instead of one per model: fewer ops per
    step, the same bytes read. -> (logits [G, B, V], stacked cache)."""
    in_axes = (0, None if shared_input else 0, None if shared_input else 0, _CACHE_AXES)
    f = jax.vmap(functools.partial(_forward, graphdef, last_only=last_only), in_axes=in_axes,
                 out_axes=(0, _CACHE_AXES))
    return f(params, ids, mask, cache)


def _run_groups(graphdefs, params, groups, ids, masks, caches, *, shared_input, last_only=True):
    """Forward every model (grouped ones vmapped together); ids/masks per model, or one shared pair.
    ``caches`` has one entry per group (stacked for a group of several models), and so has the result.
    -> (per-model logits list ([B, V_i], or [B, T, V_i] with ``last_only=False``), per-group caches)."""
    logits, new_caches = [None] * len(graphdefs), []
    for gi, members in enumerate(groups):
        if len(members) == 1:
            (i,) = members
            x, m = (ids, masks) if shared_input else (ids[i], masks[i])
            logits[i], cache = _forward(graphdefs[i], params[gi], x, m, caches[gi], last_only)
        else:
            if shared_input:
                x, m = ids, masks
            else:
                x, m = jnp.stack([ids[i] for i in members]), jnp.stack([masks[i] for i in members])
            lgs, cache = _group_forward(graphdefs[members[0]], params[gi], x, m, caches[gi],
                                        shared_input=shared_input, last_only=last_only)
            for j, i in enumerate(members):
                logits[i] = lgs[j]
        new_caches.append(cache)
    return logits, new_caches


def _choose(logits, fusion_params, sampling, key, step=0, *, rule, vocab_size, analysis, record_topk=0):
    """Per-model logits [B, V_i] -> (token [B], optional per-model analysis rows, optional fused top-k).
    ``step``: tokens generated so far (a per-token α schedule reads it)."""
    sliced = [x[:, :vocab_size].astype(jnp.float32) for x in logits]  # shared id range
    scores = fusion.combine(rule, sliced, fusion_params, step)  # [B, V]
    token = choose_tokens(scores, sampling, key)
    top = None
    if record_topk:
        logp, ids = jax.lax.top_k(jax.nn.log_softmax(scores, axis=-1), record_topk)
        top = (ids.astype(jnp.int32), logp)
    if not analysis:
        return token, (None, top)
    top1 = jnp.stack([jnp.argmax(x, axis=-1) for x in sliced], axis=-1).astype(jnp.int32)  # [B, M]
    probs = jnp.stack([jnp.take_along_axis(jax.nn.softmax(x, axis=-1), token[:, None], axis=-1)[:, 0]
                       for x in sliced], axis=-1)  # [B, M]
    changed = jnp.argmax(scores, axis=-1).astype(jnp.int32) != top1[:, 0]
    return token, ((top1, probs, changed), top)


def init_record(b, n, n_models, stop, *, pad_id, analysis, record_topk):
    """The per-row record :func:`record_token` fills: ``(tokens [B, N], num [B], finished [B], reason [B],
    byte window, analysis or None, (top-k ids, log-probs) or None)``."""
    ana0 = None
    if analysis:
        ana0 = StepAnalysis(top1=jnp.full((b, n, n_models), -1, jnp.int32),
                            chosen_prob=jnp.zeros((b, n, n_models), jnp.float32),
                            changed=jnp.zeros((b, n), bool))
    tops0 = ((jnp.full((b, n, record_topk), -1, jnp.int32), jnp.full((b, n, record_topk), -jnp.inf, jnp.float32))
             if record_topk else None)
    return (jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool),
            jnp.full((b,), RUNNING, jnp.int32), init_byte_window(b, stop), ana0, tops0)


def record_token(t, token, extra, carry, *, stop, max_new_tokens, pad_id, analysis, record_topk):
    """Token ``t`` (chosen by :func:`_choose`, with its ``extra``) into the record of :func:`init_record`: finished
    rows emit ``pad_id``; EOS, stop strings and ``max_new_tokens`` end a row. -> (token [B], carry)."""
    n = max_new_tokens
    extra, top = extra
    tokens, num, finished, reason, window, ana, tops = carry
    if record_topk:
        live = ~finished[:, None]
        tops = (tops[0].at[:, t].set(jnp.where(live, top[0], -1)),
                tops[1].at[:, t].set(jnp.where(live, top[1], -jnp.inf)))
    token = jnp.where(finished, pad_id, token)
    tokens = tokens.at[:, t].set(token)
    eos_hit = is_eos(token, stop) & ~finished
    window, stop_hit = push_and_match(window, token, stop)
    stop_hit = stop_hit & ~finished & ~eos_hit
    len_hit = (t == n - 1) & ~finished & ~eos_hit & ~stop_hit
    reason = jnp.where(eos_hit, EOS, jnp.where(stop_hit, STOP_STRING, jnp.where(len_hit, LENGTH, reason)))
    num = num + (~finished).astype(jnp.int32)
    if analysis:
        top1, probs, changed = extra
        live = ~finished
        ana = StepAnalysis(top1=ana.top1.at[:, t].set(jnp.where(live[:, None], top1, -1)),
                           chosen_prob=ana.chosen_prob.at[:, t].set(jnp.where(live[:, None], probs, 0.0)),
                           changed=ana.changed.at[:, t].set(changed & live))
    finished = finished | eos_hit | stop_hit | len_hit
    return token, (tokens, num, finished, reason, window, ana, tops)


def record_output(carry) -> DecodeOutput:
    """The :class:`DecodeOutput` of a finished record (:func:`init_record`)."""
    tokens, num, _, reason, _, ana, tops = carry
    top_ids, top_logp = tops if tops is not None else (None, None)
    return DecodeOutput(tokens=tokens, num_tokens=num, finish_reason=reason, analysis=ana, topk_ids=top_ids,
                        topk_logp=top_logp)


def decode_loop(graphdefs, params, prompt_ids, prompt_masks, caches, fusion_params, sampling: SamplingParams,
                stop: StopCriteria, key, *, rule: str, vocab_size: int, max_new_tokens: int,
                analysis: bool = False, pad_id: int = 0, groups: tuple[tuple[int, ...], ...] | None = None,
                record_topk: int = 0):
    """Pure multi-model decode (see module doc). Per model i: ``prompt_ids[i]``/``prompt_masks[i]``
    ``[B, L_i]`` left-padded, ``caches[i]`` empty with ``L_i + max_new_tokens`` slots.

    ``groups`` (static) partitions the model indices; ``params`` has one entry per group: a model's params,
    or for a group of same-architecture models with equal prompt lengths their params stacked on a leading
    axis (run as one vmapped forward, see :func:`stack_groups`). ``None``: one group per model.
    -> ``(DecodeOutput, caches)``."""
    n_models = len(graphdefs)
    groups = tuple((i,) for i in range(n_models)) if groups is None else groups
    b = prompt_ids[0].shape[0]
    n = max_new_tokens
    choose = functools.partial(_choose, rule=rule, vocab_size=vocab_size, analysis=analysis,
                               record_topk=record_topk)

    # prefill: each model on its own stream; a group's caches are stacked once here and stay stacked in the
    # loop (no per-step stack/unstack copies)
    group_caches = [caches[m[0]] if len(m) == 1 else stack_caches([caches[i] for i in m]) for m in groups]
    logits, new_caches = _run_groups(graphdefs, params, groups, prompt_ids, prompt_masks, group_caches,
                                     shared_input=False)

    record = functools.partial(record_token, stop=stop, max_new_tokens=n, pad_id=pad_id, analysis=analysis,
                               record_topk=record_topk)
    carry = init_record(b, n, n_models, stop, pad_id=pad_id, analysis=analysis, record_topk=record_topk)
    token, extra = choose(logits, fusion_params, sampling, fold_in(key, 0), jnp.int32(0))
    token, carry = record(0, token, extra, carry)

    def cond(state):
        t, _, _, rec = state
        return (t < n - 1) & ~jnp.all(rec[2])

    def body(state):
        t, token, cs, rec = state
        ones = jnp.ones((b, 1), bool)
        # append the chosen token to every stream
        lgs, new_cs = _run_groups(graphdefs, params, groups, token[:, None], ones, cs, shared_input=True)
        nxt, extra = choose(lgs, fusion_params, sampling, fold_in(key, t + 1), t + 1)
        nxt, rec = record(t + 1, nxt, extra, rec)
        return t + 1, nxt, tuple(new_cs), rec

    _, _, final_groups, rec = jax.lax.while_loop(cond, body, (jnp.int32(0), token, tuple(new_caches), carry))
    final_caches = [None] * n_models
    for members, cache in zip(groups, final_groups):
        for i, c in zip(members, [cache] if len(members) == 1 else unstack_cache(cache, len(members))):
            final_caches[i] = c
    return record_output(rec), tuple(final_caches)


_STATIC = ("graphdefs", "rule", "vocab_size", "max_new_tokens", "analysis", "pad_id", "groups", "record_topk")
decode_jit = jax.jit(decode_loop, static_argnames=_STATIC, donate_argnames=("caches",))


def _decode_sweep_impl(graphdefs, params, prompt_ids, prompt_masks, cache_shapes, fusion_params, sampling,
                       stop, key, *, rule, vocab_size, max_new_tokens, analysis, pad_id, groups, record_topk=0):
    def one(fp):
        caches = tuple(KVCache.zeros(**shape) for shape in cache_shapes)
        out, _ = decode_loop(graphdefs, params, prompt_ids, prompt_masks, caches, fp, sampling, stop, key,
                             rule=rule, vocab_size=vocab_size, max_new_tokens=max_new_tokens,
                             analysis=analysis, pad_id=pad_id, groups=groups, record_topk=record_topk)
        return out
    return jax.vmap(one)(fusion_params)


decode_sweep_jit = jax.jit(_decode_sweep_impl, static_argnames=_STATIC + ("cache_shapes",))


# ------------------------------------------------------------------------------------------ host wrapper


def partition_rules_of(model) -> Any:
    """The partition rules of a model's architecture (``proxytune_jax.models.partition_rules``)."""
    from proxytune_jax.models import partition_rules
    return partition_rules(model.config)


def eos_ids_of(config) -> list[int]:
    """A config's ``eos_token_id`` and ``generation_eos_token_id`` (each an int, a list/tuple of ints, or None)
    as one sorted list."""
    ids: set[int] = set()
    for eos in (getattr(config, "eos_token_id", None), getattr(config, "generation_eos_token_id", None)):
        if eos is not None:
            ids.update([int(eos)] if isinstance(eos, (int, np.integer)) else [int(e) for e in eos])
    return sorted(ids)


CACHE_RULES = (
    (r"^(k|v)/", P(BATCH_AXES, "tensor", None, None)),  # [B, Hkv, S, D]
    (r"^mask", P(BATCH_AXES, None)),  # [B, S]
)
BATCH_RULES = ((r".*", P(BATCH_AXES, None)),)


class _Hashable:
    """Wraps a pytree of shardings (not hashable itself) as an lru_cache key, by its flattened value."""

    def __init__(self, tree):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (treedef, tuple(leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key == other._key


@functools.lru_cache(maxsize=64)
def _cache_maker(num_layers, batch_size, max_length, num_kv_heads, head_dim, dtype, shardings):
    shardings = shardings.tree
    fn = functools.partial(KVCache.zeros, num_layers=num_layers, batch_size=batch_size, max_length=max_length,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    return jax.jit(fn, out_shardings=shardings)


@dataclasses.dataclass
class DecodeResult:
    """Host-side (NumPy) result of :meth:`Decoder.generate`."""

    tokens: np.ndarray  # [B, N] int32
    num_tokens: np.ndarray  # [B]
    finish_reason: np.ndarray  # [B] int32 (stopping.EOS / STOP_STRING / LENGTH)
    analysis: dict[str, np.ndarray] | None  # top1 [B,N,M], chosen_prob [B,N,M], changed [B,N]
    topk: "TopK | None" = None  # the fused distribution's top-k per generated token ([B, N, k]; record_topk)
    speculative: Any = None  # speculative.SpeculativeReport (acceptance statistics) of a speculative call

    def token_lists(self) -> list[list[int]]:
        return [self.tokens[i, : int(self.num_tokens[i])].tolist() for i in range(self.tokens.shape[0])]


def _find_groups(graphdefs, params) -> tuple[tuple[int, ...], ...]:
    """Partition model indices into runs of the same architecture (equal graphdef, param shapes, dtypes)."""
    def signature(i):
        leaves, treedef = jax.tree.flatten(params[i])
        return graphdefs[i], treedef, tuple((x.shape, str(x.dtype)) for x in leaves)

    groups: list[list[int]] = []
    sigs: list[Any] = []
    for i in range(len(graphdefs)):
        sig = signature(i)
        for g, s in zip(groups, sigs):
            if s == sig:
                g.append(i)
                break
        else:
            groups.append([i])
            sigs.append(sig)
    return tuple(tuple(g) for g in groups)


def stack_groups(params, groups, mesh: Mesh | None = None, rules: Sequence[Any] | None = None) -> tuple:
    """Per-model params -> one entry per group of :func:`_find_groups`: a lone model's params, or a group's params
    stacked on a leading model axis; placed on ``mesh`` (if given) by each model's partition ``rules`` (the
    model axis replicated)."""
    grouped = []
    for members in groups:
        first = params[members[0]]
        if len(members) == 1:
            tree = first if mesh is None else jax.device_put(first, tree_shardings(first, rules[members[0]], mesh))
        else:
            stack = jax.jit(lambda *ps: jax.tree.map(lambda *xs: jnp.stack(xs), *ps))
            if mesh is not None:  # each member's sharding, with the model axis replicated
                inner = tree_shardings(first, rules[members[0]], mesh)
                stack = jax.jit(stack, out_shardings=jax.tree.map(
                    lambda sh: NamedSharding(mesh, P(None, *sh.spec)), inner))
            tree = stack(*[params[i] for i in members])
        grouped.append(tree)
    return tuple(grouped)


class Decoder:
    """Models (split once into graphdef + params, placed on ``mesh`` if given) and a fusion rule.

    ``models`` are in the rule's role order (e.g. ``(base, expert, anti_expert)`` for proxy-tuning; one model
    for ``rule="plain"``). ``vocab_size`` is the shared id range (:func:`vocab.align_vocabularies`); default:
    the smallest model vocabulary.

    ``group_same_architecture`` (default on): models with the same architecture and parameter shapes (the
    usual expert / anti-expert pair) are run as one vmapped forward over params stacked once here (their
    prompts are left-padded to a common length): half the ops per step for the pair, the same bytes read.
    The stacked copy is what the decoder holds; the caller's model objects keep their own arrays."""

    def __init__(self, models: Sequence[nnx.Module], rule: str = "proxy_tuning", *, vocab_size: int | None = None,
                 mesh: Mesh | None = None, partition_rules: Sequence[Any] | None = None,
                 group_same_architecture: bool = True):
        self.rule = fusion.get_rule(rule)
        if not self.rule.num_models_ok(len(models)):
            raise UserError(f"rule {self.rule.name!r} takes models {self.rule.roles}, got {len(models)} model(s)")
        self.configs = [m.config for m in models]
        self.vocab_size = int(vocab_size or min(c.vocab_size for c in self.configs))
        self.mesh = mesh
        self._dtypes = [getattr(m, "dtype", jnp.float32) for m in models]
        split = [nnx.split(m) for m in models]
        self.graphdefs = tuple(g for g, _ in split)
        params = [p for _, p in split]
        self.groups = _find_groups(self.graphdefs, params) if group_same_architecture else tuple(
            (i,) for i in range(len(models)))
        rules = None
        if mesh is not None:
            rules = partition_rules or [partition_rules_of(m) for m in models]
        self.params = stack_groups(params, self.groups, mesh, rules)

    # -------------------------------------------------------------------------------------------------
    def _place_batch(self, x):
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, tree_shardings(x, BATCH_RULES, self.mesh))

    def _cache_shape(self, i, batch_size, max_length):
        c = self.configs[i]
        if max_length > c.max_position_embeddings:
            raise UserError(f"model {i}: prompt ({max_length} - new tokens) plus max_new_tokens exceeds its "
                            f"context of {c.max_position_embeddings} tokens; shorten the prompt or lower "
                            "max_new_tokens")
        return dict(num_layers=c.num_hidden_layers, batch_size=batch_size, max_length=max_length,
                    num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=jnp.dtype(self._dtypes[i]))

    def init_caches(self, batch_size: int, prompt_lengths: Sequence[int], max_new_tokens: int):
        caches = []
        for i, length in enumerate(prompt_lengths):
            shape = self._cache_shape(i, batch_size, length + max_new_tokens)
            shardings = None
            if self.mesh is not None:
                abstract = jax.eval_shape(lambda: KVCache.zeros(**shape))
                shardings = tree_shardings(abstract, CACHE_RULES, self.mesh)
            caches.append(_cache_maker(*shape.values(), _Hashable(shardings))())
        return tuple(caches)

    def _inputs(self, prompts, fusion_params, sampling, stop, seed, row_ids=None):
        if len(prompts) != len(self.graphdefs):
            raise ValueError(f"one (ids, mask) prompt batch per model: {len(self.graphdefs)} expected")
        prompts = [(np.asarray(p[0], np.int32), np.asarray(p[1], bool)) for p in prompts]
        for members in self.groups:  # grouped models share one prompt length: left-pad to the longest
            width = max(prompts[i][0].shape[1] for i in members)
            for i in members:
                ids_i, mask_i = prompts[i]
                extra = width - ids_i.shape[1]
                if extra:
                    prompts[i] = (np.pad(ids_i, ((0, 0), (extra, 0))), np.pad(mask_i, ((0, 0), (extra, 0))))
        ids = tuple(self._place_batch(p[0]) for p in prompts)
        masks = tuple(self._place_batch(p[1]) for p in prompts)
        fp = fusion.resolve_params(self.rule, fusion_params)
        sampling = sampling if sampling is not None else SamplingParams.create(self.vocab_size)
        stop = stop if stop is not None else make_stop_criteria(sorted({e for c in self.configs for e in eos_ids_of(c)}))
        b = ids[0].shape[0]
        rows = np.arange(b) if row_ids is None else np.asarray(row_ids)
        if rows.shape != (b,):
            raise UserError(f"row_ids must give one id per row ({b}), got shape {rows.shape}")
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.asarray(rows, jnp.uint32))
        return ids, masks, fp, sampling, stop, keys

    def _static(self, max_new_tokens, analysis, pad_id, record_topk=0):
        return dict(graphdefs=self.graphdefs, rule=self.rule.name, vocab_size=self.vocab_size,
                    max_new_tokens=int(max_new_tokens), analysis=bool(analysis), pad_id=int(pad_id),
                    groups=self.groups, record_topk=int(record_topk))

    def generate(self, prompts: Sequence[tuple[np.ndarray, np.ndarray]], *, max_new_tokens: int,
                 fusion_params: Mapping[str, Any] | None = None, sampling: SamplingParams | None = None,
                 stop: StopCriteria | None = None, seed: int = 0, analysis: bool = False,
                 pad_id: int = 0, record_topk: int = 0, row_ids: Sequence[int] | None = None,
                 speculative: int = 0, drafter: nnx.Module | None = None,
                 drafter_prompt: tuple[np.ndarray, np.ndarray] | None = None,
                 adaptive_speculative: bool = False) -> DecodeResult:
        """Decode one batch. ``prompts[i] = (ids [B, L_i], mask [B, L_i])`` left-padded for model i.

        Sampling draws row b's tokens from its own stream, keyed by ``(seed, row_ids[b])`` (default: the row's
        index): give each prompt its index in the whole input and its sample does not depend on the batch
        size or its row.

        ``stop`` defaults to the first model's ``eos_token_id``; ``sampling`` to greedy. ``record_topk = k``
        also returns the fused distribution's top k before every generated token (``DecodeResult.topk``).

        ``speculative = K`` (>= 1) decodes speculatively (:mod:`speculative`): ``drafter`` (default: the smallest
        fused model, e.g. the expert; required for rule "plain") proposes K tokens per round that the fused
        models verify in one forward -- the same greedy tokens, the same sampling distribution;
        ``adaptive_speculative`` adapts K per row; ``drafter_prompt`` is a separate drafter's prompt batch
        (default: model 0's). ``DecodeResult.speculative`` reports the acceptance."""
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= record_topk <= self.vocab_size:
            raise UserError(f"record_topk must lie in [0, {self.vocab_size}], got {record_topk}")
        if speculative or drafter is not None or adaptive_speculative:
            from proxytune_jax.decoding import speculative as spec
            spec.check_speculative(self.rule.name, len(self.graphdefs), speculative, has_drafter=drafter is not None,
                                   analysis=analysis, record_topk=record_topk)
            return spec.generate(self, prompts, max_new_tokens=max_new_tokens, draft_len=speculative,
                                 drafter=drafter, drafter_prompt=drafter_prompt, adaptive=adaptive_speculative,
                                 fusion_params=fusion_params, sampling=sampling, stop=stop, seed=seed,
                                 pad_id=pad_id, row_ids=row_ids)
        ids, masks, fp, sampling, stop, key = self._inputs(prompts, fusion_params, sampling, stop, seed, row_ids)
        b = ids[0].shape[0]
        caches = self.init_caches(b, [x.shape[1] for x in ids], max_new_tokens)
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            out, _ = decode_jit(params=self.params, prompt_ids=ids, prompt_masks=masks, caches=caches,
                                fusion_params=fp, sampling=sampling, stop=stop, key=key,
                                **self._static(max_new_tokens, analysis, pad_id, record_topk))
        return _to_host(out)

    def generate_sweep(self, prompts, *, max_new_tokens: int, fusion_params: Mapping[str, Any],
                       sampling: SamplingParams | None = None, stop: StopCriteria | None = None, seed: int = 0,
                       analysis: bool = False, pad_id: int = 0) -> list[DecodeResult]:
        """One ``jax.vmap``-ed call over hyperparameter values: every value in ``fusion_params`` carries a
        leading sweep axis (e.g. ``{"alpha": [0.5, 1.0, 2.0]}``). -> one DecodeResult per setting."""
        sizes = {np.shape(v)[0] for v in fusion_params.values()}
        if len(sizes) != 1:
            raise UserError("every swept hyperparameter needs the same leading length")
        (k,) = sizes
        defaults = fusion.resolve_params(self.rule, {n: np.asarray(v)[0] for n, v in fusion_params.items()})
        fp = {n: jnp.asarray(fusion_params[n], defaults[n].dtype) if n in fusion_params
              else jnp.broadcast_to(defaults[n], (k,) + defaults[n].shape) for n in defaults}
        for n, v in fp.items():
            if not bool(jnp.all(jnp.isfinite(v))):
                raise UserError(f"sweep: {n} has non-finite values; pass finite numbers")
        ids, masks, _, sampling, stop, key = self._inputs(prompts, None, sampling, stop, seed)
        b = ids[0].shape[0]
        shapes = tuple(tuple(self._cache_shape(i, b, x.shape[1] + max_new_tokens).items())
                       for i, x in enumerate(ids))
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            out = decode_sweep_jit(params=self.params, prompt_ids=ids, prompt_masks=masks,
                                   cache_shapes=tuple(_HashableShape(s) for s in shapes), fusion_params=fp,
                                   sampling=sampling, stop=stop, key=key,
                                   **self._static(max_new_tokens, analysis, pad_id))
        host = jax.device_get(out)
        return [_to_host(jax.tree.map(lambda x: x[j], host)) for j in range(k)]


class _HashableShape(dict):
    """A cache-shape dict usable as a static argument."""

    def __init__(self, items):
        super().__init__(items)

    def __hash__(self):
        return hash(tuple(sorted((k, str(v)) for k, v in self.items())))


def _to_host(out: DecodeOutput) -> DecodeResult:
    out = jax.device_get(out)
    ana = None
    if out.analysis is not None:
        ana = {"top1": np.asarray(out.analysis.top1), "chosen_prob": np.asarray(out.analysis.chosen_prob),
               "changed": np.asarray(out.analysis.changed)}
    topk = None
    if out.topk_ids is not None:
        from proxytune_jax.topk import TopK
        topk = TopK(np.asarray(out.topk_ids), np.asarray(out.topk_logp))
    return DecodeResult(tokens=np.asarray(out.tokens), num_tokens=np.asarray(out.num_tokens),
                        finish_reason=np.asarray(out.finish_reason), analysis=ana, topk=topk)
