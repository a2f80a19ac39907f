"""Training objectives: pure ``loss_fn(params, frozen, batch, rng, extras) -> (loss, metrics)``.

Each factory closes over *static* things only (graph definitions, loss names, hyperparameters); arrays that
the loss reads but does not train (a teacher's params) arrive through ``frozen`` (see ``training.step``).

Batch convention (``training.data``): ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]``. The logits at
position ``t`` are scored against token ``t + 1``; position ``t`` counts when token ``t + 1`` is a training
target (``loss_mask``) and both tokens are real (``attention_mask``). Every loss is the mean over counted
positions, and ``metrics["tokens"]`` is their number (the batch weight used by gradient accumulation).

Metrics name every term: ``loss`` (what is minimized), ``ce`` (cross-entropy on the targets, always
reported), and the distillation term under the loss's own name (e.g. ``forward_kl``).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from proxytune_jax.errors import UserError
from proxytune_jax.models.layers import lm_logits

_LOSS_MODULES = ("proxytune_jax.losses", "proxytune_jax.losses.divergences", "proxytune_jax.losses.sinkd",
                 "proxytune_jax.losses.first", "proxytune_jax.losses.bayesian")


def resolve_loss(name: str) -> Callable:
    """A distillation loss of ``proxytune_jax.losses`` by name (UserError listing the known ones)."""
    known = {}
    for mod_name in _LOSS_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr in dir(mod):
            fn = getattr(mod, attr)
            if attr.startswith("_") or not callable(fn) or attr.endswith("_per_position"):
                continue
            try:
                params = list(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            if params[:2] == ["student_logits", "teacher_logits"]:
                known.setdefault(attr, fn)
    if name not in known:
        raise UserError(f"unknown distillation loss {name!r}; choose one of: {', '.join(sorted(known))}")
    return known[name]


def _accepts(fn: Callable, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _loss_call_kwargs(fn: Callable, loss_kwargs: dict | None, temperature: float) -> tuple[dict, bool]:
    """The keyword arguments a distillation loss is called with (``temperature`` where it takes one) and
    whether it also wants ``labels`` (losses that mix in cross-entropy themselves)."""
    kwargs = dict(loss_kwargs or {})
    if _accepts(fn, "temperature"):
        kwargs["temperature"] = temperature
    return kwargs, _accepts(fn, "labels")


def shifted(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(labels [B, T-1] int32, mask [B, T-1] bool)``: the target of position t is token t+1."""
    ids, attn, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    labels = ids[:, 1:]
    mask = (lm[:, 1:] > 0) & (attn[:, 1:] > 0) & (attn[:, :-1] > 0)
    return labels, mask


