"""Config parsing: real-world config.json dicts (transformers 4 and 5 layouts), round trips, RoPE
frequencies against transformers' own implementation, and the small-model factory ``small_llama_config``."""
import dataclasses

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import proxytune_jax as pj
from conftest import TINY_KINDS, TINY_VOCAB_SIZE
from proxytune_jax.errors import UserError
from proxytune_jax.models import GPT2Config, LlamaConfig, config_from_hf, init_model, small_llama_config
from proxytune_jax.models.llama import rope_inv_freq

# meta-llama/Llama-3.1-8B-Instruct config.json (transformers 4 layout: rope_scaling + top-level rope_theta).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
# mistralai/Mistral-7B-v0.1 config.json
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}


def test_llama31_config_transformers4_layout():
    c = config_from_hf(LLAMA31_8B)
    assert isinstance(c, LlamaConfig)
    assert (c.rope_type, c.rope_theta, c.rope_factor, c.rope_original_max_position_embeddings) == (
        "llama3", 500000.0, 8.0, 8192)
    assert (c.num_key_value_heads, c.head_dim, c.rms_norm_eps) == (8, 128, 1e-5)
    assert c.eos_token_id == (128001, 128008, 128009) and not c.tie_word_embeddings
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias) and c.sliding_window is None
    hash(c)  # static data of the NNX graph: must be hashable


def test_transformers5_layout_equals_transformers4_layout():
    new = dict(LLAMA31_8B)
    new["rope_parameters"] = dict(new.pop("rope_scaling"), rope_theta=new.pop("rope_theta"))
    assert config_from_hf(new) == config_from_hf(LLAMA31_8B)


def test_mistral_sliding_window_and_qwen2_biases():
    m = config_from_hf(MISTRAL_7B)
    assert m.sliding_window == 4096 and all(m.window_of_layer(i) == 4096 for i in range(32))
    q = config_from_hf(dict(MISTRAL_7B, model_type="qwen2", use_sliding_window=False))
    assert q.qkv_bias and not q.o_bias and q.sliding_window is None


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_round_trip_through_transformers_config(kind):
    """ours -> to_hf_dict -> transformers' config class -> its to_dict -> ours: unchanged."""
    model_type, kwargs = TINY_KINDS[kind]
    ours = config_from_hf(transformers.AutoConfig.for_model(model_type, **kwargs).to_dict())
    again = config_from_hf(transformers.AutoConfig.for_model(**ours.to_hf_dict()).to_dict())
    assert again == ours
    assert isinstance(ours, GPT2Config if model_type == "gpt2" else LlamaConfig)


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_match_transformers(rope):
    """Llama 3.1 8B sizes (head_dim 128, theta 5e5): all three llama3 bands occur."""
    d = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = dict(rope or {"rope_type": "default"}, rope_theta=500000.0)
    hf_config = transformers.LlamaConfig(**d)
    rope_type = d["rope_parameters"]["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    ours = rope_inv_freq(config_from_hf(hf_config.to_dict()))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=0)


def test_small_llama_config_defaults_and_errors():
    c = small_llama_config(100, 24, 1, 2)
    assert (c.model_type, c.intermediate_size, c.num_key_value_heads, c.head_dim) == ("llama", 48, 2, 12)
    assert (c.max_position_embeddings, c.rope_type, c.tie_word_embeddings) == (64, "default", False)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 0)
    assert small_llama_config(100, 24, 1, 2, eos_token_id=[2, 5], pad_token_id=None).eos_token_id == (2, 5)
    hash(c)
    with pytest.raises(UserError, match="not a multiple of num_heads"):
        small_llama_config(100, 30, 1, 4)
    with pytest.raises(UserError, match="multiple of num_key_value_heads"):
        small_llama_config(100, 24, 1, 4, num_kv_heads=3)


def test_small_llama_config_round_trips_and_transformers_reads_it(tmp_path):
    """small_llama_config -> init_model -> save_pretrained -> load_pretrained: the same config and logits;
    transformers reads the folder as a LlamaConfig with the same numbers and computes the same logits."""
    cfg = small_llama_config(TINY_VOCAB_SIZE, 32, 2, 4, num_kv_heads=2, intermediate_size=48, max_positions=48,
                             tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500.0)
    model = init_model(cfg, seed=0)
    pj.save_pretrained(model, tmp_path)
    loaded = pj.load_pretrained(tmp_path, progress=False)
    # from_hf sets rope_original_max_position_embeddings (read only by llama3 RoPE) to max_position_embeddings.
    assert loaded.config.rope_original_max_position_embeddings == 48
    assert dataclasses.replace(loaded.config, rope_original_max_position_embeddings=8192) == cfg
    ids = np.random.default_rng(0).integers(3, TINY_VOCAB_SIZE, (2, 7)).astype(np.int32)
    ours = np.asarray(model(ids)[0])
    np.testing.assert_array_equal(np.asarray(loaded(ids)[0]), ours)

    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.LlamaConfig)
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
            hf.num_key_value_heads, hf.head_dim, hf.max_position_embeddings) == (TINY_VOCAB_SIZE, 32, 48, 2, 4, 2,
                                                                                  8, 48)
    assert (hf.rms_norm_eps, hf.tie_word_embeddings, hf.hidden_act) == (1e-5, True, "silu")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert config_from_hf(hf.to_dict()) == loaded.config
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = torch_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
