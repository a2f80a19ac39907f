"""Llama family causal LM in Flax NNX: Llama 2/3 (RoPE scaling ``linear`` and ``llama3``), Mistral
(sliding-window attention), Qwen2 (q/k/v biases). Grouped-query attention, tied or untied embeddings.

Submodules are named like Hugging Face's ``LlamaForCausalLM`` so weights map by the short table
``HF_NAMES`` (our ``Linear.weight`` is ``[out, in]`` like HF's, so nothing is transposed).

Shapes: B batch, T new tokens, S key slots, D hidden, H query heads, K kv heads, Dh head dim, F mlp, V vocab.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from proxytune_jax.errors import UserError
from proxytune_jax.models.attention import attend, attend_self
from proxytune_jax.models.cache import KVCache
from proxytune_jax.models.layers import (AttentionLayout, CausalLM, Embed, Linear, RMSNorm, check_lengths,
                                         check_remat, heads_first, remat_block, root_key, split_key, write_kv)
from proxytune_jax.sharding import constrain_batch

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

TokenIds = int | tuple[int, ...] | None


def _token_ids(value: Any) -> TokenIds:
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family model (hashable: it is static data of the NNX graph)."""

    model_type: str = "llama"  # "llama" | "mistral" | "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    # RoPE: theta and scaling ("default" = none; "linear": positions / factor; "llama3": Llama 3.1 bands).
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    # Biases: q/k/v (Qwen2, or Llama attention_bias), o_proj (Llama attention_bias), MLP (Llama mlp_bias).
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Sliding-window attention: window size and, per layer, "full_attention" or "sliding_attention".
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: TokenIds = 1
    eos_token_id: TokenIds = 2  # an int or a tuple of ints (Llama 3 instruct lists several)
    pad_token_id: TokenIds = None
    # EOS ids of the folder's generation_config.json (e.g. a chat model's end-of-turn token); load_pretrained
    # fills it, decoding stops on these too. Not part of config.json.
    generation_eos_token_id: TokenIds = None
    # Rematerialization of each decoder block in passes without a KV cache (training, scoring):
    # "none" | "matmuls" (save matmul outputs) | "full" (layers.REMAT_POLICIES). Not part of config.json.
    remat: str = "none"

    def __post_init__(self):
        check_remat(self.remat, self.model_type)
        if self.model_type not in MODEL_TYPES:
            raise UserError(f"LlamaConfig: model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.rope_type not in ROPE_TYPES:
            raise UserError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")

    def window_of_layer(self, i: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict (transformers 4 ``rope_scaling`` + ``rope_theta`` or
        transformers 5 ``rope_parameters`` with ``rope_theta`` inside)."""
        model_type = d.get("model_type")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{model_type}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        max_pos = d.get("max_position_embeddings", 2048)

        sliding_window, layer_types = None, None
        if model_type == "mistral":
            sliding_window = d.get("sliding_window")
        elif model_type == "qwen2" and d.get("use_sliding_window") and d.get("sliding_window"):
            sliding_window = d["sliding_window"]
            n = d["num_hidden_layers"]
            layer_types = tuple(d.get("layer_types") or (
                "sliding_attention" if i >= d.get("max_window_layers", n) else "full_attention"
                for i in range(n)))
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=max_pos,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", max_pos)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=_token_ids(d.get("bos_token_id")),
            eos_token_id=_token_ids(d.get("eos_token_id")),
            pad_token_id=_token_ids(d.get("pad_token_id")),
        )

    def to_hf_dict(self) -> dict:
        """A ``config.json`` dict that transformers' PyTorch ``AutoModelForCausalLM`` loads."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        d = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": _json_ids(self.bos_token_id),
            "eos_token_id": _json_ids(self.eos_token_id),
            "pad_token_id": _json_ids(self.pad_token_id),
        }
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise UserError("HF Llama has one attention_bias flag for q/k/v/o; qkv_bias must equal o_bias")
            d.update(attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            n = self.num_hidden_layers
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=n,
                     layer_types=list(self.layer_types or ("full_attention",) * n))
        return d


def _json_ids(ids: TokenIds):
    return list(ids) if isinstance(ids, tuple) else ids


def small_llama_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, *,
                       intermediate_size: int | None = None, num_kv_heads: int | None = None,
                       head_dim: int | None = None, max_positions: int = 64, tie_word_embeddings: bool = False,
                       bos_token_id: TokenIds = 1, eos_token_id: TokenIds = 2, pad_token_id: TokenIds = 0,
                       rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
                       model_type: str = "llama") -> LlamaConfig:
    """A Llama-architecture ``LlamaConfig`` from the few numbers a small (toy, test, benchmark) model needs.

    The one place where the library, its tests and experiments build a model config by hand (real
    checkpoints come from ``config_from_hf``). Defaults: ``intermediate_size = 2 * hidden_size``,
    ``num_kv_heads = num_heads`` (full multi-head attention), ``head_dim = hidden_size // num_heads``, RoPE
    ``"default"`` with base ``rope_theta``, SiLU MLP, no biases, and the special-token ids of the package's
    tiny tokenizers (``<pad>``=0, ``<s>``=1, ``</s>``=2; pass a tokenizer's ids, or ``None`` for none).

    >>> cfg = small_llama_config(300, 32, 2, 4, num_kv_heads=2)
    >>> model = init_model(cfg, seed=0)                     # proxytune_jax.models.init_model
    >>> save_pretrained(model, "out")                       # transformers' LlamaForCausalLM loads "out"

    Raises UserError when ``hidden_size`` is not a multiple of ``num_heads`` (without an explicit
    ``head_dim``) or ``num_heads`` not a multiple of ``num_kv_heads``.
    """
    if head_dim is None:
        if hidden_size % num_heads:
            raise UserError(f"small_llama_config: hidden_size={hidden_size} is not a multiple of "
                            f"num_heads={num_heads}; pass head_dim explicitly")
        head_dim = hidden_size // num_heads
    return LlamaConfig(
        model_type=model_type, vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads if num_kv_heads is None else num_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=_token_ids(bos_token_id),
        eos_token_id=_token_ids(eos_token_id), pad_token_id=_token_ids(pad_token_id))


