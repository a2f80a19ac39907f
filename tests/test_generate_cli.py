"""``proxytune generate`` end to end on tiny checkpoints: JSONL in/out, plain and proxy-tuned decoding equal
to the engine run directly, and clear errors with no output file for every user mistake the issue lists."""
from __future__ import annotations

import json

import numpy as np
import pytest

from proxytune_jax import cli
from proxytune_jax.decoding.engine import Decoder
from proxytune_jax.decoding.prompts import encode_prompt, left_pad
from proxytune_jax.decoding.stopping import make_stop_criteria
from proxytune_jax.models.hf_io import load_pretrained
from conftest import mismatched_tokenizer_dir

PROMPTS = ["the quick brown fox", "proxy tuning steers", "hello"]


@pytest.fixture(scope="module")
def dirs(tiny_checkpoint):
    return dict(target=tiny_checkpoint("llama", seed=20, num_hidden_layers=3),
                expert=tiny_checkpoint("llama", seed=21), anti=tiny_checkpoint("llama", seed=22))


@pytest.fixture()
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": x}) + "\n" for x in PROMPTS))
    return p


def _run(argv, capsys):
    code = cli.main(["generate", *map(str, argv)])
    return code, capsys.readouterr()


def test_proxy_tuned_generate_writes_jsonl(dirs, prompts_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, cap = _run(["--target", dirs["target"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"],
                      "--alpha", 0.8, "--expert-chat-template", "--prompts", prompts_file, "--max-new-tokens", 6,
                      "--batch-size", 2, "--analysis", "--output", out], capsys)
    assert code == 0, cap.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert not list(tmp_path.glob(".out.jsonl.*"))  # the temporary file was renamed away

    # the same decode through the engine directly, with the shapes the command uses (buckets of the longest
    # prompt per model, batches of 2, the last one padded) so the compiled program is shared
    from transformers import AutoTokenizer
    from proxytune_jax.decoding.prompts import bucket_length
    tok = AutoTokenizer.from_pretrained(dirs["target"])
    dec = Decoder([load_pretrained(dirs[k]) for k in ("target", "expert", "anti")], "proxy_tuning")
    streams = [[encode_prompt(tok, p, chat_template=c) for p in PROMPTS] for c in (False, True, False)]
    lengths = [bucket_length(max(map(len, s))) for s in streams]
    got = []
    for rows in ([0, 1], [2, 2]):
        res = dec.generate([left_pad([s[r] for r in rows], n, 0) for s, n in zip(streams, lengths)],
                           max_new_tokens=6, fusion_params={"alpha": 0.8}, stop=make_stop_criteria([2]),
                           analysis=True)
        got += res.token_lists()
    for r, expected in zip(rows_out := [json.loads(line) for line in out.read_text().splitlines()], got):
        assert r["token_ids"] == expected
        assert r["completion"] == tok.decode(r["token_ids"], skip_special_tokens=True)
        assert r["finish_reason"] == ("eos" if r["token_ids"][-1] == 2 else "length")
        assert len(r["analysis"]["top1"]) == len(r["token_ids"])
        assert all(len(t) == 3 for t in r["analysis"]["top1"])
    assert len(rows_out) == 3


def test_plain_generate_with_stop_string(dirs, tmp_path, capsys):
    out = tmp_path / "plain.jsonl"
    code, cap = _run(["--target", dirs["target"], "--prompt", "the quick", "--max-new-tokens", 8,
                      "--output", out], capsys)
    assert code == 0, cap.err
    full = json.loads(out.read_text())
    assert full["finish_reason"] in ("eos", "length") and full["completion"]
    if len(full["completion"]) < 3:
        pytest.fail(f"completion too short for a stop-string check: {full}")
    stop = full["completion"][1:3]
    code, cap = _run(["--target", dirs["target"], "--prompt", "the quick", "--max-new-tokens", 8,
                      "--stop", stop, "--output", out], capsys)
    assert code == 0, cap.err
    cut = json.loads(out.read_text())
    assert cut["finish_reason"] == "stop"
    assert cut["completion"] == full["completion"][: full["completion"].index(stop)]
    assert cut["token_ids"] == full["token_ids"][: len(cut["token_ids"])]


@pytest.mark.parametrize("case", ["missing_folder", "mismatched_tokenizers", "prompt_too_long", "alpha_nan",
                                  "alpha_inf", "top_p_zero", "top_p_above_one", "empty_prompts_file",
                                  "expert_without_anti"])
def test_user_errors_leave_no_output(case, dirs, prompts_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    three = ["--target", dirs["target"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"]]
    common = ["--max-new-tokens", 4, "--output", out]
    argv, message = {
        "missing_folder": (["--target", tmp_path / "nope", "--prompts", prompts_file, *common], "no such folder"),
        "mismatched_tokenizers": (["--target", dirs["target"], "--expert", mismatched_tokenizer_dir(
            dirs["expert"], tmp_path), "--anti-expert", dirs["anti"], "--prompts", prompts_file, *common],
            "different tokenizers"),
        "prompt_too_long": ([*three, "--prompt", "the quick brown fox " * 6, *common], "exceeds its context"),
        "alpha_nan": ([*three, "--alpha", "nan", "--prompts", prompts_file, *common], "--alpha must be a finite"),
        "alpha_inf": ([*three, "--alpha", "inf", "--prompts", prompts_file, *common], "--alpha must be a finite"),
        "top_p_zero": ([*three, "--top-p", 0, "--prompts", prompts_file, *common], r"--top-p must be in \(0, 1\]"),
        "top_p_above_one": ([*three, "--top-p", 1.5, "--prompts", prompts_file, *common], "--top-p must be in"),
        "empty_prompts_file": ([*three, "--prompts", tmp_path / "empty.jsonl", *common], "has no prompts"),
        "expert_without_anti": (["--target", dirs["target"], "--expert", dirs["expert"], "--prompts",
                                 prompts_file, *common], "give both --expert and --anti-expert"),
    }[case]
    (tmp_path / "empty.jsonl").write_text("\n")
    code, cap = _run(argv, capsys)
    assert code == 2
    import re
    assert re.search(message, cap.err), cap.err
    assert "Traceback" not in cap.err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.jsonl.*"))


def _engine_tokens(model_dirs, rule, params, prompt, max_new_tokens):
    """The engine run directly on one prompt (the reference for the command's output)."""
    from transformers import AutoTokenizer
    from proxytune_jax.decoding.prompts import bucket_length
    tok = AutoTokenizer.from_pretrained(model_dirs[0])
    dec = Decoder([load_pretrained(d) for d in model_dirs], rule)
    ids = encode_prompt(tok, prompt, chat_template=False)
    batch = left_pad([ids], bucket_length(len(ids)), 0)
    res = dec.generate([batch] * len(model_dirs), max_new_tokens=max_new_tokens, fusion_params=params,
                       stop=make_stop_criteria([2]))
    return res.token_lists()[0]


@pytest.mark.parametrize("rule,flags,params", [
    ("contrastive", ["--amateur", "anti"], {"lam": 0.7, "plausibility": 0.2}),
    ("small_large_temperature", ["--small", "expert"], {"lam": 0.3, "temperature": 1.5}),
    ("eft", ["--expert", "expert", "--anti-expert", "anti", "--expert", "anti", "--anti-expert", "expert"],
     {"weights": [1.0, 0.5]}),
])
def test_every_rule_reachable_from_the_command(rule, flags, params, dirs, tmp_path, capsys):
    """Rules beyond proxy-tuning: the model roles come from their flags (the large model is --target) and
    --param sets the rule's hyperparameters; the tokens equal the engine's with the same models and params."""
    out = tmp_path / "out.jsonl"
    argv = ["--target", dirs["target"], "--rule", rule]
    for i in range(0, len(flags), 2):
        argv += [flags[i], dirs[flags[i + 1]]]
    for k, v in params.items():
        argv += ["--param", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"]
    code, cap = _run([*argv, "--prompt", "the quick", "--max-new-tokens", 6, "--output", out], capsys)
    assert code == 0, cap.err
    got = json.loads(out.read_text())["token_ids"]
    order = [dirs["target"]] + [dirs[flags[i + 1]] for i in range(0, len(flags), 2)]
    if rule == "small_large_temperature":  # roles (small, large)
        order = order[::-1]
    assert got == _engine_tokens(order, rule, params, "the quick", 6)


@pytest.mark.parametrize("case", ["unused_flag", "missing_flag", "unknown_param", "bad_param", "eft_weights",
                                  "small_without_rule", "plain_with_alpha"])
def test_rule_flag_errors(case, dirs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    t, e, a = dirs["target"], dirs["expert"], dirs["anti"]
    argv, message = {
        "unused_flag": (["--target", t, "--rule", "contrastive", "--amateur", a, "--small", e],
                        "--rule contrastive takes --target DIR --amateur DIR; drop --small"),
        "missing_flag": (["--target", t, "--rule", "small_large_direct"], "--small is missing"),
        "unknown_param": (["--target", t, "--expert", e, "--anti-expert", a, "--param", "lam=1"],
                          r"has no hyperparameter\(s\) \['lam'\]"),
        "bad_param": (["--target", t, "--amateur", a, "--param", "lam"], "write NAME=VALUE"),
        "eft_weights": (["--target", t, "--rule", "eft", "--expert", e, "--anti-expert", a, "--param",
                         "weights=1,2"], "need as many weights"),
        "small_without_rule": (["--target", t, "--small", e], "--small needs --rule"),
        "plain_with_alpha": (["--target", t, "--alpha", 0.5], "--rule plain has no hyperparameters"),
    }[case]
    code, cap = _run([*argv, "--prompt", "hi", "--max-new-tokens", 3, "--output", out], capsys)
    import re
    assert code == 2 and re.search(message, cap.err), cap.err
    assert not out.exists()


def test_topk_cache_of_the_fused_distribution_matches_a_teacher_forced_reference(dirs, prompts_file, tmp_path,
                                                                                  capsys):
    """``--topk-cache``: the engine records the proxy-tuned distribution's top-k before every generated token;
    the cache holds it at the positions of the training file it writes. Reference: each model run without a
    cache on its own prompt + the generated tokens, log-softmaxed and fused in NumPy."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from conftest import np_log_softmax
    from proxytune_jax.losses.first import TopKCache

    out, cache_dir, k, alpha = tmp_path / "out.jsonl", tmp_path / "cache", 4, 0.8
    # random tiny models write random tokens, whose text re-tokenizes differently more often than not (such
    # completions are left out of the cache); short completions of many prompts keep enough of them
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"{w} {n}"}) + "\n" for w in PROMPTS for n in range(4)))
    code, cap = _run(["--target", dirs["target"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"],
                      "--alpha", alpha, "--expert-chat-template", "--prompts", many, "--max-new-tokens", 2,
                      "--output", out, "--topk-cache", cache_dir, "--topk", k], capsys)
    assert code == 0, cap.err
    tok = AutoTokenizer.from_pretrained(dirs["target"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    data = [json.loads(line) for line in (cache_dir / "train.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["completion"] and tok.encode(r["completion"], add_special_tokens=False)
            == [t for t in r["token_ids"] if t != 2]]
    assert [d["response"] for d in data] == [r["completion"] for r in kept] and kept  # greedy: deterministic
    import jax
    from flax import nnx
    models = [nnx.split(load_pretrained(dirs[n])) for n in ("target", "expert", "anti")]
    forwards = [jax.jit(lambda p, i, m, g=g: nnx.merge(g, p)(i, m)[0]) for g, _ in models]
    width = 48  # every sequence left-padded to one width: one compile per model
    cache = TopKCache(cache_dir)
    for i, r in enumerate(kept):
        prompts = [encode_prompt(tok, r["prompt"], chat_template=c) for c in (False, True, False)]
        gen = r["token_ids"]
        lps = []
        for (_, params), fwd, p in zip(models, forwards, prompts):
            seq = p + gen
            ids, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
            ids[0, width - len(seq):], mask[0, width - len(seq):] = seq, 1
            logits = np.asarray(fwd(params, jnp.asarray(ids), jnp.asarray(mask))[0], np.float64)
            start = width - len(seq) + len(p) - 1
            lps.append(np_log_softmax(logits[start:start + len(gen)]))
        fused = np_log_softmax(lps[0] + alpha * (lps[1] - lps[2]))
        n_prompt = len(tok.encode(r["prompt"], add_special_tokens=True))
        got = cache[i]
        for j in range(len(gen)):
            order = np.argsort(-fused[j], kind="stable")[:k]
            row = got.ids[n_prompt - 1 + j]
            np.testing.assert_array_equal(np.sort(row), np.sort(order))
            np.testing.assert_allclose(np.sort(got.logp[n_prompt - 1 + j].astype(np.float64)),
                                       np.sort(fused[j, order]), atol=3e-3)
        assert np.all(got.ids[:n_prompt - 1] == -1)
