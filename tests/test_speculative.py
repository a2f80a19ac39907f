"""Speculative fused decoding (``decoding/speculative.py``) against independent references.

* per-row KV cursors: a cache rolled back per row and continued gives the logits of each row's accepted prefix
  decoded from scratch (no cache, each row alone);
* greedy speculative tokens are IDENTICAL to the non-speculative ``Decoder.generate`` across rules (proxy-tuning,
  plain with a separate drafter, contrastive, DExperts, EFT with 5 models), batch sizes, left padding, a padded
  vocabulary, K in {1, 3}, adaptive K, a per-token α schedule and gate, EOS and stop strings inside an accepted run;
* sampled speculative decoding follows the exact joint distribution of non-speculative sampling: a G-test
  against a brute-force enumeration (NumPy transcription of the rule, temperature, top-k / top-p) on V = 8, and
  the same test rejects the drafter's distribution (it has power);
* bf16: where speculative and plain greedy differ, the plain fused top-2 is a near-tie;
* ``proxytune generate --speculative`` gives the same text as without, and bad input gives clear errors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats

import jax
import jax.numpy as jnp

from conftest import mismatched_tokenizer_dir, np_log_softmax, np_softmax
from proxytune_jax.decoding.engine import Decoder
from proxytune_jax.decoding.prompts import left_pad
from proxytune_jax.decoding.sampling import SamplingParams
from proxytune_jax.decoding.stopping import EOS, STOP_STRING, make_stop_criteria
from proxytune_jax.errors import UserError
from proxytune_jax.models import init_model, small_llama_config

pytestmark = pytest.mark.usefixtures("fast_compiles")

V = 40  # the shared id range; the models' vocabularies are padded past it
N_NEW = 10


def _model(vocab, hidden, layers, seed, heads=2):
    return init_model(small_llama_config(vocab, hidden, layers, heads, max_positions=64), seed=seed)


@pytest.fixture(scope="module")
def models():
    return dict(base=_model(V + 8, 32, 2, 1, heads=4), expert=_model(V + 4, 16, 1, 2), anti=_model(V + 4, 16, 1, 3),
                expert2=_model(V + 4, 16, 1, 4), anti2=_model(V + 4, 16, 1, 5), drafter=_model(V, 16, 1, 6))


def _prompts(b, seed=0, width=7):
    """Left-padded random prompts of different lengths (ids 3.. so no EOS / pad inside)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (b, width)).astype(np.int32)
    mask = np.ones((b, width), bool)
    for r in range(b):
        mask[r, : r % 4] = False
    ids[~mask] = 0
    return ids, mask


NO_EOS = make_stop_criteria([])


def _same_as_plain(dec, prompt, *, k, fp=None, b_prompts=None, stop=NO_EOS, n=N_NEW, **kw):
    prompts = [prompt] * len(dec.graphdefs)
    ref = dec.generate(prompts, max_new_tokens=n, fusion_params=fp, stop=stop)
    got = dec.generate(prompts, max_new_tokens=n, fusion_params=fp, stop=stop, speculative=k, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.num_tokens, ref.num_tokens)
    np.testing.assert_array_equal(got.finish_reason, ref.finish_reason)
    return ref, got


# ------------------------------------------------------------------------------------------ per-row KV cache


def test_rollback_then_continue_equals_the_accepted_prefix_from_scratch(models):
    from flax import nnx
    graphdef, params = nnx.split(models["base"])
    fwd = jax.jit(lambda ids, mask, cache: nnx.merge(graphdef, params)(ids, mask, cache))
    ids, mask = _prompts(3)
    rng = np.random.default_rng(1)
    draft = rng.integers(3, V, (3, 4)).astype(np.int32)
    keep = np.array([1, 4, 0])  # tokens of the 4 drafted each row keeps
    nxt = rng.integers(3, V, (3, 2)).astype(np.int32)

    cache = models["base"].init_cache(3, 7 + 4 + 2)
    _, cache = fwd(jnp.asarray(ids), jnp.asarray(mask), cache)
    cache = cache.with_row_lengths()
    _, cache = fwd(jnp.asarray(draft), jnp.ones((3, 4), bool), cache)
    cache = cache.rollback(jnp.asarray(7 + keep))
    assert cache.length.tolist() == (7 + keep).tolist()
    logits, cache = fwd(jnp.asarray(nxt), jnp.ones((3, 2), bool), cache)
    assert cache.length.tolist() == (9 + keep).tolist()
    # each row's prompt + accepted drafts + new tokens from scratch (no cache; left padding is exact: positions
    # come from the mask)
    seqs = [np.concatenate([ids[r][mask[r]], draft[r, : keep[r]], nxt[r]]) for r in range(3)]
    ref, _ = fwd(*map(jnp.asarray, left_pad(seqs, 13)), None)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, -2:]), atol=1e-4, rtol=1e-4)


