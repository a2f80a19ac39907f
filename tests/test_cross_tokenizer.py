"""Cross-tokenizer proxy-tuning (``decoding.cross_tokenizer``) with two different byte-level BPEs: α = 0 is the
base's own greedy decoding (the engine's plain decode), α > 0 equals a brute-force re-statement (each candidate
scored by unpadded full forwards of the small models on their own encodings), the text round-trips under both
tokenizers, and a step with no alignable candidate is a clear error. Batching: batched greedy equals one prompt
at a time (rows finishing independently); sampling is fixed by the seed and the row id whatever the batch, and
its draws follow the brute-force distribution over the fused candidate scores."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import build_tiny_tokenizer, np_log_softmax
from proxytune_jax.decoding.blackbox import LocalTopKBase
from proxytune_jax.decoding.cross_tokenizer import CrossTokenizerGenerator
from proxytune_jax.errors import UserError

PROMPTS = ["the quick brown fox", "proxy tuning steers"]
N_NEW = 5


pytestmark = pytest.mark.usefixtures("fast_compiles")


def second_tokenizer():
    """Another byte-level BPE: 200 tokens, trained on other text (so its merges and ids differ)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<unk>", "</s>", "<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a brown dog sleeps under the tree", "tuning small models is quick",
                             "proxies steer larger ones"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def world():
    from proxytune_jax.models import init_model, small_llama_config
    t1, t2 = build_tiny_tokenizer(), second_tokenizer()
    assert t1.get_vocab() != t2.get_vocab() and t1.eos_token_id != t2.eos_token_id
    cfg = dict(hidden_size=32, num_heads=4, num_kv_heads=2, max_positions=64)
    base = init_model(small_llama_config(len(t1), num_layers=2, eos_token_id=t1.eos_token_id, **cfg), seed=0)
    e = init_model(small_llama_config(len(t2), num_layers=1, eos_token_id=t2.eos_token_id, **cfg), seed=1)
    a = init_model(small_llama_config(len(t2), num_layers=1, eos_token_id=t2.eos_token_id, **cfg), seed=2)
    return t1, t2, base, e, a


def test_alpha_zero_is_the_base_greedy_decoding(world):
    from proxytune_jax.decoding.engine import Decoder
    from proxytune_jax.decoding.prompts import encode_prompt, left_pad
    from proxytune_jax.decoding.stopping import make_stop_criteria
    t1, t2, base, e, a = world
    gen = CrossTokenizerGenerator(LocalTopKBase(base, t1, k=8), t1, e, a, t2)
    got = gen.generate(PROMPTS, max_new_tokens=N_NEW, fusion_params={"alpha": 0.0})
    ref = Decoder([base], "plain").generate([left_pad([encode_prompt(t1, p) for p in PROMPTS], 16)],
                                            max_new_tokens=N_NEW, stop=make_stop_criteria([t1.eos_token_id]))
    assert [g.base_token_ids for g in got] == ref.token_lists()


def full_logits(model, ids, width=48):
    """[len(ids), V] logits of one sequence: a full forward, no cache (right-padded to one width: causal
    attention ignores the pads after it; one compile per model)."""
    from flax import nnx
    graphdef, params = nnx.split(model)
    fn = _FWD.setdefault(id(model), jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0][0]))
    x = np.zeros((1, width), np.int32)
    x[0, :len(ids)] = ids
    return np.asarray(fn(params, jnp.asarray(x)))[:len(ids)]


_FWD: dict = {}


def _text_of(raw):
    import codecs
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=False)


def _bytes_of(t1, i):  # byte-level BPE: the token string's characters are the GPT-2 byte alphabet
    from proxytune_jax.decoding.stopping import _bytes_to_unicode
    inv = {c: b for b, c in _bytes_to_unicode().items()}
    tok = t1.convert_ids_to_tokens(i)
    return b"" if i in t1.all_special_ids else bytes(inv[ch] for ch in tok)


