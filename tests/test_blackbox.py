"""Black-box bases (``decoding.blackbox``): proxy-tuning a base known only by its top-k against independent
references -- the full-logit engine at k = V, a NumPy brute-force loop (full forwards, top-k re-stated, both tail
treatments) at small k; an OpenAI-compatible completions server on the loopback interface serving a tiny
model (same tokens as the local top-k, response cache, retries, unreachable server, short lists); record/replay."""
from __future__ import annotations

import http.server
import json
import socket
import threading

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import np_log_softmax
from proxytune_jax.decoding.blackbox import (BlackBoxGenerator, LocalTopKBase, OpenAICompletionsBase,
                                             RecordingTopKBase, ReplayTopKBase)
from proxytune_jax.decoding.pipeline import TextGenerator
from proxytune_jax.errors import UserError
from proxytune_jax.models.hf_io import load_pretrained

PROMPTS = ["the quick brown fox", "proxy tuning", "hello world! answer:"]
N_NEW = 6


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def trio(tiny_checkpoint):
    from transformers import AutoTokenizer
    paths = [tiny_checkpoint("llama", seed=40, num_hidden_layers=3), tiny_checkpoint("llama", seed=41),
             tiny_checkpoint("llama", seed=42)]
    return [load_pretrained(p) for p in paths], AutoTokenizer.from_pretrained(paths[0])


def bb(trio, base, tail, **kw):
    (_, e, a), tok = trio
    return BlackBoxGenerator(base, e, a, tok, tail=tail, **kw)


def ids_of(outs):
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("tail", ["uniform"])  # "drop" at k = V is the same dense row (no tail to drop)
def test_k_equal_vocab_is_full_logit_proxy_tuning(trio, tail):
    (m, e, a), tok = trio
    from proxytune_jax.decoding.alpha_control import control_params
    fp = {"alpha": 1.5, **control_params("linear:4", "disagreement:0.05")}  # per-token α works here too
    ref = TextGenerator([m, e, a], [tok] * 3, "proxy_tuning").generate(
        PROMPTS, max_new_tokens=N_NEW, batch_size=2, fusion_params=fp)
    got = bb(trio, LocalTopKBase(m, tok, k=len(tok)), tail).generate(
        PROMPTS, max_new_tokens=N_NEW, batch_size=2, fusion_params=fp)
    assert ids_of(got) == [r.token_ids for r in ref]
    assert [g.completion for g in got] == [r.completion for r in ref]


def np_dense(lp, k, tail):
    """NumPy re-statement of the top-k base: top k of lp kept; the rest uniform tail or dropped."""
    order = np.argsort(-lp, kind="stable")[:k]
    out = np.full_like(lp, -np.inf)
    if tail == "drop":
        out[order] = lp[order] - np.log(np.exp(lp[order]).sum())
    else:
        out[:] = np.log(max(1 - np.exp(lp[order]).sum(), 1e-300) / (len(lp) - k))
        out[order] = lp[order]
    return out


@pytest.mark.parametrize("tail,k", [("uniform", 3), ("drop", 3), ("drop", 1)])
def test_small_k_matches_brute_force(trio, tail, k):
    (m, e, a), tok = trio
    from proxytune_jax.decoding.prompts import encode_prompt
    got = bb(trio, LocalTopKBase(m, tok, k=k), tail).generate(PROMPTS, max_new_tokens=N_NEW, batch_size=3,
                                                            fusion_params={"alpha": 1.0})
    full = [LocalTopKBase(x, tok, k=1) for x in (m, e, a)]  # its .logits: one full forward, no cache
    base_greedy = True
    for b, p in enumerate(PROMPTS):
        seqs = [encode_prompt(tok, p) for _ in range(3)]
        out = []
        for _ in range(N_NEW):
            lps = [np_log_softmax(f.logits(None, [s])[0]) for f, s in zip(full, seqs)]
            t = int(np.argmax(np_dense(lps[0], k, tail) + lps[1] - lps[2]))
            base_greedy &= t == int(np.argmax(lps[0]))
            out.append(t)
            for s in seqs:
                s.append(t)
            if t == 2:
                break
        assert got[b].token_ids == out, (tail, k, b)
    if k == 1 and tail == "drop":
        assert base_greedy  # the support is the base's top-1: its own greedy choice every step


# ---------------------------------------------------------------------------------------------- server


