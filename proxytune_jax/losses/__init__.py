"""Knowledge-distillation losses: pure, jittable, float32/log-space, mask-safe.

Full-logit losses (``divergences``) share one signature:
    loss(student_logits [..., V], teacher_logits [..., V], mask [...] = None, *, temperature=1.0, ...) -> scalar
(the mean over valid positions ``Σ m·ℓ / max(Σ m, 1)``); each has a ``<name>_per_position`` twin returning ``[...]``
unreduced, which the memory-lean ``chunked_loss`` evaluates chunk by chunk.

``LOSSES`` (``registry``) is the one table of every distillation loss -- the divergences, SinKD, FIRST's top-k KL
and the Bayesian KD terms -- each ``LossSpec`` declaring its hyperparameters with their defaults, the kind of
teacher it needs and its per-position form; ``register_loss`` adds one. Formulas and paper references are in
each function's docstring.

Modules: ``divergences`` (KL family, JS, TVD, skew KL, generalized JSD, AKL, Hinton KD, ULD, cross-entropy),
``chunked`` (hidden states + LM head in position chunks), ``sinkd`` (SinKD, unrolled and ott-jax), ``first``
(sparse top-k teacher, on-disk cache, temperature fit), ``bayesian`` (n-gram prior, posterior, objective),
``taid`` (TAID's interpolated teacher and its schedule), ``registry`` (the table).
"""
from proxytune_jax.losses._common import masked_mean, reduce_loss
from proxytune_jax.losses import bayesian as _bayesian
from proxytune_jax.losses import chunked as _chunked
from proxytune_jax.losses import divergences as _divergences
from proxytune_jax.losses import first as _first
from proxytune_jax.losses import sinkd as _sinkd
from proxytune_jax.losses import taid as _taid
from proxytune_jax.losses.bayesian import *  # noqa: F401,F403
from proxytune_jax.losses.chunked import *  # noqa: F401,F403
from proxytune_jax.losses.divergences import *  # noqa: F401,F403
from proxytune_jax.losses.first import *  # noqa: F401,F403
from proxytune_jax.losses.sinkd import *  # noqa: F401,F403
from proxytune_jax.losses.taid import *  # noqa: F401,F403
from proxytune_jax.losses.registry import LOSSES, LossSpec, get_loss, per_position_losses, register_loss
from proxytune_jax.losses import registry as _registry

# note: the name `sinkd` is the loss function (the module stays importable as proxytune_jax.losses.sinkd)
__all__ = sorted(set(_divergences.__all__) | set(_chunked.__all__) | set(_sinkd.__all__) | set(_first.__all__)
                 | set(_bayesian.__all__) | set(_taid.__all__) | set(_registry.__all__)
                 | {"masked_mean", "reduce_loss"})
