"""Training loops of the toy world, built on the library's jitted train step
(``proxytune_jax.training.make_train_step``) on a one-device mesh.

``fit(model, data, loss_fn, ...)`` runs ``steps`` optimizer steps over shuffled mini-batches of ``data`` (a
dict of equally long NumPy arrays) with a tqdm bar, and returns a new model with the trained weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxytune_jax.sharding import MeshConfig, make_mesh
from proxytune_jax.training.optim import OptimConfig, make_optimizer
from proxytune_jax.training.state import create_train_state, split_params
from proxytune_jax.training.step import make_multi_step, make_train_step

STEPS_PER_CALL = 8  # optimizer steps per jitted call (make_multi_step): these models are tiny, per-call costs weigh


@dataclasses.dataclass(frozen=True)
class FitConfig:
    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0


def one_device_mesh():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def batch_orders(n_rows: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices ``[steps, batch_size]``: shuffled passes over the data, a new permutation (from
    ``default_rng(seed)``) whenever the current one has fewer than ``batch_size`` rows left."""
    rng = np.random.default_rng(seed)
    order, pos, out = rng.permutation(n_rows), 0, []
    for _ in range(steps):
        if pos + batch_size > n_rows:
            order, pos = rng.permutation(n_rows), 0
        out.append(order[pos:pos + batch_size])
        pos += batch_size
    return np.stack(out).astype(np.int32)


def merge_params(graphdef, params) -> nnx.Module:
    """Rebuild an NNX model from a graphdef and a pure params dict."""
    return nnx.merge(graphdef, params)


def fit(model: nnx.Module, data: dict[str, np.ndarray], loss_fn: Callable, config: FitConfig, *,
        frozen: Any = None, desc: str = "train", progress: bool = True,
        step_cache: dict | None = None) -> tuple[nnx.Module, list[float]]:
    """Train ``model`` on ``data`` with ``loss_fn(params, frozen, batch, rng, extras) -> (loss, metrics)``.
    Returns ``(trained model, per-step losses)``. Batches are ``batch_orders(..., config.seed)``; the steps
    run ``STEPS_PER_CALL`` per jitted call (``make_multi_step``; the same updates as one call per step, the
    world's build 68 -> 54-60 s on 2 cores). Runs that differ only in ``config.seed`` can share the compiled
    steps through ``step_cache`` (a dict the caller keeps)."""
    from tqdm.auto import tqdm

    mesh = one_device_mesh()
    graphdef, params = split_params(model)
    opt_cfg = OptimConfig(learning_rate=config.learning_rate, warmup_steps=min(config.warmup_steps, config.steps),
                          total_steps=config.steps, weight_decay=config.weight_decay, min_lr_ratio=0.1)
    optimizer = make_optimizer(opt_cfg)
    with jax.set_mesh(mesh):
        # The step-0 state is built eagerly and replicated on the one device (cheaper than compiling
        # ``init_train_state``'s builder for every run of these tiny models).
        # Copies: the step donates the state, which must never alias the caller's model.
        params = jax.tree.map(jnp.array, params)
        state = create_train_state(params, optimizer, seed=config.seed)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings = jax.tree.map(lambda _: replicated, state)
        state = jax.device_put(state, shardings)
        if frozen is not None:
            frozen = jax.device_put(frozen, replicated)
        key = (id(loss_fn), dataclasses.replace(config, seed=0))
        if step_cache is not None and key in step_cache:
            step, multi = step_cache[key]
        else:
            step = make_train_step(loss_fn, optimizer, mesh, state_shardings=shardings, frozen=frozen)
            multi = make_multi_step(step)
            if step_cache is not None:
                step_cache[key] = step, multi
        idx = batch_orders(len(next(iter(data.values()))), config.steps, config.batch_size, config.seed)
        losses = []
        bar = tqdm(total=config.steps, desc=desc, disable=not progress, leave=False, mininterval=0.5)
        done = 0
        while done < config.steps:  # STEPS_PER_CALL steps per jitted call, single steps for the rest
            k = STEPS_PER_CALL if config.steps - done >= STEPS_PER_CALL else 1
            rows = idx[done:done + k]  # [k, batch]
            if k == 1:
                state, metrics = step(state, {name: jnp.asarray(v[rows[0]]) for name, v in data.items()})
            else:
                state, metrics = multi(state, {name: jnp.asarray(v[rows]) for name, v in data.items()})
            losses.append(metrics["loss"])  # a scalar or [k]: no extra device op to reshape it
            done += k
            bar.update(k)
        bar.close()
        losses = [float(x) for x in np.concatenate([np.atleast_1d(x) for x in jax.device_get(losses)])]
        params = jax.device_get(state.params)
    return merge_params(graphdef, params), losses


def next_token_ce_loss_fn(graphdef, label_smoothing: float = 0.0) -> Callable:
    """Causal-LM cross-entropy on ``batch["loss_mask"]`` tokens (mean over them); ``frozen`` unused.

    ``label_smoothing`` ε: the target is ``(1 − ε)·onehot + ε·uniform`` over the vocabulary, i.e. the loss is
    ``(1 − ε)·CE + ε·mean_v(−log p_v)``. The toy world trains every model with ε = 0.1: like real LMs (whose
    training text never makes a token impossible), no model then puts a token at a log-prob far below
    ``log(ε/V)``, so a difference of two models' log-probs -- proxy-tuning's offset -- stays bounded on tokens
    both find implausible instead of amplifying the noise of arbitrarily negative logits."""

    def loss_fn(params, frozen, batch, rng, extras):
        del frozen, rng, extras
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["input_ids"], batch["attention_mask"])  # [B, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        tgt = batch["input_ids"][:, 1:]
        m = ((batch["loss_mask"][:, 1:] > 0) & (batch["attention_mask"][:, 1:] > 0)).astype(jnp.float32)
        # one-hot product, not a gather: the gradient of a gather is a slow scatter on CPU
        nll = -jnp.sum(logp * jax.nn.one_hot(tgt, logp.shape[-1], dtype=jnp.float32), axis=-1)
        per = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
        tokens = jnp.sum(m)
        loss = jnp.sum(per * m) / jnp.maximum(tokens, 1.0)
        ce = jnp.sum(nll * m) / jnp.maximum(tokens, 1.0)
        return loss, {"loss": loss, "ce": ce, "tokens": tokens}

    return loss_fn
