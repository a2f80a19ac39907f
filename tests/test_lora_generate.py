"""``proxytune generate`` with LoRA adapters (``--expert BASE --expert-adapter DIR``): the decode equals the one
with the adapter merged into a full checkpoint (an independent path: merge, save, load), unmerged adapters
share the base's arrays with the anti-expert, and bad adapters are clear errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

import proxytune_jax as pj
from proxytune_jax import cli
from proxytune_jax.commands.generate import load_models
from proxytune_jax.models import lora, peft_io


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    """target (3 layers), small base, a LoRA adapter of the small base (PEFT folder) and the same adapter merged
    into a full Hugging Face folder (with the tokenizer)."""
    import shutil
    work = tmp_path_factory.mktemp("lora_gen")
    target = tiny_checkpoint("llama", seed=20, num_hidden_layers=3)
    small = tiny_checkpoint("llama", seed=22)
    model = pj.load_pretrained(small, progress=False)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    cfg = lora.LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    adapter = lora.init_lora(params, cfg, jax.random.key(0))
    adapter = jax.tree.map(lambda x: x + 0.4 * jax.random.normal(jax.random.key(x.size), x.shape), adapter)
    peft_io.save_adapter(work / "adapter", adapter, cfg, params, model.config, base_model_name_or_path=str(small))
    merged = lora.with_adapter(model, adapter, cfg, merged=True)
    pj.save_pretrained(merged, work / "merged")
    for f in small.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, work / "merged" / f.name)
    return dict(work=work, target=target, small=small, adapter=work / "adapter", merged=work / "merged")


def _generate(capsys, *argv):
    code = cli.main(["generate", *map(str, argv)])
    return code, capsys.readouterr()


PROMPTS = ["the quick brown fox", "proxy tuning steers", "hello there", "a b c"]


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _tokens(path):
    return [json.loads(l)["token_ids"] for l in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["auto", "merged"])
def test_expert_adapter_decodes_like_the_merged_checkpoint(setup, capsys, mode):
    s, out = setup, setup["work"] / f"lora_{mode}.jsonl"
    prompts = s["work"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = ["--target", s["target"], "--anti-expert", s["small"], "--prompts", prompts, "--max-new-tokens", 8,
              "--alpha", 1.5, "--analysis"]
    code, cap = _generate(capsys, *common, "--expert", s["small"], "--expert-adapter", s["adapter"],
                          "--adapter-mode", mode, "--output", out)
    assert code == 0, cap.err
    ref = s["work"] / "merged_ref.jsonl"
    if not ref.exists():
        code, cap = _generate(capsys, *common, "--expert", s["merged"], "--output", ref)
        assert code == 0, cap.err
        plain = s["work"] / "no_adapter.jsonl"
        code, cap = _generate(capsys, *common, "--expert", s["small"], "--output", plain)
        assert code == 0 and _tokens(plain) != _tokens(ref)  # the adapter changes what is generated
    assert _tokens(out) == _tokens(ref) and sum(map(len, _tokens(out))) >= 10
    for got, want in zip(_rows(out), _rows(ref)):  # every model's probability of each chosen token
        np.testing.assert_allclose(got["analysis"]["chosen_prob"], want["analysis"]["chosen_prob"], atol=1e-5)


def test_unmerged_expert_shares_the_base_arrays_with_the_anti_expert(setup):
    target, expert, anti = load_models([setup["target"], setup["small"], setup["small"]],
                                       [None, setup["adapter"], None], "auto")
    w = expert.model.layers[1].self_attn.q_proj.weight.get_value()
    assert isinstance(w, lora.LoraWeight)
    assert w.weight is anti.model.layers[1].self_attn.q_proj.weight.get_value()  # one copy of the base
    assert expert.model.embed_tokens.embedding.get_value() is anti.model.embed_tokens.embedding.get_value()
    # used once, the base is merged (a plain model)
    (alone,) = load_models([setup["small"]], [setup["adapter"]], "auto")
    assert not isinstance(alone.model.layers[1].self_attn.q_proj.weight.get_value(), lora.LoraWeight)


def test_bad_adapters_are_clear_errors(setup, tiny_checkpoint, capsys, tmp_path):
    s = setup
    base = ["--target", s["target"], "--anti-expert", s["small"], "--prompt", "hi", "--max-new-tokens", 2,
            "--output", tmp_path / "o.jsonl"]
    code, cap = _generate(capsys, *base, "--expert", s["small"], "--expert-adapter", tmp_path)
    assert code == 2 and "has no adapter_config.json" in cap.err
    code, cap = _generate(capsys, *base, "--expert", s["small"], "--expert-adapter", s["adapter"],
                          "--expert-adapter", s["adapter"])
    assert code == 2 and "one adapter per --expert" in cap.err
    # the adapter on a base with another shape (a 3-layer, other-seed model is fine; hidden 48 is not)
    other = tiny_checkpoint("llama", seed=0, hidden_size=48)
    code, cap = _generate(capsys, "--target", s["target"], "--expert", other, "--expert-adapter", s["adapter"],
                          "--anti-expert", other, "--prompt", "hi", "--max-new-tokens", 2,
                          "--output", tmp_path / "o.jsonl")
    assert code == 2 and "does not fit this base model" in cap.err and "Traceback" not in cap.err
    assert not (tmp_path / "o.jsonl").exists()


SHARDED_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import proxytune_jax as pj
from proxytune_jax.decoding.engine import Decoder
from proxytune_jax.models import lora, peft_io
from proxytune_jax.sharding import MeshConfig, make_mesh
assert jax.device_count() == 8
target, small, adapter = sys.argv[1:4]
mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
ids = np.random.RandomState(0).randint(3, 300, size=(2, 6)).astype(np.int32)
prompts = [(ids, np.ones_like(ids, bool))] * 3
outs = []
for m in (mesh, None):
    base = pj.load_pretrained(small, mesh=m, progress=False)
    expert = peft_io.attach_adapter(base, adapter)  # unmerged
    dec = Decoder([pj.load_pretrained(target, mesh=m, progress=False), expert, base], "proxy_tuning", mesh=m)
    if m is not None:  # the adapter's factors replicated, the base kernel sharded by the family's rule
        w = dec.params[1]["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].get_value()
        assert isinstance(w, lora.LoraWeight)
        assert w.lora_A.sharding.is_fully_replicated and w.lora_B.sharding.is_fully_replicated, w.lora_A.sharding
        assert w.weight.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), w.weight.sharding
    outs.append(dec.generate(prompts, max_new_tokens=6, fusion_params={"alpha": 1.5}, analysis=True))
np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
np.testing.assert_allclose(outs[0].analysis["chosen_prob"], outs[1].analysis["chosen_prob"], atol=1e-5)
# remat: the forward under jax.checkpoint gives the same adapter gradient
graphdef, state = nnx.split(pj.load_pretrained(small, progress=False))
params = nnx.to_pure_dict(state)
ad, cfg = peft_io.load_adapter(adapter, params, pj.load_pretrained(small, progress=False).config)
f = lambda a: jnp.sum(nnx.merge(graphdef, lora.apply(params, a, cfg))(jnp.asarray(ids))[0] ** 2)
g1, g2 = jax.grad(f)(ad), jax.grad(jax.checkpoint(f))(ad)
jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), g1, g2)
print("LORA_SHARDED_OK", int(outs[0].num_tokens.sum()))
"""


def test_unmerged_adapter_decodes_sharded_on_8_devices_and_under_remat(setup, tmp_path):
    import os
    import subprocess
    import sys
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, str(script), str(setup["target"]), str(setup["small"]),
                          str(setup["adapter"])], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LORA_SHARDED_OK" in res.stdout
