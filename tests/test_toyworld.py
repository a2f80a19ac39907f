"""The toy world's generator, tokenizer, token arrays and distillation objectives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxytune_jax import losses
from proxytune_jax.eval import extract_answer
from proxytune_jax.toyworld.data import concat, encode_corpus, encode_instructions
from proxytune_jax.toyworld.distill import METHODS, SINKD_ROWS
from proxytune_jax.toyworld.tokenizer import train_tokenizer
from proxytune_jax.toyworld.world import WorldConfig, build_world

CFG = WorldConfig(num_people=40, corpus_docs=200, tune_examples=50, eval_questions=20, seed=3)


@pytest.fixture(scope="module")
def world():
    return build_world(CFG)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(list(world.corpus) + [q.question + " " + q.answer for q in world.tune + world.heldout])


def test_world_is_deterministic_and_consistent(world):
    again = build_world(CFG)
    assert again.corpus == world.corpus and again.heldout == world.heldout
    assert set(world.tune_people).isdisjoint(world.heldout_people)
    assert set(world.tune_people) | set(world.heldout_people) == set(world.coins)
    for q in world.tune:
        assert set(q.names) <= set(world.tune_people)
    for q in world.heldout:
        assert set(q.names) <= set(world.heldout_people)
    for q in world.tune + world.heldout:
        assert extract_answer(q.answer) == str(q.target) == str(sum(world.coins[n] for n in q.names))
        assert "####" not in q.question
    text = " ".join(world.corpus)
    for person, n in world.coins.items():  # every held-out fact is in the raw corpus, with the right count
        assert person in text
        assert f"{person} has {n} coins" in text  # the very words of the worked answers
    for q in world.heldout:  # a worked answer repeats the raw statements, then adds the sum and "#### N" lines
        for name in q.names:
            assert f"{name} has {world.coins[name]} coins ." in q.answer
    assert all(len(p.split()) == 2 for p in world.coins)  # two-token names: a fact is keyed by a token pair
    assert build_world(WorldConfig(**{**CFG.__dict__, "seed": 4})).coins != world.coins


def test_tokenizer_round_trips_and_saves(world, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    for text in list(world.corpus[:20]) + [q.answer for q in world.heldout]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><|user|> hi <|assistant|>"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    q = world.heldout[0]
    assert loaded(q.question + " " + q.answer)["input_ids"] == tokenizer(q.question + " " + q.answer)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template and loaded.padding_side == "left"


def test_instruction_rows_train_only_the_response(world, tokenizer):
    rows = encode_instructions(tokenizer, world.tune[:8])
    for i, q in enumerate(world.tune[:8]):
        ids, attn, loss = rows["input_ids"][i], rows["attention_mask"][i], rows["loss_mask"][i]
        assert np.all(loss <= attn)
        trained = ids[loss > 0].tolist()
        want = tokenizer(q.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert trained == want
        real = ids[attn > 0].tolist()
        assert real[0] == tokenizer.bos_token_id and "<|assistant|>" in tokenizer.decode(real)
    corpus = encode_corpus(tokenizer, world.corpus[:5])
    both = concat(rows, corpus)
    assert both["input_ids"].shape[0] == 13
    assert both["attention_mask"].sum() == rows["attention_mask"].sum() + corpus["attention_mask"].sum()
    assert np.all(both["attention_mask"][:, -1] == 1)  # still left-padded


@pytest.fixture(scope="module")
def tiny_batch(tokenizer, world):
    """A tiny student and a batch of 2 gold + 2 transfer rows carrying every signal the table's objectives
    read (random teacher logits, their top-5, a uniform prior)."""
    from proxytune_jax.models import init_model, small_llama_config
    from proxytune_jax.toyworld.distill import _pad_last_position

    cfg = small_llama_config(len(tokenizer), 16, 1, 2, tie_word_embeddings=True)
    model = init_model(cfg, seed=0)
    rows = encode_instructions(tokenizer, world.tune[:4])
    rng = np.random.default_rng(0)
    b, t = rows["input_ids"].shape
    v = len(tokenizer)
    teacher = rng.normal(size=(b, t - 1, v)).astype(np.float32) * 2
    top = losses.topk_from_logits(jnp.asarray(teacher), k=5)
    s = 5
    rows.update(ce_rows=np.array([1, 1, 0, 0], np.int32), kd_rows=np.array([0, 0, 1, 1], np.int32),
                teacher_logits=teacher,
                topk_ids=_pad_last_position(np.asarray(top.ids, np.int32), np.arange(5, dtype=np.int32)),
                topk_logp=_pad_last_position(np.asarray(top.logp), -np.log(5.0)),
                prior_ids=np.tile(np.arange(s, dtype=np.int32), (b, t, 1)),
                prior_probs=np.full((b, t, s), 1.0 / s, np.float32))
    return model, {k: jnp.asarray(x) for k, x in rows.items()}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "bayesian"])
def test_table_objectives_are_ce_on_gold_plus_the_method_on_transfer_rows(tiny_batch, method):
    """Each row of the distillation table = CE over the gold rows' response tokens + the method's term over the
    transfer rows', each a mean over its own tokens -- recomputed here from the losses by hand."""
    from flax import nnx
    from proxytune_jax.toyworld.distill import METHOD_TABLE, _rows_for

    model, batch = tiny_batch
    graphdef, state = nnx.split(model)
    objective = METHOD_TABLE[method][0](0.7)
    rows = {k: jnp.asarray(v) for k, v in _rows_for(method, {k: np.asarray(x) for k, x in batch.items()}).items()}
    loss, metrics = objective.loss_fn(graphdef, {})(nnx.to_pure_dict(state), {}, rows, jax.random.PRNGKey(0), {})
    logits, _ = model(batch["input_ids"], batch["attention_mask"])
    s = logits[:, :-1]
    m = (batch["loss_mask"][:, 1:] > 0) & (batch["attention_mask"][:, 1:] > 0)
    gold, tr = m & (batch["ce_rows"][:, None] > 0), m & (batch["kd_rows"][:, None] > 0)
    labels = batch["input_ids"][:, 1:]
    t = batch["teacher_logits"]
    ce_gold = losses.cross_entropy(s, labels, gold)
    teacher = losses.TopKTeacher(batch["topk_ids"][:, :-1], batch["topk_logp"][:, :-1])
    term = {
        "seq_kd": lambda: losses.cross_entropy(s, labels, tr),
        "word_kd": lambda: losses.forward_kl(s, t, tr),
        "reverse_kl": lambda: losses.reverse_kl(s, t, tr),
        "js": lambda: losses.js_divergence(s, t, tr),
        "tvd": lambda: losses.tv_distance(s, t, tr),
        "generalized_jsd": lambda: losses.generalized_jsd(s, t, tr, beta=0.1),
        "sinkd": lambda: (0.5 * losses.forward_kl(s, t, tr) + 0.5 * losses.cross_entropy(s, labels, tr)
                          + 0.8 * losses.sinkd(s[:SINKD_ROWS], t[:SINKD_ROWS], tr[:SINKD_ROWS], weight=0.0008)),
        "first_top5": lambda: losses.topk_kl(s, teacher, tr, temperature=0.7),
        "first_top5_tau1": lambda: losses.topk_kl(s, teacher, tr, temperature=1.0),
    }
    want = losses.cross_entropy(s[:2], labels[:2], m[:2]) if method == "sft_gold" else ce_gold + term[method]()
    assert np.isfinite(float(loss)) and float(loss) > 0
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5)


