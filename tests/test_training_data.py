"""The training data pipeline: JSONL validation naming file and line, tokenization and loss masks, left-padded
and packed batches, deterministic per-epoch shuffling, resumable positions, top-k cache alignment."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from proxytune_jax.errors import UserError
from proxytune_jax.training.data import Batches, DataPosition, Example, load_batches, read_jsonl, tokenize_records


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _write(path, lines):
    path.write_text("".join(l + "\n" for l in lines))
    return path


GOOD = json.dumps({"prompt": "what is 2 plus 3?", "response": " five"})


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a", "response": ', r"not valid JSON"),
    ('[1, 2]', r"expected a JSON object, got list"),
    ('{"prompt": "only a prompt"}', r'no "response" field'),
    ('{"prompt": "a", "response": 3}', r'"response" must be a string, got int'),
    ('{"prompt": "a", "response": ""}', r'"response" is empty'),
    ('{"question": "a", "answer": "b"}', r"none of the fields.*\['answer', 'question'\]"),
    ('{"text": ""}', r'"text" must be a non-empty string'),
])
def test_bad_record_error_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "data.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(UserError, match=message) as info:
        read_jsonl(path)
    assert f"{path}:4:" in str(info.value)  # blank line 2 still counts


def test_missing_and_empty_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="holds no records"):
        read_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_custom_field_names(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"q": "hi", "a": " there"})])
    assert read_jsonl(path, prompt_field="q", response_field="a") == [{"prompt": "hi", "response": " there", "line": 1}]


def test_loss_mask_covers_response_and_eos_only(tokenizer):
    recs = [{"prompt": "what is 2 plus 3?", "response": " five", "line": 1}, {"text": "hello world", "line": 2}]
    ex = tokenize_records(recs, tokenizer, max_length=64)
    p = tokenizer.encode("what is 2 plus 3?", add_special_tokens=True)
    r = tokenizer.encode(" five", add_special_tokens=False)
    assert p[0] == tokenizer.bos_token_id
    assert ex[0].ids.tolist() == p + r + [tokenizer.eos_token_id]
    assert ex[0].loss_mask.tolist() == [0] * len(p) + [1] * (len(r) + 1)
    t = tokenizer.encode("hello world", add_special_tokens=True) + [tokenizer.eos_token_id]
    assert ex[1].ids.tolist() == t and ex[1].loss_mask.tolist() == [0] + [1] * (len(t) - 1)
    assert ex[1].token_offset == len(ex[0].ids)


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out, off = [], 0
    for n in lengths:
        ids = rng.integers(3, 100, n).astype(np.int32)
        out.append(Example(ids, (rng.random(n) < 0.6).astype(np.int32), off))
        off += n
    return out


def test_padded_batches_are_left_padded_and_cut(tokenizer):
    ex = _examples([3, 5, 9, 4])
    b = Batches(ex, batch_size=4, max_length=6, pad_token_id=0, shuffle=False).batch(0)
    assert b["input_ids"].shape == (4, 6) and b["input_ids"].dtype == np.int32
    assert b["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1]
    assert b["input_ids"][0, 3:].tolist() == ex[0].ids.tolist() and (b["input_ids"][0, :3] == 0).all()
    assert b["input_ids"][2].tolist() == ex[2].ids[:6].tolist()  # longer than max_length: cut at the end
    assert (b["loss_mask"] * (1 - b["attention_mask"]) == 0).all()  # no loss on pads
    assert b["token_index"][1].tolist() == [-1] + list(range(3, 8))


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=4, max_size=30), T=st.integers(2, 9),
       B=st.integers(1, 3), seed=st.integers(0, 3))
def test_packed_epoch_is_the_shuffled_stream_cut_into_rows(lengths, T, B, seed):
    ex = _examples(lengths, seed)
    total = sum(lengths)
    if (total // T) // B == 0:
        with pytest.raises(UserError, match="fewer than one batch"):
            Batches(ex, batch_size=B, max_length=T, pad_token_id=0, pack=True, seed=seed)
        return
    data = Batches(ex, batch_size=B, max_length=T, pad_token_id=0, pack=True, seed=seed)
    stream = np.concatenate([ex[i].ids for i in data.order(0)])
    mask = np.concatenate([ex[i].loss_mask for i in data.order(0)])
    rows = np.concatenate([data.batch(s)["input_ids"] for s in range(data.batches_per_epoch)])
    masks = np.concatenate([data.batch(s)["loss_mask"] for s in range(data.batches_per_epoch)])
    n = rows.size
    assert n == data.batches_per_epoch * B * T and n <= total
    np.testing.assert_array_equal(rows.reshape(-1), stream[:n])  # order kept, nothing lost or repeated
    np.testing.assert_array_equal(masks.reshape(-1), mask[:n])
    assert (data.batch(0)["attention_mask"] == 1).all()
    idx = np.concatenate([data.batch(s)["token_index"] for s in range(data.batches_per_epoch)]).reshape(-1)
    all_ids = np.concatenate([e.ids for e in ex])
    np.testing.assert_array_equal(all_ids[idx], rows.reshape(-1))  # token_index points at the right token


def test_shuffle_is_deterministic_per_seed_and_epoch():
    ex = _examples([4] * 40)
    a = Batches(ex, batch_size=4, max_length=8, pad_token_id=0, seed=7)
    b = Batches(ex, batch_size=4, max_length=8, pad_token_id=0, seed=7)
    c = Batches(ex, batch_size=4, max_length=8, pad_token_id=0, seed=8)
    assert np.array_equal(a.order(0), b.order(0)) and np.array_equal(a.order(3), b.order(3))
    assert not np.array_equal(a.order(0), a.order(1))  # a new order every epoch
    assert not np.array_equal(a.order(0), c.order(0))
    assert sorted(a.order(2).tolist()) == list(range(40))  # a permutation: every example once per epoch
    for step in (0, 9, 10, 23):  # batch(step) is a pure function of the step: resumable anywhere
        for key in a.batch(step):
            np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
    assert a.position(23) == DataPosition(epoch=2, batch_index=3)


def test_load_batches_end_to_end(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i}", "response": f" a{i}"}) for i in range(10)])
    data = load_batches(path, tokenizer, batch_size=4, max_length=16, seed=0)
    assert data.batches_per_epoch == 2 and data.pad_token_id == tokenizer.pad_token_id
    b = data.batch(0)
    assert b["loss_mask"].sum() > 0 and set(np.unique(b["loss_mask"])) <= {0, 1}
    with pytest.warns(UserWarning, match="longer than max_length=3"):
        load_batches(path, tokenizer, batch_size=2, max_length=3)
    with pytest.raises(UserError, match="fewer than one batch"):
        load_batches(path, tokenizer, batch_size=11, max_length=16)
