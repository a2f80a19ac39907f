"""The speed paths of the train step compute exactly what the plain formulations compute.

- ``cpu_backend.dense`` (hand-written VJP, used by every Linear and the LM head): value and gradients equal
  autodiff through the plain ``jnp.einsum``, for fp32 and bf16, with and without ``preferred_element_type``,
  on both sides of ``SMALL_BATCH_ROWS`` (few rows: the product is computed transposed).
- ``attention.attend`` (hand-written VJP): value equals a NumPy softmax-attention formula and gradients equal
  autodiff through the plain einsum/where/softmax formulation, for MHA/GQA/MQA, left padding (query rows
  with no allowed key), sliding windows, decode shapes (T < S), fp32 and bf16; random masks (hypothesis).
- ``cpu_backend.attend_causal`` (query blocks that skip the causal upper triangle): equals ``attend`` in value
  and gradients on every query row with an allowed key, for random masks inside the causal triangle, any
  block count (hypothesis), GQA and windows; pad rows stay finite with zero query gradient.
- ``objectives.model_logits`` (last position dropped before the LM head) equals slicing the model's logits,
  in value and in the gradient of a loss through it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from proxytune_jax.models import cpu_backend, layers
from proxytune_jax.models.attention import MASK_VALUE, attend
from proxytune_jax.models.cpu_backend import attend_causal, causal_blocks
from proxytune_jax.models.llama import LlamaForCausalLM, small_llama_config
from proxytune_jax.training.objectives import model_logits
from proxytune_jax.training.state import split_params


def _plain_dense(x, w, out_dtype=None):
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)


@pytest.mark.parametrize("lead", [(1,), (3, 5), (2, cpu_backend.SMALL_BATCH_ROWS // 2), (3, 50)])
@pytest.mark.parametrize("dtype,out_dtype,tol", [(jnp.float32, None, 1e-5), (jnp.float32, jnp.float32, 1e-5),
                                                 (jnp.bfloat16, None, 2e-2), (jnp.bfloat16, jnp.float32, 2e-2)])
def test_dense_value_and_gradients_equal_plain_einsum(lead, dtype, out_dtype, tol):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=lead + (7,)), dtype)
    w = jnp.asarray(r.normal(size=(4, 7)), dtype)  # [out, in]
    c = jnp.asarray(r.normal(size=lead + (4,)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, out_dtype).astype(jnp.float32) * c)

    v_fast, g_fast = jax.jit(jax.value_and_grad(loss(cpu_backend.dense), argnums=(0, 1)))(x, w)
    v_ref, g_ref = jax.value_and_grad(loss(_plain_dense), argnums=(0, 1))(x, w)
    assert cpu_backend.dense(x, w, out_dtype).dtype == _plain_dense(x, w, out_dtype).dtype
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_backend.dense, static_argnums=2)(x, w, out_dtype), np.float32),
                               np.asarray(_plain_dense(x, w, out_dtype), np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(float(v_fast), float(v_ref), rtol=tol)
    for a, b, like in zip(g_fast, g_ref, (x, w)):
        assert a.dtype == like.dtype and a.shape == like.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def _plain_attend(q, k, v, allowed, scale):
    """Autodiff reference: the textbook GQA formulation, no custom VJP."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    q5 = q.reshape(b, t, kv, h // kv, d)
    s = jnp.einsum("btkgd,bksd->bkgts", q5, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(allowed[:, None, None], s, MASK_VALUE), axis=-1)
    return jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v).reshape(b, t, h, d).astype(q.dtype)


def _numpy_attend(q, k, v, allowed, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    rep = h // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # [B, H, S, D]
    s = np.einsum("bthd,bhsd->bhts", q, k) * scale
    s = np.where(np.asarray(allowed)[:, None], s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", p, v)


def _attention_case(r, b, t, s, h, kv, d, allowed, dtype, tol):
    q = jnp.asarray(r.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(r.normal(size=(b, kv, s, d)), dtype)
    v = jnp.asarray(r.normal(size=(b, kv, s, d)), dtype)
    c = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    allowed = jnp.asarray(allowed)
    scale = d ** -0.5

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, allowed, scale).astype(jnp.float32) * c)

    out = jax.jit(attend, static_argnums=4)(q, k, v, allowed, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attend(q, k, v, allowed, scale),
                               rtol=tol, atol=tol)
    v_fast, g_fast = jax.jit(jax.value_and_grad(loss(attend), argnums=(0, 1, 2)))(q, k, v)
    v_ref, g_ref = jax.value_and_grad(loss(_plain_attend), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(v_fast), float(v_ref), rtol=tol, atol=tol)
    for a, b_, like in zip(g_fast, g_ref, (q, k, v)):
        assert a.dtype == like.dtype and a.shape == like.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), rtol=tol, atol=tol)
    return g_fast