def test_per_row_write_kv_matches_a_numpy_scatter():
    from proxytune_jax.models.layers import write_kv
    rng = np.random.default_rng(0)
    ck, cv = rng.normal(size=(2, 3, 2, 9, 4)).astype(np.float32)
    k, v = rng.normal(size=(2, 3, 2, 2, 4)).astype(np.float32)
    at = np.array([0, 5, 7])
    got_k, got_v = write_kv(jnp.asarray(ck), jnp.asarray(cv), jnp.asarray(k), jnp.asarray(v), jnp.asarray(at))
    for c, x, got in ((ck, k, got_k), (cv, v, got_v)):
        want = c.copy()
        for b in range(3):
            want[b, :, at[b]:at[b] + 2] = x[b]
        np.testing.assert_array_equal(np.asarray(got), want)


# -------------------------------------------------------------------------------------- greedy: identical


@pytest.mark.parametrize("b,k,control", [(1, 1, False), (3, 3, True)])
def test_proxy_tuning_greedy_identical(models, b, k, control):
    """A padded vocabulary (48 / 44 / 44 logits, shared range 40), left padding; with ``control`` a per-token α
    schedule and entropy gate (each verified position sees its own step) and adaptive k (the same program)."""
    from proxytune_jax.decoding.alpha_control import control_params
    dec = Decoder([models["base"], models["expert"], models["anti"]], "proxy_tuning", vocab_size=V)
    fp = {"alpha": 2.0, **control_params("linear:6", "entropy:2.0")} if control else {"alpha": 1.5}
    _, got = _same_as_plain(dec, _prompts(b, seed=b), k=k, fp=fp)
    rep = got.speculative
    assert rep.draft_len == k and rep.drafted.tolist() == (rep.rounds * k).tolist()
    # every row emits accepted + 1 tokens per round (no stop here) after the prefill's first token
    assert ((rep.accepted + rep.rounds) >= N_NEW - 1).all()
    assert 0.0 <= rep.acceptance_rate <= 1.0
    _check_acceptance_by_brute_force(models["expert"], _prompts(b, seed=b), got, k, adaptive=False)
    if control:
        _, got = _same_as_plain(dec, _prompts(b, seed=b), k=k, fp=fp, adaptive_speculative=True)
        _check_acceptance_by_brute_force(models["expert"], _prompts(b, seed=b), got, k, adaptive=True)


def _check_acceptance_by_brute_force(drafter, prompt, got, k, adaptive):
    """The per-row statistics of a greedy run equal a replay of its rounds with cache-free drafter forwards:
    from n emitted tokens, the drafter's greedy chain d_1..d_k on prompt + y_1..y_n is accepted up to the first
    d_i != y_{n+i}; the round emits a + 1 tokens (checks the drafter's per-row cache and its rollbacks)."""
    ids, mask = prompt
    for r in range(ids.shape[0]):
        y = got.tokens[r, : got.num_tokens[r]].tolist()
        n, k_eff, rounds, drafted, accepted = 1, k, 0, 0, 0
        while n < len(y):
            seq = ids[r][mask[r]].tolist() + y[:n]
            a = 0
            for i in range(k_eff):
                padded, pmask = left_pad([seq], 24)  # one shape: one compile of the cache-free forward
                logits, _ = drafter(jnp.asarray(padded), jnp.asarray(pmask), None)
                d = int(np.argmax(np.asarray(logits[0, -1, :V])))
                if a == i and n + i < len(y) and d == y[n + i]:
                    a += 1
                seq.append(d)
            rounds, drafted, accepted = rounds + 1, drafted + k_eff, accepted + a
            n += a + 1
            if adaptive:
                k_eff = max(k_eff - 1, 1) if 2 * a < k_eff else min(k_eff + 1, k) if a == k_eff else k_eff
        assert (got.speculative.rounds[r], got.speculative.drafted[r], got.speculative.accepted[r]) == (
            rounds, drafted, accepted), r