def brute_step(world, prompt, chosen, raw, k, alpha):
    """Independent re-statement of one step: the base's top-k ids and every candidate's fused score, each
    candidate's string scored by unpadded full forwards on the small tokenizer's encodings of prompt and text
    (log P(text + c) − log P(text))."""
    t1, t2, base, e, a = world

    def seq_lp(model, ids):
        lp = np_log_softmax(full_logits(model, ids))
        return sum(lp[i - 1, ids[i]] for i in range(1, len(ids)))

    def enc(text):
        return t2(text, add_special_tokens=False)["input_ids"] if text else []

    p1, p2 = t1(prompt)["input_ids"], t2(prompt)["input_ids"]
    text = _text_of(raw)
    lp_b = np_log_softmax(full_logits(base, p1 + chosen)[-1])
    ids, scores = [], []
    for i in np.argsort(-lp_b, kind="stable")[:k]:
        i = int(i)
        s = lp_b[i]
        old = p2 + enc(text)
        if i == t1.eos_token_id:
            new = old + [t2.eos_token_id]
        else:
            c = _text_of(raw + _bytes_of(t1, i))[len(text):]
            new = p2 + enc(text + c) if c else None
        if new is not None:
            s += alpha * ((seq_lp(e, new) - seq_lp(e, old)) - (seq_lp(a, new) - seq_lp(a, old)))
        ids.append(i)
        scores.append(s)
    return ids, np.asarray(scores)


def brute_force(world, prompt, k, alpha):
    """Greedy decoding by :func:`brute_step` (first maximum on ties)."""
    t1 = world[0]
    chosen, raw = [], b""
    for _ in range(N_NEW):
        ids, scores = brute_step(world, prompt, chosen, raw, k, alpha)
        best = ids[int(np.argmax(scores))]
        chosen.append(best)
        if best == t1.eos_token_id:
            break
        raw += _bytes_of(t1, best)
    return chosen, raw.decode("utf-8", errors="replace")


@pytest.mark.parametrize("k", [3, 10])
def test_alpha_one_matches_brute_force_and_round_trips(world, k):
    t1, t2, base, e, a = world
    gen = CrossTokenizerGenerator(LocalTopKBase(base, t1, k=k), t1, e, a, t2)
    got = gen.generate(PROMPTS, max_new_tokens=N_NEW, fusion_params={"alpha": 1.0})
    zero = gen.generate(PROMPTS, max_new_tokens=N_NEW, fusion_params={"alpha": 0.0})
    for g, p in zip(got, PROMPTS):
        ids, text = brute_force(world, p, k, 1.0)
        assert g.base_token_ids == ids and g.completion == text
        for tok in (t1, t2):  # the text round-trips under both tokenizers
            assert tok.decode(tok(g.completion, add_special_tokens=False)["input_ids"]) == g.completion
    assert [g.base_token_ids for g in got] != [z.base_token_ids for z in zero]  # α moved the decoding


