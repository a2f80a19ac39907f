"""Every mistake a user can make with checkpoints and lengths raises UserError with a message naming the fix."""
import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import proxytune_jax as pj
from proxytune_jax.errors import UserError
from proxytune_jax.models import abstract_model, config_from_hf


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match=r"has no config\.json; pass a Hugging Face model folder"):
        pj.load_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match=r"'bert' is not supported; supported model types: "
                                        r"llama, mistral, qwen2, gpt2"):
        pj.load_pretrained(tmp_path)
    with pytest.raises(UserError, match="supported model types"):
        config_from_hf({})


def test_unsupported_rope_type(tiny_checkpoint):
    d = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(UserError, match=r"rope scaling type 'yarn' is not supported; supported: "):
        config_from_hf(d)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        pj.load_pretrained(path)


def test_misshaped_tensor_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("gpt2"), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["transformer.h.0.mlp.c_fc.bias"] = np.zeros(7, np.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"mis-shaped tensors \(1\): transformer\.h\.0\.mlp\.c_fc\.bias: "
                                        r"file has \(7,\), model expects \(128,\)"):
        pj.load_pretrained(path)


def test_config_not_matching_weights(tiny_checkpoint, tmp_path):
    """A wrong intermediate_size in config.json: the transposed PyTorch shapes are reported as stored."""
    path = copy_checkpoint(tiny_checkpoint("qwen2"), tmp_path / "ckpt")
    d = json.loads((path / "config.json").read_text())
    d["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: file has \(64, 32\), "
                                        r"model expects \(48, 32\)"):
        pj.load_pretrained(path)


def test_pytorch_bin_only_folder_gets_conversion_hint(tiny_checkpoint, tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(tiny_checkpoint("llama") / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"safe_serialization=True"):
        pj.load_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model():
    """Shape-only params: the length checks run before any compute."""
    cfg = config_from_hf(dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8))
    return abstract_model(cfg)


def test_sequence_past_max_positions(tiny_model):
    with pytest.raises(UserError, match=r"input has 9 tokens but max_position_embeddings is 8; truncate"):
        tiny_model(jnp.zeros((1, 9), jnp.int32))


def test_cache_past_max_positions(tiny_model):
    with pytest.raises(UserError, match=r"max_position_embeddings is 8"):
        tiny_model.init_cache(1, 9)


def test_cache_overflow(tiny_model):
    cache = dataclasses.replace(tiny_model.init_cache(1, 4), length=jnp.asarray(3, jnp.int32))  # 3 written
    with pytest.raises(UserError, match=r"writing 2 tokens at slot 3 overflows the KV cache of 4 slots"):
        tiny_model(jnp.ones((1, 2), jnp.int32), cache=cache)


def test_gqa_heads_must_divide(tmp_path):
    with pytest.raises(UserError, match="must be a multiple of num_key_value_heads"):
        config_from_hf(dict(model_type="mistral", vocab_size=50, hidden_size=24, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=2))
