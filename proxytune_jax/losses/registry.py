"""``LOSSES``: the one table of distillation losses, each entry declaring what it needs and its hyperparameters.

An entry (``LossSpec``) says

- ``fn``: the reduced loss ``fn(student_logits [..., V], teacher, mask [...] | None, **hyper) -> scalar`` (the
  mean over valid positions; ``labels`` as a keyword where ``uses_labels``);
- ``per_position``: its unreduced twin ``[...]`` for the memory-lean ``chunked_loss`` (``None`` for losses that
  couple positions, such as the batch-wise SinKD);
- ``teacher``: what the teacher side must provide -- ``"logits"`` (full ``[..., V]`` logits), ``"topk"`` (a
  top-k teacher: the shared ``proxytune_jax.topk.TopK`` of ids + full-vocabulary log-probs, tail implied),
  ``"sparse"`` (a sparse target distribution, also a ``TopK``) or ``"prior_posterior"`` (the Bayesian KD pair
  of ``TopK``);
- ``hyperparameters``: every hyperparameter by name with its default. ``resolve(overrides)`` returns the
  defaults updated by ``overrides`` after checking each name and type; a value the caller does not set keeps
  the loss's own default (SinKD's ``temperature`` stays 2.0 unless set for SinKD).

Adding a loss for an ablation is one function plus one ``register_loss(LossSpec(...))`` call, from any
script: nothing is found by reflection.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import MappingProxyType
from typing import Any, Callable, Mapping

from proxytune_jax.errors import UserError
from proxytune_jax.losses import bayesian as B
from proxytune_jax.losses import divergences as D
from proxytune_jax.losses import first as F
from proxytune_jax.losses import taid as TA
S = importlib.import_module("proxytune_jax.losses.sinkd")  # the package's `sinkd` attribute is the loss function

TEACHER_KINDS = ("logits", "topk", "sparse", "prior_posterior")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One distillation loss and everything a caller needs to know to call it (see the module docstring)."""

    name: str
    fn: Callable
    hyperparameters: Mapping[str, Any]
    teacher: str = "logits"
    per_position: Callable | None = None
    uses_labels: bool = False
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # str hyperparameters' values
    summary: str = ""

    def __post_init__(self):
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"LossSpec {self.name}: teacher must be one of {TEACHER_KINDS}, got {self.teacher!r}")
        object.__setattr__(self, "hyperparameters", MappingProxyType(dict(self.hyperparameters)))

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict:
        """The loss's hyperparameters: its declared defaults, updated by ``overrides`` (names and types
        checked; an int is accepted for a float, a bool never for a number)."""
        out = dict(self.hyperparameters)
        for key, value in dict(overrides or {}).items():
            if key not in self.hyperparameters:
                known = ", ".join(self.hyperparameters) or "none"
                raise UserError(f"loss {self.name} has no hyperparameter {key!r}; its hyperparameters are: {known}")
            out[key] = _checked(self.name, key, self.hyperparameters[key], value, self.choices.get(key))
        return out


def _checked(loss: str, key: str, default: Any, value: Any, choices: tuple | None) -> Any:
    where = f"loss {loss}, hyperparameter {key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            if float(value).is_integer():
                return int(value)
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return float(value) if isinstance(default, float) else value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        if choices and value not in choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return value
    return value


_TAU = {"temperature": 1.0}


def _label_cross_entropy(student_logits, teacher_logits, mask=None, *, labels, temperature=1.0):
    """The cross-entropy of the row's own tokens (the teacher's logits unused): on rows the teacher wrote,
    sequence-level KD (Kim & Rush 2016)."""
    del teacher_logits
    return D.cross_entropy(student_logits, labels, mask, temperature=temperature)


def _label_cross_entropy_per_position(student_logits, teacher_logits, *, labels, temperature=1.0):
    del teacher_logits
    return D.cross_entropy_per_position(student_logits, labels, temperature=temperature)


