"""proxytune_jax: decoding-time tuning (proxy-tuning, DExperts, contrastive decoding, EFT, logit fusions)
and knowledge-distillation losses as pure, jitted JAX/Flax functions."""
from proxytune_jax.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "load_pretrained", "save_pretrained"]

# Exported lazily (PEP 562) so `import proxytune_jax` (and `proxytune --help`) does not import jax/flax.
_LAZY = {"load_pretrained": "proxytune_jax.models.hf_io", "save_pretrained": "proxytune_jax.models.hf_io"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'proxytune_jax' has no attribute {name!r}")
