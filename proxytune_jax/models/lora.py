"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a pure transformation of a model's parameter pytree.

A targeted linear layer ``y = x Wᵀ`` (``W [out, in]``, our and PyTorch's layout) becomes

    y = x Wᵀ + (α / r) · (dropout(x) Aᵀ) Bᵀ,      A [r, in], B [out, r]

(``α / √r`` with ``use_rslora``, Kalajdzievski 2023). ``A`` is drawn like PEFT's default (Kaiming-uniform,
``U(-1/√in, 1/√in)``) and ``B = 0``, so a fresh adapter leaves the model unchanged.

There is no second model class. The pieces:

- ``LoraConfig``: rank ``r``, ``alpha``, ``dropout``, ``target_modules`` (module-name patterns, see
  :func:`matches`), ``use_rslora``; validated on construction.
- an *adapter* is a nested dict mirroring the params: at each targeted kernel's path (``.../q_proj/weight``) a
  dict ``{"lora_A": [r, in], "lora_B": [out, r]}`` (float32, whatever the base dtype).
- :func:`init_lora` ``(params, cfg, key) -> adapter``; :func:`merge` ``(params, adapter, cfg) -> params`` with
  ``W + s·B A`` (same tree and dtypes as ``params``: a plain model);
- :func:`apply` ``(params, adapter, cfg, dropout_key=None) -> params`` *unmerged*: each targeted leaf becomes a
  :class:`LoraWeight` pytree node (``weight``, ``lora_A``, ``lora_B``; scale and dropout rate static) that
  ``layers.Linear`` computes as above. The result goes through ``nnx.merge(graphdef, ...)`` like any params,
  so it runs in the jitted train step (gradients reach ``A`` and ``B`` only when the adapter is what is
  differentiated), in the decoding engine's ``while_loop``, under remat and on a mesh (the partition rules
  replicate ``lora_A``/``lora_B``, ``models.partition_rules``). Dropout acts on the LoRA input only and only
  when a ``dropout_key`` is given (training); decoding never passes one.

Module names are the Hugging Face ones joined by dots (``model.layers.0.self_attn.q_proj``); every 2-D
``weight`` of a linear layer is targetable except the output head (``lm_head``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from proxytune_jax.errors import UserError

LORA_A, LORA_B = "lora_A", "lora_B"
# PEFT's "all-linear": every linear layer but the output head.
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters (the ``model.lora`` node of a ``TrainConfig``).

    ``target_modules``: patterns over module names; a pattern matches a module when it equals the module's
    dotted name or its last components (``q_proj``, ``self_attn.o_proj``), or fully matches it as a regular
    expression (``model\\.layers\\.[01]\\..*_proj``); ``"all-linear"`` targets every linear layer but
    ``lm_head``. Defaults: the attention and MLP projections of the Llama family."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj")
    use_rslora: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"LoRA rank r must be an integer >= 1, got {self.r!r}; set e.g. lora r=8")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}; a common choice is 2·r")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise UserError("LoRA target_modules must be a non-empty list of module-name patterns, e.g. "
                            "[\"q_proj\", \"v_proj\"] (or [\"all-linear\"])")
        for p in self.target_modules:
            if not isinstance(p, str) or not p:
                raise UserError(f"LoRA target_modules holds {p!r}; each entry is a module name or regex")
            try:
                re.compile(p)
            except re.error as err:
                raise UserError(f"LoRA target module pattern {p!r} is not a valid regular expression ({err}); "
                                "write a module name such as q_proj") from None

    @property
    def scale(self) -> float:
        """``α / r`` (``α / √r`` with ``use_rslora``)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A targeted kernel with its adapter, unmerged: ``layers.Linear`` computes
    ``dense(x, weight) + scale · dense(dense(dropout(x), lora_A), lora_B)``."""

    weight: jax.Array  # [out, in] the frozen base kernel (base dtype)
    lora_A: jax.Array  # [r, in]
    lora_B: jax.Array  # [out, r]
    dropout_key: jax.Array | None = None  # a PRNG key in training, None otherwise
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def shape(self):
        return self.weight.shape

    @property
    def dtype(self):
        return self.weight.dtype


