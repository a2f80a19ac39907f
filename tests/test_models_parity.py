"""Parity of the Flax models with transformers PyTorch on tiny random checkpoints of every family (fp32).

Reference: the PyTorch model that wrote the checkpoint. Weights are redrawn at meaningful scale (see
conftest.build_torch_model), so logits have std ~0.8 and a 1e-4 max-abs bound is a real constraint.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import proxytune_jax as pj
from conftest import TINY_KINDS, TINY_VOCAB_SIZE

ATOL = 1e-4
KINDS = sorted(TINY_KINDS)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    logits, _ = nnx.merge(graphdef, state)(ids, mask)
    return logits


def forward(model, ids, mask=None):
    graphdef, state = nnx.split(model)
    mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask, bool)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids, jnp.int32), mask))


def torch_logits(model, ids, mask=None):
    ids = torch.tensor(np.asarray(ids), dtype=torch.long)
    with torch.no_grad():
        if mask is None:
            return model(ids).logits.numpy()
        mask = torch.tensor(np.asarray(mask), dtype=torch.long)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(ids, attention_mask=mask, position_ids=position_ids).logits.numpy()


def random_ids(batch, length, seed=0):
    return np.random.RandomState(seed).randint(3, TINY_VOCAB_SIZE, size=(batch, length)).astype(np.int32)


@pytest.mark.parametrize("kind", KINDS)
def test_full_forward_matches_transformers(kind, tiny_checkpoint, torch_lm):
    path = tiny_checkpoint(kind)
    model = pj.load_pretrained(path)
    ids = random_ids(2, 12)
    ref = torch_logits(torch_lm(path), ids)
    got = forward(model, ids)
    assert got.shape == (2, 12, TINY_VOCAB_SIZE) and got.dtype == np.float32
    assert ref.std() > 0.3  # logits are not near-constant, so the bound below means something
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_left_padded_forward_matches_transformers(kind, tiny_checkpoint, torch_lm):
    """Left-padded batch with positions from the mask, compared on real tokens."""
    path = tiny_checkpoint(kind)
    ids = random_ids(2, 12, seed=1)
    mask = np.ones((2, 12), np.int32)
    mask[1, :5] = 0
    ref = torch_logits(torch_lm(path), ids, mask)
    got = forward(pj.load_pretrained(path), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("blocks", [None, 3, 7])
def test_causal_query_blocks_match_transformers(kind, blocks, tiny_checkpoint, torch_lm, monkeypatch):
    """A pass without a cache uses ``cpu_backend.attend_causal`` (query blocks that skip the causal upper
    triangle). T = 50 gives ``causal_blocks(50) = 2`` blocks; 3 and 7 (uneven splits) are forced. Left padding
    (row 1: 17 pad tokens, so whole blocks of pad queries) and Mistral's window 4 included."""
    from proxytune_jax.models import cpu_backend
    used = []
    default = cpu_backend.causal_blocks

    def spy(t):
        used.append(blocks or default(t))
        return used[-1]

    monkeypatch.setattr(cpu_backend, "causal_blocks", spy)
    path = tiny_checkpoint(kind)
    ids = random_ids(2, 50, seed=3)
    mask = np.ones((2, 50), np.int32)
    mask[1, :17] = 0
    ref = torch_logits(torch_lm(path), ids, mask)
    graphdef, state = nnx.split(pj.load_pretrained(path))
    got = np.asarray(jax.jit(lambda st: nnx.merge(graphdef, st)(jnp.asarray(ids), jnp.asarray(mask, bool))[0])(state))
    assert used and set(used) == {blocks or 2}  # traced here, with the intended block count
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=ATOL, rtol=0)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_portable_blockwise_path_matches_transformers(kind, tiny_checkpoint, torch_lm, monkeypatch):
    """The accelerator default (``backend.force("portable")``: einsum dense, ``attention.attend_blockwise``),
    here with 16-row blocks so T = 50 spans 4 blocks (the last one padded); left padding (17 pads) and
    Mistral's window 4 included."""
    from proxytune_jax.models import attention, backend
    monkeypatch.setattr(attention, "BLOCK", 16)
    calls = []
    real_blockwise = attention.attend_blockwise
    monkeypatch.setattr(attention, "attend_blockwise", lambda *a, **k: calls.append(1) or real_blockwise(*a, **k))
    path = tiny_checkpoint(kind)
    ids = random_ids(2, 50, seed=5)
    mask = np.ones((2, 50), np.int32)
    mask[1, :17] = 0
    ref = torch_logits(torch_lm(path), ids, mask)
    graphdef, state = nnx.split(pj.load_pretrained(path))
    with backend.force("portable"):
        got = np.asarray(jax.jit(lambda st: nnx.merge(graphdef, st)(jnp.asarray(ids), jnp.asarray(mask, bool))[0])(
            state))
    assert calls  # traced through the blockwise attention
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=ATOL, rtol=0)
    assert np.isfinite(got).all()