@pytest.mark.parametrize("rule,names,fp", [
    ("contrastive", ("base", "expert"), {"lam": 0.5}),
    ("dexperts", ("base", "expert", "anti"), None),
    ("eft", ("base", "expert", "anti", "expert2", "anti2"), {"weights": [1.0, 0.5]}),
])
def test_other_rules_greedy_identical(models, rule, names, fp):
    dec = Decoder([models[n] for n in names], rule, vocab_size=V)
    _same_as_plain(dec, _prompts(3, seed=3), k=2, fp=fp)


class _LetterTokenizer:
    """Token i decodes to one letter (for byte-level stop strings without a real tokenizer)."""
    all_special_ids = []

    def convert_ids_to_tokens(self, ids):
        return [chr(ord("a") + i % 26) for i in ids]


def test_plain_speculative_decoding_eos_and_stop_strings_inside_accepted_runs(models):
    dec = Decoder([models["base"]], "plain", vocab_size=V)
    prompt = _prompts(3, seed=4)
    ref, _ = _same_as_plain(dec, prompt, k=3, drafter=models["drafter"])  # a separate small drafter
    # the target drafting for itself: every draft accepted, K + 1 = 4 tokens per round (1 + 4 + 4 + 1 of 4)
    _, got = _same_as_plain(dec, prompt, k=3, drafter=models["base"])
    assert got.speculative.acceptance_rate == 1.0
    assert got.speculative.rounds.tolist() == [3, 3, 3]
    # EOS at the 6th token of row 0: the second token of the second round's accepted run
    eos = int(ref.tokens[0, 5])
    _, got = _same_as_plain(dec, prompt, k=3, drafter=models["base"], stop=make_stop_criteria([eos]))
    assert got.finish_reason[0] == EOS and got.num_tokens[0] <= 6
    # a stop string made of row 1's 4th and 5th tokens' text (inside the second round)
    letters = "".join(chr(ord("a") + t % 26) for t in ref.tokens[1])
    stop = make_stop_criteria([], [letters[3:5]], _LetterTokenizer(), V)
    _, got = _same_as_plain(dec, prompt, k=3, drafter=models["base"], stop=stop)
    assert got.finish_reason[1] == STOP_STRING and got.num_tokens[1] <= 5
    assert got.speculative.acceptance_rate == 1.0


def test_bad_input(models):
    trio = Decoder([models["base"], models["expert"], models["anti"]], "proxy_tuning", vocab_size=V)
    p = [_prompts(1)] * 3
    with pytest.raises(UserError, match=">= 1"):
        trio.generate(p, max_new_tokens=4, speculative=0, drafter=models["drafter"])
    with pytest.raises(UserError, match="drop --speculative"):
        trio.generate(p, max_new_tokens=4, speculative=2, analysis=True)
    with pytest.raises(UserError, match="same tokenizer"):
        trio.generate(p, max_new_tokens=4, speculative=2, drafter=_model(V - 10, 16, 1, 7))
    with pytest.raises(UserError, match="lower --speculative"):
        trio.generate(p, max_new_tokens=50, speculative=8)
    with pytest.raises(UserError, match="separate drafter"):
        Decoder([models["base"]], "plain").generate(p[:1], max_new_tokens=4, speculative=2)
    with pytest.raises(UserError, match="small_large_kl"):
        Decoder([models["drafter"], models["base"]], "small_large_kl").generate(p[:2], max_new_tokens=4,
                                                                              speculative=2)


# ------------------------------------------------------------------------------- sampling: exact distribution

SV = 8  # vocabulary of the statistical test
S_NEW = 3
S_PROMPT = np.array([3, 5, 1], np.int32)


@pytest.fixture(scope="module")
def small_vocab_models():
    return [_model(SV, 16, 2, 11), _model(SV, 8, 1, 12), _model(SV, 8, 1, 13)]