def _causal(b, t, s, starts, window=None):
    """[B, T, S]: query t sits at slot s - t + t_idx; keys from each row's start, causal, optional window."""
    qs = np.arange(t)[:, None] + (s - t)
    ks = np.arange(s)[None, :]
    allowed = (ks <= qs)[None] & (ks[None] >= np.asarray(starts)[:, None, None])
    if window is not None:
        allowed &= (qs - ks < window)[None]
    return np.broadcast_to(allowed, (b, t, s))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
def test_attend_value_and_gradients_equal_references(heads, dtype, tol):
    h, kv = heads
    r = np.random.default_rng(h * 10 + kv)
    b, t, d = 3, 9, 8
    allowed = _causal(b, t, t, starts=[0, 4, 8])  # row 1: 4 pad queries; row 2: only the last query is real
    g_q = _attention_case(r, b, t, t, h, kv, d, allowed, dtype, tol)[0]
    # pad query rows (no allowed key) get a uniform softmax forward and exactly zero gradient backward
    assert not np.asarray(allowed[1, :4]).any()
    assert float(jnp.abs(g_q[1, :4]).max()) == 0.0 and float(jnp.abs(g_q[2, :8]).max()) == 0.0


def test_attend_decode_shape_and_sliding_window():
    r = np.random.default_rng(5)
    _attention_case(r, 2, 1, 12, 4, 2, 8, _causal(2, 1, 12, starts=[0, 5]), jnp.float32, 2e-5)  # one new token
    _attention_case(r, 2, 3, 12, 4, 2, 8, _causal(2, 3, 12, starts=[0, 5]), jnp.float32, 2e-5)  # three
    _attention_case(r, 2, 10, 10, 4, 2, 8, _causal(2, 10, 10, starts=[0, 2], window=3), jnp.float32, 2e-5)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 1), (2, 2), (6, 3)]))
def test_attend_gradients_equal_autodiff_for_random_masks(seed, heads):
    r = np.random.default_rng(seed)
    allowed = r.random((2, 5, 7)) < 0.5  # arbitrary masks, fully masked rows included
    allowed[0, 0] = False
    _attention_case(r, 2, 5, 7, heads[0], heads[1], 4, allowed, jnp.float32, 2e-5)


@functools.lru_cache(maxsize=None)
def _causal_pair(scale, num_blocks):
    """Jitted (value, value_and_grad of sum(out * c)) of attend_causal and of attend, the mask an argument: one
    compile per shape, shared by the cases and examples that repeat it."""
    def pair(f):
        loss = lambda q, k, v, allowed, c: jnp.sum(f(q, k, v, allowed) * c)  # noqa: E731
        return jax.jit(f), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return (pair(lambda q, k, v, allowed: attend_causal(q, k, v, allowed, scale, num_blocks)),
            pair(lambda q, k, v, allowed: attend(q, k, v, allowed, scale)))


def _causal_blocks_case(r, b, t, h, kv, d, allowed, num_blocks, tol=2e-5):
    """attend_causal vs attend on rows that have an allowed key (the cotangent is zero on the others, as a
    masked loss makes it)."""
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(r.normal(size=(b, kv, t, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(b, kv, t, d)), jnp.float32)
    allowed = jnp.asarray(allowed)
    real = np.asarray(allowed).any(-1)  # [B, T]
    c = jnp.asarray(r.normal(size=(b, t, h, d)) * real[:, :, None, None], jnp.float32)
    scale = d ** -0.5

    blocked, plain = _causal_pair(scale, num_blocks)
    out, ref = blocked[0](q, k, v, allowed), plain[0](q, k, v, allowed)
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=tol, atol=tol)
    v_fast, g_fast = blocked[1](q, k, v, allowed, c)
    v_ref, g_ref = plain[1](q, k, v, allowed, c)
    np.testing.assert_allclose(float(v_fast), float(v_ref), rtol=tol, atol=tol)
    for a, b_ in zip(g_fast, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=tol, atol=tol)
    assert float(jnp.abs(g_fast[0][~real]).max(initial=0.0)) == 0.0  # pad query rows: no gradient


