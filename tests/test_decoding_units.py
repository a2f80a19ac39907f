"""Sampling, stopping, vocabulary alignment and prompt handling of the decoding engine, piece by piece."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

from proxytune_jax.decoding import sampling as S
from proxytune_jax.decoding.prompts import bucket_length, encode_prompt, left_pad
from proxytune_jax.decoding.stopping import (init_byte_window, make_stop_criteria, push_and_match,
                                             token_byte_table, trim_at_stop)
from proxytune_jax.decoding.vocab import align_vocabularies
from proxytune_jax.errors import UserError

V = 50


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


# ------------------------------------------------------------------------------------------- sampling

_process = jax.jit(S.process_scores)
_choose = jax.jit(S.choose_tokens)


def _hf_warped(scores, temperature, top_k, top_p):
    """transformers' own warpers in the official order (temperature -> top-k -> top-p) as the reference."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.set_num_threads(1)
    x = torch.tensor(scores)
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.numpy()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.3, 3.0), st.integers(0, V), st.floats(0.05, 1.0))
def test_processors_match_transformers_warpers(seed, temperature, top_k, top_p):
    scores = np.random.default_rng(seed).normal(size=(3, V)).astype(np.float32) * 2
    params = S.SamplingParams.create(V, temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(_process(jnp.asarray(scores), params))
    ref = _hf_warped(scores, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    kept = ~np.isneginf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6, atol=1e-6)


def test_banned_ids_and_greedy():
    scores = jnp.asarray(np.random.default_rng(1).normal(size=(4, V)), jnp.float32)
    top = np.argmax(np.asarray(scores), -1)
    params = S.SamplingParams.create(V, temperature=0.0, banned_ids=[int(top[0])])
    got = np.asarray(_choose(scores, params, jax.random.key(0)))
    assert got[0] == np.argsort(-np.asarray(scores[0]))[1]  # the banned top-1 is skipped
    np.testing.assert_array_equal(got[1:], top[1:])
    # greedy ignores the key; top-k 1 sampling equals greedy
    greedy = np.asarray(_choose(scores, S.SamplingParams.create(V), jax.random.key(5)))
    k1 = np.asarray(_choose(scores, S.SamplingParams.create(V, temperature=2.0, top_k=1), jax.random.key(5)))
    np.testing.assert_array_equal(greedy, top)
    np.testing.assert_array_equal(k1, top)


def test_categorical_sampling_reproducible_and_distributed():
    logits = np.log(np.array([[0.6, 0.3, 0.1] + [0.0] * (V - 3)], np.float32) + 1e-30)
    scores = jnp.asarray(np.repeat(logits, 4000, axis=0))
    params = S.SamplingParams.create(V, temperature=1.0)
    a = np.asarray(_choose(scores, params, jax.random.key(3)))
    b = np.asarray(_choose(scores, params, jax.random.key(3)))
    c = np.asarray(_choose(scores, params, jax.random.key(4)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    freq = np.bincount(a, minlength=3)[:3] / len(a)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.03)
    # top-p 0.5 keeps only the first token (mass before it 0 < 0.5; before the second 0.6 >= 0.5)
    top_p = np.asarray(_choose(scores, S.SamplingParams.create(V, temperature=1.0, top_p=0.5),
                               jax.random.key(3)))
    assert (top_p == 0).all()


# ------------------------------------------------------------------------------------------- stopping


def test_token_byte_table_reproduces_decoding(tok):
    table, lens = token_byte_table(tok, len(tok))
    ids = tok("Hello world! the quick brown fox; 42 (x)")["input_ids"]
    text = b"".join(bytes(table[i, : lens[i]].astype(np.uint8)) for i in ids).decode()
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_push_and_match_finds_stop_strings_across_tokens(tok):
    text = "the quick brown fox jumps"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stops = ["k br", "fox j", "zzz"]
    crit = make_stop_criteria([2], stops, tok, len(tok))
    window = init_byte_window(1, crit)
    push = jax.jit(push_and_match)
    hits = []
    for t in ids:
        window, hit = push(window, jnp.asarray([t], jnp.int32), crit)
        hits.append(bool(hit[0]))
    # expected: a hit first at the first step whose decoded prefix contains a stop string (the row then
    # finishes, so later steps do not matter)
    expected = [any(s in tok.decode(ids[: k + 1]) for s in stops) for k in range(len(ids))]
    assert any(expected) and not expected[0]
    assert hits.index(True) == expected.index(True)
    assert trim_at_stop("abc k brown fox j", stops) == ("abc ", True)
    assert trim_at_stop("abc", stops) == ("abc", False)


# ------------------------------------------------------------------------------------------- vocab


def test_vocab_alignment_padded_and_added_tokens(tok):
    import copy
    chat = copy.deepcopy(tok)
    chat.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})  # like Llama-2 32000 vs 32001
    assert len(chat) == len(tok) + 1
    # model vocabularies padded differently (embedding rows 304 vs 300 vs 301)
    al = align_vocabularies([tok, chat, tok], [304, 301, 300])
    assert al.size == len(tok) == 300
    al = align_vocabularies([chat, chat], [301, 301])
    assert al.size == 301  # the added token is shared by both: it stays in range
    al = align_vocabularies([tok, tok], [320, 296])  # an embedding smaller than the tokenizer
    assert al.size == 296


def test_vocab_alignment_refuses_different_tokenizers(tok, tmp_path):
    import json
    from transformers import PreTrainedTokenizerFast
    tok.save_pretrained(tmp_path)
    state = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    inv = {i: t for t, i in vocab.items()}
    a, b = inv[100], inv[101]
    vocab[a], vocab[b] = 101, 100  # same strings, two ids swapped: a genuinely different tokenizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(state))
    other = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="different tokenizers.*id 100"):
        align_vocabularies([tok, other], [300, 300], ["--target x", "--expert y"])


# ------------------------------------------------------------------------------------------- prompts


def test_prompts_chat_template_buckets_and_left_padding(tok):
    plain = encode_prompt(tok, "two plus three")
    assert plain == tok("two plus three")["input_ids"] and plain[0] == tok.bos_token_id
    chat = encode_prompt(tok, "two plus three", chat_template=True)
    assert tok.decode(chat, skip_special_tokens=True).endswith("user: two plus three\nassistant:")
    assert [bucket_length(n) for n in (1, 8, 9, 33, 64)] == [8, 8, 16, 64, 64]
    assert bucket_length(40, cap=50) == 50 and bucket_length(60, cap=50) == 60
    ids, mask = left_pad([[5, 6, 7], [9]], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    no_template = type(tok).from_pretrained(tok.name_or_path)
    no_template.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        encode_prompt(no_template, "x", chat_template=True)
