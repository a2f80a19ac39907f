"""Multiple-choice scoring by log-likelihood against a row-by-row NumPy computation without padding."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from proxytune_jax.models import init_model, small_llama_config
    from proxytune_jax.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat .", "a dog ran in the park today .", "yes no maybe"])
    cfg = small_llama_config(len(tok), 16, 1, 2, max_positions=32, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return init_model(cfg, seed=1), tok


def reference_score(model, tok, prompt, choice):
    import jax.numpy as jnp

    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    ids = np.array([p + c], np.int32)
    logits, _ = model(jnp.asarray(ids))  # one unpadded row, no mask
    logits = np.asarray(logits[0], np.float64)
    total = 0.0
    for j in range(len(c)):
        row = logits[len(p) + j - 1]
        total += row[c[j]] - (np.log(np.exp(row - row.max()).sum()) + row.max())
    return total, len(c)


def test_multiple_choice_scores_match_unpadded_rows(model_and_tokenizer):
    from proxytune_jax.eval import multiple_choice_accuracy, multiple_choice_scores

    model, tok = model_and_tokenizer
    prompts = ["the cat sat on", "a dog ran"]
    choices = [["the mat .", "yes", "the park today ."], ["in the park today .", "no"]]
    got = multiple_choice_scores(model, tok, prompts, choices)
    got_norm = multiple_choice_scores(model, tok, prompts, choices, length_normalize=True)
    for i, opts in enumerate(choices):
        for j, opt in enumerate(opts):
            want, n = reference_score(model, tok, prompts[i], opt)
            assert got[i][j] == pytest.approx(want, rel=1e-4, abs=1e-4)
            assert got_norm[i][j] == pytest.approx(want / n, rel=1e-4, abs=1e-4)
    gold = [int(np.argmax(s)) for s in got]
    assert multiple_choice_accuracy(got, gold) == 1.0
    assert multiple_choice_accuracy(got, [(g + 1) % len(c) for g, c in zip(gold, choices)]) == 0.0
