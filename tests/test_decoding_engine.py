"""The multi-model decoding engine against independent references.

* plain greedy == transformers PyTorch ``generate(do_sample=False)`` (Llama-family and GPT-2), each prompt alone
  vs our left-padded batch;
* proxy-tuned greedy == a brute-force PyTorch loop recomputing every model's full forward at every step (no
  cache), each prompt alone, the expert reading its chat template;
* per-row EOS, stop strings, traced α (no recompilation), a vmap-ed α sweep, seeded sampling, donation.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from proxytune_jax.decoding import engine
from proxytune_jax.decoding.engine import Decoder, decode_jit
from proxytune_jax.decoding.prompts import encode_prompt, left_pad
from proxytune_jax.decoding.sampling import SamplingParams
from proxytune_jax.decoding.stopping import EOS, LENGTH, STOP_STRING, make_stop_criteria
from proxytune_jax.models.hf_io import load_pretrained

EOS_ID = 2
PROMPTS = ["the quick brown fox", "proxy", "question: what is two plus three? answer:"]
N_NEW = 10


def _batch(tok, prompts, length, chat=False):
    return left_pad([encode_prompt(tok, p, chat_template=chat) for p in prompts], length, tok.pad_token_id)


def _hf_greedy(model, ids, n_new):
    import torch
    torch.set_num_threads(1)  # tiny models: threads only contend with XLA's
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n_new, eos_token_id=EOS_ID, pad_token_id=0)
    gen = out[0, len(ids):].tolist()
    return gen[: gen.index(EOS_ID) + 1] if EOS_ID in gen else gen


# ---------------------------------------------------------------------------------------------- plain


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_plain_greedy_matches_transformers_generate(kind, tiny_checkpoint, torch_lm):
    from transformers import AutoTokenizer
    path = tiny_checkpoint(kind, seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    dec = Decoder([load_pretrained(path)], "plain")
    ids, mask = _batch(tok, PROMPTS, 32)
    res = dec.generate([(ids, mask)], max_new_tokens=N_NEW, stop=make_stop_criteria([EOS_ID]))
    for b, p in enumerate(PROMPTS):  # our left-padded batch vs each prompt alone in transformers
        expected = _hf_greedy(torch_lm(path), encode_prompt(tok, p), N_NEW)
        assert res.token_lists()[b] == expected, (kind, b)
        assert res.finish_reason[b] == (EOS if expected[-1] == EOS_ID and len(expected) <= N_NEW else LENGTH)


# ------------------------------------------------------------------------------------------ proxy-tuned


@pytest.fixture(scope="module")
def trio(tiny_checkpoint):
    from transformers import AutoTokenizer
    paths = [tiny_checkpoint("llama", seed=10, num_hidden_layers=3, intermediate_size=96),
             tiny_checkpoint("llama", seed=11), tiny_checkpoint("llama", seed=12)]
    tok = AutoTokenizer.from_pretrained(paths[0])
    dec = Decoder([load_pretrained(p) for p in paths], "proxy_tuning")
    chat = [False, True, False]  # the expert reads its chat template, base and anti-expert the plain prompt
    streams = [[encode_prompt(tok, p, chat_template=c) for p in PROMPTS] for c in chat]
    batch = [left_pad(s, 48, tok.pad_token_id) for s in streams]
    return dict(paths=paths, tok=tok, dec=dec, streams=streams, batch=batch)


def _reference_proxy(torch_lm, paths, streams_of_prompt, alpha, n_new):
    """Brute force: every step recomputes each model's full forward on its whole stream (no cache)."""
    import torch
    torch.set_num_threads(1)
    models = [torch_lm(p) for p in paths]
    seqs = [list(s) for s in streams_of_prompt]
    out, top1, probs = [], [], []
    for _ in range(n_new):
        with torch.no_grad():
            lps = [torch.log_softmax(m(torch.tensor([s])).logits[0, -1].double(), -1).numpy()
                   for m, s in zip(models, seqs)]
        scores = lps[0] + alpha * (lps[1] - lps[2])
        t = int(np.argmax(scores))
        out.append(t)
        top1.append([int(np.argmax(lp)) for lp in lps])
        probs.append([float(np.exp(lp[t])) for lp in lps])
        for s in seqs:
            s.append(t)
        if t == EOS_ID:
            break
    return out, np.array(top1), np.array(probs)


