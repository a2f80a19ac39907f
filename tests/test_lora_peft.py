"""LoRA (``models.lora``) and the PEFT format (``models.peft_io``) against the reference: ``peft`` +
transformers PyTorch on tiny random Llama / Mistral / Qwen2 checkpoints (fp32).

The PEFT adapters get random *nonzero* ``lora_B`` (PEFT initialises it to 0, which would make every
comparison trivially pass) at a scale that moves the logits by O(1), checked before comparing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import proxytune_jax as pj
from conftest import TINY_VOCAB_SIZE
from proxytune_jax.errors import UserError
from proxytune_jax.models import lora, peft_io

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
peft = pytest.importorskip("peft")


def _ids(seed=0):
    return np.random.RandomState(seed).randint(3, TINY_VOCAB_SIZE, size=(2, 10)).astype(np.int32)


def _ours(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, jnp.asarray(ids)))


def _torch_base(path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _peft_adapter(base_path, out_dir, *, targets, r=4, alpha=8.0, rslora=False, seed=0):
    """A PEFT LoRA on the base with random nonzero A and B, saved to ``out_dir``; returns the PEFT model."""
    import torch
    model = peft.get_peft_model(_torch_base(base_path), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
        use_rslora=rslora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_peft_adapter_loads_with_peft_logits(kind, tiny_checkpoint, torch_lm, tmp_path):
    """(a) a PEFT-saved adapter, loaded here unmerged and merged, gives peft + transformers' logits."""
    base = tiny_checkpoint(kind)
    targets = ALL if kind != "mistral" else ["q_proj", "v_proj", "down_proj"]
    ref_model = _peft_adapter(base, tmp_path / "adapter", targets=targets, rslora=(kind == "qwen2"))
    ids = _ids()
    ref = _torch_logits(ref_model, ids)
    assert np.abs(ref - _torch_logits(torch_lm(base), ids)).max() > 0.3  # the adapter really changes logits
    cfg, raw = peft_io.read_adapter_config(tmp_path / "adapter")
    assert (cfg.r, cfg.alpha, cfg.use_rslora) == (4, 8.0, kind == "qwen2") and raw["peft_type"] == "LORA"

    unmerged = peft_io.load_pretrained_with_adapter(base, tmp_path / "adapter", progress=False)
    q = unmerged.model.layers[0].self_attn.q_proj.weight.get_value()
    assert isinstance(q, lora.LoraWeight) and q.lora_A.shape == (4, 32)
    np.testing.assert_allclose(_ours(unmerged, ids), ref, atol=ATOL, rtol=0)
    merged = peft_io.load_pretrained_with_adapter(base, tmp_path / "adapter", merged=True, progress=False)
    assert not isinstance(merged.model.layers[0].self_attn.q_proj.weight.get_value(), lora.LoraWeight)
    np.testing.assert_allclose(_ours(merged, ids), ref, atol=ATOL, rtol=0)  # (c) merged == unmerged (== peft)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_exported_adapter_loads_in_peft(kind, tiny_checkpoint, tmp_path):
    """(b) an adapter made here, exported in the PEFT format, loads in peft with the same logits."""
    import torch
    base = tiny_checkpoint(kind)
    model = pj.load_pretrained(base, progress=False)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    cfg = lora.LoraConfig(r=3, alpha=6.0, target_modules=("q_proj", "o_proj", "up_proj"))
    adapter = lora.init_lora(params, cfg, jax.random.key(0))
    adapter = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape), adapter)
    peft_io.save_adapter(tmp_path / "ours", adapter, cfg, params, model.config, base_model_name_or_path=str(base))
    written = json.loads((tmp_path / "ours" / peft_io.CONFIG_FILE).read_text())
    assert written["target_modules"] == ["o_proj", "q_proj", "up_proj"] and written["r"] == 3

    ref_model = peft.PeftModel.from_pretrained(_torch_base(base), tmp_path / "ours").eval()
    loaded_b = dict(ref_model.named_parameters())[
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"].detach().numpy()
    np.testing.assert_array_equal(loaded_b, np.asarray(adapter["model"]["layers"][1]["mlp"]["up_proj"]["weight"]
                                                       ["lora_B"]))
    ids = _ids(1)
    ours = _ours(lora.with_adapter(model, adapter, cfg), ids)
    with torch.no_grad():
        np.testing.assert_allclose(ours, _torch_logits(ref_model, ids), atol=ATOL, rtol=0)
    # and back: our own load of our export is the same adapter
    again, cfg2 = peft_io.load_adapter(tmp_path / "ours", params, model.config)
    assert cfg2.r == 3 and cfg2.alpha == 6.0
    jax.tree.map(np.testing.assert_array_equal, again, adapter)


def test_fresh_adapter_is_identity_and_grads_reach_only_the_adapter(tiny_checkpoint):
    model = pj.load_pretrained(tiny_checkpoint("llama"), progress=False)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    cfg = lora.LoraConfig(r=2, alpha=4.0, dropout=0.5, target_modules=("all-linear",))
    adapter = lora.init_lora(params, cfg, jax.random.key(0))
    assert len(lora.adapter_leaves(adapter)) == 2 * 7  # every projection of both layers, never lm_head
    ids = jnp.asarray(_ids())

    def loss(ad, key):
        logits, _ = nnx.merge(graphdef, lora.apply(params, ad, cfg, dropout_key=key))(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    np.testing.assert_allclose(_ours(lora.with_adapter(model, adapter, cfg), _ids()), _ours(model, _ids()), atol=1e-6)
    g = jax.grad(loss)(adapter, jax.random.key(1))
    q = g["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert float(jnp.abs(q["lora_B"]).max()) > 0 and float(jnp.abs(q["lora_A"]).max()) == 0  # B = 0 at init
    # dropout only with a key: two keys give two losses once B != 0; no key is deterministic
    ad = jax.tree.map(lambda x: x + 0.1, adapter)
    assert float(loss(ad, jax.random.key(1))) != float(loss(ad, jax.random.key(2)))
    assert float(loss(ad, None)) == float(loss(ad, None))


def test_bad_adapters_and_configs_name_the_fix(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="rank r must be an integer >= 1"):
        lora.LoraConfig(r=0)
    with pytest.raises(UserError, match="dropout"):
        lora.LoraConfig(dropout=1.0)
    model = pj.load_pretrained(tiny_checkpoint("llama"), progress=False)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    with pytest.raises(UserError, match=r"match no linear layer.*q_proj"):
        lora.init_lora(params, lora.LoraConfig(target_modules=("query",)), jax.random.key(0))
    # a PEFT adapter for another base (hidden size 48): shapes named, and the fix
    _peft_adapter(tiny_checkpoint("llama", hidden_size=48), tmp_path / "other", targets=["q_proj"])
    with pytest.raises(UserError, match=r"does not fit this base model.*q_proj.*pass the base model"):
        peft_io.load_pretrained_with_adapter(tiny_checkpoint("llama"), tmp_path / "other", progress=False)
    with pytest.raises(UserError, match="has no adapter_config.json"):
        peft_io.load_adapter(tmp_path, params, model.config)
