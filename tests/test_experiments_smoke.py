"""Every experiment script runs end to end with ``--smoke`` (tiny random models, tiny data files it writes), so
the recipes never rot. Scripts are imported and their ``main`` called in this process (one JAX start-up for
all); XLA optimizations are turned down while they run (compile time dominates at this size)."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if not p.name.startswith("_"))


pytestmark = pytest.mark.usefixtures("fast_compiles")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def quick_world_cache(tmp_path_factory) -> Path:
    """The demo's ``--quick`` world (seed 0), built once per session into a cache the toy-world scripts'
    smoke runs share (a file lock: one xdist worker builds, the others wait and load)."""
    from filelock import FileLock

    from proxytune_jax.commands.demo import configs
    from proxytune_jax.toyworld.build import build_toyworld

    root = tmp_path_factory.getbasetemp().parent / "toyworld_quick"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / ".lock")):
        build_toyworld(configs(True, 0).toyworld, root / "cache", progress=False, log=lambda *_: None)
    return root / "cache"


def run_smoke(name: str, out: Path, *extra: str) -> dict:
    module = importlib.import_module(f"experiments.{name}")
    results = module.main(["--smoke", "--out", str(out), *extra])
    assert isinstance(results, dict)
    written = list((out / "results").glob("*.json"))
    assert written, f"{name} wrote no results JSON"
    json.loads(written[0].read_text())  # valid JSON
    return results


def in_unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_every_script_is_covered():
    covered = {"proxy_tune_llama2", "summarization_fusion", "code_adaptation", "task_tuning",
               "distill_sinkd_glue", "distill_losses", "distill_first", "distill_bayesian", "toyworld_seeds",
               "sinkhorn_gradients", "toyworld_gkd", "toyworld_proxy_distill", "toyworld_lora_expert",
               "toyworld_alpha_schedules", "toyworld_blackbox", "toyworld_speculative",
               "toyworld_cross_tokenizer"}
    assert set(SCRIPTS) <= covered, f"add a smoke test for {sorted(set(SCRIPTS) - covered)}"
    for name in SCRIPTS:
        doc = (REPO / "experiments" / f"{name}.py").read_text()
        assert "Reproduces" in doc and "Hardware" in doc and "Mesh" in doc, f"{name}: document paper, hardware, mesh"


def test_proxy_tune_llama2(tmp_path):
    r = run_smoke("proxy_tune_llama2", tmp_path)
    assert set(r["tasks"]) == {"gsm8k", "alpaca_eval"}
    gsm = r["tasks"]["gsm8k"]
    for setting in ("base", "proxy", "tuned"):
        assert in_unit(gsm[setting]["exact_match"]) and gsm[setting]["n"] == 2
    assert in_unit(gsm["proxy"]["top1_changed"])
    assert "gap_closed" in r
    outs = json.loads((tmp_path / "results" / "alpaca_eval" / "proxy.json").read_text())
    assert len(outs) == 2 and {"instruction", "output", "generator"} <= set(outs[0])


def test_summarization_fusion(tmp_path):
    r = run_smoke("summarization_fusion", tmp_path)
    assert set(r["settings"]) == {"small", "large", "small_large_direct", "small_large_temperature",
                                  "small_large_low_confidence"}
    for s in r["settings"].values():
        assert all(in_unit(s[k]) for k in ("rouge1", "rouge2", "rougeL"))


def test_code_adaptation(tmp_path):
    r = run_smoke("code_adaptation", tmp_path)
    for name in ("base", "proxy", "expert"):
        s = r["settings"][name]
        lines = Path(s["samples_file"]).read_text().splitlines()
        assert len(lines) == 2 and json.loads(lines[0])["task_id"] == "HumanEval/0"  # 1 problem x 2 samples
        assert in_unit(s["pass@1"]) and in_unit(s["pass@2"])


def test_task_tuning(tmp_path):
    r = run_smoke("task_tuning", tmp_path)
    assert (Path(r["expert"]) / "config.json").is_file()  # exported by `proxytune train`
    tiny = r["bases"]["tiny"]
    assert in_unit(tiny["base"]["exact_match"]) and in_unit(tiny["proxy"]["exact_match"])


def test_distill_sinkd_glue(tmp_path):
    r = run_smoke("distill_sinkd_glue", tmp_path)
    assert set(r["settings"]) == {"ce", "kd", "kd_sinkd"}
    last = r["settings"]["kd_sinkd"]["last_train_metrics"]
    assert last["sinkhorn"] > 0 and math.isfinite(last["loss"])
    assert "sinkhorn" not in r["settings"]["kd"]["last_train_metrics"]
    assert all(in_unit(s["accuracy"]) for s in r["settings"].values())


def test_distill_losses(tmp_path):
    r = run_smoke("distill_losses", tmp_path)
    assert {"teacher", "student_init", "forward_kl", "skew_reverse_kl"} <= set(r["runs"])
    assert all(in_unit(v["rougeL"]) for v in r["runs"].values())


@pytest.mark.skipif(not (REPO / "experiments" / "distill_first.py").exists(), reason="script not written")
def test_distill_first(tmp_path):
    r = run_smoke("distill_first", tmp_path)
    assert r["cache"]["k"] == 5 and r["cache"]["num_sequences"] > 0
    for mode in r["runs"]:
        assert math.isfinite(r["runs"][mode]["final_loss"])
        assert in_unit(r["runs"][mode]["ece10"]) and in_unit(r["runs"][mode]["mc"]["boolq"]["accuracy"])
    assert r["runs"]["renormalize_tau1"]["temperature"] == 1.0
    assert Path(r["reliability_png"]).stat().st_size > 1000


@pytest.mark.skipif(not (REPO / "experiments" / "distill_bayesian.py").exists(), reason="script not written")
def test_distill_bayesian(tmp_path):
    r = run_smoke("distill_bayesian", tmp_path)
    assert r["corpus_size"] > 0
    for name in ("sft", "bayesian"):
        assert in_unit(r["runs"][name]["exact_match"])


def test_toyworld_seeds(tmp_path, quick_world_cache):
    # the quick world's distillation table is the demo's (tests/test_demo.py runs it): proxy-tuning only here
    r = run_smoke("toyworld_seeds", tmp_path, "--cache-dir", str(quick_world_cache), "--skip-distillation")
    (row,) = r["per_seed"].values()
    assert all(in_unit(row[k]) for k in ("base-large", "tuned-small", "proxy-tuned-large", "tuned-large"))
    for b in ("base-large", "tuned-small"):  # margins are the differences of the accuracies above
        assert r["summary"][b]["margins"] == [pytest.approx(row["proxy-tuned-large"] - row[b])]
        assert isinstance(r["summary"][b]["holds"], bool)


def test_toyworld_gkd(tmp_path, quick_world_cache):
    from proxytune_jax.toyworld.distill import EXTRA_METHODS
    r = run_smoke("toyworld_gkd", tmp_path, "--cache-dir", str(quick_world_cache),
                  "--methods", "word_kd", "gkd_mixed", "taid")
    (table,) = r.values()
    assert {"word_kd", "gkd_mixed", "taid"} == set(table["methods"]) and {"gkd_mixed", "taid"} <= set(EXTRA_METHODS)
    for m, row in table["methods"].items():
        assert in_unit(row["accuracy"]["mean"]) and in_unit(row["agreement"]["mean"]), m
    assert {"gkd_mixed - word_kd", "taid - word_kd"} <= set(table["differences"])


def test_toyworld_proxy_distill(tmp_path, quick_world_cache):
    r = run_smoke("toyworld_proxy_distill", tmp_path, "--cache-dir", str(quick_world_cache))
    (world,) = r.values()
    for start in ("base-small", "base-large"):
        s = world["students"][start]
        assert len(s["accuracy"]) == 1 and in_unit(s["accuracy"][0]) and in_unit(s["agreement_with_proxy"][0])
        assert math.isfinite(s["final_kl"][0]) and s["final_kl"][0] >= 0
    assert set(world["seconds_per_token"]) == {"proxy-tuned-large", "distilled base-small", "distilled base-large"}


def test_sinkhorn_gradients(capsys):
    module = importlib.import_module("experiments.sinkhorn_gradients")
    out = module.main(["--cases", "4", "--modes", "unrolled"])
    assert sum(out["unrolled"].values()) == 0
    assert "| noise std | cases | unrolled non-finite |" in capsys.readouterr().out


def test_loss_benchmark_reports_what_does_not_fit_and_finishes():
    """A step whose compiled memory plan exceeds the budget is reported as "does not fit (N)" and skipped; the
    other rows are measured and the table is printed (the default budget is the memory available now)."""
    import subprocess
    script = REPO / "experiments" / "benchmarks" / "losses.py"
    base = [sys.executable, str(script), "--positions", "64", "--hidden", "8", "--vocab", "512", "--skip-others",
            "--losses", "forward_kl", "reverse_kl", "--remat"]
    tight = subprocess.run(base + ["--max-run-gib", "0.0004"], capture_output=True, text=True, timeout=300)
    assert tight.returncode == 0, tight.stderr[-2000:]
    skipped = [l for l in tight.stdout.splitlines() if "does not fit (" in l and l.endswith("; skipped")]
    assert len(skipped) == 4 and "Not run (budget" in tight.stdout, tight.stdout  # 2 losses x plain, chunked
    assert "| forward_kl | 512 | nan |" in tight.stdout and "| reverse_kl | 512 | nan |" in tight.stdout
    roomy = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert roomy.returncode == 0 and "does not fit" not in roomy.stdout, roomy.stderr[-2000:]
    row = next(l for l in roomy.stdout.splitlines() if l.startswith("| forward_kl | 512 |"))
    assert "nan" not in row.split("|")[3]  # measured: plain seconds


def test_toyworld_lora_expert(tmp_path, quick_world_cache, capsys):
    """The LoRA-expert experiment on the quick world, then its adapter proxy-tunes base-large from the CLI."""
    from proxytune_jax import cli
    from proxytune_jax.models import peft_io
    r = run_smoke("toyworld_lora_expert", tmp_path / "run", "--cache-dir", str(quick_world_cache))
    (row,) = r["per_seed"].values()
    for k in ("base-large", "tuned-small", "lora-tuned-small", "proxy-tuned-large (full expert)",
              "proxy-tuned-large (LoRA expert)", "tuned-large"):
        assert in_unit(row[k]), k
    assert 0 < row["trainable_params"] < row["full_params"]
    assert peft_io.read_adapter_config(row["adapter_dir"])[0].r == 4
    module = importlib.import_module("experiments.toyworld_lora_expert")
    cli_dir = tmp_path / "cli"
    module.main(["--smoke", "--cache-dir", str(quick_world_cache), "--export-cli", str(cli_dir)])
    assert (cli_dir / "lora_expert.py").is_file() and (cli_dir / "base-small" / "tokenizer_config.json").is_file()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((cli_dir / "heldout.jsonl").read_text().splitlines(True)[:4]))
    code = cli.main(["generate", "--target", str(cli_dir / "base-large"), "--expert", str(cli_dir / "base-small"),
                     "--expert-adapter", row["adapter_dir"], "--anti-expert", str(cli_dir / "base-small"),
                     "--prompts", str(prompts), "--max-new-tokens", "8", "--output", str(tmp_path / "out.jsonl")])
    assert code == 0, capsys.readouterr().err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_toyworld_alpha_schedules(tmp_path, quick_world_cache):
    r = run_smoke("toyworld_alpha_schedules", tmp_path, "--cache-dir", str(quick_world_cache))
    (row,) = r["per_seed"].values()
    assert all(in_unit(x) for x in row["per_token"].values())
    for name, s in r["summary"].items():  # the table's differences are those of the accuracies above
        assert s["diff_vs_constant"] == [pytest.approx(row["per_token"][name] - row["per_token"]["constant"])]
    # constant α through the schedule path equals the plain constant-α decode of the sweep
    assert row["per_token"]["constant"] == pytest.approx(row["constant_alpha"]["1.0"])
    assert (tmp_path / "results" / "alpha_sweep_per_token.png").stat().st_size > 0


def test_toyworld_blackbox(tmp_path, quick_world_cache):
    r = run_smoke("toyworld_blackbox", tmp_path, "--cache-dir", str(quick_world_cache))
    (row,) = r["per_seed"].values()
    acc = row["accuracy"]
    assert {"base-large", "full logits", "k=1 uniform", "k=5 drop", "k=V uniform"} <= set(acc)
    assert all(in_unit(x) for x in acc.values())
    assert acc["k=V uniform"] == pytest.approx(acc["full logits"])  # no truncation: the full-logit decode
    for name, s in r["summary"].items():
        assert s["diff_vs_full"] == [pytest.approx(acc[name] - acc["full logits"])]


def test_toyworld_speculative(tmp_path, quick_world_cache):
    r = run_smoke("toyworld_speculative", tmp_path, "--cache-dir", str(quick_world_cache))
    assert set(r["rows"]) == {"proxy k=2 greedy", "proxy k=2 sampled", "proxy k=2 adaptive greedy",
                              "proxy k=2 adaptive sampled", "plain k=2 greedy"}
    for row in r["rows"].values():  # (the script itself asserts greedy completions equal non-speculative ones)
        assert in_unit(row["acceptance"][0]) and 1.0 <= row["tokens_per_round"][0] <= 3.0
    assert set(r["speed"]) == {"proxy k=2", "proxy k=2 adaptive"}
    assert all(v["all"][0] > 0 and v["1"][0] > 0 for v in r["speed"].values())
    for p in r["projection"]:  # bytes per token from the measured tokens per round (speculative_cost)
        tau = r["rows"][f"proxy k=2 {p['mode']}"]["tokens_per_round"][0]
        assert p["tokens_per_round"] == pytest.approx(tau) and p["cost"] == pytest.approx(p["break_even"] / tau)


def test_speculative_cost_model_limits():
    """The bytes-per-token model at its limits: a free drafter rejected every round costs what non-speculative
    fused decoding costs; plain speculative decoding with a free drafter accepting everything costs 1/(K+1);
    at the break-even tokens per round the cost is plain decoding's."""
    sys.path.insert(0, str(REPO / "experiments" / "benchmarks"))
    import speculative_cost as sc

    base, pair = sc.PARAMS["Llama-2-13b"], [sc.PARAMS["Llama-2-7b"]] * 2
    assert sc.speculative_cost(4, 1.0, base, pair, 0.0) == pytest.approx(sc.proxy_cost(base, pair))
    assert sc.proxy_cost(base, pair) == pytest.approx(1 + 2 * 6.738 / 13.016, rel=1e-3)
    assert sc.speculative_cost(3, 4.0, base, [], 0.0) == pytest.approx(0.25)
    for k in (1, 2, 4, 8):
        tau = sc.break_even_tokens_per_round(k, base, pair, sc.PARAMS["TinyLlama-1.1B"])
        if tau <= k + 1:
            assert sc.speculative_cost(k, tau, base, pair, sc.PARAMS["TinyLlama-1.1B"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sc.speculative_cost(2, 3.5, base, pair, 0.0)  # more than K + 1 tokens per round is impossible


def test_decode_benchmark_speculative_rows_tiny():
    """`decode.py --speculative` on tiny random weights: greedy tokens equal non-speculative ones (asserted in the
    script), and the printed rows are consistent (tokens per round within [1, K + 1], positive speeds)."""
    import argparse
    sys.path.insert(0, str(REPO / "experiments" / "benchmarks"))
    import decode

    rows = decode.speculative_rows(argparse.Namespace(tiny=True, batches=[2], prompt=8, new=8, repeats=1,
                                                      speculative=[2]))
    (r,) = rows
    assert r["batch"] == 2 and r["k"] == 2 and 1.0 <= r["tokens_per_round"] <= 3.0 and 0 <= r["acceptance"] <= 1
    assert r["tps"] > 0 and r["ref_tps"] > 0 and r["round_steps"] > 0


def test_toyworld_cross_tokenizer(tmp_path, quick_world_cache):
    r = run_smoke("toyworld_cross_tokenizer", tmp_path, "--cache-dir", str(quick_world_cache))
    (row,) = r["per_seed"].values()
    acc = row["accuracy"]
    assert {"base-large", "proxy-tuned, same tokenizer", "proxy-tuned, cross-tokenizer"} <= set(acc)
    assert all(in_unit(x) for x in acc.values())
    assert row["alpha0_rows_differing_from_base_greedy"] == 0  # α = 0: the base's own greedy decoding
    for name, s in r["summary"].items():
        assert s["diff_vs_same"] == [pytest.approx(acc[name] - acc["proxy-tuned, same tokenizer"])]
    assert (tmp_path / "results" / "toyworld_cross_tokenizer.md").read_text().startswith("| setting")