@pytest.fixture(scope="module")
def proxy_run(trio):
    res = trio["dec"].generate(trio["batch"], max_new_tokens=N_NEW, stop=make_stop_criteria([EOS_ID]),
                               analysis=True)
    return res


def test_proxy_tuned_greedy_matches_no_cache_reference(trio, proxy_run, torch_lm):
    res = proxy_run
    for b in range(len(PROMPTS)):
        ref, top1, probs = _reference_proxy(torch_lm, trio["paths"], [s[b] for s in trio["streams"]], 1.0, N_NEW)
        assert res.token_lists()[b] == ref
        n = len(ref)
        np.testing.assert_array_equal(res.analysis["top1"][b, :n], top1)
        np.testing.assert_allclose(res.analysis["chosen_prob"][b, :n], probs, atol=1e-4)
        assert (res.analysis["top1"][b, n:] == -1).all()
    # "changed" = combined top-1 (the greedy choice) differs from the base's top-1
    live = res.analysis["top1"][..., 0] >= 0
    np.testing.assert_array_equal(res.analysis["changed"], live & (res.tokens != res.analysis["top1"][..., 0]))


def test_alpha_is_traced_no_recompilation(trio, proxy_run, torch_lm):
    size = decode_jit._cache_size()
    for alpha in (0.5, 2.0):
        res = trio["dec"].generate(trio["batch"], max_new_tokens=N_NEW, stop=make_stop_criteria([EOS_ID]),
                                   analysis=True, fusion_params={"alpha": alpha})
        ref, _, _ = _reference_proxy(torch_lm, trio["paths"], [s[0] for s in trio["streams"]], alpha, N_NEW)
        assert res.token_lists()[0] == ref
    assert decode_jit._cache_size() == size  # same compiled program for every α


def test_eos_in_one_row_leaves_the_others_unchanged(trio, proxy_run):
    rows = proxy_run.token_lists()
    others = set(rows[1]) | set(rows[2])
    pos = next(i for i, t in enumerate(rows[0]) if t not in others and t not in rows[0][:i] and i > 0)
    new_eos = rows[0][pos]
    res = trio["dec"].generate(trio["batch"], max_new_tokens=N_NEW, analysis=True,
                               stop=make_stop_criteria([new_eos]))  # same shapes: no recompilation
    assert res.token_lists()[0] == rows[0][: pos + 1]
    assert res.finish_reason[0] == EOS
    assert (res.tokens[0, pos + 1:] == 0).all()  # a finished row stops changing (pad id)
    assert res.token_lists()[1:] == rows[1:]