_TABLE = [
    LossSpec("forward_kl", D.forward_kl, _TAU, per_position=D.forward_kl_per_position,
             summary="KL(p‖q), mean-seeking (classic KD)"),
    LossSpec("reverse_kl", D.reverse_kl, _TAU, per_position=D.reverse_kl_per_position,
             summary="KL(q‖p), mode-seeking (MiniLLM)"),
    LossSpec("js_divergence", D.js_divergence, _TAU, per_position=D.js_divergence_per_position,
             summary="½KL(p‖M) + ½KL(q‖M), M = (p+q)/2"),
    LossSpec("tv_distance", D.tv_distance, _TAU, per_position=D.tv_distance_per_position,
             summary="½ Σ|p − q|"),
    LossSpec("skew_forward_kl", D.skew_forward_kl, {"temperature": 1.0, "alpha": 0.1},
             per_position=D.skew_forward_kl_per_position, summary="KL(p ‖ αp + (1−α)q) (DistiLLM)"),
    LossSpec("skew_reverse_kl", D.skew_reverse_kl, {"temperature": 1.0, "alpha": 0.1},
             per_position=D.skew_reverse_kl_per_position, summary="KL(q ‖ (1−α)p + αq) (DistiLLM)"),
    LossSpec("generalized_jsd", D.generalized_jsd, {"temperature": 1.0, "beta": 0.5},
             per_position=D.generalized_jsd_per_position, summary="β·KL(p‖M) + (1−β)·KL(q‖M) (GKD)"),
    LossSpec("adaptive_kl", D.adaptive_kl, {"temperature": 1.0, "mu": 0.5},
             per_position=D.adaptive_kl_per_position, summary="head/tail-weighted FKL + RKL (AKL)"),
    LossSpec("hinton_kd", D.hinton_kd, {"temperature": 1.0, "alpha": 0.5}, per_position=D.hinton_kd_per_position,
             uses_labels=True, summary="α·τ²·KL(p_τ‖q_τ) + (1−α)·CE (Hinton et al. 2015)"),
    LossSpec("uld", D.uld, _TAU, per_position=D.uld_per_position,
             summary="Σ|sort(q) − sort(p)| (ULD; vocabularies may differ)"),
    LossSpec("uld_kd", D.uld_kd, {"temperature": 1.0, "weight": 1.5}, per_position=D.uld_kd_per_position,
             uses_labels=True, summary="CE + λ·ULD (Boizard et al. 2024)"),
    LossSpec("cross_entropy", _label_cross_entropy, _TAU, per_position=_label_cross_entropy_per_position,
             uses_labels=True, summary="CE of the row's tokens: sequence-level KD on teacher-written rows"),
    LossSpec("taid", TA.taid_loss, {"t": 0.4, "temperature": 1.0}, per_position=TA.taid_per_position,
             summary="H(p_t, q), p_t = softmax((1−t)·sg(s) + t·z) (TAID; the taid objective schedules t)"),
    LossSpec("sinkd", S.sinkd, {"temperature": 2.0, "epsilon": 0.1, "num_iters": 20, "weight": 0.001},
             summary="batch-wise Sinkhorn distance, released-code form (SinKD, Cui et al. 2024)"),
    LossSpec("sinkhorn_ott", S.sinkhorn_ott, {"temperature": 2.0, "epsilon": 0.1, "weight": 1.0, "threshold": 1e-4,
                                              "max_iterations": 2000, "implicit_diff": False},
             summary="batch-wise Sinkhorn distance solved by ott-jax to convergence"),
    LossSpec("topk_kl", F.topk_kl, {"temperature": 1.0, "mode": "renormalize"}, teacher="topk",
             per_position=F.topk_kl_per_position, choices={"mode": F.MODES},
             summary="KL(t‖s) over a top-k teacher (FIRST); temperature calibrates the teacher"),
    LossSpec("sparse_kl", B.sparse_kl, _TAU, teacher="sparse", per_position=B.sparse_kl_per_position,
             summary="KL(target‖q) for a sparse target distribution"),
    LossSpec("bayesian_kd", B.bayesian_kd, {"temperature": 1.0, "alpha": 0.5, "beta": 0.5},
             teacher="prior_posterior", uses_labels=True,
             summary="CE + α·KL(prior‖q) + β·KL(posterior‖q) (Bayesian KD from a closed-source teacher)"),
]

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _TABLE}


def register_loss(spec: LossSpec, *, replace: bool = False) -> LossSpec:
    """Add ``spec`` to ``LOSSES`` (an existing name only with ``replace=True``). Returns ``spec``."""
    if not isinstance(spec, LossSpec):
        raise TypeError(f"register_loss takes a LossSpec, got {type(spec).__name__}")
    if spec.name in LOSSES and not replace:
        raise UserError(f"a loss named {spec.name!r} is already registered; pick another name or pass replace=True")
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str, *, teacher: str | None = None, per_position: bool = False) -> LossSpec:
    """The ``LossSpec`` called ``name``; ``teacher`` / ``per_position`` restrict to losses that fit a caller
    (UserError listing the ones that do)."""
    fits = {k: s for k, s in LOSSES.items()
            if (teacher is None or s.teacher == teacher) and (not per_position or s.per_position is not None)}
    if name not in fits:
        what = "" if name not in LOSSES else (
            f" (it needs a {LOSSES[name].teacher} teacher)" if teacher and LOSSES[name].teacher != teacher
            else " (it has no per-position form)")
        raise UserError(f"loss {name!r} cannot be used here{what}; choose one of: {', '.join(sorted(fits))}")
    return fits[name]


def per_position_losses() -> dict[str, Callable]:
    """Name -> per-position function of every entry that has one (what ``chunked_loss`` accepts by name)."""
    return {k: s.per_position for k, s in LOSSES.items() if s.per_position is not None}


__all__ = ["LOSSES", "LossSpec", "TEACHER_KINDS", "get_loss", "per_position_losses", "register_loss"]
