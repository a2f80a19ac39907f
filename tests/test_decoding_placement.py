"""Models of a fusion on separate device groups (``decoding.placement``) against the single-device engine.

* the placement spec: parsed groups and meshes, and a UserError naming the fix for each bad input (overlap,
  devices that do not exist, unknown or repeated roles, a model left without devices, a mesh that does not cover
  its group's devices, malformed entries);
* on 8 simulated CPU devices (a subprocess: the device count is fixed when JAX starts): the same tokens, analysis
  and fused top-k as :class:`engine.Decoder` on one device, for proxy-tuning with the base sharded fsdp2 x
  tensor3 over 6 devices and the expert / anti-expert on one device each (batch 4, left padding), seeded
  sampling, EOS ending every row early, ``max_new_tokens=1``, a 2-model rule and a shared expert+anti-expert
  group; ``proxytune generate --placement`` writing the same JSONL as without it (stop strings, padded batches).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proxytune_jax.decoding.placement import DeviceGroup, check_groups, model_names, parse_placement
from proxytune_jax.errors import UserError


def _run_8_devices(script: str, tmp_path, *args) -> dict:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, str(path), *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the spec


def test_parse_groups_meshes_and_shared_entries():
    groups = parse_placement("base=0-5:fsdp2xtensor3, expert=6,anti_expert=7", "proxy_tuning", 3, 8)
    assert groups == (DeviceGroup((0,), (0, 1, 2, 3, 4, 5), (1, 2, 3)), DeviceGroup((1,), (6,), (1, 1, 1)),
                      DeviceGroup((2,), (7,), (1, 1, 1)))
    # the default mesh puts a group's devices on fsdp; roles joined by + share a group; entries in any order,
    # devices left out stay idle
    groups = parse_placement("expert+anti_expert=4-5,base=0-3", "proxy_tuning", 3, 8)
    assert groups == (DeviceGroup((0,), (0, 1, 2, 3), (1, 4, 1)), DeviceGroup((1, 2), (4, 5), (1, 2, 1)))
    assert parse_placement("expert=1,amateur=0:data1", "contrastive", 2, 2)[0].models == (0,)
    assert model_names("eft", 5) == ["base", "expert", "anti_expert", "expert2", "anti_expert2"]
    groups = parse_placement("base=0,expert=1,anti_expert=2,expert2=3,anti_expert2=4", "eft", 5, 5)
    assert [g.models for g in groups] == [(0,), (1,), (2,), (3,), (4,)]
    check_groups(groups, 5, 5)  # what parse_placement accepts, check_groups does


@pytest.mark.parametrize("spec, devices, fix", [
    ("base=0-5,expert=5,anti_expert=7", 8, "device 5 is in both"),  # overlap
    ("base=0-5,expert=6,anti_expert=8", 8, "there are 8 devices"),  # a device that does not exist
    ("base=0-5,expert=6", 8, "no devices to ['anti_expert']"),  # a model without devices
    ("base=0-5,expert=6,amateur=7", 8, "has no model 'amateur'"),  # unknown role
    ("base=0-5,expert=6,anti_expert=7,base=7", 8, "names 'base' twice"),
    ("base=0-5:fsdp2xtensor2,expert=6,anti_expert=7", 8, "covers 4 devices but the group has 6"),
    ("base=0-5:fsdp2xwidth3,expert=6,anti_expert=7", 8, "write e.g. fsdp2xtensor3"),
    ("base=5-0,expert=6,anti_expert=7", 8, "FIRST <= LAST"),
    ("base:0-5,expert=6,anti_expert=7", 8, "is not ROLES=DEVICES[:MESH]"),
    ("", 8, "placement is empty"),
])
def test_bad_placements_name_the_fix(spec, devices, fix):
    with pytest.raises(UserError) as err:
        parse_placement(spec, "proxy_tuning", 3, devices)
    assert fix in str(err.value)


@pytest.mark.parametrize("groups, fix", [
    ([DeviceGroup((0,), (0, 1), (1, 2, 1)), DeviceGroup((1,), (1,), (1, 1, 1))], "its own devices"),
    ([DeviceGroup((0,), (0,), (1, 1, 1)), DeviceGroup((1,), (2,), (1, 1, 1))], "devices [0, 2]"),  # 2 devices
    ([DeviceGroup((0,), (0,), (1, 1, 1))], "hold models [0]"),
    ([DeviceGroup((0,), (0,), (1, 2, 1)), DeviceGroup((1,), (1,), (1, 1, 1))], "does not cover"),
])
def test_bad_device_groups_name_the_fix(groups, fix):
    with pytest.raises(UserError) as err:
        check_groups(groups, 2, 2)
    assert fix in str(err.value)


@pytest.mark.parametrize("extra, fix", [
    (["--placement", "base=0,expert=0,anti_expert=0"], "device 0 is in both"),
    (["--placement", "base+expert+anti_expert=0", "--speculative", "2"], "drop --placement or --speculative"),
])
def test_generate_refuses_a_bad_placement_before_loading(extra, fix, tmp_path, capsys):
    from proxytune_jax import cli
    code = cli.main(["generate", "--target", str(tmp_path / "missing"), "--expert", "e", "--anti-expert", "a",
                     "--prompt", "hi", "--max-new-tokens", "2", "--output", str(tmp_path / "o.jsonl"), *extra])
    assert code == 2
    assert fix in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------ 8 devices: API


API_SCRIPT = r'''
import dataclasses, json
import numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compile time dominates
assert jax.device_count() == 8, jax.device_count()
from proxytune_jax.models import init_model, small_llama_config
from proxytune_jax.decoding.engine import Decoder
from proxytune_jax.decoding.placement import PlacedDecoder
from proxytune_jax.decoding.prompts import left_pad
from proxytune_jax.decoding.sampling import SamplingParams
from proxytune_jax.decoding.stopping import LENGTH, make_stop_criteria

small = dict(vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2, pad_token_id=None, num_layers=2)
models = [init_model(small_llama_config(**dict(small, hidden_size=48, num_heads=6, num_kv_heads=6, num_layers=3)),
                     seed=0), init_model(small_llama_config(**small), seed=1), init_model(small_llama_config(**small), seed=2)]
rng = np.random.default_rng(0)
prompts = [list(rng.integers(3, 96, size=n)) for n in (5, 9, 3, 7)]  # batch 4, left padded
batch = [left_pad(prompts, 12)] * 3
n = 10
single = Decoder(models, "proxy_tuning")
placed = PlacedDecoder(models, "proxy_tuning", placement="base=0-5:fsdp2xtensor3,expert=6,anti_expert=7",
                       check_every=2)
w = placed.placed_groups[0].params[0]["model"]["layers"][0]["self_attn"]["q_proj"]["weight"][...]
assert len(w.sharding.device_set) == 6 and w.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), w.sharding
assert w.addressable_shards[0].data.size * 6 == w.size  # the base's weights split over its 6 devices
assert placed.placed_groups[1].params[0]["lm_head"]["weight"][...].sharding.device_set == {jax.devices()[6]}
checked = []

def same(kw, dec=placed, ref=single):
    streams = batch[:len(ref.graphdefs)]
    a = ref.generate(streams, max_new_tokens=kw.pop("n", n), **kw)
    b = dec.generate(streams, max_new_tokens=a.tokens.shape[1], **kw)
    assert np.array_equal(a.tokens, b.tokens), (kw, a.tokens, b.tokens)
    assert np.array_equal(a.num_tokens, b.num_tokens) and np.array_equal(a.finish_reason, b.finish_reason)
    if a.analysis is not None:
        assert np.array_equal(a.analysis["top1"], b.analysis["top1"])
        assert np.array_equal(a.analysis["changed"], b.analysis["changed"])
        np.testing.assert_allclose(a.analysis["chosen_prob"], b.analysis["chosen_prob"], atol=1e-5)
    if a.topk is not None:
        assert np.array_equal(a.topk.ids, b.topk.ids)
        np.testing.assert_allclose(a.topk.logp, b.topk.logp, atol=1e-5)
    checked.append(a.tokens.tolist())
    return a, b

def stop_at(ids):  # EOS ids padded to 4 entries: one stop shape, one compile for every case
    stop = make_stop_criteria(ids)
    return dataclasses.replace(stop, eos_ids=jnp.asarray((sorted(set(ids)) + [-1] * 4)[:4], jnp.int32))

common = dict(analysis=True, record_topk=4, fusion_params={"alpha": 0.7})
a, _ = same(dict(common, stop=stop_at([])))
assert (a.finish_reason == LENGTH).all()
# EOS: row r stops at its token 2 (or earlier where that id came sooner): every row is done long before n, and
# the placed loop stops early too
a, _ = same(dict(common, stop=stop_at(a.tokens[:, 2].tolist())))
assert a.num_tokens.max() <= 3 and placed.steps_run < n - 1, (a.num_tokens, placed.steps_run)
same(dict(common, stop=stop_at([]), sampling=SamplingParams.create(96, temperature=1.0, top_p=0.9), seed=7,
          row_ids=[3, 1, 4, 1]))
same(dict(common, stop=stop_at([]), sampling=SamplingParams.create(96, temperature=0.7, top_k=5), seed=1))
same(dict(common, stop=stop_at([]), n=1))
# the expert pair sharing one device group: one vmapped forward, as on one device
pair = PlacedDecoder(models, "proxy_tuning", placement="base=0-3:data2xtensor2,expert+anti_expert=4-5")
assert pair.placed_groups[1].groups == ((0, 1),)
same(dict(common, stop=stop_at([])), dec=pair)
# a 2-model rule (contrastive decoding: the expert is the large one), default fsdp meshes
two = [models[0], models[1]]
same(dict(analysis=True, stop=stop_at([]), fusion_params={"lam": 0.5}), dec=PlacedDecoder(two, "contrastive",
     placement="expert=0-3,amateur=4-7"), ref=Decoder(two, "contrastive"))
print(json.dumps({"ok": True, "checked": len(checked)}))
'''


def test_placed_decoding_equals_one_device_on_8_devices(tmp_path):
    out = _run_8_devices(API_SCRIPT, tmp_path)
    assert out == {"ok": True, "checked": 7}


# ------------------------------------------------------------------------------------------ 8 devices: CLI


CLI_SCRIPT = r'''
import json, sys
import jax
jax.config.update("jax_disable_most_optimizations", True)
assert jax.device_count() == 8
from proxytune_jax import cli
target, expert, anti, prompts, out = sys.argv[1:6]

def generate(name, *extra):
    argv = ["generate", "--target", target, "--expert", expert, "--anti-expert", anti, "--expert-chat-template",
            "--prompts", prompts, "--max-new-tokens", "8", "--batch-size", "2", "--alpha", "0.8", "--analysis",
            "--output", f"{out}/{name}.jsonl", *extra]
    assert cli.main(argv) == 0, name
    return [json.loads(line) for line in open(f"{out}/{name}.jsonl")]

free = generate("free")
stop = next(r["completion"][1:3] for r in free if len(r["completion"].strip()) >= 3)
one = generate("one", "--stop", stop)
placed = generate("placed", "--stop", stop, "--placement", "base=0-5:fsdp3xtensor2,expert=6,anti_expert=7")
for p, o in zip(placed, one):  # the same text and tokens; probabilities equal up to float rounding
    pa, oa = p.pop("analysis"), o.pop("analysis")
    assert p == o and pa["top1"] == oa["top1"] and pa["changed"] == oa["changed"], (p, o)
    assert max(abs(x - y) for a, b in zip(pa["chosen_prob"], oa["chosen_prob"]) for x, y in zip(a, b)) < 1e-5
assert len(placed) == len(one) == 3
assert any(r["finish_reason"] == "stop" for r in one), one
print(json.dumps({"ok": True, "rows": len(one)}))
'''


def test_generate_placement_writes_the_same_jsonl_on_8_devices(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the quick brown fox", "proxy", "hello")))
    dirs = [tiny_checkpoint("llama", seed=20, num_hidden_layers=3), tiny_checkpoint("llama", seed=21),
            tiny_checkpoint("llama", seed=22)]
    assert _run_8_devices(CLI_SCRIPT, tmp_path, *dirs, prompts, tmp_path) == {"ok": True, "rows": 3}
