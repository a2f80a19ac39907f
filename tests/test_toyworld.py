"""The toy world's generator, tokenizer, token arrays and distillation objectives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxytune_jax import losses
from proxytune_jax.eval import extract_answer
from proxytune_jax.toyworld.data import concat, encode_corpus, encode_instructions
from proxytune_jax.toyworld.distill import METHODS, SINKD_ROWS, objective
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
    from proxytune_jax.models import LlamaConfig, init_model

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = init_model(cfg, seed=0)
    rows = encode_instructions(tokenizer, world.tune[:4])
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    rng = np.random.default_rng(0)
    b, t = rows["input_ids"].shape
    v = len(tokenizer)
    teacher = rng.normal(size=(b, t - 1, v)).astype(np.float32) * 2
    top = losses.topk_from_logits(jnp.asarray(teacher), k=5)
    batch.update(teacher_logits=jnp.asarray(teacher), topk_ids=top.ids, topk_logp=top.logp)
    s = 5
    batch.update(prior_ids=jnp.asarray(np.tile(np.arange(s, dtype=np.int32), (b, t - 1, 1))),
                 prior_probs=jnp.full((b, t - 1, s), 1.0 / s, jnp.float32),
                 post_ids=jnp.asarray(np.tile(np.arange(s, dtype=np.int32) + 3, (b, t - 1, 1))),
                 post_probs=jnp.full((b, t - 1, s), 1.0 / s, jnp.float32))
    return model, batch


@pytest.mark.parametrize("method", METHODS)
def test_objectives_match_the_library_losses(tiny_batch, method):
    from flax import nnx

    model, batch = tiny_batch
    graphdef, state = nnx.split(model)
    loss, metrics = objective(method, graphdef, first_temperature=0.7)(state, None, batch, jax.random.PRNGKey(0), {})
    logits, _ = model(batch["input_ids"], batch["attention_mask"])
    s = logits[:, :-1]
    m = (batch["loss_mask"][:, 1:] > 0) & (batch["attention_mask"][:, 1:] > 0)
    labels = batch["input_ids"][:, 1:]
    t = batch["teacher_logits"]
    ce = losses.cross_entropy(s, labels, m)
    want = {
        "sft": ce,
        "forward_kl": losses.forward_kl(s, t, m),
        "reverse_kl": losses.reverse_kl(s, t, m),
        "js": losses.js_divergence(s, t, m),
        "tvd": losses.tv_distance(s, t, m),
        "generalized_jsd": losses.generalized_jsd(s, t, m, beta=0.1),
        "sinkd": (0.5 * losses.forward_kl(s, t, m) + 0.5 * ce
                  + 0.8 * losses.sinkd(s[:SINKD_ROWS], t[:SINKD_ROWS], m[:SINKD_ROWS], weight=0.0008)),
        "first_top5": losses.topk_kl(s, losses.TopKTeacher(batch["topk_ids"], batch["topk_logp"]), m,
                                     temperature=0.7),
        "first_top5_tail": losses.topk_kl(s, losses.TopKTeacher(batch["topk_ids"], batch["topk_logp"]), m,
                                          temperature=0.7, mode="tail_bucket"),
        "bayesian": losses.bayesian_kd(s, labels, losses.SparseDist(batch["prior_ids"], batch["prior_probs"]),
                                       losses.SparseDist(batch["post_ids"], batch["post_probs"]), m),
    }[method]
    assert np.isfinite(float(loss)) and float(loss) > 0
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5)
    assert int(metrics["tokens"]) == int(m.sum())


def test_vmapped_students_train_like_separate_runs(tiny_batch):
    """Stacking seeds under vmap must not couple them (e.g. through global-norm clipping): seed 1 trained
    alongside seed 0 ends where seed 1 trained alone ends."""
    from proxytune_jax.toyworld.distill import train_students
    from proxytune_jax.toyworld.train import FitConfig

    model, batch = tiny_batch
    from flax import nnx

    graphdef = nnx.split(model)[0]
    data = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask", "teacher_logits")}
    cfg = FitConfig(steps=3, batch_size=2, learning_rate=5e-2, warmup_steps=1)
    loss_fn = objective("forward_kl", graphdef)
    _, both, losses_both = train_students(model, data, loss_fn, cfg, (0, 1), chunk=2, progress=False)
    _, alone, losses_alone = train_students(model, data, loss_fn, cfg, (1,), chunk=3, progress=False)
    assert losses_both.shape == (3, 2) and losses_alone.shape == (3, 1)
    np.testing.assert_allclose(losses_both[:, 1], losses_alone[:, 0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(both), jax.tree.leaves(alone)):
        np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[0], rtol=1e-4, atol=1e-6)
    moved = [float(np.abs(np.asarray(a)[0] - np.asarray(a)[1]).max()) for a in jax.tree.leaves(both)]
    assert max(moved) > 0  # different data orders give different students
