"""proxytune_jax: decoding-time tuning (proxy-tuning, DExperts, contrastive decoding, EFT, logit fusions)
and knowledge-distillation losses as pure, jitted JAX/Flax functions."""
from proxytune_jax.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