def test_text_the_small_tokenizer_cannot_round_trip_is_a_clear_error(world):
    """A word-level small tokenizer (unknown words become <unk>) cannot be aligned through text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from proxytune_jax.decoding.cross_tokenizer import TextScorer
    t1, t2, base, e, a = world
    wl = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "the": 2, "fox": 3}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t3 = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(UserError, match=r"step 3: the small models' tokenizer does not round-trip the text at "
                                        r"character 0 .*byte-level tokenizer"):
        TextScorer(e, t3).continuation_logprobs([1], "zebra", [" fox"], where="step 3")


def test_generate_cli_cross_tokenizer(world, tmp_path, capsys):
    """``proxytune generate --cross-tokenizer`` == the library call (local base, k = V); without the flag the
    mismatched tokenizers are refused with a message pointing to it."""
    import json
    from proxytune_jax import cli, save_pretrained
    t1, t2, base, e, a = world
    dirs = {}
    for name, m, tok in (("base", base, t1), ("expert", e, t2), ("anti", a, t2)):
        save_pretrained(m, tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--target", dirs["base"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"],
            "--prompt", PROMPTS[0], "--max-new-tokens", N_NEW, "--alpha", 1.0, "--output", out]
    assert cli.main([str(x) for x in argv + ["--cross-tokenizer"]]) == 0
    ref = CrossTokenizerGenerator(LocalTopKBase(base, t1, k=len(t1)), t1, e, a, t2).generate(
        PROMPTS[:1], max_new_tokens=N_NEW, fusion_params={"alpha": 1.0})[0]
    row = json.loads(out.read_text())
    assert row["base_token_ids"] == ref.base_token_ids and row["completion"] == ref.completion
    capsys.readouterr()
    out.unlink()
    assert cli.main([str(x) for x in argv]) != 0
    assert "--cross-tokenizer" in capsys.readouterr().err and not out.exists()


MORE_PROMPTS = PROMPTS + ["a dog", "small models steer large ones when", "é ü"]


class EosAfter(LocalTopKBase):
    """A local base whose prefixes of ``prompt`` put EOS first once ``after`` tokens are generated (so one row of
    a batch finishes early, the others go on)."""

    def __init__(self, *a, prompt, after, **kw):
        super().__init__(*a, **kw)
        self.prompt, self.after = prompt, after

    def topk(self, texts, ids):
        top = super().topk(texts, ids)
        ids_, lp = np.array(top.ids), np.array(top.logp)
        n0 = len(self.tokenizer(self.prompt)["input_ids"])
        for b, (t, seq) in enumerate(zip(texts, ids)):
            if t.startswith(self.prompt) and len(seq) - n0 >= self.after:
                ids_[b, -1], lp[b, -1] = self.tokenizer.eos_token_id, 0.0
        return type(top)(ids_, lp)


def test_batched_greedy_equals_one_prompt_at_a_time(world):
    """Rows of a batch finish independently (EOS, stop string, length) and decode exactly as alone."""
    t1, t2, base, e, a = world
    gen = CrossTokenizerGenerator(EosAfter(base, t1, k=6, prompt=MORE_PROMPTS[1], after=2), t1, e, a, t2)
    kw = dict(max_new_tokens=N_NEW, fusion_params={"alpha": 1.0})
    alone = [gen.generate([p], **kw)[0] for p in MORE_PROMPTS]
    assert alone[1].finish_reason == "eos" and len(alone[1].base_token_ids) == 3
    assert {o.finish_reason for i, o in enumerate(alone) if i != 1} == {"length"}
    for bs in (3, len(MORE_PROMPTS)):
        assert gen.generate(MORE_PROMPTS, batch_size=bs, **kw) == alone
    # a stop string ends one row: the text is cut before it, the other rows go on
    stop = alone[0].completion[2:4]
    got = gen.generate(MORE_PROMPTS, batch_size=4, stop_strings=[stop], **kw)
    assert got[0].finish_reason == "stop" and got[0].completion == alone[0].completion[:alone[0].completion.find(stop)]
    assert [g for g, o in zip(got, alone) if stop not in o.completion] == [o for o in alone if stop not in o.completion]


def test_sampling_is_fixed_by_seed_and_row_id(world):
    t1, t2, base, e, a = world
    gen = CrossTokenizerGenerator(LocalTopKBase(base, t1, k=8), t1, e, a, t2)
    kw = dict(max_new_tokens=N_NEW, fusion_params={"alpha": 1.0}, temperature=1.0, top_p=0.95)
    ids = lambda outs: [o.base_token_ids for o in outs]  # noqa: E731
    ref = gen.generate(MORE_PROMPTS, batch_size=len(MORE_PROMPTS), seed=7, **kw)
    assert ids(gen.generate(MORE_PROMPTS, batch_size=2, seed=7, **kw)) == ids(ref)
    assert [gen.generate([p], seed=7, row_ids=[i], **kw)[0].base_token_ids for i, p in enumerate(MORE_PROMPTS)] \
        == ids(ref)
    assert ids(gen.generate(MORE_PROMPTS, seed=8, **kw)) != ids(ref)  # another seed, other draws
    greedy = gen.generate(MORE_PROMPTS, max_new_tokens=N_NEW, fusion_params={"alpha": 1.0})
    assert ids(greedy) != ids(ref)  # it did sample


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 3, 1.0), (1.5, 0, 0.8)])
def test_sampled_candidates_follow_the_brute_force_distribution(world, temperature, top_k, top_p):
    """N rows of one prompt (row ids 0..N-1, independent keys), one step: the drawn tokens' frequencies match
    softmax(s / T) over the brute-force fused scores s of the base's top 6, after top-k / top-p (NumPy)."""
    t1, t2, base, e, a = world
    n, k, prompt = 400, 6, PROMPTS[1]
    ids, s = brute_step(world, prompt, [], b"", k, 1.0)
    z = s / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(k, bool)
    keep[order[:top_k or k]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    keep[order[mass_before >= top_p]] = False  # the nucleus: mass ranked strictly before < top_p
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    gen = CrossTokenizerGenerator(LocalTopKBase(base, t1, k=k), t1, e, a, t2)
    outs = gen.generate([prompt] * n, batch_size=n, max_new_tokens=1, fusion_params={"alpha": 1.0},
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    drawn = [o.base_token_ids[0] for o in outs]
    freq = np.asarray([drawn.count(i) / n for i in ids])
    assert set(drawn) <= {i for i, kp in zip(ids, keep) if kp}  # nothing outside top-k / the nucleus
    assert (np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9).all(), (freq, p)
    assert (p > 0).sum() >= 2  # a real distribution, not one token


def test_generate_cli_cross_tokenizer_batched_sampling(world, tmp_path):
    """``--cross-tokenizer`` with --batch-size / --temperature / --top-k / --seed / --stop == the library call."""
    import json
    from conftest import write_jsonl
    from proxytune_jax import cli, save_pretrained
    t1, t2, base, e, a = world
    dirs = {}
    for name, m, tok in (("base", base, t1), ("expert", e, t2), ("anti", a, t2)):
        save_pretrained(m, tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": p} for p in MORE_PROMPTS])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--cross-tokenizer", "--target", dirs["base"], "--expert", dirs["expert"], "--anti-expert",
            dirs["anti"], "--prompts", prompts, "--max-new-tokens", N_NEW, "--alpha", 1.0, "--output", out,
            "--batch-size", 2, "--temperature", 0.9, "--top-k", 5, "--seed", 3, "--base-topk", 8, "--stop", "e"]
    assert cli.main([str(x) for x in argv]) == 0
    ref = CrossTokenizerGenerator(LocalTopKBase(base, t1, k=8), t1, e, a, t2).generate(
        MORE_PROMPTS, max_new_tokens=N_NEW, fusion_params={"alpha": 1.0}, temperature=0.9, top_k=5, seed=3,
        stop_strings=["e"])
    assert [json.loads(x) for x in out.read_text().splitlines()] == [r.to_json() for r in ref]


def test_toyworld_second_tokenizer_is_a_deterministic_round_tripping_bpe():
    """``toyworld.bpe_pair.train_bpe_tokenizer``: the same texts give the same tokenizer; every world text (and
    the text that follows a prompt, with its leading space) round-trips; it segments differently from the
    world's word-level tokenizer (some words take several tokens)."""
    from proxytune_jax.toyworld.bpe_pair import train_bpe_tokenizer
    from proxytune_jax.toyworld.build import tokenizer_texts
    from proxytune_jax.toyworld.tokenizer import train_tokenizer
    from proxytune_jax.toyworld.world import WorldConfig, build_world
    w = build_world(WorldConfig(num_people=60, corpus_docs=200, tune_examples=40, eval_questions=8, seed=3))
    texts = tokenizer_texts(w)
    a, b = train_bpe_tokenizer(texts), train_bpe_tokenizer(texts)
    assert a.get_vocab() == b.get_vocab() and len(a) == 320
    for t in texts[:50] + [" " + q.answer for q in w.heldout] + ["how many coins ? é"]:
        ids = a(t, add_special_tokens=False)["input_ids"]
        assert a.decode(ids) == t
    words = train_tokenizer(texts)
    q = w.heldout[0].question
    assert len(a(q)["input_ids"]) > len(words(q)["input_ids"])  # names split into pieces
    assert a(q)["input_ids"][0] == a.bos_token_id and a.chat_template == words.chat_template


def test_alpha_gate_in_a_batch(world):
    """The gate reads the pair's distributions over each row's candidates: a gate that never opens is α = 0
    (the base's greedy decoding), one that always opens is constant α."""
    from proxytune_jax.decoding.alpha_control import control_params
    t1, t2, base, e, a = world
    gen = CrossTokenizerGenerator(LocalTopKBase(base, t1, k=8), t1, e, a, t2)
    kw = dict(max_new_tokens=N_NEW, batch_size=3)
    ids = lambda outs: [o.base_token_ids for o in outs]  # noqa: E731
    shut = gen.generate(MORE_PROMPTS[:3], fusion_params={"alpha": 1.0, **control_params(gate="entropy:1e9")}, **kw)
    assert ids(shut) == ids(gen.generate(MORE_PROMPTS[:3], fusion_params={"alpha": 0.0}, **kw))
    open_ = gen.generate(MORE_PROMPTS[:3], fusion_params={"alpha": 1.0, **control_params(gate="disagreement:0")},
                         **kw)
    assert ids(open_) == ids(gen.generate(MORE_PROMPTS[:3], fusion_params={"alpha": 1.0}, **kw)) != ids(shut)
