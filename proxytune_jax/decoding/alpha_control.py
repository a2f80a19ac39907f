"""Per-token α: a schedule over generated tokens and a gate on the small pair's uncertainty.

Proxy-tuning adds ``α·(log p_E − log p_A)`` at every step with one α. Here α may change with ``t``, the number of
tokens generated so far (0 for the first generated token), and may be switched off per row where the small
pair is confident:

    α_t = α                                  schedule "constant"
    α_t = α · max(0, 1 − t / END)            schedule "linear:END"   (α at the first token, 0 from token END on)
    α_t = α if t < K else ALPHA2             schedule "step:K:ALPHA2"

    gate "entropy:THRESH"        α_t applied where H(p_E) ≥ THRESH (nats), else 0 (the base alone)
    gate "disagreement:THRESH"   α_t applied where KL(p_E ‖ p_A) ≥ THRESH (nats), else 0

All five numbers are ordinary traced fusion hyperparameters (:data:`PARAMS`, floats; kinds are coded 0/1/2), so
changing a schedule or a threshold never recompiles and a sweep over them is one ``jax.vmap``
(``Decoder.generate_sweep``). They are accepted by every rule with an ``alpha`` (proxy_tuning, dexperts) and only
when given: without them a rule computes exactly what it did before. The effective α has shape ``[B, 1]``
(per row), which the rules broadcast over the vocabulary.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from proxytune_jax.errors import UserError

SCHEDULES = {"constant": 0, "linear": 1, "step": 2}
GATES = {"none": 0, "entropy": 1, "disagreement": 2}
# name -> default; all float32 traced values
PARAMS = {"alpha_schedule": 0.0, "alpha_schedule_n": 1.0, "alpha_after": 0.0, "alpha_gate": 0.0,
          "alpha_gate_threshold": 0.0}


def _number(text: str, what: str, example: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a number; e.g. {example}") from None
    if not math.isfinite(x):
        raise UserError(f"{what}: {text!r} is not finite; e.g. {example}")
    return x


def parse_schedule(spec: str | None) -> dict[str, float]:
    """``constant`` | ``linear:END`` | ``step:K:ALPHA2`` -> the schedule's params (empty for None)."""
    if spec is None:
        return {}
    parts = spec.split(":")
    kind = parts[0]
    usage = "constant, linear:END (e.g. linear:16) or step:K:ALPHA2 (e.g. step:4:0.5)"
    if kind not in SCHEDULES:
        raise UserError(f"--alpha-schedule {spec!r}: unknown schedule {kind!r}; use {usage}")
    want = {"constant": 1, "linear": 2, "step": 3}[kind]
    if len(parts) != want:
        raise UserError(f"--alpha-schedule {spec!r}: {kind} takes {want - 1} number(s); use {usage}")
    out = {"alpha_schedule": float(SCHEDULES[kind])}
    if kind == "linear":
        end = _number(parts[1], f"--alpha-schedule {spec!r}", "linear:16")
        if end <= 0:
            raise UserError(f"--alpha-schedule {spec!r}: END must be > 0 tokens, e.g. linear:16")
        out["alpha_schedule_n"] = end
    elif kind == "step":
        k = _number(parts[1], f"--alpha-schedule {spec!r}", "step:4:0.5")
        if k < 0:
            raise UserError(f"--alpha-schedule {spec!r}: K must be >= 0 tokens, e.g. step:4:0.5")
        out["alpha_schedule_n"] = k
        out["alpha_after"] = _number(parts[2], f"--alpha-schedule {spec!r}", "step:4:0.5")
    return out