def lora_dense(x: jax.Array, w: LoraWeight, dense) -> jax.Array:
    """``x [..., in] -> [..., out]`` through the base kernel plus the low-rank path (in the adapter's dtype,
    cast back to the base output's dtype, as PEFT does). ``dense`` is ``layers.dense``."""
    y = dense(x, w.weight)  # [..., out]
    xa = x.astype(w.lora_A.dtype)
    if w.dropout_key is not None and w.dropout > 0:
        keep = jax.random.bernoulli(w.dropout_key, 1.0 - w.dropout, xa.shape)
        xa = jnp.where(keep, xa / (1.0 - w.dropout), 0.0)
    h = dense(xa, w.lora_A)  # [..., r]
    return y + (w.scale * dense(h, w.lora_B)).astype(y.dtype)


# ------------------------------------------------------------------------------------------ paths


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_linear_kernel(path: tuple[str, ...], leaf) -> bool:
    return (len(path) >= 2 and path[-1] == "weight" and len(getattr(leaf, "shape", ())) == 2
            and path[-2] != "lm_head")


def module_name(path: tuple[str, ...]) -> str:
    """``("model", "layers", "0", "self_attn", "q_proj", "weight")`` -> ``model.layers.0.self_attn.q_proj``."""
    return ".".join(path[:-1])


def linear_kernels(params) -> dict[str, tuple[str, ...]]:
    """Module name -> path (as strings) of every targetable kernel of ``params`` (a pure params dict)."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, LoraWeight))[0]:
        path = tuple(_key_str(k) for k in kp)
        if _is_linear_kernel(path, leaf):
            out[module_name(path)] = path
    return out


def matches(pattern: str, name: str) -> bool:
    """Whether a target pattern selects the module ``name`` (see ``LoraConfig``)."""
    if pattern == ALL_LINEAR:
        return True
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _short_names(names) -> list[str]:
    return sorted({n.split(".")[-1] for n in names})


def targets(params, cfg: LoraConfig) -> dict[str, tuple[str, ...]]:
    """Module name -> kernel path of the modules ``cfg`` targets in ``params``. Raises ``UserError`` for a
    pattern that matches no module (naming the model's module names)."""
    kernels = linear_kernels(params)
    unmatched = [p for p in cfg.target_modules if not any(matches(p, n) for n in kernels)]
    if unmatched:
        raise UserError(f"LoRA target_modules {unmatched} match no linear layer of this model; its linear layers "
                        f"are named {', '.join(_short_names(kernels))} (e.g. {next(iter(kernels), '?')}); "
                        "use those names (or \"all-linear\")")
    return {n: p for n, p in kernels.items() if any(matches(t, n) for t in cfg.target_modules)}


def _get(tree, path):
    for k in path:
        tree = tree[int(k) if isinstance(tree, (list, tuple)) else _dict_key(tree, k)]
    return tree


def _dict_key(d: dict, k: str):
    if k in d:
        return k
    if k.isdigit() and int(k) in d:
        return int(k)
    raise KeyError(k)


def _native_path(tree, path: tuple[str, ...]) -> tuple:
    """String path -> the keys the tree actually uses (ints for nnx.List layers)."""
    out = []
    for k in path:
        key = _dict_key(tree, k)
        out.append(key)
        tree = tree[key]
    return tuple(out)


def _set(tree: dict, path: tuple, value) -> dict:
    """A copy of nested dict ``tree`` with ``value`` at ``path`` (creating dicts on the way)."""
    head, rest = path[0], path[1:]
    new = dict(tree)
    new[head] = value if not rest else _set(tree.get(head, {}), rest, value)
    return new


def adapter_leaves(adapter) -> dict[tuple, dict]:
    """Native path of the kernel -> ``{"lora_A", "lora_B"}`` for every entry of an adapter."""
    out = {}

    def walk(node, path):
        if isinstance(node, dict) and LORA_A in node and LORA_B in node:
            out[path] = node
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))

    walk(adapter, ())
    return out


# ------------------------------------------------------------------------------------------ the transformation


