"""The jitted train and eval steps.

``make_train_step(loss_fn, optimizer, mesh, ...)`` returns a pure ``(state, batch) -> (state, metrics)``
function: one ``jax.jit`` with explicit ``in_shardings``/``out_shardings`` and the state donated. Frozen
models (a distillation teacher, a Bayesian proxy) are *arguments* of the jitted function (never closed over,
so they are not baked into the executable as constants); the returned object binds them.

A ``loss_fn`` (see ``training.objectives``) has the signature
``loss_fn(params, frozen, batch, rng, extras) -> (loss, metrics)`` where ``loss`` is the mean over the batch's
loss tokens and ``metrics`` is a dict of scalars holding every term plus ``"tokens"`` (the number of loss
tokens, the weight of this batch).

Gradient accumulation (``grad_accum_steps = k``): the global batch of ``B`` rows is split into ``k``
micro-batches of ``B / k`` rows (row ``i`` goes to micro-batch ``i % k``, so each device keeps its own rows)
and scanned; each micro-batch gradient is weighted by its token count, so the update equals the big-batch
update for every per-token loss (batch-wise losses such as SinKD couple positions and are not decomposable).

Several steps per call (``make_multi_step(train_step)``): ``n`` optimizer steps as one jitted ``lax.scan``
over batches stacked ``[n, B, ...]`` (``sharding.put_stacked_batches``). The updates are the single step's
(the scan body *is* the step function; bit for bit in our tests); what shrinks is the work around each call:
dispatch of the state and teacher buffers, the host sync, the allocation of the temporaries
(measured by ``experiments/benchmarks/train.py``). It is the ``steps_per_call`` of ``proxytune train``; each
distinct ``n`` compiles once.

On CPU every step here is compiled with ``xla_options.compiler_options`` (see that module).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from proxytune_jax.errors import UserError
from proxytune_jax.sharding import BATCH_AXES, activation_sharding
from proxytune_jax.training.state import TrainState
from proxytune_jax.xla_options import compiler_options

LossFn = Callable[[Any, Any, dict, jax.Array, dict], tuple[jax.Array, dict]]


class TrainStep:
    """``step(state, batch) -> (state, metrics)``; ``step.jitted(frozen, state, batch)`` is the raw jit and
    ``step.fn`` the pure function it compiles (what ``make_multi_step`` scans)."""

    def __init__(self, jitted, frozen, *, fn, mesh: Mesh, state_shardings, frozen_shardings, donate: bool):
        self.jitted = jitted
        self.frozen = frozen
        self.fn = fn
        self.mesh = mesh
        self.state_shardings = state_shardings
        self.frozen_shardings = frozen_shardings
        self.donate = donate

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.jitted(self.frozen, state, batch)


class MultiStep:
    """``multi(state, batches) -> (state, metrics)``: one optimizer step per leading index of ``batches``
    (``[n, B, ...]``), metrics stacked ``[n]``; ``multi.jitted(frozen, state, batches)`` is the raw jit."""

    def __init__(self, jitted, frozen):
        self.jitted = jitted
        self.frozen = frozen

    def __call__(self, state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        return self.jitted(self.frozen, state, batches)


def _weighted_value_and_grad(loss_fn: LossFn, params, frozen, batch, rng, extras, accum: int, mesh: Mesh):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, metrics), grads = grad_fn(params, frozen, batch, rng, extras)
        return loss, metrics, grads

    def split(x):  # [B, ...] -> [k, B/k, ...], row i -> micro-batch i % k (keeps rows on their device)
        b = x.shape[0]
        if b % accum:
            raise UserError(f"batch size {b} is not divisible by grad_accum_steps={accum}")
        x = x.reshape((b // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        spec = P(None, BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
        g_sum, m_sum = carry
        mb, j = xs
        (loss, metrics), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, j), extras)
        w = metrics["tokens"].astype(jnp.float32)
        g_sum = jax.tree.map(lambda a, b: a + w * b, g_sum, g)
        m_sum = {k: m_sum[k] + (v if k == "tokens" else w * v) for k, v in metrics.items()}
        return (g_sum, m_sum), None

    (_, m_shapes) = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro),
                                                    rng, extras))[0]
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_m = {k: jnp.zeros(v.shape, v.dtype if k == "tokens" else jnp.float32) for k, v in m_shapes.items()}
    (g_sum, m_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(accum)))
    total = jnp.maximum(m_sum["tokens"].astype(jnp.float32), 1.0)
    grads = jax.tree.map(lambda g: g / total, g_sum)
    metrics = {k: (v if k == "tokens" else v / total) for k, v in m_sum.items()}
    return metrics["loss"], metrics, grads


def with_compute_dtype(loss_fn: LossFn, compute_dtype=None) -> LossFn:
    """Mixed precision: ``loss_fn`` evaluated on the trained params cast to ``compute_dtype`` (floating leaves
    only; ``None``: unchanged). The params (the master weights) and so the gradients and optimizer moments keep
    their own dtype: the cast's transpose brings the gradients back to it. Logits and losses are float32 by the
    models' and losses' own contract."""
    if compute_dtype is None:
        return loss_fn
    dtype = jnp.dtype(compute_dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def mixed(params, frozen, batch, rng, extras):
        return loss_fn(jax.tree.map(cast, params), frozen, batch, rng, extras)
    return mixed


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    state_shardings: TrainState, frozen: Any = None, grad_accum_steps: int = 1,
                    compute_dtype=None,
                    learning_rate_fn: Callable | None = None,
                    update_extras: Callable[[dict, jax.Array, dict], dict] | None = None,
                    generate: Callable[[Any, Any, dict, jax.Array], dict] | None = None,
                    donate: bool = True) -> TrainStep:
    """Build the jitted train step.

    Args:
      loss_fn: ``(params, frozen, batch, rng, extras) -> (loss, metrics)`` (see ``training.objectives``).
      optimizer: an optax transformation (``training.optim.make_optimizer``).
      mesh: the device mesh; batches are split over ``data x fsdp``.
      state_shardings: ``TrainState`` of ``NamedSharding`` (``training.state.train_state_shardings``).
      frozen: arrays the loss reads but does not train (teacher params), already placed on the mesh; their
        current shardings become the jit's ``in_shardings``.
      grad_accum_steps: micro-batches per optimizer step (see module docstring).
      compute_dtype: mixed precision (``with_compute_dtype``): e.g. ``jnp.bfloat16`` on float32 params.
      learning_rate_fn: the schedule, only to report ``learning_rate`` in the metrics.
      update_extras: ``(extras, step, metrics) -> extras`` for objective state (default: unchanged).
      generate: ``(params, frozen, batch, rng) -> batch``: data the objective makes inside the step before the
        gradient (e.g. student samples), under ``stop_gradient`` (default: the batch as given).
      donate: donate the input state's buffers (the caller must not reuse the old state).

    Metrics: every term from ``loss_fn``, ``tokens`` (loss tokens in the global batch), ``grad_norm``
    (global norm before clipping) and ``learning_rate`` (the rate used by this update).
    """
    if grad_accum_steps < 1:
        raise UserError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    loss_fn = with_compute_dtype(loss_fn, compute_dtype)
    frozen = {} if frozen is None else frozen
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))  # a prefix: every batch leaf split on its leading dim
    rep = NamedSharding(mesh, P())

    def step(frozen, state: TrainState, batch):
        with activation_sharding(mesh):  # the models constrain activations to batch rows over data x fsdp
            return _step(frozen, state, batch)

    def _step(frozen, state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)
        if generate is not None:
            gen_rng, step_rng = jax.random.split(step_rng)
            batch = jax.lax.stop_gradient(generate(state.params, frozen, batch, gen_rng))
        loss, metrics, grads = _weighted_value_and_grad(loss_fn, state.params, frozen, batch, step_rng,
                                                        state.extras, grad_accum_steps, mesh)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        extras = state.extras if update_extras is None else update_extras(state.extras, state.step, metrics)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, extras=extras)
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(frozen_shardings, state_shardings, batch_sh),
                     out_shardings=(state_shardings, rep), donate_argnums=(1,) if donate else (),
                     compiler_options=compiler_options(mesh))
    return TrainStep(jitted, frozen, fn=step, mesh=mesh, state_shardings=state_shardings,
                     frozen_shardings=frozen_shardings, donate=donate)


def make_multi_step(train_step: TrainStep) -> MultiStep:
    """Several optimizer steps per jitted call: ``lax.scan`` of ``train_step``'s own step function over
    batches stacked on a new leading axis (see the module docstring for why this is faster on CPU).

    ``multi(state, batches)`` with ``batches`` a dict of ``[n, B, ...]`` arrays placed by
    ``sharding.put_stacked_batches`` (step axis replicated, rows over data x fsdp) returns the state after
    ``n`` steps and every metric of every step, stacked ``[n]``. Same shardings and donation as
    ``train_step``; each distinct ``n`` compiles once.
    """
    fn, mesh = train_step.fn, train_step.mesh
    stacked_sh = NamedSharding(mesh, P(None, BATCH_AXES))  # a prefix: [n, B, ...] rows split on dim 1

    def multi(frozen, state: TrainState, batches):
        return jax.lax.scan(lambda s, b: fn(frozen, s, b), state, batches)

    jitted = jax.jit(multi, in_shardings=(train_step.frozen_shardings, train_step.state_shardings, stacked_sh),
                     out_shardings=(train_step.state_shardings, NamedSharding(mesh, P())),
                     donate_argnums=(1,) if train_step.donate else (), compiler_options=compiler_options(mesh))
    return MultiStep(jitted, train_step.frozen)


class EvalStep:
    """``evaluate(params, batch) -> metrics`` (token-weighted sums; see ``mean_metrics``)."""

    def __init__(self, jitted, frozen):
        self.jitted = jitted
        self.frozen = frozen

    def __call__(self, params, batch) -> dict:
        return self.jitted(self.frozen, params, batch)


def make_eval_step(loss_fn: LossFn, mesh: Mesh, *, params_shardings: Any, frozen: Any = None,
                   seed: int = 0, state: Any = None, compute_dtype=None) -> EvalStep:
    """A jitted ``(params, batch) -> metrics`` without gradients. Each metric comes back multiplied by the
    batch's ``tokens`` so several batches add up; ``mean_metrics`` divides by the total. ``state``: the
    objective state the loss reads (its initial value; default none)."""
    objective_state = {} if state is None else state
    loss_fn = with_compute_dtype(loss_fn, compute_dtype)
    frozen = {} if frozen is None else frozen
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    rep = NamedSharding(mesh, P())

    def evaluate(frozen, params, batch):
        with activation_sharding(mesh):
            _, metrics = loss_fn(params, frozen, batch, jax.random.PRNGKey(seed), objective_state)
        w = metrics["tokens"].astype(jnp.float32)
        return {k: (v if k == "tokens" else w * v) for k, v in metrics.items()}

    jitted = jax.jit(evaluate, in_shardings=(frozen_shardings, params_shardings, NamedSharding(mesh, P(BATCH_AXES))),
                     out_shardings=rep, compiler_options=compiler_options(mesh))
    return EvalStep(jitted, frozen)


def mean_metrics(summed: list[dict]) -> dict[str, float]:
    """Token-weighted means of ``make_eval_step`` outputs over several batches."""
    total: dict[str, float] = {}
    for m in summed:
        for k, v in m.items():
            total[k] = total.get(k, 0.0) + float(v)
    tokens = max(total.get("tokens", 0.0), 1.0)
    return {k: (v if k == "tokens" else v / tokens) for k, v in total.items()}
