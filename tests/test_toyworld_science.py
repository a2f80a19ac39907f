"""The toy world's two claims, checked on the demo's world (seed 0) that the session builds once:
proxy-tuning lifts the large base far above itself, and on the transfer-set regime word-level KD agrees with
the teacher more than SFT on gold does, beyond the spread of 3 seeds and the bootstrap interval.

Not a hard-coded result: the thresholds are the claims themselves (a margin of 0.3 accuracy over the base;
every KD seed above every SFT seed), and the runs are the library's own."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_proxy_tuning_beats_the_large_base_and_the_small_expert(toyworld_default):
    from proxytune_jax.toyworld.proxy import run_proxy_tuning

    tw = toyworld_default
    models = {name: tw.load(name) for name in ("base-small", "base-large", "tuned-small", "tuned-large")}
    pt = run_proxy_tuning(models, tw.tokenizer, list(tw.world.heldout), alphas=(1.0,))
    acc = pt.accuracy
    assert acc["proxy-tuned-large"] > acc["base-large"] + 0.3, acc
    assert acc["proxy-tuned-large"] > acc["tuned-small"] + 0.3, acc


@pytest.mark.slow
def test_word_level_kd_agrees_with_the_teacher_beyond_the_seed_spread(toyworld_default):
    from proxytune_jax.toyworld.distill import DEFAULT_FIT, run_table

    tw = toyworld_default
    table = run_table(tw.load("base-small"), tw.load("tuned-large"), tw.load("tuned-small"), tw.tokenizer, tw.world,
                      methods=("sft_gold", "word_kd"), seeds=(0, 1, 2), fit_config=DEFAULT_FIT, n_boot=500,
                      progress=False)
    kd, sft = (table["methods"][m]["agreement"]["per_seed"] for m in ("word_kd", "sft_gold"))
    assert min(kd) > max(sft), (kd, sft)
    lo, hi = table["differences"]["word_kd - sft_gold"]["agreement"]["ci95"]
    assert lo > 0, (lo, hi)
    # the knowledge itself: teacher-forced recall of the transfer people's coin counts
    kd_f, sft_f = (table["methods"][m]["fact_recall"]["per_seed"] for m in ("word_kd", "sft_gold"))
    assert min(kd_f) > max(sft_f), (kd_f, sft_f)