def parse_gate(spec: str | None) -> dict[str, float]:
    """``none`` | ``entropy:THRESH`` | ``disagreement:THRESH`` (nats) -> the gate's params (empty for None)."""
    if spec is None:
        return {}
    kind, sep, rest = spec.partition(":")
    usage = "entropy:THRESH (e.g. entropy:1.0) or disagreement:THRESH (e.g. disagreement:0.5), in nats"
    if kind not in GATES:
        raise UserError(f"--alpha-gate {spec!r}: unknown gate {kind!r}; use {usage}")
    if kind == "none":
        return {"alpha_gate": 0.0}
    if not sep:
        raise UserError(f"--alpha-gate {spec!r}: give a threshold; use {usage}")
    thr = _number(rest, f"--alpha-gate {spec!r}", f"{kind}:0.5")
    if thr < 0:
        raise UserError(f"--alpha-gate {spec!r}: the threshold is >= 0 nats")
    return {"alpha_gate": float(GATES[kind]), "alpha_gate_threshold": thr}


def control_params(schedule: str | None = None, gate: str | None = None) -> dict[str, float]:
    """All of :data:`PARAMS` filled (so every call shares one pytree structure) when either is given, else {}."""
    given = {**parse_schedule(schedule), **parse_gate(gate)}
    return {**PARAMS, **given} if given else {}


def is_active(params: Mapping) -> bool:
    return any(k in params for k in PARAMS)


def schedule_alpha(alpha, params: Mapping, step) -> jax.Array:
    """α_t for generated-token index ``step`` (traced scalar int): ``[]`` or α's shape."""
    t = jnp.asarray(step, jnp.float32)
    kind = params["alpha_schedule"]
    n = params["alpha_schedule_n"]
    linear = alpha * jnp.maximum(0.0, 1.0 - t / jnp.maximum(n, 1e-6))
    stepped = jnp.where(t < n, alpha, params["alpha_after"])
    return jnp.where(kind == 1, linear, jnp.where(kind == 2, stepped, alpha))


def gate_mask(expert_logp: jax.Array, anti_logp: jax.Array, params: Mapping) -> jax.Array:
    """``[B]`` bool: rows where α applies. Log-probs ``[B, V]`` (``-inf`` allowed)."""
    p_e = jnp.exp(expert_logp)
    safe_e = jnp.where(p_e > 0, expert_logp, 0.0)
    entropy = -jnp.sum(jnp.where(p_e > 0, p_e * safe_e, 0.0), axis=-1)
    diff = jnp.where(p_e > 0, safe_e - jnp.where(p_e > 0, anti_logp, 0.0), 0.0)
    kl = jnp.sum(jnp.where(p_e > 0, p_e * diff, 0.0), axis=-1)  # +inf where p_A = 0 < p_E
    kind, thr = params["alpha_gate"], params["alpha_gate_threshold"]
    return jnp.where(kind == 1, entropy >= thr, jnp.where(kind == 2, kl >= thr, True))


def effective_alpha(params: Mapping, expert_logp: jax.Array, anti_logp: jax.Array, step) -> jax.Array:
    """``[B, 1]`` per-row α at generated-token index ``step``: the schedule's α_t where the gate is open, else 0."""
    a_t = schedule_alpha(jnp.asarray(params["alpha"], jnp.float32), params, step)
    open_ = gate_mask(expert_logp, anti_logp, params)
    return jnp.where(open_, a_t, 0.0)[:, None]


def describe(params: Mapping) -> str:
    """Human-readable form of concrete control params (for tables)."""
    if not is_active(params):
        return "constant"
    kind = int(params["alpha_schedule"])
    n = float(params["alpha_schedule_n"])
    s = ["constant", f"linear:{n:g}", f"step:{n:g}:{float(params['alpha_after']):g}"][kind]
    g = int(params["alpha_gate"])
    if g:
        s += f" + {['', 'entropy', 'disagreement'][g]}≥{float(params['alpha_gate_threshold']):g}"
    return s


__all__ = ["GATES", "PARAMS", "SCHEDULES", "control_params", "describe", "effective_alpha", "gate_mask",
           "is_active", "parse_gate", "parse_schedule", "schedule_alpha"]
