"""The one training loop, and ``fit``: training on in-memory arrays with an objective, several seeds at once.

``run_steps`` drives a jitted train step over a range of steps: it groups them ``steps_per_call`` to a jitted
call (``step.make_multi_step``), cuts a call wherever a caller needs the state of a given step (a checkpoint,
an evaluation: ``cut_every``), and hands every finished call to ``on_call``. ``training.train`` (the
``proxytune train`` run with files, checkpoints and metrics) and ``fit`` both run through it.

``fit(model, data, objective, ...)`` trains on a dict of equally long NumPy arrays (``input_ids``,
``attention_mask``, ``loss_mask`` and whatever the objective reads: ``teacher_logits``, ``topk_ids``, ...) with
shuffled mini-batches, AdamW + warmup-cosine, on a one-device mesh by default. With ``seeds=(s0, s1, ...)``
the runs of every seed train together: the train state is stacked on a leading seed axis and the step is
``jax.vmap``-ed over it (each seed with its own data order, initial PRNG key and gradient clipping), which
costs far less than one run after another for small models. The toy world trains its models and its
distillation students this way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from proxytune_jax.errors import UserError
from proxytune_jax.models.lora import LoraConfig
from proxytune_jax.sharding import MeshConfig, make_mesh
from proxytune_jax.training.objectives import Objective
from proxytune_jax.training.optim import OptimConfig, learning_rate_schedule, make_optimizer
from proxytune_jax.training.state import create_train_state, split_params
from proxytune_jax.training.step import MultiStep, TrainStep, make_train_step


def call_length(step: int, total: int, steps_per_call: int, cut_every: Sequence[int] = ()) -> int:
    """How many steps the jitted call starting after ``step`` runs: ``steps_per_call``, unless a step whose
    state is needed (a multiple of an entry of ``cut_every``, or the last step ``total``) comes sooner; then
    single steps up to it (one compiled program for each of 1 and ``steps_per_call``, not one per remainder).
    The cut points are absolute step numbers, so a resumed run groups its steps as an uninterrupted one."""
    k = steps_per_call
    end = min(step + k, total)
    for every in cut_every:
        if every:
            end = min(end, (step // every + 1) * every)
    return k if end - step == k else 1


def run_steps(state, train_step: TrainStep, multi_step: MultiStep | None, host_batches: Callable[[int], dict],
              place: Callable[[list[dict]], Any], *, start: int, total: int, steps_per_call: int = 1,
              cut_every: Sequence[int] = (), on_call: Callable[[Any, int, list[dict], dict], Any] | None = None,
              bar=None):
    """Run steps ``start+1 .. total``. ``host_batches(s)`` gives the host batch of step ``s`` (0-based);
    ``place(batches)`` puts one batch (a list of one) or ``n`` stacked batches on the devices.
    ``on_call(state, first_step, hosts, metrics)`` runs after each call (metrics still on device, stacked
    ``[n]`` for a multi-step call) and may return a replacement state (or None). Returns the final state."""
    step = start
    while step < total:
        n = call_length(step, total, steps_per_call if multi_step is not None else 1, cut_every)
        hosts = [host_batches(s) for s in range(step, step + n)]
        if n == 1:
            state, metrics = train_step(state, place(hosts))
        else:
            state, metrics = multi_step(state, place(hosts))
        if on_call is not None:
            state = on_call(state, step, hosts, metrics) or state
        step += n
        if bar is not None:
            bar.update(n)
    return state


def batch_orders(n_rows: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices ``[steps, batch_size]``: shuffled passes over the data, a new permutation (from
    ``default_rng(seed)``) whenever the current one has fewer than ``batch_size`` rows left."""
    if n_rows < 1:
        raise UserError("fit got no training rows")
    batch_size = min(batch_size, n_rows)
    rng = np.random.default_rng(seed)
    order, pos, out = rng.permutation(n_rows), 0, []
    for _ in range(steps):
        if pos + batch_size > n_rows:
            order, pos = rng.permutation(n_rows), 0
        out.append(order[pos:pos + batch_size])
        pos += batch_size
    return np.stack(out).astype(np.int32)


