"""``bayesian``: Bayesian KD from a closed-source teacher (the teacher gives text only)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from proxytune_jax.errors import UserError
from proxytune_jax.training.objectives.base import DataContext, Objective
from proxytune_jax.training.objectives.common import (count, frozen_logits, model_logits, row_masks, shifted,
                                                      token_cross_entropy)


class PriorAttacher:
    """Adds the n-gram prior of every token (``prior_ids`` int32 / ``prior_probs`` float32 ``[B, T, S]``; entry
    t is the prior of token t) to a host batch. Each row's real tokens are scored on their own (pads never
    enter a context), matching how the counts were taken from the unpadded corpus."""

    def __init__(self, prior, *, gamma: float = 2.0, support: int = 32):
        self.prior, self.gamma, self.support = prior, gamma, support

    def __call__(self, batch: dict) -> dict:
        ids, attn = batch["input_ids"], batch["attention_mask"] > 0
        B, T = ids.shape
        S = self.support + 1
        out_ids = np.full((B, T, S), -1, np.int32)
        out_p = np.zeros((B, T, S), np.float32)
        for r in range(B):
            real = np.flatnonzero(attn[r])
            if real.size == 0:
                continue
            d = self.prior.prior(ids[r, real], gamma=self.gamma, support=self.support)
            out_ids[r, real], out_p[r, real] = d.ids, d.probs
        return {**batch, "prior_ids": out_ids, "prior_probs": out_p}


@dataclasses.dataclass(frozen=True)
class Bayesian(Objective):
    """``loss = mean_t [CE_t + α·KL(p̂_t ‖ q_t) + β·KL(E(P|M)_t ‖ q_t)]`` (``losses.bayesian_kd``).

    The training data are the teacher's generated texts. The prior ``p̂`` is an ``ngram_n``-gram model counted
    over the training file (blended with the observed label by ``gamma``, ``prior_support`` continuations
    kept), attached to each batch on the host (``prior_ids``/``prior_probs``; in-memory data may carry them
    already). Inside the step ``posterior_samples`` tokens per position are sampled from the proxy model M
    (``proxy``, a frozen model; without one, the student's own stop-gradient logits) and the posterior
    ``E(P | M)`` over ``posterior_bins`` grid values is formed in closed form; in-memory data may instead carry
    a posterior computed once offline (``posterior_ids`` / ``posterior_probs`` ``[B, T-1, S']``, entry t the
    posterior of token t+1), and then no proxy runs in the step. With per-row selectors in the
    batch (``kd_rows`` for the teacher's texts, ``ce_rows`` for gold rows) the loss is the Bayesian term over
    the teacher's rows plus the cross-entropy over the gold rows, each a mean over its own tokens.
    Metrics: ``loss``, ``ce``, ``kl_prior``, ``kl_posterior``, ``tokens``."""

    name: ClassVar[str] = "bayesian"
    proxy: str = ""
    ngram_n: int = 2
    gamma: float = 2.0
    prior_support: int = 32
    posterior_bins: int = 100
    posterior_samples: int = 8
    alpha: float = 0.5
    beta: float = 0.5
    temperature: float = 1.0
    proxy_temperature: float = 1.0

    def validate(self) -> None:
        if self.ngram_n < 1 or self.prior_support < 1 or self.posterior_bins < 2 or self.posterior_samples < 1:
            raise UserError("objective bayesian needs ngram_n >= 1, prior_support >= 1, posterior_bins >= 2 and "
                            "posterior_samples >= 1")
        if self.gamma < 1:
            raise UserError(f"objective.gamma must be >= 1, got {self.gamma}")

    def frozen_models(self):
        return {"proxy": self.proxy} if self.proxy else {}

    def attach(self, data: DataContext):
        if not data.path:
            return None
        from proxytune_jax.losses.bayesian import NgramPrior
        if data.split == "train" or not hasattr(self, "_prior"):
            prior = NgramPrior.from_corpus([e.ids for e in data.examples], n=self.ngram_n)
            object.__setattr__(self, "_prior", prior)  # the eval split scores with the training counts
        return PriorAttacher(self._prior, gamma=self.gamma, support=self.prior_support)

    def loss_fn(self, student, frozen_graphdefs):
        from proxytune_jax.losses.bayesian import (SparseDist, bayesian_kd, posterior_estimate, sample_proxy_tokens,
                                                   sparse_kl)
        proxy_graphdef = frozen_graphdefs.get("proxy")
        o = self

        def loss_fn(params, frozen, batch, rng, state):
            del state
            labels, mask = shifted(batch)
            s = model_logits(student, params, batch)
            prior = SparseDist(batch["prior_ids"][:, 1:], batch["prior_probs"][:, 1:])
            if "posterior_ids" in batch:  # computed offline, once
                posterior = SparseDist(batch["posterior_ids"], batch["posterior_probs"])
            else:
                proxy = (frozen_logits(proxy_graphdef, frozen["proxy"], batch, s.shape[-1])
                         if proxy_graphdef is not None else jax.lax.stop_gradient(s))
                samples = sample_proxy_tokens(rng, proxy, o.posterior_samples, temperature=o.proxy_temperature)
                posterior = jax.lax.stop_gradient(posterior_estimate(prior, samples, num_bins=o.posterior_bins))
            ce_mask, kd_mask = row_masks(batch, mask)
            loss = bayesian_kd(s, labels, prior, posterior, kd_mask, alpha=o.alpha, beta=o.beta,
                               temperature=o.temperature)
            ce = token_cross_entropy(s, labels, ce_mask)
            if "ce_rows" in batch:
                loss = loss + ce
            return loss, {"loss": loss, "ce": ce,
                          "kl_prior": sparse_kl(s, prior, kd_mask, temperature=o.temperature),
                          "kl_posterior": sparse_kl(s, posterior, kd_mask, temperature=o.temperature),
                          "tokens": count(ce_mask | kd_mask)}

        return loss_fn
