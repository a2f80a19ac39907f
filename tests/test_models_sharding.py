"""Shapes at scale (never materialised) and partition rules: valid shardings for every param, and the same
logits when the params are sharded over 8 simulated devices (fsdp=2 x tensor=4)."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import proxytune_jax as pj
from proxytune_jax.models import LlamaConfig, abstract_model, partition_rules
from proxytune_jax.sharding import MeshConfig, make_mesh, path_to_str, tree_shardings

# meta-llama/Llama-2-70b-hf config.json
LLAMA2_70B = LlamaConfig(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=4096, rms_norm_eps=1e-5)


def test_llama2_70b_param_shapes_without_materialising():
    model = abstract_model(LLAMA2_70B, jnp.bfloat16)
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)
    # The published parameter count of Llama-2-70b-hf.
    assert sum(int(np.prod(x.shape)) for x in leaves) == 68_976_648_192
    layer = model.model.layers[79].self_attn
    assert layer.q_proj.weight.shape == (8192, 8192) and layer.k_proj.weight.shape == (1024, 8192)  # [out, in]
    assert model.model.layers[0].mlp.down_proj.weight.shape == (8192, 28672)



def test_llama2_70b_forward_shapes_without_materialising():
    """Abstract forward with a cache; 2 of the 80 identical layers keep the trace short."""
    import dataclasses
    model = abstract_model(dataclasses.replace(LLAMA2_70B, num_hidden_layers=2), jnp.bfloat16)
    graphdef, state = nnx.split(model)

    def logits_fn(state, ids, cache):
        return nnx.merge(graphdef, state)(ids, None, cache)

    cache = jax.eval_shape(lambda: model.init_cache(1, 32))
    logits, new_cache = jax.eval_shape(logits_fn, state, jax.ShapeDtypeStruct((1, 16), jnp.int32), cache)
    assert logits.shape == (1, 16, 32000) and logits.dtype == jnp.float32
    assert new_cache.k[1].shape == (1, 8, 32, 128) and new_cache.k[1].dtype == jnp.bfloat16


def test_70b_rules_shard_every_matrix():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    state = nnx.state(abstract_model(LLAMA2_70B, jnp.bfloat16))
    shardings = tree_shardings(state, partition_rules(LLAMA2_70B), mesh)
    by_path = {path_to_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    assert by_path["model/layers/5/self_attn/q_proj/weight/value"] == P("tensor", "fsdp")
    assert by_path["model/layers/5/self_attn/o_proj/weight/value"] == P("fsdp", "tensor")
    assert by_path["model/layers/5/mlp/down_proj/weight/value"] == P("fsdp", "tensor")
    assert by_path["model/embed_tokens/embedding/value"] == P("tensor", "fsdp")
    assert by_path["lm_head/weight/value"] == P("tensor", "fsdp")
    assert all(axis is None for axis in by_path["model/norm/scale/value"])  # replicated
    matrices = [p for p in by_path if "/weight/" in p or "embedding" in p]
    assert all(len(by_path[p]) == 2 for p in matrices)  # no matrix falls through to replication


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_rules_give_valid_shardings_on_one_device(kind, tiny_checkpoint):
    model = pj.load_pretrained(tiny_checkpoint(kind))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    state = nnx.state(model)
    shardings = tree_shardings(state, partition_rules(model.config), mesh)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert isinstance(sharding, NamedSharding)
        assert sharding.shard_shape(leaf.shape) == leaf.shape  # one device holds everything
    placed = jax.device_put(state, shardings)
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(placed), jax.tree.leaves(shardings)))


SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import proxytune_jax as pj
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import MeshConfig, make_mesh, tree_shardings
    assert jax.device_count() == 8
    path = sys.argv[1]
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    model = pj.load_pretrained(path, mesh=mesh)  # each tensor placed by the rules while loading
    graphdef, state = nnx.split(model)
    q = model.model.layers[0].self_attn.q_proj.weight[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), q.sharding
    assert q.addressable_shards[0].data.shape == (8, 16)  # [32, 32] over tensor=4 x fsdp=2
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 300, size=(2, 12)), jnp.int32)
    step = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)[0])
    sharded = np.asarray(step(state, ids))
    plain = pj.load_pretrained(path)
    ref = np.asarray(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)[0])(nnx.state(plain), ids))
    np.testing.assert_allclose(sharded, ref, atol=1e-5, rtol=0)
    print("SHARDED_OK", np.abs(sharded - ref).max())
""")


def test_sharded_params_on_8_devices_match(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SHARDED_OK" in res.stdout
