"""The train state: one pytree holding everything a step changes.

``params`` is a *pure* nested dict of arrays (``nnx.to_pure_dict(nnx.split(model)[1])``): parameter paths read
like ``model/layers/0/self_attn/q_proj/weight``, which the partition rules, weight-decay masks and orbax
all see directly. ``nnx.merge(graphdef, params)`` rebuilds the module inside a jitted step.

``rng`` is a raw ``uint32[2]`` key (``jax.random.PRNGKey`` layout) so checkpoints store plain arrays; the step
splits it once per optimizer step, so a resumed run draws the same numbers as an uninterrupted one.
``extras`` holds loss-specific state (e.g. TAID's interpolation ``t``): a flat dict of arrays, saved and
restored with the rest.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from proxytune_jax.sharding import Rules, put_global, suffix_shardings, tree_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken
    params: Any  # pure dict of arrays (the trained model)
    opt_state: Any  # optax state over params
    rng: jax.Array  # [2] uint32 raw PRNG key
    extras: dict[str, jax.Array]  # loss-specific state


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, pure params dict)`` of an NNX model (``nnx.merge(graphdef, params)`` rebuilds it)."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def create_train_state(params: Any, optimizer: optax.GradientTransformation, *, seed: int = 0,
                       extras: dict[str, Any] | None = None) -> TrainState:
    """A fresh state at step 0 (call under ``jax.jit`` with ``out_shardings`` to build it sharded)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        extras={k: jnp.asarray(v) for k, v in (extras or {}).items()},
    )


def train_state_shardings(abstract_state: TrainState, rules: Rules, mesh: Mesh) -> TrainState:
    """``NamedSharding`` for every leaf: params by the model family's ``rules``; optimizer moments like the
    parameter they track (matched by path suffix and shape); step, rng, extras and counters replicated."""
    params_sh = tree_shardings(abstract_state.params, rules, mesh)
    rep = NamedSharding(mesh, P())
    return TrainState(
        step=rep,
        params=params_sh,
        opt_state=suffix_shardings(abstract_state.opt_state, abstract_state.params, params_sh, mesh),
        rng=rep,
        extras=jax.tree.map(lambda _: rep, abstract_state.extras),
    )


def abstract_train_state(params_shapes: Any, optimizer: optax.GradientTransformation, *, rules: Rules,
                         mesh: Mesh, extras: dict[str, Any] | None = None) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct`` leaves carrying their target shardings on ``mesh``: the tree
    orbax restores into (this is how a checkpoint saved on 8 devices is resumed on 1, and back)."""
    shapes = jax.eval_shape(lambda p: create_train_state(p, optimizer, extras=extras), params_shapes)
    shardings = train_state_shardings(shapes, rules, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, *, rules: Rules, mesh: Mesh,
                     seed: int = 0, extras: dict[str, Any] | None = None) -> TrainState:
    """Build the step-0 state directly sharded on ``mesh`` (params are copied onto their shardings)."""
    abstract = abstract_train_state(jax.eval_shape(lambda p: p, params), optimizer, rules=rules, mesh=mesh,
                                    extras=extras)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    params = put_global(params, shardings.params)
    build = jax.jit(lambda p: create_train_state(p, optimizer, seed=seed, extras=extras),
                    in_shardings=(shardings.params,), out_shardings=shardings)
    return build(params)
