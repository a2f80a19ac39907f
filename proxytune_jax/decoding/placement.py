"""Models of a fusion on separate device groups: ``base=0-5:fsdp2xtensor3,expert=6,anti_expert=7``.

:class:`engine.Decoder` puts every model on one mesh: each device holds a slice of every model and the models run
one after the other inside one jitted loop. :class:`PlacedDecoder` gives each model (or several models sharing an
entry, ``expert+anti_expert=6``) **its own device group**, a ``("data", "fsdp", "tensor")`` mesh of its own
devices, so the large base and the small pair can compute at the same time on different chips.

**Why a host-driven loop.** ``jax.jit`` does not take arguments committed to disjoint device sets, so one program
cannot hold the base on devices 0-5 and the expert on device 6. The two ways out:

(a) one program over the union mesh in which each group computes its own model (``shard_map`` with the work
    selected per group): every model's params must then be laid out over the *whole* mesh with matching shapes,
    which heterogeneous models (a 13B base, 7B experts) do not have;
(b) **one jitted step per group, dispatched asynchronously, with a small exchange per token** (chosen here):

    * prefill, then per token: the chosen token ``[B]`` int32 is copied to every group, each group runs its
      jitted one-token forward on its own KV cache and returns its next-token logits ``[B, V]`` (float32, cut to
      the shared vocabulary), which are copied to the **fusion device** (the first device of the base's group);
      one jitted fusion step there combines them (:mod:`fusion`), samples and records (the same
      :func:`engine._choose` and :func:`engine.record_token` as the single-mesh loop, with the same per-row keys
      ``fold_in(key_row, t)``), giving the next token;
    * the Python loop only *dispatches*: JAX returns futures, so group g's forward for token t is queued while the
      host dispatches group g+1's and the fusion; the groups overlap on their own devices. The host never waits
      on a token: whether every row has finished is a flag computed on device and read ``check_every`` steps
      late (its copy started when it was made), so the device queue stays ``check_every`` steps deep; a row
      that finished earlier emits ``pad_id`` exactly as in the single-mesh loop, so stopping late changes no
      output.

**Trade-off.** Per token: ``G + 3`` dispatches for G groups (one batched copy of the token to every group, G
forwards, one batched copy of the logits, one fusion step), tens of microseconds of host work each on an idle
host (1-2 ms per token in all on the loaded 2-core machine of the README's table), against one
``lax.while_loop`` iteration for the single mesh. The per-group prefill and step are jitted once with their
graph definitions and parameter tree bound, so a dispatch only flattens a tuple of arrays. It pays off when a model forward takes longer than that dispatch, i.e. for large models whose
forwards then run side by side (time per token ≈ max over groups instead of the sum), and it loses for tiny
ones. The exchange is ``M × B × V × 4`` bytes of logits per token to the fusion device and ``B × 4`` back.
Not supported: :meth:`Decoder.generate_sweep` (a ``vmap`` over hyperparameters needs one program) and speculative
decoding (one program over one mesh).

Spec syntax (:func:`parse_placement`): comma-separated ``ROLES=DEVICES[:MESH]`` entries.

* ``ROLES``: a model's role in the rule (``base``, ``expert``, ``anti_expert``, ``amateur``, ``small``, ``large``,
  ``model``; for ``eft`` with several pairs ``expert2``, ``anti_expert2``, ...), or several joined by ``+``
  sharing one group (same-architecture ones then run as one vmapped forward, as in :class:`engine.Decoder`).
* ``DEVICES``: one index ``6`` or an inclusive range ``0-5`` into ``jax.devices()``. Groups may not overlap;
  devices left out stay idle.
* ``MESH``: axis sizes joined by ``x`` (``fsdp2xtensor3``, ``data2xfsdp3``); unnamed axes are 1 and the sizes must
  multiply to the group's device count. Default rule: every device on ``fsdp`` (params fully sharded, the batch
  split over the group where it divides; tensor parallelism only where asked).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from proxytune_jax.decoding import fusion
from proxytune_jax.decoding.engine import (CACHE_RULES, BATCH_RULES, Decoder, DecodeResult, _cache_maker, _choose,
                                           _find_groups, _Hashable, _run_groups, _to_host, init_record,
                                           partition_rules_of, record_output, record_token, stack_caches,
                                           stack_groups)
from proxytune_jax.decoding.sampling import SamplingParams, fold_in
from proxytune_jax.decoding.stopping import StopCriteria
from proxytune_jax.errors import UserError
from proxytune_jax.models.cache import KVCache
from proxytune_jax.sharding import AXES, MeshConfig, make_mesh, tree_shardings

EXAMPLE = "base=0-5:fsdp2xtensor3,expert=6,anti_expert=7"


@dataclasses.dataclass(frozen=True)
class DeviceGroup:
    """Models (indices in the rule's order) placed on devices (indices into ``jax.devices()``) as one mesh."""

    models: tuple[int, ...]
    devices: tuple[int, ...]
    mesh_shape: tuple[int, int, int]  # (data, fsdp, tensor); product == len(devices)


# ----------------------------------------------------------------------------------------------------- parsing


def model_names(rule: str | fusion.FusionRule, num_models: int) -> list[str]:
    """One unique name per model, in rule order: the rule's roles; for a variadic rule (``eft``) the k-th pair's
    roles get a suffix ``k`` from the second pair on (``expert2``, ``anti_expert2``, ...)."""
    rule = fusion.get_rule(rule)
    if not rule.variadic:
        return list(rule.roles)
    group = rule.roles[1:]
    names = [rule.roles[0]]
    for k in range((num_models - 1) // len(group)):
        names += [r if k == 0 else f"{r}{k + 1}" for r in group]
    return names


_ENTRY = re.compile(r"^(?P<roles>[A-Za-z0-9_+]+)=(?P<first>\d+)(?:-(?P<last>\d+))?(?::(?P<mesh>\S+))?$")
_AXIS = re.compile(r"^(data|fsdp|tensor)(\d+)$")


def _mesh_shape(text: str | None, n: int, what: str) -> tuple[int, int, int]:
    if text is None:
        return (1, n, 1)
    sizes: dict[str, int] = {}
    for part in text.split("x"):
        m = _AXIS.match(part)
        if m is None or m.group(1) in sizes or int(m.group(2)) < 1:
            raise UserError(f"placement {what}: mesh {text!r} is not AXIS SIZE pairs joined by 'x' (each of "
                            f"{', '.join(AXES)} at most once, sizes >= 1); write e.g. fsdp2xtensor3")
        sizes[m.group(1)] = int(m.group(2))
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if math.prod(shape) != n:
        raise UserError(f"placement {what}: mesh {text!r} covers {math.prod(shape)} devices but the group has {n}; "
                        f"make the axis sizes multiply to {n}")
    return shape


def parse_placement(spec: str, rule: str | fusion.FusionRule, num_models: int,
                    num_devices: int) -> tuple[DeviceGroup, ...]:
    """``"base=0-5:fsdp2xtensor3,expert=6,anti_expert=7"`` -> device groups, ordered by their first model
    (module doc for the syntax). UserError naming the fix for: a malformed entry, an unknown or repeated role, a
    model left without devices, an empty range, a device that does not exist, groups that overlap, a mesh whose
    sizes do not cover the group's devices."""
    names = model_names(rule, num_models)
    entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
    if not entries:
        raise UserError(f"placement is empty; give ROLE=DEVICES per model, e.g. {EXAMPLE}")
    groups, owner = [], {}  # owner: device -> the entry holding it
    seen: set[str] = set()
    for entry in entries:
        m = _ENTRY.match(entry)
        if m is None:
            raise UserError(f"placement entry {entry!r} is not ROLES=DEVICES[:MESH]; write e.g. {EXAMPLE} "
                            "(DEVICES one index or a range FIRST-LAST; ROLES joined by + share a group)")
        roles = m.group("roles").split("+")
        for r in roles:
            if r not in names:
                raise UserError(f"placement entry {entry!r}: rule {fusion.get_rule(rule).name!r} has no model "
                                f"{r!r}; name its models {names}")
            if r in seen:
                raise UserError(f"placement names {r!r} twice; give each model one entry (models sharing devices "
                                "go in one entry: expert+anti_expert=6)")
            seen.add(r)
        first = int(m.group("first"))
        last = first if m.group("last") is None else int(m.group("last"))
        if last < first:
            raise UserError(f"placement entry {entry!r}: the range {first}-{last} is empty; write FIRST-LAST with "
                            "FIRST <= LAST")
        if last >= num_devices:
            raise UserError(f"placement entry {entry!r} names device {last} but there are {num_devices} devices "
                            f"(0-{num_devices - 1}); use indices below {num_devices}")
        for d in range(first, last + 1):
            if d in owner:
                raise UserError(f"placement: device {d} is in both {owner[d]!r} and {entry!r}; give each group its "
                                "own devices (models sharing devices go in one entry: expert+anti_expert=6)")
            owner[d] = entry
        devices = tuple(range(first, last + 1))
        shape = _mesh_shape(m.group("mesh"), len(devices), repr(entry))
        groups.append(DeviceGroup(tuple(sorted(names.index(r) for r in roles)), devices, shape))
    missing = [r for r in names if r not in seen]
    if missing:
        raise UserError(f"placement gives no devices to {missing}; add an entry per model, e.g. {missing[0]}=N "
                        f"(or {'+'.join([missing[0], names[0]])}=... to share a group)")
    return tuple(sorted(groups, key=lambda g: g.models[0]))


def check_groups(groups: Sequence[DeviceGroup], num_models: int, num_devices: int) -> None:
    """Device groups given directly (not parsed): every model in exactly one group, existing devices, no device in
    two groups, each mesh covering its group's devices; UserError naming the fix otherwise."""
    placed = sorted(i for g in groups for i in g.models)
    if placed != list(range(num_models)):
        raise UserError(f"the device groups hold models {placed}; put each of the {num_models} models in exactly "
                        "one group")
    devices = [d for g in groups for d in g.devices]
    if any(not 0 <= d < num_devices for d in devices) or len(set(devices)) != len(devices):
        raise UserError(f"the device groups use devices {devices}; give each group its own devices among the "
                        f"{num_devices} that exist (0-{num_devices - 1})")
    for g in groups:
        if not g.devices or math.prod(g.mesh_shape) != len(g.devices):
            raise UserError(f"device group of models {g.models}: mesh {g.mesh_shape} does not cover its "
                            f"{len(g.devices)} devices; make (data, fsdp, tensor) multiply to {len(g.devices)}")


# ------------------------------------------------------------------------------------------- jitted pieces


def group_prefill(graphdefs, params, prompt_ids, prompt_masks, caches, *, groups, vocab_size):
    """One device group's prefill (its models only; ``groups`` index into them, as in :func:`engine.decode_loop`).
    -> (per-model next-token logits [B, V] float32 on the shared vocabulary, per-group (stacked) caches)."""
    stacked = [caches[m[0]] if len(m) == 1 else stack_caches([caches[i] for i in m]) for m in groups]
    logits, new = _run_groups(graphdefs, params, groups, prompt_ids, prompt_masks, stacked, shared_input=False)
    return tuple(x[:, :vocab_size].astype(jnp.float32) for x in logits), tuple(new)


def group_step(graphdefs, params, token, caches, *, groups, vocab_size):
    """One device group's forward of the chosen token ``[B]`` on its caches -> (logits [B, V] per model, caches)."""
    ones = jnp.ones((token.shape[0], 1), bool)
    logits, new = _run_groups(graphdefs, params, groups, token[:, None], ones, caches, shared_input=True)
    return tuple(x[:, :vocab_size].astype(jnp.float32) for x in logits), tuple(new)


def fuse_first(logits, fusion_params, sampling: SamplingParams, stop: StopCriteria, key, *, rule, vocab_size,
               max_new_tokens, analysis, pad_id, record_topk):
    """Token 0 from the prefill logits (in rule order) -> (state ``(t, token [B], record)``, all-finished flag)."""
    b = logits[0].shape[0]
    carry = init_record(b, max_new_tokens, len(logits), stop, pad_id=pad_id, analysis=analysis,
                        record_topk=record_topk)
    t = jnp.int32(0)
    token, extra = _choose(logits, fusion_params, sampling, fold_in(key, t), t, rule=rule, vocab_size=vocab_size,
                           analysis=analysis, record_topk=record_topk)
    token, carry = record_token(t, token, extra, carry, stop=stop, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                analysis=analysis, record_topk=record_topk)
    return (t, token, carry), jnp.all(carry[2])


def fuse_next(logits, fusion_params, sampling: SamplingParams, stop: StopCriteria, key, state, *, rule,
              vocab_size, max_new_tokens, analysis, pad_id, record_topk):
    """Token ``t + 1`` from the logits after token ``t`` -> (state, all-finished flag); the body of
    :func:`engine.decode_loop`'s while loop after the forward."""
    t, _, carry = state
    t = t + 1
    token, extra = _choose(logits, fusion_params, sampling, fold_in(key, t), t, rule=rule, vocab_size=vocab_size,
                           analysis=analysis, record_topk=record_topk)
    token, carry = record_token(t, token, extra, carry, stop=stop, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                analysis=analysis, record_topk=record_topk)
    return (t, token, carry), jnp.all(carry[2])


_FUSE_STATIC = ("rule", "vocab_size", "max_new_tokens", "analysis", "pad_id", "record_topk")
fuse_first_jit = jax.jit(fuse_first, static_argnames=_FUSE_STATIC)
fuse_next_jit = jax.jit(fuse_next, static_argnames=_FUSE_STATIC, donate_argnames=("state",))


# ------------------------------------------------------------------------------------------------- decoder


class _PlacedGroup:
    """A device group ready to run: its models' (stacked, sharded) params on its mesh, and its prefill / step
    jitted once with the graphdefs and the params' tree structure bound. Per token the step then takes a flat
    tuple of arrays: no graphdef hashing or ``nnx.State`` flattening on the host for every dispatch (they cost
    milliseconds per token in Python)."""

    def __init__(self, models, groups, graphdefs, params, mesh: Mesh, vocab_size: int):
        self.models = models  # model indices in rule order
        self.groups = groups  # same-architecture runs, indices into ``models``
        self.params = params  # one entry per run (engine.stack_groups)
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.leaves, treedef = jax.tree.flatten(params)
        static = dict(groups=groups, vocab_size=vocab_size)

        def prefill(leaves, prompt_ids, prompt_masks, caches):
            return group_prefill(graphdefs, jax.tree.unflatten(treedef, leaves), prompt_ids, prompt_masks, caches,
                                 **static)

        def step(leaves, token, caches):
            return group_step(graphdefs, jax.tree.unflatten(treedef, leaves), token, caches, **static)

        self.prefill = jax.jit(prefill, donate_argnums=3)
        self.step = jax.jit(step, donate_argnums=2)


class PlacedDecoder(Decoder):
    """:class:`engine.Decoder` with each model on its own device group (module doc): the same ``generate``
    arguments and the same tokens as the single-mesh decoder on the same models.

    ``placement``: a spec string (:func:`parse_placement`) or device groups. ``devices``: the devices the indices
    refer to (default ``jax.devices()``). ``check_every``: steps between reads of the all-rows-finished flag
    (each read waits for the flag made ``check_every`` steps before, so it rarely stalls; up to about
    ``2 * check_every`` extra pad-only steps once every row has finished)."""

    def __init__(self, models: Sequence[nnx.Module], rule: str = "proxy_tuning", *,
                 placement: str | Sequence[DeviceGroup], vocab_size: int | None = None,
                 devices: Sequence[Any] | None = None, partition_rules: Sequence[Any] | None = None,
                 group_same_architecture: bool = True, check_every: int = 8):
        # the single-device setup (rule, configs, graphdefs; params as the models' own arrays, not yet placed)
        super().__init__(models, rule, vocab_size=vocab_size, group_same_architecture=False)
        if check_every < 1:
            raise UserError(f"check_every must be >= 1, got {check_every}")
        self.check_every = int(check_every)
        self.steps_run = 0
        devices = list(devices if devices is not None else jax.devices())
        if isinstance(placement, str):
            placement = parse_placement(placement, self.rule, len(models), len(devices))
        else:
            check_groups(placement, len(models), len(devices))
        self.placement = tuple(sorted(placement, key=lambda g: min(g.models)))
        params = list(self.params)  # group_same_architecture=False: one entry per model
        rules = list(partition_rules) if partition_rules is not None else [partition_rules_of(m) for m in models]
        self.placed_groups = []
        for g in self.placement:
            mesh = make_mesh(MeshConfig(*g.mesh_shape), [devices[d] for d in g.devices])
            graphdefs = tuple(self.graphdefs[i] for i in g.models)
            local = [params[i] for i in g.models]
            runs = (_find_groups(graphdefs, local) if group_same_architecture
                    else tuple((j,) for j in range(len(g.models))))
            self.placed_groups.append(_PlacedGroup(
                g.models, runs, graphdefs, stack_groups(local, runs, mesh, [rules[i] for i in g.models]), mesh,
                self.vocab_size))
        # models run together share a prompt length (Decoder._inputs pads by self.groups)
        self.groups = tuple(tuple(pg.models[j] for j in run) for pg in self.placed_groups for run in pg.groups)
        self.params = None  # held per group in self.placed_groups
        self.fusion_device = devices[self.placement[0].devices[0]]  # the first device of the base's group

    def _place_batch(self, x):
        return np.asarray(x)  # placed per group in generate

    def _group_caches(self, pg: _PlacedGroup, batch_size: int, lengths: Sequence[int]):
        caches = []
        for i, length in zip(pg.models, lengths):
            shape = self._cache_shape(i, batch_size, length)
            abstract = jax.eval_shape(lambda: KVCache.zeros(**shape))
            caches.append(_cache_maker(*shape.values(), _Hashable(tree_shardings(abstract, CACHE_RULES, pg.mesh)))())
        return tuple(caches)

    def generate(self, prompts, *, max_new_tokens: int, fusion_params=None, sampling: SamplingParams | None = None,
                 stop: StopCriteria | None = None, seed: int = 0, analysis: bool = False, pad_id: int = 0,
                 record_topk: int = 0, row_ids: Sequence[int] | None = None, speculative: int = 0,
                 drafter: nnx.Module | None = None, drafter_prompt=None,
                 adaptive_speculative: bool = False) -> DecodeResult:
        """As :meth:`engine.Decoder.generate` (same arguments, same result), without speculative decoding."""
        if speculative or drafter is not None or drafter_prompt is not None or adaptive_speculative:
            raise UserError("speculative decoding runs every model in one program over one mesh; use Decoder "
                            "(drop the placement) or drop speculative")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= record_topk <= self.vocab_size:
            raise UserError(f"record_topk must lie in [0, {self.vocab_size}], got {record_topk}")
        ids, masks, fp, sampling, stop, keys = self._inputs(prompts, fusion_params, sampling, stop, seed, row_ids)
        b, n, v = ids[0].shape[0], int(max_new_tokens), self.vocab_size
        fuse_at = SingleDeviceSharding(self.fusion_device)
        fp, sampling, stop, keys = jax.device_put((fp, sampling, stop, keys), fuse_at)
        static = dict(rule=self.rule.name, vocab_size=v, max_new_tokens=n, analysis=bool(analysis),
                      pad_id=int(pad_id), record_topk=int(record_topk))

        logits: list[Any] = [None] * len(self.graphdefs)
        caches = []
        for pg in self.placed_groups:  # prefill: dispatched group after group, computed side by side
            put = lambda x: jax.device_put(x, tree_shardings(x, BATCH_RULES, pg.mesh))  # noqa: E731
            g_ids = tuple(put(ids[i]) for i in pg.models)
            g_masks = tuple(put(masks[i]) for i in pg.models)
            g_caches = self._group_caches(pg, b, [ids[i].shape[1] + n for i in pg.models])
            out, c = pg.prefill(pg.leaves, g_ids, g_masks, g_caches)
            caches.append(c)
            for i, x in zip(pg.models, out):
                logits[i] = x
        state, done = fuse_first_jit(jax.device_put(logits, fuse_at), fp, sampling, stop, keys, **static)

        token_at = [pg.replicated for pg in self.placed_groups]
        flag = None  # the all-finished flag of check_every steps ago, its host copy under way
        self.steps_run = 0  # one-token steps dispatched (a diagnostic: the single-mesh loop runs max(num_tokens) - 1)
        for t in range(1, n):
            if t % self.check_every == 0:
                if flag is not None and bool(flag):
                    break  # every row finished: the remaining steps would only record pad_id
                flag = done
                flag.copy_to_host_async()
            self.steps_run += 1
            tokens = jax.device_put([state[1]] * len(self.placed_groups), token_at)  # one batched copy
            for gi, pg in enumerate(self.placed_groups):
                out, caches[gi] = pg.step(pg.leaves, tokens[gi], caches[gi])
                for i, x in zip(pg.models, out):
                    logits[i] = x
            state, done = fuse_next_jit(jax.device_put(logits, fuse_at), fp, sampling, stop, keys, state, **static)
        return _to_host(record_output(state[2]))

    def generate_sweep(self, *args, **kwargs):
        raise UserError("generate_sweep needs one program over all models; use Decoder (one mesh) for a sweep, or "
                        "loop generate over the values with a placement")