def _np_scores(logits_rows, rule, alpha):
    """NumPy transcription of the fused scores (float64)."""
    if rule == "plain":
        return np.asarray(logits_rows[0], np.float64)
    base, ex, an = (np_log_softmax(x) for x in logits_rows)
    return base + alpha * (ex - an)


def _np_process(scores, temperature, top_k=0, top_p=1.0):
    """banned (none) -> temperature -> top-k -> top-p -> probabilities (float64)."""
    s = scores / temperature
    order = np.argsort(-s)
    keep = np.ones_like(s, bool)
    if top_k:
        keep &= s >= s[order[top_k - 1]]
    if top_p < 1.0:
        p = np_softmax(np.where(keep, s, -np.inf))
        srt = p[order]
        before = np.cumsum(srt) - srt
        kept = order[before < top_p]
        keep &= np.isin(np.arange(len(s)), kept) | (s >= s[kept].min())
    return np_softmax(np.where(keep, s, -np.inf))


def _exact_joint(models_, rule, alpha, **proc):
    """P(y_1..y_S_NEW) of non-speculative sampling, by enumerating prefixes (no cache, float64 reference)."""
    def dist(prefix):
        seq = jnp.asarray(np.concatenate([S_PROMPT, np.asarray(prefix, np.int32)])[None])
        rows = [np.asarray(m(seq, None, None)[0][0, -1], np.float64) for m in models_]
        return _np_process(_np_scores(rows, rule, alpha), **proc)

    joint = np.zeros((SV,) * S_NEW)
    p1 = dist([])
    for a in np.flatnonzero(p1):
        p2 = dist([a])
        for b in np.flatnonzero(p2):
            p3 = dist([a, b])
            joint[a, b] = p1[a] * p2[b] * p3
    return joint.reshape(-1)


def _g_test(counts, probs):
    """G-test p-value of counts against probs (bins of expected count < 5 pooled); counts where probs == 0
    give p = 0."""
    if counts[probs == 0].sum():
        return 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    g = 2 * np.sum(np.where(obs > 0, obs * np.log(np.where(obs > 0, obs, 1) / exp), 0.0))
    return float(scipy.stats.chi2.sf(g, len(obs) - 1))


@pytest.mark.parametrize("rule,k,proc", [
    ("proxy_tuning", 2, dict(temperature=0.7, top_k=5)),
    ("plain", 1, dict(temperature=1.3, top_p=0.85)),
])
def test_sampled_speculative_follows_the_exact_distribution(small_vocab_models, rule, k, proc):
    rows = 4000
    if rule == "plain":
        fused, drafter = small_vocab_models[:1], small_vocab_models[1]
    else:
        fused, drafter = small_vocab_models, None
    dec = Decoder(fused, rule)
    prompt = (np.tile(S_PROMPT, (rows, 1)), np.ones((rows, len(S_PROMPT)), bool))
    sampling = SamplingParams.create(SV, **proc)
    fp = {"alpha": 1.0} if rule != "plain" else None
    res = dec.generate([prompt] * len(fused), max_new_tokens=S_NEW, fusion_params=fp, sampling=sampling,
                       stop=make_stop_criteria([]), seed=7, speculative=k, drafter=drafter)
    assert (res.num_tokens == S_NEW).all()
    codes = (res.tokens * SV ** np.arange(S_NEW - 1, -1, -1)).sum(-1)
    counts = np.bincount(codes, minlength=SV ** S_NEW).astype(np.float64)
    exact = _exact_joint(fused, rule, 1.0, **proc)
    assert abs(exact.sum() - 1) < 1e-9
    assert _g_test(counts, exact) > 1e-3
    # power: the drafter's own (processed) distribution is rejected by the same test on the same samples
    q_models = [drafter if drafter is not None else fused[1]]
    wrong = _exact_joint(q_models, "plain", 1.0, **proc)
    assert _g_test(counts, wrong) < 1e-3
    assert 0.0 < res.speculative.acceptance_rate < 1.0


# ------------------------------------------------------------------------------------------------- bf16


