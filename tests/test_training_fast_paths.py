"""The speed paths of the train step compute exactly what the plain formulations compute.

- ``layers.dense`` (hand-written VJP, used by every Linear and the LM head): value and gradients equal
  autodiff through the plain ``jnp.einsum``, for fp32 and bf16, with and without ``preferred_element_type``,
  on both sides of ``SMALL_BATCH_ROWS`` (few rows: the product is computed transposed).
- ``objectives.model_logits`` (last position dropped before the LM head) equals slicing the model's logits,
  in value and in the gradient of a loss through it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxytune_jax.models import layers
from proxytune_jax.models.llama import LlamaConfig, LlamaForCausalLM
from proxytune_jax.training.objectives import model_logits
from proxytune_jax.training.state import split_params


def _plain_dense(x, w, out_dtype=None):
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)


@pytest.mark.parametrize("lead", [(1,), (3, 5), (2, layers.SMALL_BATCH_ROWS // 2), (3, 50)])
@pytest.mark.parametrize("dtype,out_dtype,tol", [(jnp.float32, None, 1e-5), (jnp.float32, jnp.float32, 1e-5),
                                                 (jnp.bfloat16, None, 2e-2), (jnp.bfloat16, jnp.float32, 2e-2)])
def test_dense_value_and_gradients_equal_plain_einsum(lead, dtype, out_dtype, tol):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=lead + (7,)), dtype)
    w = jnp.asarray(r.normal(size=(4, 7)), dtype)  # [out, in]
    c = jnp.asarray(r.normal(size=lead + (4,)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, out_dtype).astype(jnp.float32) * c)

    v_fast, g_fast = jax.jit(jax.value_and_grad(loss(layers.dense), argnums=(0, 1)))(x, w)
    v_ref, g_ref = jax.value_and_grad(loss(_plain_dense), argnums=(0, 1))(x, w)
    assert layers.dense(x, w, out_dtype).dtype == _plain_dense(x, w, out_dtype).dtype
    np.testing.assert_allclose(np.asarray(jax.jit(layers.dense, static_argnums=2)(x, w, out_dtype), np.float32),
                               np.asarray(_plain_dense(x, w, out_dtype), np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(float(v_fast), float(v_ref), rtol=tol)
    for a, b, like in zip(g_fast, g_ref, (x, w)):
        assert a.dtype == like.dtype and a.shape == like.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_model_logits_equal_sliced_model_logits_in_value_and_gradient():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    from flax import nnx
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = split_params(model)
    r = np.random.default_rng(2)
    ids = jnp.asarray(r.integers(0, 64, (2, 9)), jnp.int32)
    attn = jnp.asarray(np.array([[1] * 9, [0, 0, 0] + [1] * 6]), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": attn}
    c = jnp.asarray(r.normal(size=(2, 8, 64)), jnp.float32)

    def sliced(p):
        logits, _ = nnx.merge(graphdef, p)(ids, attn)
        return logits[:, :-1]

    np.testing.assert_allclose(np.asarray(model_logits(graphdef, params, batch)), np.asarray(sliced(params)),
                               rtol=1e-6, atol=1e-6)
    g_fast = jax.grad(lambda p: jnp.sum(model_logits(graphdef, p, batch) * c))(params)
    g_ref = jax.grad(lambda p: jnp.sum(sliced(p) * c))(params)
    for a, b_ in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)
