"""Flax NNX causal LMs that load Hugging Face checkpoints (one file per family).

>>> from proxytune_jax.models import config_from_hf, init_model, small_llama_config
>>> model = init_model(config_from_hf({"model_type": "llama", ...}), seed=0)
>>> tiny = init_model(small_llama_config(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4), seed=0)
>>> logits, cache = model(input_ids, attention_mask, model.init_cache(batch, max_len))
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from proxytune_jax.errors import UserError
from proxytune_jax.models import gpt2, llama
from proxytune_jax.models.cache import KVCache, positions_from_mask
from proxytune_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from proxytune_jax.models.llama import LlamaConfig, LlamaForCausalLM, small_llama_config

# model_type -> (family module, config class, model class)
FAMILIES = {
    "llama": (llama, LlamaConfig, LlamaForCausalLM),
    "mistral": (llama, LlamaConfig, LlamaForCausalLM),
    "qwen2": (llama, LlamaConfig, LlamaForCausalLM),
    "gpt2": (gpt2, GPT2Config, GPT2LMHeadModel),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

Config = LlamaConfig | GPT2Config
Model = LlamaForCausalLM | GPT2LMHeadModel


def family_of(model_type: str | None):
    """The family module, config class and model class of a ``model_type`` (UserError when unsupported)."""
    if model_type not in FAMILIES:
        raise UserError(
            f"model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use a checkpoint of one of these families")
    return FAMILIES[model_type]


def config_from_hf(d: dict) -> Config:
    """Our config from a Hugging Face ``config.json`` dict."""
    _, config_cls, _ = family_of(d.get("model_type"))
    try:
        return config_cls.from_hf(d)
    except KeyError as e:
        raise UserError(f"config.json of model_type {d.get('model_type')!r} lacks the field {e}; "
                        "fix the config (or re-export it with transformers' save_pretrained)") from None


def model_class(config: Config):
    return family_of(config.model_type)[2]


def init_model(config: Config, *, seed: int = 0, dtype=jnp.float32) -> Model:
    """A randomly initialised model (params in ``dtype``; logits always float32)."""
    return model_class(config)(config, rngs=nnx.Rngs(seed), dtype=dtype)


def abstract_model(config: Config, dtype=jnp.float32) -> Model:
    """The model with ``ShapeDtypeStruct`` params (nothing allocated), e.g. for 70B shapes or loading."""
    return nnx.eval_shape(lambda: model_class(config)(config, rngs=None, dtype=dtype))


# LoRA factors (models.lora) are small: replicated, whatever the kernel they adapt.
LORA_RULES = ((r"/lora_(A|B)$", P()),)


def partition_rules(config: Config):
    """``(regex, PartitionSpec)`` rules over '/'-joined param paths, see ``proxytune_jax.sharding``."""
    return LORA_RULES + tuple(family_of(config.model_type)[0].partition_rules(config))


__all__ = [
    "SUPPORTED_MODEL_TYPES", "KVCache", "positions_from_mask", "LlamaConfig", "LlamaForCausalLM",
    "GPT2Config", "GPT2LMHeadModel", "config_from_hf", "init_model", "abstract_model", "partition_rules",
    "family_of", "model_class", "small_llama_config",
]
