"""``proxy_tuned_teacher``: the student's loss against the proxy-tuned distribution equals a NumPy computation
of ``KL(softmax(log p_M + α·(log p_M+ − log p_M−)) ‖ q)`` from the four models' logits."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import np_log_softmax


@pytest.mark.parametrize("alpha,own_rows", [(1.0, False), (0.5, False), (1.0, True)])
def test_loss_against_the_fused_teacher_matches_numpy(alpha, own_rows):
    """``own_rows``: the base and the anti-expert read their own prompts (another prompt, more padding) with
    the same response in the same columns, as proxy-tuning feeds them the plain prompt."""
    from proxytune_jax.models import init_model, small_llama_config
    from proxytune_jax.training import ProxyTunedTeacher

    small = small_llama_config(50, 32, 2, 4, max_positions=32)
    large = small_llama_config(50, 48, 2, 4, max_positions=32)
    student, base = init_model(small, seed=0), init_model(large, seed=1)
    expert, anti = init_model(small, seed=2), init_model(small, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 50, size=(3, 8)).astype(np.int32)
    attn = np.ones_like(ids)
    attn[0, :2] = 0
    lm = np.zeros_like(ids)
    lm[:, 4:] = 1
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(lm)}
    plain_ids, plain_attn = ids.copy(), attn.copy()
    if own_rows:
        plain_ids[:, :4] = rng.integers(4, 50, size=(3, 4))
        plain_attn[:, :3] = 0
        plain_ids[:, :3] = 0
        for role in ("base", "anti_expert"):
            batch[f"{role}_input_ids"] = jnp.asarray(plain_ids)
            batch[f"{role}_attention_mask"] = jnp.asarray(plain_attn)

    objective = ProxyTunedTeacher(base="b", expert="e", anti_expert="a", rule_params={"alpha": alpha},
                                  ce_weight=0.5)
    objective.validate()
    split = {r: nnx.split(m) for r, m in (("base", base), ("expert", expert), ("anti_expert", anti))}
    sg, sp = nnx.split(student)
    loss_fn = objective.loss_fn(sg, {r: g for r, (g, _) in split.items()})
    loss, metrics = loss_fn(sp, {r: p for r, (_, p) in split.items()}, batch, None, {})

    def logits(m, x=ids, a=attn):
        out, _ = m(jnp.asarray(x), jnp.asarray(a))
        return np.asarray(out[:, :-1], np.float64)

    fused = (np_log_softmax(logits(base, plain_ids, plain_attn))
             + alpha * (np_log_softmax(logits(expert)) - np_log_softmax(logits(anti, plain_ids, plain_attn))))
    lp, lq = np_log_softmax(fused), np_log_softmax(logits(student))
    mask = (lm[:, 1:] > 0) & (attn[:, 1:] > 0) & (attn[:, :-1] > 0)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    ce = -np.take_along_axis(lq, ids[:, 1:, None], axis=-1)[..., 0]
    want_kl, want_ce = kl[mask].mean(), ce[mask].mean()
    np.testing.assert_allclose(float(metrics["forward_kl"]), want_kl, rtol=2e-4)
    np.testing.assert_allclose(float(loss), want_kl + 0.5 * want_ce, rtol=2e-4)


def test_proxy_teacher_refuses_missing_models_and_rules_over_other_roles():
    from proxytune_jax.errors import UserError
    from proxytune_jax.training import ProxyTunedTeacher

    with pytest.raises(UserError, match="objective.anti_expert"):
        ProxyTunedTeacher(base="b", expert="e").validate()
    with pytest.raises(UserError, match="needs a rule over"):
        ProxyTunedTeacher(base="b", expert="e", anti_expert="a", rule="plain").validate()
    with pytest.raises(UserError, match="no hyperparameter"):
        ProxyTunedTeacher(base="b", expert="e", anti_expert="a", rule_params={"beta": 1.0}).validate()
    assert ProxyTunedTeacher(base="b", expert="e", anti_expert="a").frozen_models() == {
        "base": "b", "expert": "e", "anti_expert": "a"}