@pytest.mark.parametrize("t,num_blocks", [(64, None), (100, None), (37, 2), (37, 5), (9, 9), (128, 4)])
def test_attend_causal_equals_attend_with_padding_and_windows(t, num_blocks):
    r = np.random.default_rng(t)
    if num_blocks is None:
        assert causal_blocks(t) == {64: 2, 100: 3}[t]
    _causal_blocks_case(r, 3, t, 4, 2, 8, _causal(3, t, t, starts=[0, t // 3, t - 1]), num_blocks)
    _causal_blocks_case(r, 2, t, 4, 1, 8, _causal(2, t, t, starts=[0, 5], window=7), num_blocks)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 9, 40]), st.data())
def test_attend_causal_equals_attend_for_random_causal_masks(seed, t, data):
    r = np.random.default_rng(seed)
    # a few shapes (each compiles once; the masks and values vary per example)
    num_blocks = data.draw(st.sampled_from(sorted({1, min(t, 3), min(t, 9)})))
    allowed = (r.random((2, t, t)) < 0.6) & np.tril(np.ones((t, t), bool))  # any mask inside the triangle
    _causal_blocks_case(r, 2, t, 4, 2, 4, allowed, num_blocks)


@pytest.mark.parametrize("t,block,window", [(50, 16, None), (50, 16, 5), (64, 64, None), (40, 128, 7)])
def test_attend_blockwise_value_and_gradients_equal_references(t, block, window):
    """The portable blockwise attention (online softmax, recomputing backward) vs the NumPy formula (value)
    and autodiff of the textbook formulation (gradients), GQA 4/2, left padding (a row of 17 pads, a row with
    one real token), causal and sliding-window masks, T not a multiple of the block."""
    from proxytune_jax.models.attention import SelfMask, attend_blockwise
    r = np.random.default_rng(t + block)
    b, h, kv, d, scale = 3, 4, 2, 8, 0.3
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(b, kv, t, d)), jnp.float32) for _ in range(2))
    valid = np.ones((b, t), bool)
    valid[1, :17] = False
    valid[2, :t - 1] = False
    mask = SelfMask(jnp.asarray(valid), jnp.asarray(np.maximum(np.cumsum(valid, 1) - 1, 0)), window)
    allowed = mask.dense()
    g = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32) * jnp.asarray(valid)[:, :, None, None]
    out = jax.jit(lambda q, k, v: attend_blockwise(q, k, v, mask, scale, block))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[valid], _numpy_attend(q, k, v, allowed, scale)[valid],
                               rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[~valid] == 0)  # pad queries: zeros
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend_blockwise(q, k, v, mask, scale, block) * g),
                             argnums=(0, 1, 2)))(q, k, v)
    refs = jax.grad(lambda q, k, v: jnp.sum(_plain_attend(q, k, v, allowed, scale) * g), argnums=(0, 1, 2))(q, k, v)
    for a, ref in zip(grads, refs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=1e-5, atol=2e-5)


def test_causal_blocks_and_attend_causal_errors():
    assert [causal_blocks(t) for t in (1, 8, 31, 32, 128, 512, 2048)] == [1, 1, 1, 2, 4, 8, 16]
    q = jnp.zeros((1, 4, 2, 8))
    kv = jnp.zeros((1, 2, 6, 8))
    with pytest.raises(ValueError, match="as many keys as queries"):
        attend_causal(q, kv, kv, jnp.ones((1, 4, 6), bool), 1.0)
    with pytest.raises(ValueError, match="num_blocks"):
        attend_causal(q, kv[:, :, :4], kv[:, :, :4], jnp.ones((1, 4, 4), bool), 1.0, num_blocks=5)


def test_model_logits_equal_sliced_model_logits_in_value_and_gradient():
    config = small_llama_config(64, 32, 2, 4, num_kv_heads=2, intermediate_size=48, max_positions=32,
                                pad_token_id=None)
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


# ------------------------------------------------- XLA:CPU temp heaps (proxytune_jax.xla_options)

def _varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i


