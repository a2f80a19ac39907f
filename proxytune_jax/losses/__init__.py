"""Knowledge-distillation losses (methods.md §2): pure, jittable, float32/log-space, mask-safe.

Uniform signature of the full-logit losses (``divergences``):
    loss(student_logits [..., V], teacher_logits [..., V], mask [...] = None, *, temperature=1.0, ...) -> scalar
mean over valid positions ``Σ m·ℓ / max(Σ m, 1)``; ``<name>_per_position`` twins return ``[...]`` unreduced and are
registered by name in ``PER_POSITION`` (used by the memory-lean ``chunked_loss``). ``LOSSES`` maps names to the
reduced losses.

Modules: ``divergences`` (KL family, JS, TVD, skew KL, generalized JSD, AKL, Hinton KD, ULD, cross-entropy),
``chunked`` (hidden states + LM head in position chunks), ``sinkd`` (SinKD, unrolled and ott-jax), ``first``
(sparse top-k teacher, on-disk cache, temperature fit), ``bayesian`` (n-gram prior, posterior, objective).
"""
from proxytune_jax.losses._common import masked_mean, reduce_loss
from proxytune_jax.losses import bayesian as _bayesian
from proxytune_jax.losses import chunked as _chunked
from proxytune_jax.losses import divergences as _divergences
from proxytune_jax.losses import first as _first
from proxytune_jax.losses import sinkd as _sinkd
from proxytune_jax.losses.bayesian import *  # noqa: F401,F403
from proxytune_jax.losses.chunked import *  # noqa: F401,F403
from proxytune_jax.losses.divergences import *  # noqa: F401,F403
from proxytune_jax.losses.first import *  # noqa: F401,F403
from proxytune_jax.losses.sinkd import *  # noqa: F401,F403

# note: the name `sinkd` is the loss function (the module stays importable as proxytune_jax.losses.sinkd)
__all__ = sorted(set(_divergences.__all__) | set(_chunked.__all__) | set(_sinkd.__all__) | set(_first.__all__)
                 | set(_bayesian.__all__) | {"masked_mean", "reduce_loss"})