def token_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over ``mask`` of ``logsumexp(logits) - logits[label]`` in fp32 (0 for an empty mask).

    The label's logit is picked with a one-hot product, not a gather: the gradient of a gather is a scatter,
    which XLA on CPU runs several times slower than this elementwise form."""
    logits = logits.astype(jnp.float32)
    picked = jnp.sum(logits * jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def model_logits(graphdef: nnx.GraphDef, params: Any, batch: dict) -> jax.Array:
    """Logits ``[B, T-1, V]`` (fp32) of the positions that predict tokens 1..T-1.

    The last position is dropped from the hidden states *before* the output projection (same values as
    slicing ``model(...)`` logits), so no ``[B, T, V]`` slice runs forward and no pad of the ``[B, T-1, V]``
    cotangent runs backward."""
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, T, D]
    return lm_logits(h[:, :-1], model.lm_head_weight())  # [B, T-1, V] float32


def sft_objective(graphdef: nnx.GraphDef) -> Callable:
    """Supervised fine-tuning: cross-entropy on the response tokens. Metrics: ``loss``, ``ce``, ``tokens``."""

    def loss_fn(params, frozen, batch, rng, extras):
        del frozen, rng, extras
        labels, mask = shifted(batch)
        ce = token_cross_entropy(model_logits(graphdef, params, batch), labels, mask)
        return ce, {"loss": ce, "ce": ce, "tokens": jnp.sum(mask, dtype=jnp.int32)}

    return loss_fn


def online_distillation_objective(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef, *,
                                  loss: str = "forward_kl", temperature: float = 1.0, kd_weight: float = 1.0,
                                  ce_weight: float = 0.0, loss_kwargs: dict | None = None) -> Callable:
    """Online distillation: the teacher (``frozen["teacher"]``) runs inside the step under
    ``stop_gradient``; ``loss = kd_weight * <loss>(student, teacher, mask, temperature) + ce_weight * ce``.

    ``loss`` is any name from ``proxytune_jax.losses`` with the ``(student_logits, teacher_logits, mask, *,
    temperature, ...)`` signature; losses that mix in cross-entropy themselves (``hinton_kd``, ``uld_kd``) get
    ``labels``. ``loss_kwargs`` pass hyperparameters (``alpha``, ``beta``, ...). Student and teacher must share
    the tokenizer; a teacher with a larger (padded) vocabulary is cut to the student's ids.
    Metrics: ``loss``, ``<loss name>``, ``ce``, ``tokens``.
    """
    kd_fn = resolve_loss(loss)
    kwargs, wants_labels = _loss_call_kwargs(kd_fn, loss_kwargs, temperature)

    def loss_fn(params, frozen, batch, rng, extras):
        del rng, extras
        labels, mask = shifted(batch)
        student = model_logits(student_graphdef, params, batch)
        teacher = jax.lax.stop_gradient(model_logits(teacher_graphdef, frozen["teacher"], batch))
        teacher = teacher[..., : student.shape[-1]]
        extra = {"labels": labels} if wants_labels else {}
        kd = kd_fn(student, teacher, mask, **kwargs, **extra)
        ce = token_cross_entropy(student, labels, mask)
        total = kd_weight * kd + ce_weight * ce
        return total, {"loss": total, loss: kd, "ce": ce, "tokens": jnp.sum(mask, dtype=jnp.int32)}

    return loss_fn


def offline_topk_objective(student_graphdef: nnx.GraphDef, *, temperature: float = 1.0,
                           mode: str = "renormalize", kd_weight: float = 1.0, ce_weight: float = 0.0,
                           loss_kwargs: dict | None = None) -> Callable:
    """Offline distillation from a FIRST top-k teacher cache (``training.topk_cache``): the batch carries
    ``topk_ids``/``topk_logp`` ``[B, T, k]`` (the teacher's top-k at each input position) and the loss is
    ``kd_weight * topk_kl(student, teacher, mask, temperature=τ, mode) + ce_weight * ce``; τ tempers the
    teacher only (FIRST's calibration), ``mode`` is ``renormalize`` or ``tail_bucket``.
    Metrics: ``loss``, ``topk_kl``, ``ce``, ``tokens``."""
    from proxytune_jax.losses.first import MODES, TopKTeacher, topk_kl
    if mode not in MODES:
        raise UserError(f"topk mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    kwargs = dict(loss_kwargs or {})

    def loss_fn(params, frozen, batch, rng, extras):
        del frozen, rng, extras
        labels, mask = shifted(batch)
        student = model_logits(student_graphdef, params, batch)
        teacher = TopKTeacher(batch["topk_ids"][:, :-1], batch["topk_logp"][:, :-1].astype(jnp.float32))
        kd = topk_kl(student, teacher, mask, temperature=temperature, mode=mode, **kwargs)
        ce = token_cross_entropy(student, labels, mask)
        total = kd_weight * kd + ce_weight * ce
        return total, {"loss": total, "topk_kl": kd, "ce": ce, "tokens": jnp.sum(mask, dtype=jnp.int32)}

    return loss_fn


def prepare_sources(config, train_src, eval_src, tokenizer, mesh):
    """Per-objective host-side additions to the batches (top-k cache entries, ...) and extra frozen arrays.
    Returns ``(train_src, eval_src, extra_frozen)``."""
    del tokenizer, mesh
    if config.objective == "offline_topk":
        from proxytune_jax.training.topk_cache import TopKAttacher
        train_src.attach = TopKAttacher(config.topk_cache, train_src.batches.examples, name=config.train_file)
        if eval_src is not None:
            if not config.eval_topk_cache:
                raise UserError("objective offline_topk with an eval_file needs eval_topk_cache (the teacher's "
                                "top-k cache of eval_file)")
            eval_src.attach = TopKAttacher(config.eval_topk_cache, eval_src.batches.examples, name=config.eval_file)
        return train_src, eval_src, {}
    if config.objective == "bayesian":
        return _prepare_bayesian(config, train_src, eval_src)
    return train_src, eval_src, {}


def bayesian_objective(student_graphdef: nnx.GraphDef, proxy_graphdef: nnx.GraphDef | None = None, *,
                       num_bins: int = 100, num_samples: int = 8, alpha: float = 0.5, beta: float = 0.5,
                       temperature: float = 1.0, proxy_temperature: float = 1.0) -> Callable:
    """Bayesian KD from a closed-source teacher (``losses.bayesian``): the training file is the teacher's
    generated corpus; the batch carries the n-gram prior ``prior_ids``/``prior_probs`` ``[B, T, S]`` (entry t =
    the prior of token t, host-side, see ``PriorAttacher``). Inside the step K tokens per position are sampled
    from the proxy model M (``frozen["proxy"]``; without one, the student's own stop-gradient logits), the
    posterior ``E(P | M)`` is formed in closed form and
    ``loss = mean_t [CE_t + α·KL(p̂_t ‖ q_t) + β·KL(E(P|M)_t ‖ q_t)]`` (``bayesian_kd``).
    Metrics: ``loss``, ``ce``, ``kl_prior``, ``kl_posterior``, ``tokens``."""
    from proxytune_jax.losses.bayesian import (SparseDist, bayesian_kd, posterior_estimate, sample_proxy_tokens,
                                               sparse_kl)

    def loss_fn(params, frozen, batch, rng, extras):
        del extras
        labels, mask = shifted(batch)
        student = model_logits(student_graphdef, params, batch)
        if proxy_graphdef is not None:
            proxy = model_logits(proxy_graphdef, frozen["proxy"], batch)[..., : student.shape[-1]]
        else:
            proxy = student
        proxy = jax.lax.stop_gradient(proxy)
        prior = SparseDist(batch["prior_ids"][:, 1:], batch["prior_probs"][:, 1:])
        samples = sample_proxy_tokens(rng, proxy, num_samples, temperature=proxy_temperature)
        posterior = jax.lax.stop_gradient(posterior_estimate(prior, samples, num_bins=num_bins))
        loss = bayesian_kd(student, labels, prior, posterior, mask, alpha=alpha, beta=beta, temperature=temperature)
        kl_prior = sparse_kl(student, prior, mask, temperature=temperature)
        kl_post = sparse_kl(student, posterior, mask, temperature=temperature)
        ce = token_cross_entropy(student, labels, mask)
        return loss, {"loss": loss, "ce": ce, "kl_prior": kl_prior, "kl_posterior": kl_post,
                      "tokens": jnp.sum(mask, dtype=jnp.int32)}

    return loss_fn


class PriorAttacher:
    """Adds the n-gram prior of every token (``prior_ids`` int32 / ``prior_probs`` float32 ``[B, T, S]``) to a
    host batch. Each row's real tokens are scored on their own (pads never enter a context), matching how the
    counts were taken from the unpadded corpus."""

    def __init__(self, prior, *, gamma: float = 2.0, support: int = 32):
        self.prior, self.gamma, self.support = prior, gamma, support

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        ids, attn = batch["input_ids"], batch["attention_mask"] > 0
        B, T = ids.shape
        S = self.support + 1
        out_ids = np.full((B, T, S), -1, np.int32)
        out_p = np.zeros((B, T, S), np.float32)
        for r in range(B):
            real = np.flatnonzero(attn[r])
            if real.size == 0:
                continue
            d = self.prior.prior(ids[r, real], gamma=self.gamma, support=self.support)
            out_ids[r, real], out_p[r, real] = d.ids, d.probs
        return {**batch, "prior_ids": out_ids, "prior_probs": out_p}


def _prepare_bayesian(config, train_src, eval_src):
    from proxytune_jax.losses.bayesian import NgramPrior
    prior = NgramPrior.from_corpus([e.ids for e in train_src.batches.examples], n=config.ngram_n)
    attach = PriorAttacher(prior, gamma=config.gamma, support=config.prior_support)
    train_src.attach = attach
    if eval_src is not None:
        eval_src.attach = attach
    return train_src, eval_src, {}


def online_distillation_chunked_objective(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef, *,
                                          loss: str = "forward_kl", temperature: float = 1.0,
                                          kd_weight: float = 1.0, chunk_size: int | None = None,
                                          loss_kwargs: dict | None = None) -> Callable:
    """Online distillation without ever materializing ``[B, T, V]`` logits: both models stop at their final
    hidden states and the loss is computed from ``h @ W_lm_head`` in chunks of positions
    (``losses.chunked_loss``: same value and gradient as the plain objective, the teacher a constant).
    ``loss`` is a per-position name of ``losses.PER_POSITION``; to mix in cross-entropy use ``hinton_kd``
    (or ``uld_kd``), which get ``labels``. Metrics: ``loss``, ``<loss name>``, ``tokens`` (no separate ``ce``:
    it would need the full logits)."""
    from proxytune_jax.losses.chunked import chunked_loss, resolve_per_position
    per_position = resolve_per_position(loss)
    kwargs, wants_labels = _loss_call_kwargs(per_position, loss_kwargs, temperature)

    def loss_fn(params, frozen, batch, rng, extras):
        del rng, extras
        labels, mask = shifted(batch)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        student = nnx.merge(student_graphdef, params)
        teacher = nnx.merge(teacher_graphdef, frozen["teacher"])
        hs, _ = student.hidden_states(ids, attn)  # [B, T, D]
        ht, _ = teacher.hidden_states(ids, attn)  # [B, T, Dt]
        ht, wt = jax.lax.stop_gradient(ht[:, :-1]), jax.lax.stop_gradient(teacher.lm_head_weight())
        ws = student.lm_head_weight()
        wt = wt[: ws.shape[0]]
        pos = {"labels": labels} if wants_labels else None
        kd = chunked_loss(loss, hs[:, :-1], ws, ht, wt, mask, chunk_size=chunk_size, position_args=pos, **kwargs)
        total = kd_weight * kd
        return total, {"loss": total, loss: kd, "tokens": jnp.sum(mask, dtype=jnp.int32)}

    return loss_fn
