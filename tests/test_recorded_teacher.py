"""A black-box teacher from recorded OpenAI-style responses (``training.recorded_teacher``): the recorded top-k
becomes the same cache a local teacher writes (``training.topk_cache.build_topk_cache``, the reference here),
at every scored position, in both response formats; ``offline_topk`` trains on it from the CLI."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import plus_rows, write_jsonl
from proxytune_jax import cli
from proxytune_jax.errors import UserError

K = 4


def _record(tokenizer, model, prompt: str, response: str, fmt: str) -> dict:
    """What an OpenAI-compatible server serving ``model`` returns for ``prompt`` when it generates ``response``
    with ``logprobs``: the top-K log-probs of the full softmax before each generated token."""
    p = tokenizer.encode(prompt, add_special_tokens=True)
    r = tokenizer.encode(response, add_special_tokens=False)
    ids = jnp.asarray([p + r], jnp.int32)
    logits, _ = model(ids, jnp.ones_like(ids))
    lp = np.asarray(logits[0], np.float64)
    lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
    rows = []
    for j in range(len(r)):
        pos = len(p) - 1 + j
        top = np.argsort(-lp[pos], kind="stable")[:K]
        rows.append([(int(i), float(lp[pos, i])) for i in top])
    raw = tokenizer.convert_ids_to_tokens
    if fmt == "completions":
        logprobs = {"tokens": raw(r), "token_logprobs": [float(lp[len(p) - 1 + j, t]) for j, t in enumerate(r)],
                    "top_logprobs": [{raw(i): v for i, v in row} for row in rows]}
        body = {"choices": [{"text": response, "logprobs": logprobs, "finish_reason": "stop"}]}
    else:
        from proxytune_jax.decoding.stopping import token_byte_table
        table, lens = token_byte_table(tokenizer, len(tokenizer))

        def entry(i):  # chat APIs return the decoded token text and its UTF-8 bytes
            return {"token": tokenizer.decode([i]), "bytes": table[i, :lens[i]].tolist()}

        content = [{**entry(t), "logprob": float(lp[len(p) - 1 + j, t]),
                    "top_logprobs": [{**entry(i), "logprob": v} for i, v in row]} for j, (t, row) in
                   enumerate(zip(r, rows))]
        body = {"choices": [{"message": {"role": "assistant", "content": response}, "logprobs": {"content": content}}]}
    return {"prompt": prompt, "response": body}


@pytest.mark.parametrize("fmt", ["completions", "chat"])
def test_recorded_responses_give_the_local_teachers_cache_and_train(fmt, tiny_checkpoint, tmp_path, capsys):
    import proxytune_jax as pj
    from transformers import AutoTokenizer

    from proxytune_jax.losses.first import TopKCache
    from proxytune_jax.training.topk_cache import build_topk_cache

    teacher_dir = tiny_checkpoint("llama", seed=2, hidden_size=64, intermediate_size=96)
    student_dir = tiny_checkpoint("llama", seed=1)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = pj.load_pretrained(teacher_dir)
    rows = plus_rows(4)
    write_jsonl(tmp_path / "responses.jsonl", [_record(tok, teacher, r["prompt"], r["response"], fmt) for r in rows])
    assert cli.main(["topk-cache", "--responses", str(tmp_path / "responses.jsonl"),
                     "--tokenizer", str(teacher_dir), "--out", str(tmp_path / "cache"), "--k", str(K)]) == 0
    data = tmp_path / "cache" / "train.jsonl"
    assert [json.loads(line) for line in data.read_text().splitlines()] == rows
    api = TopKCache(tmp_path / "cache")
    local = TopKCache(build_topk_cache(teacher_dir, data, tmp_path / "local", k=K))
    for i, r in enumerate(rows):
        n_prompt = len(tok.encode(r["prompt"], add_special_tokens=True))
        n_resp = len(tok.encode(r["response"], add_special_tokens=False))
        a, b = api[i], local[i]
        scored = slice(n_prompt - 1, n_prompt - 1 + n_resp)
        np.testing.assert_array_equal(a.ids[scored], b.ids[scored])
        np.testing.assert_allclose(a.logp[scored].astype(np.float32), b.logp[scored].astype(np.float32), atol=2e-3)
        assert np.all(a.ids[:n_prompt - 1] == -1) and np.all(a.ids[-1] == -1)  # unscored positions: empty rows
    capsys.readouterr()
    (tmp_path / "config.py").write_text(
        "from proxytune_jax.training import DataConfig, ModelConfig, OfflineTopK, OptimConfig, TrainConfig\n"
        f"config = TrainConfig(model=ModelConfig(student={str(student_dir)!r}),\n"
        f"    data=DataConfig(train_file={str(data)!r}, max_length=32, batch_size=4),\n"
        f"    objective=OfflineTopK(topk_cache={str(tmp_path / 'cache')!r}, mode='tail_bucket'),\n"
        "    steps=4, log_every=2, export=False, optim=OptimConfig(learning_rate=1e-3, warmup_steps=1))\n")
    assert cli.main(["train", "--no-progress", "--config", str(tmp_path / "config.py"),
                     "--workdir", str(tmp_path / "run")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["topk_kl"]) and line["topk_kl"] > 0 for line in lines if "topk_kl" in line)


def test_bad_recordings_are_refused_with_their_line(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from proxytune_jax.training.recorded_teacher import build_api_topk_cache

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama", seed=2, hidden_size=64, intermediate_size=96))
    ok = {"choices": [{"text": " a: 1", "logprobs": {"tokens": tok.convert_ids_to_tokens(
        tok.encode(" a: 1", add_special_tokens=False)), "top_logprobs": []}}]}
    ok["choices"][0]["logprobs"]["top_logprobs"] = [{} for _ in ok["choices"][0]["logprobs"]["tokens"]]
    no_logprobs = {"choices": [{"text": " a: 1", "logprobs": None}]}
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "response": ok}, {"prompt": "q", "response": no_logprobs}])
    with pytest.raises(UserError, match=r"a.jsonl:2: not an OpenAI-style response"):
        build_api_topk_cache(tmp_path / "a.jsonl", tok, tmp_path / "c1")
    wrong = json.loads(json.dumps(ok))
    wrong["choices"][0]["text"] = " a: 2"  # the tokens say " a: 1"
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "response": wrong}])
    with pytest.raises(UserError, match=r"b.jsonl:1: the generated tokens are not this tokenizer's encoding"):
        build_api_topk_cache(tmp_path / "b.jsonl", tok, tmp_path / "c2")