def test_sampling_is_reproducible_for_a_seed(trio, proxy_run):
    dec, v = trio["dec"], trio["dec"].vocab_size
    hot = SamplingParams.create(v, temperature=2.0)
    stop = make_stop_criteria([EOS_ID])
    kw = dict(max_new_tokens=N_NEW, stop=stop, analysis=True)
    a = dec.generate(trio["batch"], sampling=hot, seed=7, **kw)
    b = dec.generate(trio["batch"], sampling=hot, seed=7, **kw)
    c = dec.generate(trio["batch"], sampling=hot, seed=8, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # top-k = 1 sampling is greedy whatever the temperature
    k1 = dec.generate(trio["batch"], sampling=SamplingParams.create(v, temperature=1.5, top_k=1), seed=3, **kw)
    np.testing.assert_array_equal(k1.tokens, proxy_run.tokens)
    # a banned token is never chosen
    banned_tok = proxy_run.token_lists()[0][0]
    ban = dec.generate(trio["batch"], sampling=SamplingParams.create(v, banned_ids=[banned_tok]), **kw)
    assert banned_tok not in ban.tokens[:, : int(ban.num_tokens.max())][ban.tokens != 0]


def test_alpha_sweep_vmapped_equals_loop(trio, proxy_run):
    alphas = [1.0, 0.5]
    stop = make_stop_criteria([EOS_ID])
    sweep = trio["dec"].generate_sweep(trio["batch"], max_new_tokens=N_NEW, stop=stop,
                                       fusion_params={"alpha": alphas})
    np.testing.assert_array_equal(sweep[0].tokens, proxy_run.tokens)
    half = trio["dec"].generate(trio["batch"], max_new_tokens=N_NEW, stop=stop, analysis=True,
                                fusion_params={"alpha": 0.5})
    np.testing.assert_array_equal(sweep[1].tokens, half.tokens)
    np.testing.assert_array_equal(sweep[1].num_tokens, half.num_tokens)


def test_caches_are_donated(trio):
    dec = trio["dec"]
    ids, masks, fp, sp, st, key = dec._inputs(trio["batch"], None, None, make_stop_criteria([EOS_ID]), 0)
    caches = dec.init_caches(len(PROMPTS), [x.shape[1] for x in ids], N_NEW)
    out, new_caches = decode_jit(params=dec.params, prompt_ids=ids, prompt_masks=masks, caches=caches,
                                 fusion_params=fp, sampling=sp, stop=st, key=key, **dec._static(N_NEW, True, 0))
    assert caches[0].k[0].is_deleted() and caches[2].v[-1].is_deleted()
    assert int(new_caches[0].length) == 48 + int(out.num_tokens.max()) - 1  # prefill + appended tokens


# ---------------------------------------------------------------------------------------------- stop strings


def test_stop_strings_per_row_on_device(tiny_checkpoint):
    from transformers import AutoTokenizer
    path = tiny_checkpoint("llama", seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    dec = Decoder([load_pretrained(path)], "plain")
    ids, mask = _batch(tok, PROMPTS, 32)
    n = 12
    full = dec.generate([(ids, mask)], max_new_tokens=n, stop=make_stop_criteria([EOS_ID])).token_lists()
    # a stop string straddling the boundary of the 3rd and 4th generated tokens of row 0
    row = full[0]
    assert len(row) >= 6
    left, right = tok.decode(row[:3]), tok.decode(row[:4])
    stop_str = right[len(left) - 2: len(left) + 1] if len(left) >= 2 else right[-3:]
    assert stop_str and stop_str in right
    stops = [stop_str, "\u00a7never\u00a7"]
    res = dec.generate([(ids, mask)], max_new_tokens=n, stop=make_stop_criteria([EOS_ID], stops, tok, 300))
    for b, r in enumerate(full):
        cut = next((k for k in range(1, len(r) + 1) if any(s in tok.decode(r[:k]) for s in stops)), None)
        if cut is None:
            assert res.token_lists()[b] == r
        else:
            assert res.token_lists()[b] == r[:cut], b
            assert res.finish_reason[b] == STOP_STRING
    assert res.finish_reason[0] == STOP_STRING


# ---------------------------------------------------------------------------------------------- mesh


MESH_SCRIPT = r'''
import os, json, sys
import numpy as np, jax
assert jax.device_count() == 8, jax.device_count()
from proxytune_jax.models import init_model, small_llama_config
from proxytune_jax.decoding.engine import Decoder
from proxytune_jax.decoding.prompts import left_pad
from proxytune_jax.decoding.stopping import make_stop_criteria
from proxytune_jax.sharding import MeshConfig, make_mesh
base = dict(vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2, pad_token_id=None)
models = [init_model(small_llama_config(num_layers=3, **base), seed=0),
          init_model(small_llama_config(num_layers=2, **base), seed=1),
          init_model(small_llama_config(num_layers=2, **base), seed=2)]
rng = np.random.default_rng(0)
prompts = [list(rng.integers(3, 96, size=n)) for n in (5, 9, 3, 7)]
batch = [left_pad(prompts, 16)] * 3
stop = make_stop_criteria([2])
single = Decoder(models, "proxy_tuning").generate(batch, max_new_tokens=8, stop=stop, analysis=True)
mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
sharded_dec = Decoder(models, "proxy_tuning", mesh=mesh)
leaf = sharded_dec.params[0]["model"]["layers"][0]["self_attn"]["q_proj"]["weight"][...]
assert len(leaf.sharding.device_set) == 8, leaf.sharding
sharded = sharded_dec.generate(batch, max_new_tokens=8, stop=stop, analysis=True)
assert np.array_equal(single.tokens, sharded.tokens), (single.tokens, sharded.tokens)
assert np.array_equal(single.analysis["top1"], sharded.analysis["top1"])
# speculative decoding on the mesh (per-row cache cursors, the expert drafting): the same greedy tokens
spec = sharded_dec.generate(batch, max_new_tokens=8, stop=stop, speculative=2)
assert np.array_equal(single.tokens, spec.tokens), (single.tokens, spec.tokens)
assert spec.speculative.rounds.max() >= 1
print(json.dumps({"ok": True, "tokens": single.tokens.tolist()}))
'''


def test_mesh_8_devices_equals_single_device(tmp_path):
    import json
    import os
    import subprocess
    import sys
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["ok"]
