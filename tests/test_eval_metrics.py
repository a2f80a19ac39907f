"""Evaluation metrics against independent computations: hand-written answer cases, ECE against a
brute-force loop, ROUGE against rouge-score directly, NLL against a NumPy re-statement."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from proxytune_jax import UserError
from proxytune_jax.eval import (accuracy, expected_calibration_error, extract_answer, gap_closed, mean_nll,
                                multiple_choice_accuracy, perplexity, plot_reliability_diagram, reliability_bins,
                                response_nll, rouge, sequence_logprob, top1_changed_share,
                                top1_confidence_and_correct)


@pytest.mark.parametrize("text, expected", [
    ("Tom has 3 apples.\n#### 12", "12"),
    ("#### 1,234", "1234"),
    ("the answer is #### -7.", "-7"),
    ("#### $5.50", "5.5"),
    ("#### 4.00", "4"),
    ("#### +3", "3"),
    ("#### 0.5 and later 9", "0.5"),  # the number right after the marker wins over later numbers
    ("first 3 then #### 8 #### 9", "8"),  # the first marker counts
    ("#### seven", None),  # text after the marker: no answer, even though no digit follows
    ("#### abc 5", None),  # the number must come first after the marker
    ("She had 5 cats and 12 dogs", "12"),  # no marker: last number
    ("costs 1,000,000 dollars.", "1000000"),
    ("temperature -3.25 today", "-3.25"),
    ("a ratio of .5", "0.5"),
    ("no numbers here", None),
    ("", None),
    ("-0", "0"),
])
def test_extract_answer_hand_written(text, expected):
    assert extract_answer(text) == expected


def test_accuracy_pairs_and_length_check():
    preds = ["so #### 12", "I think 7", "#### 3", "nothing"]
    refs = ["x\n#### 12", "#### 8", "#### 3.0", "#### 1"]
    assert accuracy(preds, refs) == pytest.approx(2 / 4)
    with pytest.raises(UserError):
        accuracy(preds, refs[:2])


def brute_force_ece(conf, correct, n_bins):
    """Literal re-statement: loop over bins (lo, hi], first bin closed at 0."""
    n = len(conf)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0.0)]
        if not members:
            continue
        acc = sum(correct[i] for i in members) / len(members)
        avg = sum(conf[i] for i in members) / len(members)
        total += len(members) / n * abs(acc - avg)
    return total


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=60),
       st.sampled_from([10, 15]))
def test_ece_matches_brute_force(pairs, n_bins):
    conf = [p[0] for p in pairs]
    corr = [float(p[1]) for p in pairs]
    assert expected_calibration_error(conf, corr, n_bins) == pytest.approx(brute_force_ece(conf, corr, n_bins), abs=1e-9)


def test_ece_edges_and_known_values():
    # Bin edges: 0.1 belongs to the first of 10 bins, 0.1000001 to the second.
    bins = reliability_bins([0.1, 0.1000001, 0.0, 1.0], [1, 0, 0, 1], 10)
    assert bins.counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    # Perfectly confident and right: 0. Always 0.9 confident and always wrong: 0.9.
    assert expected_calibration_error([1.0] * 5, [1] * 5) == 0.0
    assert expected_calibration_error([0.9] * 4, [0] * 4) == pytest.approx(0.9)


def test_top1_confidence_and_reliability_png(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11))
    labels = rng.integers(0, 11, size=(3, 5))
    mask = rng.random((3, 5)) > 0.3
    conf, corr = top1_confidence_and_correct(logits, labels, mask)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.allclose(conf, p.max(-1)[mask])
    assert np.array_equal(corr, (p.argmax(-1) == labels)[mask].astype(float))
    path = tmp_path / "rel.png"
    plot_reliability_diagram({"a": (conf, corr), "b": (conf ** 2, corr)}, path, n_bins=10)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rouge_matches_rouge_score_directly():
    preds = ["the cat sat on the mat", "a quick brown fox", "hello world", ""]
    refs = ["the cat is on the mat", "the quick brown dog jumps", "hello there world", "nothing"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    want = {k: np.mean([scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)]) for k in ["rouge1", "rouge2", "rougeL"]}
    got = rouge(preds, refs)
    for k in want:
        assert got[k] == pytest.approx(want[k])
    assert 0 < got["rouge1"] < 1


def numpy_nll(logits, ids, resp):
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if resp[b, t]:
                row = logits[b, t - 1].astype(np.float64)
                lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total -= row[ids[b, t]] - lse
                n += 1
    return total, n


def test_response_nll_matches_numpy_loop():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32) * 3
    logits[0, 2, 4] = -np.inf  # a banned token that is never a target
    ids = rng.integers(0, 9, size=(2, 6))
    ids[0, 3] = 5
    resp = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    total, n = response_nll(logits, ids, resp)
    want_total, want_n = numpy_nll(logits, ids, resp)
    assert float(n) == want_n
    assert float(total) == pytest.approx(want_total, rel=1e-5)
    assert perplexity(float(total), float(n)) == pytest.approx(math.exp(want_total / want_n), rel=1e-5)
    assert math.isnan(mean_nll(0.0, 0.0))
    # sequence_logprob is the per-row negative of the same sums.
    per_row = np.asarray(sequence_logprob(logits, ids, resp))
    assert per_row.sum() == pytest.approx(-want_total, rel=1e-5)


def test_multiple_choice_accuracy_and_gap_and_top1():
    assert multiple_choice_accuracy([[0.1, -2.0], [-5.0, -1.0], [-1.0, -1.0]], [0, 1, 1]) == pytest.approx(2 / 3)
    assert gap_closed(0.1, 0.4, 0.5) == pytest.approx(0.75)
    assert gap_closed({"a": 0.0, "b": 0.2}, {"a": 0.6, "b": 0.1}, {"a": 0.5, "b": 0.4}) == pytest.approx((1.2 - 0.5) / 2)
    assert math.isnan(gap_closed(0.3, 0.5, 0.3))
    a = np.array([[[0, 1.0], [2.0, 0]], [[1.0, 0], [0, 3.0]]])
    b = np.array([[[0, 1.0], [0, 2.0]], [[1.0, 0], [3.0, 0]]])
    assert top1_changed_share(a, b) == pytest.approx(0.5)
    assert top1_changed_share(a, b, np.array([[1, 0], [1, 0]])) == 0.0


def test_eval_command(tmp_path, capsys):
    from proxytune_jax import cli

    preds = tmp_path / "out.jsonl"
    refs = tmp_path / "ref.jsonl"
    preds.write_text("\n".join(json.dumps({"id": i, "completion": c}) for i, c in
                               [(1, "x #### 4"), (0, "the cat sat 3")]) + "\n")
    refs.write_text("\n".join(json.dumps({"id": i, "answer": c}) for i, c in
                              [(0, "the cat sat #### 3"), (1, "#### 5")]) + "\n")
    out = tmp_path / "scores.json"
    assert cli.main(["eval", "--predictions", str(preds), "--references", str(refs),
                     "--metric", "accuracy", "rouge", "--output", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["n"] == 2 and scores["accuracy"] == pytest.approx(0.5)
    assert scores["rouge1"] == pytest.approx(rouge(["x #### 4", "the cat sat 3"], ["#### 5", "the cat sat #### 3"])["rouge1"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    assert cli.main(["eval", "--predictions", str(bad), "--references", str(refs)]) == 2
    assert "no text field" in capsys.readouterr().err
