"""Fusion rules: per-step pure functions ``(per-model scores, params) -> combined next-token scores``.

Formulas, defaults and paper references: ``docs/methods.md`` §1. Every rule is one function registered by
name in :data:`FUSION_RULES` with the role of each model it takes (in order), whether it reads each model's
**log-probs** (``log_softmax`` of the logits) or its **raw logits**, and its default hyperparameters. Adding a
rule means adding one decorated function.

Conventions (all inputs ``[B, V]`` float32 over the shared vocabulary, outputs ``[B, V]`` float32):

* Hyperparameters arrive as a dict of traced ``jnp`` arrays, never Python floats, so an α sweep reuses
  one compiled program (or is ``jax.vmap``-ed). :func:`resolve_params` fills defaults and checks names.
* ``-inf`` means "impossible". A combination that would produce NaN (``-inf - -inf``, ``0 * -inf``) gives
  ``-inf`` for the first case and drops the term for a zero weight, so masks never turn into NaN.
* The scores need not be normalised: the sampler takes ``softmax`` after its processors/temperature/top-p.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from proxytune_jax.decoding import alpha_control
from proxytune_jax.decoding.sampling import top_p_mask
from proxytune_jax.errors import UserError

NEG_INF = -jnp.inf
Params = Mapping[str, jax.Array]
RuleFn = Callable[[Sequence[jax.Array], Params], jax.Array]


@dataclasses.dataclass(frozen=True)
class FusionRule:
    """A registered rule. ``roles`` names each model the rule takes, in order; ``variadic`` rules (EFT) take
    ``roles[0]`` followed by any number of ``roles[1:]`` groups. ``inputs`` is "logprobs" or "logits"."""

    name: str
    fn: RuleFn
    roles: tuple[str, ...]
    inputs: str
    defaults: Mapping[str, float]
    required: tuple[str, ...] = ()
    variadic: bool = False

    def num_models_ok(self, n: int) -> bool:
        if self.variadic:
            group = len(self.roles) - 1
            return n >= 1 + group and (n - 1) % group == 0
        return n == len(self.roles)

    def __call__(self, scores: Sequence[jax.Array], params: Params) -> jax.Array:
        return self.fn(scores, params)


FUSION_RULES: dict[str, FusionRule] = {}


def register(name: str, *, roles: tuple[str, ...], inputs: str, defaults: Mapping[str, float] | None = None,
             required: tuple[str, ...] = (), variadic: bool = False):
    """Decorator adding a rule function to :data:`FUSION_RULES` under ``name``."""
    if inputs not in ("logprobs", "logits"):
        raise ValueError(f"inputs must be 'logprobs' or 'logits', got {inputs!r}")

    def wrap(fn: RuleFn) -> RuleFn:
        FUSION_RULES[name] = FusionRule(name, fn, tuple(roles), inputs, dict(defaults or {}), tuple(required),
                                        variadic)
        return fn
    return wrap


def get_rule(name: str | FusionRule) -> FusionRule:
    if isinstance(name, FusionRule):
        return name
    if name not in FUSION_RULES:
        raise UserError(f"unknown fusion rule {name!r}; choose one of {sorted(FUSION_RULES)}")
    return FUSION_RULES[name]


def resolve_params(rule: str | FusionRule, params: Mapping[str, object] | None = None) -> dict[str, jax.Array]:
    """Defaults filled in, unknown names refused, values as float32 arrays (``steps`` as int32).

    Concrete (non-traced) values are checked to be finite here, so a bad α fails before any compile."""
    rule = get_rule(rule)
    params = dict(params or {})
    extra = set(alpha_control.PARAMS) if "alpha" in rule.defaults else set()  # per-token α (alpha_control)
    unknown = set(params) - set(rule.defaults) - set(rule.required) - extra
    if unknown:
        hint = ("; a per-token α schedule or gate needs a rule with an alpha (proxy_tuning, dexperts)"
                if unknown & set(alpha_control.PARAMS) else "")
        raise UserError(f"rule {rule.name!r} has no hyperparameter(s) {sorted(unknown)}; it takes "
                        f"{sorted(set(rule.defaults) | set(rule.required))}{hint}")
    missing = [k for k in rule.required if k not in params]
    if missing:
        raise UserError(f"rule {rule.name!r} needs hyperparameter(s) {missing}")
    out = {}
    if alpha_control.is_active(params):  # any one given: all filled, one pytree structure
        params = {**alpha_control.PARAMS, **params}
    for k in sorted(set(rule.defaults) | set(params)):
        v = params.get(k, rule.defaults.get(k))
        dtype = np.int32 if k == "steps" else np.float32
        if not isinstance(v, jax.core.Tracer):  # checked on the host: also inside a jit trace (a fused teacher)
            arr = np.asarray(v, dtype)
            if not np.all(np.isfinite(arr)):
                raise UserError(f"rule {rule.name!r}: hyperparameter {k}={v!r} is not finite; pass a finite number")
            v = jnp.asarray(arr)
        out[k] = v
    return out


def _scaled(weight: jax.Array, term: jax.Array) -> jax.Array:
    """``weight * term`` with a zero weight dropping the term (no ``0 * -inf = NaN``)."""
    return jnp.where(weight == 0, 0.0, weight * term)


def _diff(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a - b`` with ``-inf - -inf`` (a token impossible under both) giving ``-inf``, not NaN."""
    d = a - b
    return jnp.where(jnp.isnan(d), NEG_INF, d)