def test_sliding_window_is_in_effect(tiny_checkpoint):
    """Mistral's window (4) changes logits of late tokens vs. the same weights with full attention."""
    import dataclasses
    model = pj.load_pretrained(tiny_checkpoint("mistral"))
    assert model.config.sliding_window == 4
    ids = random_ids(1, 12, seed=2)
    windowed = forward(model, ids)
    full_model = nnx.merge(*_with_config(model, dataclasses.replace(model.config, sliding_window=None)))
    full = forward(full_model, ids)
    np.testing.assert_allclose(windowed[:, :4], full[:, :4], atol=1e-5)  # window not yet reached
    assert np.abs(windowed[:, 6:] - full[:, 6:]).max() > 1e-2


def _with_config(model, config):
    from proxytune_jax.models import model_class
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_class(config)(config, rngs=None)))
    return graphdef, nnx.state(model)


def test_sharded_checkpoint_loads(tiny_checkpoint, torch_lm):
    path = tiny_checkpoint("llama", sharded=True)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 3 and (path / "model.safetensors.index.json").is_file()
    ids = random_ids(2, 12, seed=3)
    np.testing.assert_allclose(forward(pj.load_pretrained(path), ids), torch_logits(torch_lm(path), ids),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_roundtrip_through_transformers(kind, tiny_checkpoint, tmp_path):
    """Our save_pretrained -> transformers AutoModelForCausalLM loads it -> same logits as our model."""
    from transformers import AutoModelForCausalLM
    model = pj.load_pretrained(tiny_checkpoint(kind))
    out = pj.save_pretrained(model, tmp_path / kind)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == model.config.model_type
    ids = random_ids(2, 12, seed=4)
    np.testing.assert_allclose(torch_logits(reloaded, ids), forward(model, ids), atol=ATOL, rtol=0)


def test_save_pretrained_sharded_and_reload(tiny_checkpoint, tmp_path, torch_lm):
    """Sharded save (with index) reloads identically here and in transformers."""
    path = tiny_checkpoint("qwen2")
    model = pj.load_pretrained(path)
    out = pj.save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    assert (out / "model.safetensors.index.json").is_file()
    again = pj.load_pretrained(out)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = random_ids(1, 6, seed=5)
    np.testing.assert_allclose(torch_logits(torch_lm(out), ids), torch_logits(torch_lm(path), ids), atol=1e-6)


def test_tokenizer_from_checkpoint(tiny_checkpoint):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    enc = tok(["a b", "hello world!"], padding=True)
    assert tok.padding_side == "left" and enc.input_ids[0][0] == tok.pad_token_id
    assert enc.input_ids[1][0] == tok.bos_token_id
    assert tok.decode(enc.input_ids[1], skip_special_tokens=True) == "hello world!"
    assert len(tok) == TINY_VOCAB_SIZE


def test_gpt2_original_openai_names_load(tiny_checkpoint, tmp_path):
    """openai-community/gpt2 stores names without 'transformer.' and causal-mask buffers 'h.N.attn.bias'."""
    import shutil
    from safetensors.numpy import load_file, save_file
    src = tiny_checkpoint("gpt2")
    path = shutil.copytree(src, tmp_path / "openai")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    tensors.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(2)})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the buffers are known, not "unused tensors"
        openai = pj.load_pretrained(path)
    ours = pj.load_pretrained(src)
    for a, b in zip(jax.tree.leaves(nnx.state(openai)), jax.tree.leaves(nnx.state(ours))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
