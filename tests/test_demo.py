"""`proxytune demo --quick` end to end into tmp_path (toy models cached in tmp_path too)."""
import json
import math

import pytest

from proxytune_jax import cli

MODELS = ("base-small", "base-large", "tuned-small", "proxy-tuned-large", "tuned-large")
METHODS = ("sft_gold", "seq_kd", "word_kd", "reverse_kl", "js", "tvd", "generalized_jsd", "sinkd", "first_top5",
           "first_top5_tau1", "bayesian")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    code = cli.main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"])
    return code, out, cache


def _unit(x):
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


@pytest.mark.slow
def test_demo_quick_writes_complete_results(demo_run):
    code, out, cache = demo_run
    assert code == 0
    for name in ("results.json", "alpha_sweep.png", "reliability_sft_vs_first.png", "examples.md"):
        assert (out / name).is_file(), name
    for png in ("alpha_sweep.png", "reliability_sft_vs_first.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    r = json.loads((out / "results.json").read_text())
    pt = r["proxy_tuning"]
    assert pt["n_questions"] == 24
    assert set(pt["accuracy"]) == set(MODELS) and all(_unit(v) for v in pt["accuracy"].values())
    acc = pt["accuracy"]
    if acc["tuned-large"] == acc["base-large"]:
        assert pt["gap_closed"] is None  # undefined, reported as null rather than NaN
    else:
        want = (acc["proxy-tuned-large"] - acc["base-large"]) / (acc["tuned-large"] - acc["base-large"])
        assert pt["gap_closed"] == pytest.approx(want)
    assert _unit(pt["top1_changed_share"])
    assert set(pt["alpha_sweep"]) == {"0.5", "1.0", "2.0"} and all(_unit(v) for v in pt["alpha_sweep"].values())
    assert pt["alpha_sweep"]["1.0"] == acc["proxy-tuned-large"]  # the α = 1 point is the table's run
    assert len(r["examples"]) == 2 and all(set(MODELS[1:]) <= set(ex) for ex in r["examples"])
    d = r["distillation"]
    assert set(d["methods"]) == set(METHODS) and d["primary_comparison"] == ["word_kd", "sft_gold"]
    assert math.isfinite(d["teacher"]["first_temperature"]) and d["teacher"]["first_temperature"] > 0
    for method, entry in d["methods"].items():
        for key in ("accuracy", "agreement", "fact_recall", "ece"):
            assert _unit(entry[key]["mean"]) and entry[key]["std"] >= 0, (method, key)
            lo, hi = entry[key]["ci95"]
            assert 0 <= lo <= hi <= 1, (method, key)
        assert math.isfinite(entry["nll"]["mean"]) and entry["nll"]["mean"] > 0, method
        assert len(entry["accuracy"]["per_seed"]) == 1
        assert entry["objective"]["name"] in ("sft", "offline_logits", "offline_topk", "bayesian")
    assert set(d["differences"]) >= {"word_kd - sft_gold", "seq_kd - sft_gold", "word_kd - seq_kd"}
    assert r["timings"]["toyworld_cached"] is False


@pytest.mark.slow
def test_second_build_reuses_the_cache(demo_run):
    from proxytune_jax.commands.demo import configs
    from proxytune_jax.toyworld.build import build_toyworld

    _, _, cache = demo_run
    tw = build_toyworld(configs(True, 0).toyworld, cache, progress=False)
    assert tw.timings["cached"] is True
    model = tw.load("tuned-large")
    assert model.config.vocab_size == len(tw.tokenizer)
    assert (tw.model_path("tuned-large") / "config.json").is_file()


@pytest.mark.slow
def test_second_run_reuses_the_distillation_table(demo_run, tmp_path):
    """A second run reads the cached students' scores (same numbers): the table folder's table.json is
    written last (atomically), so a folder without it (an interrupted run) is redone."""
    _, out, cache = demo_run
    first = json.loads((out / "results.json").read_text())
    assert first["distillation"]["cached"] is False
    tables = list(cache.glob("*/distill/*/table.json"))
    assert len(tables) == 1
    code = cli.main(["demo", "--quick", "--out", str(tmp_path), "--cache-dir", str(cache), "--no-progress"])
    assert code == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["timings"]["toyworld_cached"] is True and again["distillation"]["cached"] is True
    assert again["distillation"]["methods"] == first["distillation"]["methods"]
    assert again["distillation"]["differences"] == first["distillation"]["differences"]
    assert again["proxy_tuning"] == first["proxy_tuning"]  # decoding is deterministic (greedy)