def test_bf16_differences_are_near_ties(models):
    cast = [init_model(small_llama_config(V + 8, 32, 2, 4, max_positions=64), seed=1, dtype=jnp.bfloat16),
            init_model(small_llama_config(V + 4, 16, 1, 2, max_positions=64), seed=2, dtype=jnp.bfloat16),
            init_model(small_llama_config(V + 4, 16, 1, 2, max_positions=64), seed=3, dtype=jnp.bfloat16)]
    dec = Decoder(cast, "proxy_tuning", vocab_size=V)
    prompt = [_prompts(3, seed=8)] * 3
    ref = dec.generate(prompt, max_new_tokens=N_NEW, stop=NO_EOS, record_topk=2)
    got = dec.generate(prompt, max_new_tokens=N_NEW, stop=NO_EOS, speculative=3)
    for r in range(3):
        diff = np.flatnonzero(got.tokens[r] != ref.tokens[r])
        if diff.size:  # the first difference: the speculative token is plain's runner-up, within a bf16 tie
            t = diff[0]
            assert got.tokens[r, t] == ref.topk.ids[r, t, 1]
            assert ref.topk.logp[r, t, 0] - ref.topk.logp[r, t, 1] < 0.1


# -------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def dirs(tiny_checkpoint):
    return dict(target=tiny_checkpoint("llama", seed=20, num_hidden_layers=3),
                expert=tiny_checkpoint("llama", seed=21), anti=tiny_checkpoint("llama", seed=22),
                drafter=tiny_checkpoint("gpt2", seed=23))


def _run(argv, capsys):
    from proxytune_jax import cli
    code = cli.main(["generate", *map(str, argv)])
    return code, capsys.readouterr()


def test_cli_speculative_same_text_and_reports_acceptance(dirs, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": x}) + "\n" for x in ["the quick brown", "hello", "proxy"]))
    common = ["--target", dirs["target"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"], "--prompts",
              prompts, "--max-new-tokens", 8, "--batch-size", 2]
    code, cap = _run([*common, "--output", tmp_path / "a.jsonl"], capsys)
    assert code == 0, cap.err
    code, cap = _run([*common, "--speculative", 2, "--output", tmp_path / "b.jsonl"], capsys)
    assert code == 0, cap.err
    assert "acceptance" in cap.out
    # plain decoding of --target drafted by a GPT-2 on the same tokenizer
    code, cap = _run([*common[:2], *common[6:], "--output", tmp_path / "c.jsonl"], capsys)
    assert code == 0, cap.err
    code, cap = _run([*common[:2], *common[6:], "--speculative", 3, "--drafter", dirs["drafter"],
                      "--adaptive-speculative", "--output", tmp_path / "d.jsonl"], capsys)
    assert code == 0, cap.err
    assert "acceptance" in cap.out
    a, b, c, d = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()]
                  for f in ("a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl"))
    assert a == b and c == d


@pytest.mark.parametrize("extra,message", [
    (["--speculative", 0], ">= 1"),
    (["--drafter", "DRAFTER"], "go with --speculative"),
    (["--speculative", 2, "--analysis"], "drop --speculative"),
    (["--speculative", 2, "--drafter", "OTHER_TOKENIZER"], "share the fused models' tokenizer.*id 120"),
    (["--speculative", 2, "--rule", "small_large_kl"], "small_large_kl"),
])
def test_cli_bad_input(dirs, tmp_path, capsys, extra, message):
    sub = {"DRAFTER": dirs["drafter"], "OTHER_TOKENIZER": mismatched_tokenizer_dir(dirs["drafter"], tmp_path)}
    extra = [sub.get(x, x) for x in extra]
    out = tmp_path / "o.jsonl"
    models = (["--target", dirs["target"], "--small", dirs["expert"]] if "small_large_kl" in extra else
              ["--target", dirs["target"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"]])
    code, cap = _run([*models, "--prompt", "hi", "--max-new-tokens", 4, *extra, "--output", out], capsys)
    assert code == 2 and "Traceback" not in cap.err
    import re
    assert re.search(message, cap.err), cap.err
    assert not out.exists()


def test_cli_plain_needs_a_drafter(dirs, tmp_path, capsys):
    code, cap = _run(["--target", dirs["target"], "--prompt", "hi", "--max-new-tokens", 4, "--speculative", 2,
                      "--output", tmp_path / "o.jsonl"], capsys)
    assert code != 0 and "--drafter" in cap.err