# ----------------------------------------------------------------------------------------------------------
# Plain decoding of one model.


@register("plain", roles=("model",), inputs="logits")
def plain(scores, params):
    """The model's own logits (the rule used when only a target is given)."""
    (s,) = scores
    return s


# ----------------------------------------------------------------------------------------------------------
# Proxy-tuning family (Liu et al. 2024), on log-probs.


@register("proxy_tuning", roles=("base", "expert", "anti_expert"), inputs="logprobs", defaults={"alpha": 1.0})
def proxy_tuning(logps, params):
    """``log p_M + α·(log p_M+ − log p_M−)`` (α default 1).

    The official code adds raw logits; with log-probs the softmax is identical (each model's logsumexp is a
    per-row constant) and the per-model probabilities stay interpretable."""
    base, expert, anti = logps
    return base + _scaled(params["alpha"], _diff(expert, anti))


@register("eft", roles=("base", "expert", "anti_expert"), inputs="logprobs", required=("weights",),
          variadic=True)
def eft(logps, params):
    """Several experts (EFT-style): ``log p_M + Σ_i w_i·(log p_Ei − log p_Ai)``.

    Models in order ``(base, E_1, A_1, E_2, A_2, ...)``; ``weights`` is a ``[n_pairs]`` array (no default)."""
    base, rest = logps[0], logps[1:]
    w = jnp.atleast_1d(params["weights"])
    if w.shape[0] != len(rest) // 2:
        raise UserError(f"eft: {len(rest) // 2} expert/anti-expert pairs but {w.shape[0]} weights; "
                        "give one weight per pair")
    out = base
    for i in range(len(rest) // 2):
        out = out + _scaled(w[i], _diff(rest[2 * i], rest[2 * i + 1]))
    return out


@register("dexperts", roles=("base", "expert", "anti_expert"), inputs="logprobs",
          defaults={"alpha": 2.0, "filter_p": 0.9})
def dexperts(logps, params):
    """DExperts (Liu et al. 2021): the **base** is top-p-truncated (nucleus ``filter_p``) *before* combining;
    truncated tokens stay ``-inf``: ``where(top_p(p_M), log p_M, -inf) + α·(log p_M+ − log p_M−)``.
    Defaults filter_p 0.9, α 2.0. (Later top-p in the sampler acts on the combined scores as usual.)"""
    base, expert, anti = logps
    kept = jnp.where(top_p_mask(base, params["filter_p"]), base, NEG_INF)
    return kept + _scaled(params["alpha"], _diff(expert, anti))


@register("contrastive", roles=("expert", "amateur"), inputs="logits",
          defaults={"lam": 1.0, "plausibility": 0.1, "amateur_temperature": 1.0})
def contrastive(logits, params):
    """Contrastive decoding (Li et al. 2023): ``log p_E − λ·log p_A`` on the plausible head
    ``V_head = {x : p_E(x) ≥ a·max p_E}`` (``a`` = ``plausibility``), ``-inf`` elsewhere, where
    ``log p_A = log_softmax(s_A / τ_A)`` (τ_A = ``amateur_temperature``). Defaults a 0.1, λ 1.0, τ_A 1.0.
    Takes raw logits because of the amateur temperature."""
    s_e, s_a = logits
    lp_e = jax.nn.log_softmax(s_e, axis=-1)
    lp_a = jax.nn.log_softmax(s_a / params["amateur_temperature"], axis=-1)
    head = lp_e >= jnp.log(params["plausibility"]) + jnp.max(lp_e, axis=-1, keepdims=True)
    return jnp.where(head, lp_e - _scaled(params["lam"], lp_a), NEG_INF)


# ----------------------------------------------------------------------------------------------------------
# "small + λ·large" fusions on raw logits (heuristics from a tutorial blog post, not a paper; docs/methods.md
# §1.5; s_S small, s_L large).


@register("small_large_direct", roles=("small", "large"), inputs="logits", defaults={"lam": 0.5})
def small_large_direct(logits, params):
    """``s_S + λ·s_L`` on raw logits (λ default 0.5)."""
    s_s, s_l = logits
    return s_s + _scaled(params["lam"], s_l)


@register("small_large_temperature", roles=("small", "large"), inputs="logits",
          defaults={"lam": 0.5, "temperature": 2.0})
def small_large_temperature(logits, params):
    """``s_S + λ·s_L / T`` on raw logits (λ 0.5, T 2.0)."""
    s_s, s_l = logits
    return s_s + _scaled(params["lam"], s_l / params["temperature"])


@register("small_large_low_confidence", roles=("small", "large"), inputs="logits",
          defaults={"lam": 0.5, "theta": 0.1})
def small_large_low_confidence(logits, params):
    """``s_S + λ·1[softmax(s_S) < θ]·s_L`` (element-wise mask, as in the source; λ 0.5, θ 0.1)."""
    s_s, s_l = logits
    low = jax.nn.softmax(s_s, axis=-1) < params["theta"]
    return s_s + jnp.where(low, _scaled(params["lam"], s_l), 0.0)


def kl_to_target(z: jax.Array, log_p_target: jax.Array) -> jax.Array:
    """Σ_rows KL(p_L ‖ softmax(z)) with ``0·log 0 = 0`` (rows are independent, so Adam's per-element updates
    do not depend on the batch size)."""
    p = jnp.exp(log_p_target)
    log_q = jax.nn.log_softmax(z, axis=-1)
    terms = jnp.where(p > 0, p * (log_p_target - jnp.where(p > 0, log_q, 0.0)), 0.0)
    return jnp.sum(terms)


@register("small_large_kl", roles=("small", "large"), inputs="logits", defaults={"steps": 10, "lr": 0.1})
def small_large_kl(logits, params):
    """KL-optimized logits: start ``z = s_S`` and take ``steps`` (k, default 10) ``optax.adam(lr)`` steps
    (lr default 0.1) on ``KL(softmax(s_L) ‖ softmax(z))``; returns ``z``. ``k`` and ``lr`` are traced
    (``lax.fori_loop`` with a traced bound). ``-inf`` entries of ``s_S`` stay ``-inf``."""
    s_s, s_l = logits
    log_p = jax.nn.log_softmax(s_l, axis=-1)
    finite = jnp.isfinite(s_s)
    z0 = jnp.where(finite, s_s, 0.0)
    opt = optax.adam(params["lr"])
    grad_fn = jax.grad(lambda z: kl_to_target(jnp.where(finite, z, NEG_INF), log_p))

    def step(_, carry):
        z, state = carry
        updates, state = opt.update(grad_fn(z), state, z)
        return optax.apply_updates(z, updates), state

    z, _ = jax.lax.fori_loop(0, params["steps"], step, (z0, opt.init(z0)))
    return jnp.where(finite, z, NEG_INF)


# ----------------------------------------------------------------------------------------------------------


def combine(rule: str | FusionRule, logits: Sequence[jax.Array], params: Params | None = None,
            step=0) -> jax.Array:
    """Apply ``rule`` to per-model raw logits ``[B, V]`` (log-softmaxed first when the rule reads log-probs).
    ``params`` may leave out any hyperparameter that has a default (``resolve_params``). ``step`` (traced int:
    tokens generated so far) drives a per-token α schedule when ``params`` holds one (:mod:`alpha_control`):
    α becomes the schedule's α_t, per row ``[B, 1]``, zeroed where the gate on (model 1, model 2) -- the
    expert and anti-expert -- is closed."""
    rule = get_rule(rule)
    if not rule.num_models_ok(len(logits)):
        raise UserError(f"rule {rule.name!r} takes models {rule.roles}{' (+ more pairs)' if rule.variadic else ''}"
                        f", got {len(logits)}")
    xs = [x.astype(jnp.float32) for x in logits]
    if rule.inputs == "logprobs":
        xs = [jax.nn.log_softmax(x, axis=-1) for x in xs]
    params = resolve_params(rule, params)
    if alpha_control.is_active(params):
        params = {**params, "alpha": alpha_control.effective_alpha(params, xs[1], xs[2], step)}
    return rule.fn(xs, params)
