"""GPT-2 causal LM in Flax NNX: learned positions, fused q/k/v, GELU (tanh), tied LM head.

Submodules are named like Hugging Face's ``GPT2LMHeadModel``. HF GPT-2 uses ``Conv1D`` whose ``weight`` is
``[in, out]``; our ``Linear.weight`` is ``[out, in]``, so those weights are transposed (table ``HF_NAMES``).

Shapes: B batch, T new tokens, S key slots, D hidden, H heads, Dh head dim, F mlp, V vocab.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from proxytune_jax.errors import UserError
from proxytune_jax.models.attention import attend, attend_self
from proxytune_jax.models.cache import KVCache
from proxytune_jax.models.layers import (AttentionLayout, CausalLM, Embed, LayerNorm, Linear, check_lengths,
                                         check_remat, heads_first, remat_block, root_key, split_key, write_kv)
from proxytune_jax.sharding import constrain_batch

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 model, named like the Llama config (HF: n_embd, n_layer, n_head, ...)."""

    model_type: str = "gpt2"
    vocab_size: int = 50257
    hidden_size: int = 768  # n_embd
    num_hidden_layers: int = 12  # n_layer
    num_attention_heads: int = 12  # n_head
    intermediate_size: int = 3072  # n_inner (None in HF -> 4 * n_embd)
    max_position_embeddings: int = 1024  # n_positions
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    # EOS ids of the folder's generation_config.json; load_pretrained fills it. Not part of config.json.
    generation_eos_token_id: int | tuple[int, ...] | None = None
    # Rematerialization of each block in passes without a KV cache: "none" | "matmuls" | "full"
    # (layers.REMAT_POLICIES). Not part of config.json.
    remat: str = "none"

    def __post_init__(self):
        check_remat(self.remat, self.model_type)
        if self.activation_function not in ACTIVATIONS:
            raise UserError(f"gpt2: activation_function {self.activation_function!r} is not supported; "
                            f"supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"gpt2: n_embd={self.hidden_size} must be divisible by n_head="
                            f"{self.num_attention_heads}")

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "GPT2Config":
        n_embd = d.get("n_embd", 768)
        return cls(
            vocab_size=d.get("vocab_size", 50257),
            hidden_size=n_embd,
            num_hidden_layers=d.get("n_layer", 12),
            num_attention_heads=d.get("n_head", 12),
            intermediate_size=d.get("n_inner") or 4 * n_embd,
            max_position_embeddings=d.get("n_positions", 1024),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            activation_function=d.get("activation_function", "gelu_new"),
            scale_attn_weights=d.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_embd": self.hidden_size,
            "n_layer": self.num_hidden_layers,
            "n_head": self.num_attention_heads,
            "n_inner": self.intermediate_size,
            "n_positions": self.max_position_embeddings,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation_function,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


class GPT2Attention(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, key):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        k_attn, k_proj = split_key(key, 2)
        self.c_attn = Linear(d, 3 * d, use_bias=True, dtype=dtype, key=k_attn)  # fused q, k, v
        self.c_proj = Linear(d, d, use_bias=True, dtype=dtype, key=k_proj)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def __call__(self, x, allowed, kv=None, write_at=None):
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)  # 3 x [B, T, D]
        q, k, v = (y.reshape(b, t, self.num_heads, self.head_dim) for y in (q, k, v))  # [B, T, H, Dh]
        k, v = heads_first(k), heads_first(v)  # [B, H, T, Dh]
        if kv is not None:
            k, v = write_kv(kv[0], kv[1], k, v, write_at)  # [B, H, S, Dh]
        if kv is None:  # no cache: keys are these T tokens, ``allowed`` is a SelfMask
            out = attend_self(q, k, v, allowed, scale=self.scale)  # [B, T, H, Dh]
        else:
            out = attend(q, k, v, allowed, scale=self.scale)  # [B, T, H, Dh]
        return self.c_proj(out.reshape(b, t, d)), (k, v)