class _Server:
    """An OpenAI-style /v1/completions server on 127.0.0.1 answering from a tiny model's top-k."""

    def __init__(self, model, tok, *, fail_first=0, short=False):
        self.local = LocalTopKBase(model, tok, k=len(tok), from_text=True)
        self.tok, self.fail_first, self.short, self.hits = tok, fail_first, short, 0
        self.auth: list = []  # the Authorization header of every request
        srv = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                srv.hits += 1
                srv.auth.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if srv.hits <= srv.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                k = body["logprobs"] - (1 if srv.short else 0)
                lps = np_log_softmax(srv.local.logits(body["prompt"], None))
                choices = []
                for j, row in enumerate(lps):
                    top = np.argsort(-row, kind="stable")[:k]
                    toks = srv.tok.convert_ids_to_tokens([int(i) for i in top])  # raw token strings
                    choices.append({"index": j, "text": toks[0], "logprobs": {
                        "tokens": [toks[0]], "top_logprobs": [{t: float(row[i]) for t, i in zip(toks, top)}]}})
                data = json.dumps({"choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(trio):
    made = []

    def make(**kw):
        s = _Server(trio[0][0], trio[1], **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_api_base_equals_local_topk_and_caches(trio, server):
    (m, _, _), tok = trio
    srv = server(fail_first=1)  # the first request gets a 503: the client retries
    api = OpenAICompletionsBase(srv.url, "tiny", tok, k=5, backoff=0.01)
    got = bb(trio, api, "uniform").generate(PROMPTS, max_new_tokens=N_NEW, batch_size=3)
    ref = bb(trio, LocalTopKBase(m, tok, k=5, from_text=True), "uniform").generate(
        PROMPTS, max_new_tokens=N_NEW, batch_size=3)
    assert ids_of(got) == ids_of(ref)
    hits = srv.hits
    assert hits >= 2  # the retried 503 plus at least one answered step
    again = bb(trio, api, "uniform").generate(PROMPTS, max_new_tokens=N_NEW, batch_size=3)
    assert ids_of(again) == ids_of(got) and srv.hits == hits  # every prefix answered from the cache


def test_api_errors(trio, server):
    tok = trio[1]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = OpenAICompletionsBase(f"http://127.0.0.1:{port}", "tiny", tok, k=3, retries=1, backoff=0.01, timeout=2)
    with pytest.raises(UserError, match=r"could not reach the base at http://127.0.0.1:\d+/v1/completions after 2"):
        api.topk(["hello"])
    short = server(short=True)
    with pytest.raises(UserError, match=r"prefix 'hello'.*2 top-logprob entries, but k = 3; lower --base-topk"):
        OpenAICompletionsBase(short.url, "tiny", tok, k=3).topk(["hello"])
    with pytest.raises(UserError, match="top_logprobs cap"):
        OpenAICompletionsBase(short.url, "tiny", tok, k=25)


def test_record_then_replay(trio, tmp_path):
    (m, _, _), tok = trio
    path = tmp_path / "base.jsonl"
    rec = RecordingTopKBase(LocalTopKBase(m, tok, k=4, from_text=True), path, tok)
    got = bb(trio, rec, "drop").generate(PROMPTS, max_new_tokens=N_NEW, batch_size=2)
    rec.save()
    assert not list(tmp_path.glob(".base.jsonl.*"))  # written atomically
    before = path.read_text()
    RecordingTopKBase(LocalTopKBase(m, tok, k=4), path, tok).save()  # re-opened: keeps every row as it was
    assert path.read_text() == before
    replay = ReplayTopKBase(path, tok, k=4)
    assert ids_of(bb(trio, replay, "drop").generate(PROMPTS, max_new_tokens=N_NEW, batch_size=2)) == ids_of(got)
    # the replayed TopK equals the recorded model's top-k for a recorded prefix
    top, ref = replay.topk([PROMPTS[0]]), LocalTopKBase(m, tok, k=4, from_text=True).topk([PROMPTS[0]], None)
    np.testing.assert_array_equal(top.ids, ref.ids)
    np.testing.assert_allclose(top.logp, ref.logp, rtol=1e-6)
    with pytest.raises(UserError, match=r"no recorded answer for the prefix 'a prompt never recorded'.*--base-record"):
        bb(trio, replay, "drop").generate(["a prompt never recorded"], max_new_tokens=2, batch_size=1)
    with pytest.raises(UserError, match=r"4 log-probs for k = 5; replay with --base-topk 4"):
        ReplayTopKBase(path, tok, k=5).topk([PROMPTS[0]])


def test_wrong_length_from_a_base_names_the_step(trio):
    (m, _, _), tok = trio

    class Bad(LocalTopKBase):
        def topk(self, texts, ids):
            top = super().topk(texts, ids)
            return type(top)(top.ids[:, :-1], top.logp[:, :-1])
    with pytest.raises(UserError, match=r"step 0: the base returned top-k lists of shape \(1, 2\)"):
        bb(trio, Bad(m, tok, k=3), "uniform").generate(["hi"], max_new_tokens=2, batch_size=1)


def test_generate_cli_api_record_replay(trio, tiny_checkpoint, server, tmp_path, capsys):
    """``proxytune generate --base-api`` (loopback server) == the engine with the local top-k; ``--base-record``
    then ``--base-replay`` gives the same file with no server; a replay missing a prefix fails naming it."""
    from proxytune_jax import cli
    (m, _, _), tok = trio
    pair = ["--expert", tiny_checkpoint("llama", seed=41), "--anti-expert", tiny_checkpoint("llama", seed=42)]
    srv = server()
    common = [*pair, "--prompt", PROMPTS[0], "--max-new-tokens", N_NEW, "--base-topk", 5, "--base-tail", "drop"]
    out, rec = tmp_path / "api.jsonl", tmp_path / "rec.jsonl"
    assert cli.main(["generate", *map(str, common + ["--base-api", srv.url, "--base-model", "tiny",
                                                     "--base-record", rec, "--output", out])]) == 0
    ref = bb(trio, LocalTopKBase(m, tok, k=5, from_text=True), "drop").generate(PROMPTS[:1], max_new_tokens=N_NEW)
    assert json.loads(out.read_text())["token_ids"] == ref[0].token_ids
    srv.close()
    out2 = tmp_path / "replay.jsonl"
    assert cli.main(["generate", *map(str, common + ["--base-replay", rec, "--output", out2])]) == 0
    assert out2.read_text() == out.read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    code = cli.main(["generate", *map(str, [*pair, "--prompt", "unseen", "--max-new-tokens", 2, "--base-replay",
                                            rec, "--base-topk", 5, "--output", bad])])
    err = capsys.readouterr().err
    assert code != 0 and "no recorded answer for the prefix 'unseen'" in err and not bad.exists()
    code = cli.main(["generate", *map(str, [*pair, "--prompt", "x", "--max-new-tokens", 2, "--base-api", srv.url,
                                            "--output", bad])])
    assert code != 0 and "--base-api needs --base-model" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["replay missing prefix", "replay damaged", "replay missing file",
                                  "unreachable server", "replay with --base-api", "bad topk"])
def test_blackbox_bad_input(case, tiny_checkpoint, tmp_path, capsys):
    """The bad-input contract (tests/test_bad_input.py): non-zero exit, a message naming the fix, no traceback,
    no output file, nothing that existed changed."""
    from test_bad_input import _expect_refused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    rec = tmp_path / "rec.jsonl"
    rec.write_text(json.dumps({"prefix": "recorded", "ids": [5, 6], "logprobs": [-0.1, -3.0]}) + "\n")
    (tmp_path / "damaged.jsonl").write_text('{"prefix": "x", "ids": [1]\n')
    pair = ["--expert", tiny_checkpoint("llama", seed=41), "--anti-expert", tiny_checkpoint("llama", seed=42)]
    base = ["generate", *pair, "--prompt", "hello", "--max-new-tokens", 2, "--output", tmp_path / "out.jsonl"]
    argv, message = {
        "replay missing prefix": (base + ["--base-replay", rec, "--base-topk", 2],
                                  r"no recorded answer for the prefix 'hello'.*--base-record"),
        "replay damaged": (base + ["--base-replay", tmp_path / "damaged.jsonl"], r"damaged.jsonl:1"),
        "replay missing file": (base + ["--base-replay", tmp_path / "none.jsonl"], r"record it first with --base-record"),
        "unreachable server": (base + ["--base-api", dead, "--base-model", "m", "--base-retries", 0],
                               r"could not reach the base at .* start the server or fix --base-api"),
        "replay with --base-api": (base + ["--base-api", dead, "--base-model", "m", "--base-replay", rec],
                                   r"give one"),
        "bad topk": (base + ["--base-api", dead, "--base-model", "m", "--base-topk", 50], r"\[1, 20\]"),
    }[case]
    _expect_refused(argv, message, capsys, tmp_path)


def test_generate_cli_api_key_from_env(trio, tiny_checkpoint, server, tmp_path, capsys, monkeypatch):
    """``--base-api-key-env VAR`` sends the key in VAR as a bearer token; the key appears in no output, message or
    recorded file; an unset variable is refused naming the variable, before any request."""
    from proxytune_jax import cli
    secret = "sk-test-5ecret-value"
    monkeypatch.setenv("PT_TEST_KEY", secret)
    monkeypatch.delenv("PT_UNSET_KEY", raising=False)
    pair = ["--expert", tiny_checkpoint("llama", seed=41), "--anti-expert", tiny_checkpoint("llama", seed=42)]
    srv = server()
    out, rec = tmp_path / "api.jsonl", tmp_path / "rec.jsonl"
    common = [*pair, "--prompt", PROMPTS[0], "--max-new-tokens", 3, "--base-topk", 5, "--base-api", srv.url,
              "--base-model", "tiny"]
    assert cli.main(["generate", *map(str, common + ["--base-record", rec, "--output", out,
                                                     "--base-api-key-env", "PT_TEST_KEY"])]) == 0
    assert srv.auth and set(srv.auth) == {f"Bearer {secret}"}
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    assert secret not in out.read_text() + rec.read_text()
    hits = srv.hits
    code = cli.main(["generate", *map(str, common + ["--output", tmp_path / "x.jsonl", "--base-api-key-env",
                                                     "PT_UNSET_KEY"])])
    err = capsys.readouterr().err
    assert code != 0 and "--base-api-key-env PT_UNSET_KEY: the environment variable PT_UNSET_KEY is not set" in err
    assert srv.hits == hits and not (tmp_path / "x.jsonl").exists()
    assert cli.main(["generate", *map(str, common + ["--output", tmp_path / "y.jsonl"])]) == 0
    assert srv.auth[-1] is None  # no flag, no header