def init_lora(params, cfg: LoraConfig, key: jax.Array) -> dict:
    """A fresh adapter for ``params``: ``lora_A [r, in] ~ U(-1/√in, 1/√in)`` (PEFT's Kaiming-uniform with
    a = √5), ``lora_B [out, r] = 0``, float32. Keys follow the targeted kernels' paths."""
    adapter: dict = {}
    for i, (name, path) in enumerate(sorted(targets(params, cfg).items())):
        native = _native_path(params, path)
        out_f, in_f = _get(params, path).shape
        bound = 1.0 / math.sqrt(in_f)
        a = jax.random.uniform(jax.random.fold_in(key, i), (cfg.r, in_f), jnp.float32, -bound, bound)
        adapter = _set(adapter, native, {LORA_A: a, LORA_B: jnp.zeros((out_f, cfg.r), jnp.float32)})
    return adapter


def check_adapter(params, adapter, cfg: LoraConfig, *, source: str = "the adapter") -> None:
    """Raise ``UserError`` when ``adapter`` does not fit ``params``: a module the model lacks, or shapes that
    differ (an adapter for another base model), or a rank other than ``cfg.r``."""
    kernels = {tuple(str(k) for k in p): n for n, p in linear_kernels(params).items()}
    problems = []
    for path, ab in adapter_leaves(adapter).items():
        spath = tuple(str(k) for k in path)
        if spath not in kernels:
            problems.append(f"{module_name(spath)} is not a linear layer of the base model")
            continue
        out_f, in_f = _get(params, spath).shape
        a, b = ab[LORA_A], ab[LORA_B]
        if tuple(a.shape) != (cfg.r, in_f) or tuple(b.shape) != (out_f, cfg.r):
            problems.append(f"{kernels[spath]}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, the base needs "
                            f"({cfg.r}, {in_f}) / ({out_f}, {cfg.r})")
    if not adapter_leaves(adapter):
        problems.append("it holds no LoRA weights")
    if problems:
        raise UserError(f"{source} does not fit this base model ({'; '.join(problems[:5])}"
                        + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                        + "); pass the base model the adapter was trained on")


def apply(params, adapter, cfg: LoraConfig, *, dropout_key: jax.Array | None = None):
    """``params`` with every adapted kernel replaced by a :class:`LoraWeight` (unmerged; the base arrays are
    shared, not copied). ``dropout_key`` turns the LoRA dropout on (training only)."""
    out = params
    for i, (path, ab) in enumerate(sorted(adapter_leaves(adapter).items(), key=lambda kv: str(kv[0]))):
        native = _native_path(params, tuple(str(k) for k in path))
        key = None
        if dropout_key is not None and cfg.dropout > 0:
            key = jax.random.fold_in(dropout_key, i)
        w = LoraWeight(weight=_get(params, native), lora_A=ab[LORA_A], lora_B=ab[LORA_B], dropout_key=key,
                       scale=cfg.scale, dropout=float(cfg.dropout))
        out = _set(out, native, w)
    return out


def merge(params, adapter, cfg: LoraConfig):
    """``params`` with ``W + scale · B A`` at every adapted kernel (computed in float32, stored in ``W``'s
    dtype): the same tree as ``params``, a plain model."""
    out = params
    for path, ab in adapter_leaves(adapter).items():
        native = _native_path(params, tuple(str(k) for k in path))
        w = _get(params, native)  # [out, in]
        delta = cfg.scale * jnp.einsum("or,ri->oi", ab[LORA_B].astype(jnp.float32), ab[LORA_A].astype(jnp.float32))
        out = _set(out, native, (w.astype(jnp.float32) + delta).astype(w.dtype))
    return out


def strip(params):
    """The base params of an unmerged tree (every :class:`LoraWeight` back to its kernel)."""
    return jax.tree.map(lambda x: x.weight if isinstance(x, LoraWeight) else x, params,
                        is_leaf=lambda x: isinstance(x, LoraWeight))


def with_adapter(model, adapter, cfg: LoraConfig, *, merged: bool = False, source: str = "the adapter"):
    """An NNX model with ``adapter`` applied: unmerged (targeted ``Param``s hold ``LoraWeight``s sharing the
    base arrays) or merged (a plain model with ``W + s·BA``)."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    check_adapter(params, adapter, cfg, source=source)
    new = merge(params, adapter, cfg) if merged else apply(params, adapter, cfg)
    nnx.replace_by_pure_dict(state, new)
    return nnx.merge(graphdef, state)


def num_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
