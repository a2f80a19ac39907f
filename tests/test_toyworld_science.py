"""The toy world's two claims, checked on the demo's world (seed 0) that the session builds once:
proxy-tuning lifts the large base far above itself and above the small expert, and on the transfer-set regime
word-level KD brings the student closer to the teacher on held-out questions than SFT on gold does -- in
KL(teacher‖student) and in recall of the transferred facts -- beyond the spread of 3 seeds and the bootstrap
interval.

Top-1 agreement with the teacher is reported by the demo but not asserted: on this world it does not separate
the two (0.688 ± 0.008 vs 0.688 ± 0.002; see the README). Not a hard-coded result: the thresholds are the
claims themselves (a margin of 0.3 accuracy; every KD seed beyond every SFT seed), the runs the library's own."""
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
def test_word_level_kd_moves_the_student_to_the_teacher_beyond_the_seed_spread(toyworld_default):
    from proxytune_jax.toyworld.distill import DEFAULT_FIT, run_table

    tw = toyworld_default
    table = run_table(tw.load("base-small"), tw.load("tuned-large"), tw.load("tuned-small"), tw.tokenizer, tw.world,
                      methods=("sft_gold", "word_kd"), seeds=(0, 1, 2), fit_config=DEFAULT_FIT, n_boot=500,
                      progress=False)
    per_seed = {k: [table["methods"][m][k]["per_seed"] for m in ("word_kd", "sft_gold")]
                for k in ("kl_teacher_student", "fact_recall")}
    diff = table["differences"]["word_kd - sft_gold"]
    kd, sft = per_seed["kl_teacher_student"]  # the teacher's distribution on held-out answers
    assert max(kd) < min(sft), (kd, sft)
    assert diff["kl_teacher_student"]["ci95"][1] < 0, diff["kl_teacher_student"]
    kd, sft = per_seed["fact_recall"]  # the knowledge itself: the transfer people's coin counts
    assert min(kd) > max(sft), (kd, sft)
    assert diff["fact_recall"]["ci95"][0] > 0, diff["fact_recall"]