@dataclasses.dataclass
class FitResult:
    """``models``: one trained model per seed; ``metrics``: every step's metrics, ``[steps]`` per seed
    (``metrics[name][i]`` is seed ``seeds[i]``'s curve)."""

    models: list[nnx.Module]
    metrics: dict[str, np.ndarray]
    seeds: tuple[int, ...]
    adapters: list | None = None  # with ``fit(lora=...)``: the trained LoRA adapter of each seed

    @property
    def model(self) -> nnx.Module:
        return self.models[0]


def _seed_parallel(train_step: TrainStep, mesh, num_seeds: int) -> tuple[Callable, Callable]:
    """Jitted ``(state, batch, frozen)`` and ``(state, batches, frozen)`` over a seed-stacked state: ``vmap`` of
    the step's own function over the seed axis (frozen models shared), and a scan of it over stacked steps.
    One seed runs the step function itself on the unstacked state (no batched products of size 1)."""
    fn = train_step.fn
    rep = NamedSharding(mesh, P())
    if num_seeds == 1:
        def vstep(frozen, state, batch):
            squeeze = functools.partial(jax.tree.map, lambda x: x[0])
            out = fn(frozen, squeeze(state), squeeze(batch))
            return jax.tree.map(lambda x: x[None], out)
    else:
        vstep = jax.vmap(fn, in_axes=(None, 0, 0))

    def multi(frozen, state, batches):  # batches [n, S, B, ...]
        return jax.lax.scan(lambda s, b: vstep(frozen, s, b), state, batches)

    kw = dict(in_shardings=rep, out_shardings=rep, donate_argnums=(1,))
    j1, jn = jax.jit(vstep, **kw), jax.jit(multi, **kw)
    return (lambda s, b, f: j1(f, s, b)), (lambda s, b, f: jn(f, s, b))


_STEP_CACHE: dict = {}


