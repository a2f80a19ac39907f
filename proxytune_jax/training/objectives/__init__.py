"""Training objectives as first-class strategies (``base.Objective``), registered in one table.

=============================== ============================================================================
name                            what it trains on
=============================== ============================================================================
``sft``                         cross-entropy on the targets (optionally label-smoothed)
``online_distillation``         any full-logit loss of ``losses.LOSSES`` against a frozen teacher in the step
``online_distillation_chunked`` the same without ``[B, T, V]`` logits (hidden states + LM head in chunks)
``offline_logits``              any full-logit loss against teacher logits stored with in-memory data
``offline_topk``                FIRST: a top-k teacher (on-disk cache or arrays), calibrated temperature
``bayesian``                    Bayesian KD: n-gram prior + proxy posterior from a closed-source teacher's text
``taid``                        TAID: an interpolated teacher moving from the student to the teacher (state: t)
``on_policy``                   GKD: outputs sampled from the student in the step with probability λ, any loss
``proxy_tuned_teacher``         the proxy-tuned distribution of (base, expert, anti-expert) as the teacher
=============================== ============================================================================

Add one: subclass ``Objective`` as a frozen dataclass with a ``name`` and a ``loss_fn``, then
``register_objective(MyObjective)`` -- from any script or config file (see the README).
"""
from proxytune_jax.training.objectives.base import (OBJECTIVES, DataContext, LossFn, Objective, get_objective,
                                                    register_objective)
from proxytune_jax.training.objectives.bayesian import Bayesian, PriorAttacher
from proxytune_jax.training.objectives.chunked import OnlineDistillationChunked
from proxytune_jax.training.objectives.common import (LossTerm, model_logits, row_masks, shifted,
                                                      token_cross_entropy)
from proxytune_jax.training.objectives.on_policy import OnPolicyDistillation
from proxytune_jax.training.objectives.online import OfflineLogits, OnlineDistillation
from proxytune_jax.training.objectives.proxy_teacher import ProxyTunedTeacher
from proxytune_jax.training.objectives.sft import SFT
from proxytune_jax.training.objectives.taid import TAID
from proxytune_jax.training.objectives.topk import OfflineTopK

# The registry, in one place.
for _cls in (SFT, OnlineDistillation, OnlineDistillationChunked, OfflineLogits, OfflineTopK, Bayesian, TAID,
             OnPolicyDistillation, ProxyTunedTeacher):
    register_objective(_cls)
del _cls

__all__ = ["OBJECTIVES", "DataContext", "LossFn", "Objective", "get_objective", "register_objective", "SFT",
           "OnlineDistillation", "OnlineDistillationChunked", "OfflineLogits", "OfflineTopK", "Bayesian", "TAID",
           "OnPolicyDistillation", "ProxyTunedTeacher",
           "PriorAttacher", "LossTerm", "model_logits", "row_masks", "shifted", "token_cross_entropy"]
