"""GLUE/SuperGLUE loaders (HF parquet layout and SuperGLUE JSONL release), verbalizers, and the official
metrics against independent restatements (scipy, the phi-coefficient identity)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from proxytune_jax.data import glue
from proxytune_jax.errors import UserError


def test_sst2_hf_parquet_layout(tmp_path):
    os.makedirs(tmp_path / "sst2")
    pd.DataFrame({"sentence": ["a fine film", "dull"], "label": [1, 0], "idx": [0, 1]}).to_parquet(
        tmp_path / "sst2" / "validation-00000-of-00001.parquet")
    exs = glue.load_glue("sst2", str(tmp_path))
    assert [e.reference for e in exs] == [1, 0]
    assert exs[0].prompt == ("Sentence: a fine film\nQuestion: Is the sentiment of this sentence positive or "
                             "negative?\nAnswer:")
    assert exs[0].meta["label_words"] == ["negative", "positive"]


def test_superglue_jsonl_string_and_bool_labels(tmp_path):
    cb = tmp_path / "CB" / "val.jsonl"
    os.makedirs(cb.parent)
    cb.write_text("\n".join(json.dumps(r) for r in [
        {"premise": "It rains.", "hypothesis": "It is wet.", "label": "entailment", "idx": 0},
        {"premise": "It rains.", "hypothesis": "It is dry.", "label": "contradiction", "idx": 1},
        {"premise": "It rains.", "hypothesis": "It is Monday.", "label": "neutral", "idx": 2},
    ]))
    assert [e.reference for e in glue.load_glue("cb", str(cb))] == [0, 1, 2]
    boolq = tmp_path / "boolq.jsonl"
    boolq.write_text(json.dumps({"question": "is water wet", "passage": "Water is wet.", "label": True}) + "\n")
    ex = glue.load_glue("boolq", str(boolq))[0]
    assert ex.reference == 1 and ex.prompt == "Passage: Water is wet.\nQuestion: is water wet?\nAnswer:"


def test_glue_errors(tmp_path):
    p = tmp_path / "test.jsonl"
    p.write_text(json.dumps({"sentence": "x", "label": -1}) + "\n")
    with pytest.raises(UserError, match="validation split"):
        glue.load_glue("sst2", str(p))
    p.write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(UserError, match="lacks field.*sentence"):
        glue.load_glue("sst2", str(p))
    with pytest.raises(UserError, match="unknown GLUE"):
        glue.load_glue("squad", str(p))


def test_stsb_regression_prediction_is_expected_score():
    logits = np.array([[0.0, 0, 0, 0, 0, 50.0], [1.0, 1, 1, 1, 1, 1]])
    pred = glue.predictions_from_class_logits("stsb", logits)
    np.testing.assert_allclose(pred, [5.0, 2.5], atol=1e-6)
    assert glue.predictions_from_class_logits("sst2", np.array([[0.1, 0.3], [2.0, -1.0]])).tolist() == [1, 0]


def test_verbalizer_ids_distinct_or_error():
    class Tok:
        def __init__(self, table):
            self.table = table

        def encode(self, text, add_special_tokens=False):
            return self.table[text]

    assert glue.verbalizer_token_ids("sst2", Tok({" negative": [5, 6], " positive": [7]})) == [5, 7]
    with pytest.raises(UserError, match="share first tokens"):
        glue.verbalizer_token_ids("sst2", Tok({" negative": [5, 6], " positive": [5, 9]}))


binary = st.lists(st.integers(0, 1), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(binary, binary)
def test_matthews_equals_phi_coefficient(a, b):
    n = min(len(a), len(b))
    pred, gold = np.array(a[:n]), np.array(b[:n])
    got = glue.glue_metrics("cola", pred, gold)["matthews"]
    if pred.std() == 0 or gold.std() == 0:
        assert got == 0.0
    else:
        assert got == pytest.approx(stats.pearsonr(pred, gold)[0], abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 5, allow_nan=False)), min_size=3, max_size=30))
def test_stsb_pearson_spearman_match_scipy(pairs):
    pred = np.array([float(p) for p, _ in pairs])
    gold = np.array([g for _, g in pairs])
    if pred.std() < 1e-9 or gold.std() < 1e-9:
        return
    got = glue.glue_metrics("stsb", pred, gold)
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0], abs=1e-7)
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0], abs=1e-7)


def test_f1_and_macro_f1_by_hand():
    pred, gold = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    m = glue.glue_metrics("mrpc", pred, gold)  # tp=2 fp=1 fn=1 -> f1 = 4/6
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3)
    cb = glue.glue_metrics("cb", np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    # class 0: f1 1; class 1: tp1 fn1 -> 2/3; class 2: tp1 fp1 -> 2/3
    assert cb["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3) and cb["accuracy"] == 0.75
    with pytest.raises(UserError):
        glue.glue_metrics("sst2", [1, 0], [1])