def _proto_fields(b: bytes):
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            value, i = b[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = b[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        yield field, value


def _temp_heaps(compiled) -> list[int]:
    """Sizes of the temp allocations in a compiled executable's buffer assignment (xla BufferAssignmentProto:
    field 3 = BufferAllocationProto with 2 size, 3 thread-local, 5 entry parameter, 7 maybe live out,
    12 constant)."""
    heaps = []
    for field, alloc in _proto_fields(compiled.memory_analysis().serialized_buffer_assignment_proto):
        if field == 3:
            f = dict(_proto_fields(alloc))
            if not any(f.get(k) for k in (3, 5, 7, 12)):
                heaps.append(f.get(2, 0))
    return heaps


def test_cpu_train_step_splits_its_temporaries_into_small_heaps_and_computes_the_same():
    """make_train_step compiles with xla_options.compiler_options on CPU: every temp heap <= CPU_HEAP_BYTES
    where the plain jit of the same step function has one heap above it, and the results are bit for bit the
    plain jit's (buffer assignment changes no arithmetic)."""
    from flax import nnx
    from proxytune_jax.models import partition_rules
    from proxytune_jax.sharding import MeshConfig, make_mesh, put_global_batch
    from proxytune_jax.training.objectives import SFT
    from proxytune_jax.training.optim import OptimConfig, make_optimizer
    from proxytune_jax.training.state import init_train_state, train_state_shardings
    from proxytune_jax.training.step import make_train_step
    from proxytune_jax.xla_options import CPU_HEAP_BYTES, compiler_options

    config = small_llama_config(512, 32, 2, 4, num_kv_heads=2, intermediate_size=48, pad_token_id=None)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = split_params(model)
    mesh = make_mesh(MeshConfig())
    assert compiler_options(mesh) == {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_BYTES}
    opt = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10))
    r = np.random.default_rng(0)
    batch = {"input_ids": r.integers(3, 512, (32, 64)).astype(np.int32),
             "attention_mask": np.ones((32, 64), np.int32), "loss_mask": np.ones((32, 64), np.int32)}
    rules = partition_rules(config)
    states = [init_train_state(params, opt, rules=rules, mesh=mesh) for _ in range(2)]
    sh = train_state_shardings(states[0], rules, mesh)
    step = make_train_step(SFT().loss_fn(graphdef, {}), opt, mesh, state_shardings=sh)
    device_batch = put_global_batch(batch, mesh)
    ours = _temp_heaps(step.jitted.lower({}, states[0], device_batch).compile())
    plain_jit = jax.jit(step.fn)
    plain = _temp_heaps(plain_jit.lower({}, states[1], device_batch).compile())
    assert len(plain) == 1 and plain[0] > 2 * CPU_HEAP_BYTES  # logits [32, 63, 512] and friends: one big heap
    assert len(ours) >= 3 and max(ours) <= CPU_HEAP_BYTES
    assert sum(ours) < 1.05 * plain[0]  # splitting costs almost no memory
    s_ours, m_ours = step(states[0], device_batch)
    s_plain, m_plain = plain_jit({}, states[1], device_batch)
    assert float(m_ours["loss"]) == float(m_plain["loss"])
    for a, b in zip(jax.tree.leaves(s_ours.params), jax.tree.leaves(s_plain.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compiler_options_are_cpu_only():
    from types import SimpleNamespace
    from proxytune_jax.xla_options import compiler_options
    fake = SimpleNamespace(devices=np.array([SimpleNamespace(platform="tpu")], dtype=object))
    assert compiler_options(fake) is None


@pytest.mark.parametrize("window", [None, 9])
def test_gpu_and_tpu_kernel_paths_equal_attend_on_cpu(window):
    """The GPU path's layout logic (left pads rotated to cuDNN's right-aligned sequence lengths, causal, local
    window) run through ``jax.nn.dot_product_attention``'s XLA implementation, and the TPU path's splash
    attention in Pallas interpret mode, both on CPU: equal to ``attend`` on every real query. (The kernels
    themselves run only on their hardware: unmeasured here.)"""
    from proxytune_jax.models.attention import SelfMask, _attend_cudnn, _attend_splash
    r = np.random.default_rng(0)
    b, t, h, kv, d = 2, 128, 4, 2, 16
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(b, kv, t, d)), jnp.float32) for _ in range(2))
    valid = np.ones((b, t), bool)
    valid[1, :37] = False
    mask = SelfMask(jnp.asarray(valid), jnp.asarray(np.maximum(np.cumsum(valid, 1) - 1, 0)), window)
    ref = _numpy_attend(q, k, v, mask.dense(), 0.25)
    gpu = np.asarray(_attend_cudnn(q, k, v, mask, 0.25, implementation="xla"))
    np.testing.assert_allclose(gpu[valid], ref[valid], rtol=1e-5, atol=1e-5)
    tpu = _attend_splash(q, k, v, mask, 0.25, interpret=True)
    if tpu is None:
        pytest.skip("splash attention does not import under this jax")
    np.testing.assert_allclose(np.asarray(tpu)[valid], ref[valid], rtol=1e-5, atol=1e-5)