# ------------------------------------------------------------------------------------------------ RoPE


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] (float32, computed as HF does) with the config's RoPE scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.rope_factor)
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, Dh] (float32; halves duplicated, HF's rotate_half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, Dh] rotated by cos/sin [B, T, Dh] (in float32, result in x's dtype)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# ---------------------------------------------------------------------------------------------- modules


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, key):
        d, h, k, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, dh
        kq, kk, kv, ko = split_key(key, 4)
        self.q_proj = Linear(d, h * dh, use_bias=config.qkv_bias, dtype=dtype, key=kq)
        self.k_proj = Linear(d, k * dh, use_bias=config.qkv_bias, dtype=dtype, key=kk)
        self.v_proj = Linear(d, k * dh, use_bias=config.qkv_bias, dtype=dtype, key=kv)
        self.o_proj = Linear(h * dh, d, use_bias=config.o_bias, dtype=dtype, key=ko)

    def __call__(self, x, cos, sin, allowed, kv=None, write_at=None):
        """x [B, T, D]; allowed [B, T, S]; kv: this layer's cache (k, v) [B, K, S, Dh] or None."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, H, Dh]
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, Dh]
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = heads_first(k), heads_first(v)  # [B, K, T, Dh]
        if kv is not None:
            k, v = write_kv(kv[0], kv[1], k, v, write_at)  # [B, K, S, Dh]
        if kv is None:  # no cache: keys are these T tokens, ``allowed`` is a SelfMask
            out = attend_self(q, k, v, allowed, scale=self.head_dim ** -0.5)  # [B, T, H, Dh]
        else:
            out = attend(q, k, v, allowed, scale=self.head_dim ** -0.5)  # [B, T, H, Dh]
        return self.o_proj(out.reshape(b, t, -1)), (k, v)


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, key):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        kg, ku, kd = split_key(key, 3)
        self.gate_proj = Linear(d, f, use_bias=bias, dtype=dtype, key=kg)
        self.up_proj = Linear(d, f, use_bias=bias, dtype=dtype, key=ku)
        self.down_proj = Linear(f, d, use_bias=bias, dtype=dtype, key=kd)

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, key):
        k_attn, k_mlp = split_key(key, 2)
        self.self_attn = LlamaAttention(config, dtype=dtype, key=k_attn)
        self.mlp = LlamaMLP(config, dtype=dtype, key=k_mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, allowed, kv=None, write_at=None):
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, write_at)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, key):
        k_embed, *k_layers = split_key(key, 1 + config.num_hidden_layers)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, key=k_embed)
        self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype, key=k) for k in k_layers])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(CausalLM):
    """``model(input_ids [B, T], attention_mask [B, T] | None, cache | None) -> (logits [B, T, V] f32, cache)``.

    Batches are left-padded; positions come from the attention mask (and the cache's mask). With a cache,
    the new tokens are written at slots ``[cache.length, cache.length + T)`` and the updated cache returned.
    ``rngs=None`` builds zero params (for shapes only, e.g. under ``nnx.eval_shape`` before loading).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        k_model, k_head = split_key(root_key(rngs), 2)
        self.model = LlamaModel(config, dtype=dtype, key=k_model)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, key=k_head)

    def token_embedding(self) -> Embed:
        return self.model.embed_tokens

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] (param dtype) and the updated cache."""
        b, t = input_ids.shape
        check_lengths(t, cache, self.config.max_position_embeddings, self.config.model_type)
        layout = AttentionLayout(attention_mask, b, t, cache)
        cos, sin = rope_cos_sin(layout.positions, rope_inv_freq(self.config))  # [B, T, Dh]
        windows = {self.config.window_of_layer(i) for i in range(self.config.num_hidden_layers)}
        allowed = {w: layout.mask(w) for w in windows}  # per window size: SelfMask or [B, T, S]

        x = constrain_batch(self.model.embed_tokens(input_ids))  # [B, T, D]
        ks, vs = [], []
        for i, layer in enumerate(self.model.layers):
            mask = allowed[self.config.window_of_layer(i)]
            if cache is None:  # training / scoring: a backward pass may follow, blocks under the remat policy
                block = remat_block(lambda x, mask, layer=layer: layer(x, cos, sin, mask)[0], self.config.remat)
                x = constrain_batch(block(x, mask))
                continue
            x, (k, v) = layer(x, cos, sin, mask, (cache.k[i], cache.v[i]), layout.write_at)
            x = constrain_batch(x)
            ks.append(k)
            vs.append(v)
        return self.model.norm(x), layout.new_cache(ks, vs, t)



# ------------------------------------------------------------------------------------ HF names, sharding

# (our parameter path regex, HF tensor name template, transpose?) — our Linear.weight is HF's [out, in].
HF_NAMES: tuple[tuple[str, str, bool], ...] = (
    (r"model/embed_tokens/embedding", r"model.embed_tokens.weight", False),
    (r"model/layers/(\d+)/(self_attn|mlp)/(\w+_proj)/weight", r"model.layers.\1.\2.\3.weight", False),
    (r"model/layers/(\d+)/(self_attn|mlp)/(\w+_proj)/bias", r"model.layers.\1.\2.\3.bias", False),
    (r"model/layers/(\d+)/(\w+_layernorm)/scale", r"model.layers.\1.\2.weight", False),
    (r"model/norm/scale", r"model.norm.weight", False),
    (r"lm_head/weight", r"lm_head.weight", False),
)
# HF tensors that carry no parameters of ours (buffers of old checkpoints).
HF_IGNORED = (r"rotary_emb\.inv_freq$",)


def partition_rules(config: LlamaConfig) -> tuple[tuple[str, P], ...]:
    """Megatron-style tensor parallelism (heads / mlp columns over ``tensor``) + FSDP over the other dim."""
    del config  # same rules for every size
    return (
        (r"embed_tokens/embedding", P("tensor", "fsdp")),  # [V, D]
        (r"self_attn/(q|k|v)_proj/weight", P("tensor", "fsdp")),  # [H*Dh, D]
        (r"self_attn/(q|k|v)_proj/bias", P("tensor")),  # [H*Dh]
        (r"self_attn/o_proj/weight", P("fsdp", "tensor")),  # [D, H*Dh]
        (r"mlp/(gate|up)_proj/weight", P("tensor", "fsdp")),  # [F, D]
        (r"mlp/(gate|up)_proj/bias", P("tensor")),  # [F]
        (r"mlp/down_proj/weight", P("fsdp", "tensor")),  # [D, F]
        (r"lm_head/weight", P("tensor", "fsdp")),  # [V, D]
        (r"(layernorm|norm)/scale", P()),  # [D]
    )