def test_bayesian_table_objective_adds_gold_ce_to_the_bayesian_term(tiny_batch):
    """The Bayesian row: CE on gold rows + bayesian_kd on transfer rows (posterior from proxy samples in the
    step: a proxy equal to the student here, so the check is of the composition, with the same samples)."""
    from flax import nnx
    from proxytune_jax.training.objectives import Bayesian

    model, batch = tiny_batch
    graphdef, state = nnx.split(model)
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask", "ce_rows", "kd_rows", "prior_ids",
                                  "prior_probs")}
    objective = Bayesian(posterior_bins=8, posterior_samples=4)
    loss, metrics = objective.loss_fn(graphdef, {})(nnx.to_pure_dict(state), {}, rows, jax.random.PRNGKey(3), {})
    logits, _ = model(batch["input_ids"], batch["attention_mask"])
    s = logits[:, :-1]
    m = (batch["loss_mask"][:, 1:] > 0) & (batch["attention_mask"][:, 1:] > 0)
    gold, tr = m & (batch["ce_rows"][:, None] > 0), m & (batch["kd_rows"][:, None] > 0)
    labels = batch["input_ids"][:, 1:]
    prior = losses.SparseDist(batch["prior_ids"][:, 1:], batch["prior_probs"][:, 1:])
    samples = losses.sample_proxy_tokens(jax.random.PRNGKey(3), jax.lax.stop_gradient(s), 4)
    post = losses.posterior_estimate(prior, samples, num_bins=8)
    want = losses.cross_entropy(s, labels, gold) + losses.bayesian_kd(s, labels, prior, post, tr)
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["ce"]), float(losses.cross_entropy(s, labels, gold)), rtol=2e-5)
    # the same posterior handed over with the data (computed once, offline): the same loss, no sampling
    offline = dict(rows, posterior_ids=post.ids, posterior_probs=post.probs)
    loss2, _ = objective.loss_fn(graphdef, {})(nnx.to_pure_dict(state), {}, offline, jax.random.PRNGKey(99), {})
    np.testing.assert_allclose(float(loss2), float(want), rtol=2e-5)


def test_world_cache_digest_follows_the_numerics(monkeypatch):
    """A world trained under another compute path or older attention numerics is not reused."""
    from proxytune_jax.models import attention, backend
    from proxytune_jax.toyworld.build import ToyWorldConfig

    cfg = ToyWorldConfig()
    here = cfg.digest()
    assert ToyWorldConfig().digest() == here  # deterministic
    with backend.force("portable" if backend.current() != "portable" else "cpu"):
        assert cfg.digest() != here
    monkeypatch.setattr(attention, "NUMERICS_VERSION", attention.NUMERICS_VERSION + 1)
    assert cfg.digest() != here