def fit(model: nnx.Module, data: dict[str, np.ndarray], objective: Objective, *, steps: int, batch_size: int,
        optim: OptimConfig, seeds: Sequence[int] = (0,), frozen_models: dict[str, nnx.Module] | None = None,
        steps_per_call: int = 8, mesh=None, progress: bool = True, desc: str = "train",
        reuse_compiled: bool = True, lora: LoraConfig | None = None) -> FitResult:
    """Train ``model`` on in-memory ``data`` with ``objective`` for ``steps`` steps of ``batch_size`` rows, once
    per seed of ``seeds``, all seeds together (see the module docstring). ``frozen_models`` are the models of
    ``objective.frozen_models()`` by role, already loaded. Seed ``s`` draws its batches with
    ``batch_orders(rows, steps, batch_size, s)`` and starts its PRNG key from ``s``; ``optim.total_steps`` 0
    means ``steps``. Runs that differ only in their seeds and data values reuse compiled steps
    (``reuse_compiled``).

    With ``lora`` (a ``models.lora.LoraConfig``) only a LoRA adapter is trained (``training.lora``; seed ``s``
    draws its ``lora_A`` from ``s``): ``FitResult.adapters`` holds one adapter per seed and ``models`` the
    base with each adapter applied, unmerged (sharing the base's arrays)."""
    from tqdm.auto import tqdm

    objective = objective.bind_run(steps)
    objective.validate()
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise UserError("fit needs at least one seed")
    if steps < 1:
        raise UserError(f"fit needs steps >= 1, got {steps}")
    mesh = mesh or make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    optim = optim if optim.total_steps else dataclasses.replace(optim, total_steps=steps)
    optim = dataclasses.replace(optim, warmup_steps=min(optim.warmup_steps, steps - 1))
    optimizer = make_optimizer(optim)
    graphdef, params = split_params(model)
    frozen_models = frozen_models or {}
    missing = set(objective.frozen_models()) - set(frozen_models)
    if missing:
        raise UserError(f"objective {objective.name} needs frozen model(s) {', '.join(sorted(missing))}")
    frozen_graphdefs, frozen = {}, {}
    for role in objective.frozen_models():
        frozen_graphdefs[role], frozen[role] = split_params(frozen_models[role])
    base = None
    if lora is not None:
        from proxytune_jax.models import lora as lora_lib
        from proxytune_jax.training.lora import BASE_ROLE
        base, frozen[BASE_ROLE] = params, params
    rep = NamedSharding(mesh, P())
    n_rows = len(data["input_ids"])
    idx = np.stack([batch_orders(n_rows, steps, batch_size, s) for s in seeds], axis=1)  # [steps, S, B]
    with jax.set_mesh(mesh):
        # Copies: the step donates the state, which must never alias the caller's model.
        init = ((lambda s: jax.tree.map(jnp.array, params)) if lora is None
                else (lambda s: lora_lib.init_lora(base, lora, jax.random.PRNGKey(s))))
        states = [create_train_state(init(s), optimizer, seed=s, extras=objective.init_state()) for s in seeds]
        state = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *states), rep)
        frozen = jax.device_put(frozen, rep)
        shardings = jax.tree.map(lambda _: rep, states[0])
        key = (repr(objective), graphdef, tuple(frozen_graphdefs.items()), optim, len(seeds), id(mesh), lora)
        cached = _STEP_CACHE.get(key) if reuse_compiled else None
        if cached is None:
            loss_fn = objective.loss_fn(graphdef, frozen_graphdefs)
            generate = objective.make_generate(graphdef, frozen_graphdefs)
            if lora is not None:
                from proxytune_jax.training.lora import wrap_generate, wrap_loss_fn
                loss_fn, generate = wrap_loss_fn(loss_fn, lora), wrap_generate(generate, lora)
            step = make_train_step(loss_fn, optimizer, mesh, state_shardings=shardings, frozen=frozen,
                                   learning_rate_fn=learning_rate_schedule(optim),
                                   update_extras=objective.update_state, generate=generate)
            cached = _seed_parallel(step, mesh, len(seeds))
            if reuse_compiled:
                _STEP_CACHE[key] = cached
        one, many = cached  # called with this call's frozen arrays (a cached step saw another call's)
        dev = {k: jnp.asarray(v) for k, v in data.items()}

        def place(hosts):
            rows = jnp.asarray(np.stack(hosts) if len(hosts) > 1 else hosts[0])  # [(n,) S, B]
            return jax.tree.map(lambda x: x[rows], dev)

        calls: list[tuple[int, dict]] = []
        bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, mininterval=0.5)
        state = run_steps(state, TrainStepLike(one, frozen), TrainStepLike(many, frozen), lambda s: idx[s], place,
                          start=0, total=steps, steps_per_call=steps_per_call,
                          on_call=lambda st, first, hosts, m: calls.append((len(hosts), m)), bar=bar)
        bar.close()
        params = jax.device_get(state.params)
    metrics: dict[str, list] = {}
    for n, m in jax.device_get(calls):
        for k, v in m.items():
            metrics.setdefault(k, []).append(np.reshape(np.asarray(v), (n, len(seeds))))
    stacked = {k: np.concatenate(v).T for k, v in metrics.items()}  # [S, steps]
    per_seed = [jax.tree.map(lambda x: x[i], params) for i in range(len(seeds))]
    if lora is None:
        return FitResult([nnx.merge(graphdef, p) for p in per_seed], stacked, seeds)
    models = [nnx.merge(graphdef, lora_lib.apply(base, ad, lora)) for ad in per_seed]
    return FitResult(models, stacked, seeds, adapters=per_seed)


class TrainStepLike:
    """Adapts a ``(state, batch, frozen)`` callable to the ``step(state, batch)`` form ``run_steps`` calls,
    passing this call's frozen arrays."""

    def __init__(self, fn, frozen):
        self.fn, self.frozen = fn, frozen

    def __call__(self, state, batch):
        return self.fn(state, batch, self.frozen)