class GPT2MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype, key):
        d, f = config.hidden_size, config.intermediate_size
        k_fc, k_proj = split_key(key, 2)
        self.c_fc = Linear(d, f, use_bias=True, dtype=dtype, key=k_fc)
        self.c_proj = Linear(f, d, use_bias=True, dtype=dtype, key=k_proj)
        self.activation_function = config.activation_function

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        return self.c_proj(ACTIVATIONS[self.activation_function](self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, key):
        eps = config.layer_norm_epsilon
        k_attn, k_mlp = split_key(key, 2)
        self.ln_1 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.attn = GPT2Attention(config, layer_idx, dtype=dtype, key=k_attn)
        self.ln_2 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = GPT2MLP(config, dtype=dtype, key=k_mlp)

    def __call__(self, x, allowed, kv=None, write_at=None):
        attn_out, kv = self.attn(self.ln_1(x), allowed, kv, write_at)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT2Model(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype, key):
        k_wte, k_wpe, *k_layers = split_key(key, 2 + config.num_hidden_layers)
        self.wte = Embed(config.vocab_size, config.hidden_size, dtype=dtype, key=k_wte)
        self.wpe = Embed(config.max_position_embeddings, config.hidden_size, dtype=dtype, key=k_wpe, std=0.01)
        self.h = nnx.List([GPT2Block(config, i, dtype=dtype, key=k) for i, k in enumerate(k_layers)])
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype)


class GPT2LMHeadModel(CausalLM):
    """``model(input_ids [B, T], attention_mask [B, T] | None, cache | None) -> (logits [B, T, V] f32, cache)``.

    Same conventions as ``LlamaForCausalLM`` (left padding, positions from masks, explicit KV cache).
    ``rngs=None`` builds zero params (for shapes only, e.g. under ``nnx.eval_shape`` before loading).
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        k_model, k_head = split_key(root_key(rngs), 2)
        self.transformer = GPT2Model(config, dtype=dtype, key=k_model)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, key=k_head)

    def token_embedding(self) -> Embed:
        return self.transformer.wte

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] (param dtype) and the updated cache."""
        b, t = input_ids.shape
        check_lengths(t, cache, self.config.max_position_embeddings, self.config.model_type)
        layout = AttentionLayout(attention_mask, b, t, cache)
        x = constrain_batch(self.transformer.wte(input_ids) + self.transformer.wpe(layout.positions))  # [B, T, D]
        ks, vs = [], []
        for i, block in enumerate(self.transformer.h):
            if cache is None:  # training / scoring: blocks under the remat policy
                x = constrain_batch(remat_block(lambda x, mask, block=block: block(x, mask)[0], self.config.remat)(
                    x, layout.mask(None)))
                continue
            x, (k, v) = block(x, layout.mask(None), (cache.k[i], cache.v[i]), layout.write_at)
            x = constrain_batch(x)
            ks.append(k)
            vs.append(v)
        return self.transformer.ln_f(x), layout.new_cache(ks, vs, t)



# (our parameter path regex, HF tensor name template, transpose?) — Conv1D weights are [in, out], ours
# [out, in].
HF_NAMES: tuple[tuple[str, str, bool], ...] = (
    (r"transformer/(wte|wpe)/embedding", r"transformer.\1.weight", False),
    (r"transformer/h/(\d+)/(attn|mlp)/(c_\w+)/weight", r"transformer.h.\1.\2.\3.weight", True),
    (r"transformer/h/(\d+)/(attn|mlp)/(c_\w+)/bias", r"transformer.h.\1.\2.\3.bias", False),
    (r"transformer/h/(\d+)/(ln_\d)/scale", r"transformer.h.\1.\2.weight", False),
    (r"transformer/h/(\d+)/(ln_\d)/bias", r"transformer.h.\1.\2.bias", False),
    (r"transformer/ln_f/scale", r"transformer.ln_f.weight", False),
    (r"transformer/ln_f/bias", r"transformer.ln_f.bias", False),
    (r"lm_head/weight", r"lm_head.weight", False),
)
# Causal-mask buffers of old checkpoints (``h.0.attn.bias [1, 1, n, n]``, ``attn.masked_bias``).
HF_IGNORED = (r"\.attn\.bias$", r"\.attn\.masked_bias$")
# The original OpenAI checkpoints store names without the ``transformer.`` prefix.
HF_OPTIONAL_PREFIX = "transformer."


def partition_rules(config: GPT2Config) -> tuple[tuple[str, P], ...]:
    del config
    return (
        (r"wte/embedding", P("tensor", "fsdp")),  # [V, D]
        (r"wpe/embedding", P(None, "fsdp")),  # [P, D]
        (r"(attn/c_attn|mlp/c_fc)/weight", P("tensor", "fsdp")),  # [3D, D] / [F, D]
        (r"(attn/c_attn|mlp/c_fc)/bias", P("tensor")),  # [3D] / [F]
        (r"(attn|mlp)/c_proj/weight", P("fsdp", "tensor")),  # [D, D] / [D, F]
        (r"lm_head/weight", P("tensor", "fsdp")),  # [V, D]
        (r"ln_(\d|f)/(scale|bias)|c_proj/bias", P()),
    )
