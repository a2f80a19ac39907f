"""``TrainConfig``: a small tree of typed dataclasses describing a training run, validated on load.

    TrainConfig
      model      ModelConfig       student folder, tokenizer, param dtype, LoRA (``lora``: None = full)
      data       DataConfig        train/eval JSONL files, row length, batch size, packing
      objective  an Objective      the strategy and its hyperparameters (``training.objectives``)
      optim      OptimConfig       AdamW + warmup-cosine (``total_steps`` 0: the run's ``steps``)
      mesh       MeshConfig        (data, fsdp, tensor) sizes
      checkpoint CheckpointConfig  save_every, keep
      report     ReportConfig      metric writers (TensorBoard by default, W&B), profiler trace steps
      gen_eval   GenEvalConfig     generation-based evaluation every N steps (decode + exact match / ROUGE)
      steps, seed, grad_accum_steps, steps_per_call, log_every, eval_every, export

A config file (e.g. ``experiments/configs/sft_tiny.py``) is ordinary Python that defines a module-level
``config = TrainConfig(...)``. ``--set key=value`` overrides a field by its dotted path
(``optim.learning_rate=1e-3``, ``objective.loss=reverse_kl``, ``objective.loss_params.temperature=2``,
``objective.name=bayesian`` switches the objective, keeping the fields both have). Every value, from the file or
``--set``, is checked against its field's type: a wrong type is a ``UserError`` naming the field (a bool is
``true``/``false``, never a string such as ``"no"``). ``config.json`` in a workdir holds ``to_dict()``;
``from_dict`` reads it back (the objective by its ``name``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from proxytune_jax.errors import UserError
from proxytune_jax.models.lora import LoraConfig
from proxytune_jax.sharding import MeshConfig
from proxytune_jax.training.objectives import SFT, Objective, get_objective
from proxytune_jax.training.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    student: str = ""  # Hugging Face folder with the initial weights of the trained model
    tokenizer: str = ""  # folder for AutoTokenizer (default: the student's folder)
    param_dtype: str = "float32"  # "float32" or "bfloat16" (params and optimizer moments: the master copy)
    # Mixed precision: the dtype the student computes in ("": param_dtype; "bfloat16" with param_dtype
    # "float32": bf16 matmuls/activations on fp32 master weights and fp32 optimizer moments; the params are
    # cast inside the step, gradients flow back in fp32; logits and losses stay float32).
    compute_dtype: str = ""
    # Rematerialization of the student's blocks (models.layers.REMAT_POLICIES): "none" | "matmuls" | "full".
    remat: str = "none"
    # LoRA: train only an adapter (r, alpha, dropout, target_modules; models.lora) and export it in the PEFT
    # format; None trains every parameter. ``--set model.lora.r=8`` turns it on with the other defaults.
    lora: LoraConfig | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_file: str = ""  # JSONL: {"prompt", "response"} or {"text"} per line
    eval_file: str = ""  # optional held-out JSONL, scored every eval_every steps and at the end
    max_length: int = 128  # tokens per row
    batch_size: int = 8  # global batch (rows per optimizer step, over all devices)
    pack: bool = False  # pack examples into full rows instead of padding each one
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 100
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Where metrics go besides ``metrics.jsonl`` (always written): ``to`` names writers of
    ``training.reporting.WRITERS`` ("tensorboard": event files in WORKDIR/tensorboard, "wandb": a Weights &
    Biases run, needs ``pip install proxytune_jax[wandb]``); ``("none",)`` writes only metrics.jsonl.
    ``profile``: a ``jax.profiler`` trace of steps "A:B" (inclusive) or of "N" steps after the first step of the
    run, written to WORKDIR/profile ("": none)."""
    to: tuple[str, ...] = ("tensorboard",)
    wandb_project: str = "proxytune_jax"
    wandb_entity: str = ""  # "" = your default entity
    wandb_name: str = ""  # "" = the workdir's name
    profile: str = ""


@dataclasses.dataclass(frozen=True)
class GenEvalConfig:
    """Generation-based evaluation during training (``training.gen_eval``): every ``every`` steps (and at step 0
    and the last step) decode greedy answers for the prompts of ``prompts_file`` (JSONL with "prompt" and a
    reference in "answer", "reference" or "response"; default: ``data.eval_file``) with the library's decoder on
    the current params and score them with ``metrics`` (``eval.scoring.METRICS``: accuracy = GSM-style answer
    match, exact_match = whole strings, rouge = ROUGE-1/2/L). Logged as ``gen_eval_<metric>`` in metrics.jsonl
    (``gen_eval/<metric>`` in TensorBoard / W&B); the decoded answers go to WORKDIR/gen_eval/step_<N>.jsonl."""
    every: int = 0  # 0: off
    prompts_file: str = ""
    max_prompts: int = 0  # 0: all
    max_new_tokens: int = 32
    batch_size: int = 8
    metrics: tuple[str, ...] = ("accuracy",)
    stop: tuple[str, ...] = ()  # stop strings (the answer is cut before them)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    objective: Objective = SFT()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    report: ReportConfig = ReportConfig()
    gen_eval: GenEvalConfig = GenEvalConfig()
    steps: int = 1000
    seed: int = 0  # data order and the PRNG key of the train state
    grad_accum_steps: int = 1  # micro-batches per step (data.batch_size must be divisible by it)
    steps_per_call: int = 1  # optimizer steps per jitted call (a scan; training.step.make_multi_step)
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (when data.eval_file is set)
    export: bool = True  # write the final params as a Hugging Face folder WORKDIR/final

    def optim_config(self) -> OptimConfig:
        """The optimizer config with ``total_steps`` resolved (0 means the run's ``steps``)."""
        return self.optim if self.optim.total_steps else dataclasses.replace(self.optim, total_steps=self.steps)

    def validate(self) -> None:
        check_types(self)
        if not self.model.student:
            raise UserError("config model.student is empty; set it to the Hugging Face folder of the model to train")
        if not self.data.train_file:
            raise UserError("config data.train_file is empty; set it to a JSONL file")
        if self.model.param_dtype not in ("float32", "bfloat16"):
            raise UserError(f"model.param_dtype must be 'float32' or 'bfloat16', got {self.model.param_dtype!r}")
        if self.model.compute_dtype not in ("", "float32", "bfloat16"):
            raise UserError(f"model.compute_dtype must be '' (= param_dtype), 'float32' or 'bfloat16', got "
                            f"{self.model.compute_dtype!r}")
        from proxytune_jax.models.layers import REMAT_POLICIES
        if self.model.remat not in REMAT_POLICIES:
            raise UserError(f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {self.model.remat!r}")
        for name, value in (("steps", self.steps), ("data.batch_size", self.data.batch_size),
                            ("data.max_length", self.data.max_length),
                            ("checkpoint.save_every", self.checkpoint.save_every),
                            ("checkpoint.keep", self.checkpoint.keep), ("log_every", self.log_every),
                            ("grad_accum_steps", self.grad_accum_steps), ("steps_per_call", self.steps_per_call)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.eval_every < 0:
            raise UserError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.data.batch_size % self.grad_accum_steps:
            raise UserError(f"data.batch_size {self.data.batch_size} is not divisible by grad_accum_steps "
                            f"{self.grad_accum_steps}")
        self.optim_config().validate()
        self.objective.validate()
        _validate_report(self.report)
        _validate_gen_eval(self.gen_eval, self.data)

    def to_dict(self) -> dict:
        return to_dict(self)


def _validate_report(report: ReportConfig) -> None:
    from proxytune_jax.training.reporting import WRITERS
    from proxytune_jax.training.profiling import parse_profile_steps
    names = [n.strip() for n in report.to]
    unknown = [n for n in names if n not in WRITERS and n != "none"]
    if unknown:
        raise UserError(f"report.to: unknown writer {unknown[0]!r}; choose from none, {', '.join(WRITERS)} "
                        "(e.g. --report-to tensorboard,wandb)")
    if "none" in names and len(names) > 1:
        raise UserError("report.to: 'none' cannot be combined with other writers; drop it or the others")
    parse_profile_steps(report.profile)  # raises on a malformed spec


def _validate_gen_eval(g: GenEvalConfig, data: DataConfig) -> None:
    from proxytune_jax.eval.scoring import METRICS
    if g.every < 0:
        raise UserError(f"gen_eval.every must be >= 0 (0: off), got {g.every}")
    if not g.every:
        return
    if not (g.prompts_file or data.eval_file):
        raise UserError("gen_eval.every is set but there are no prompts: set gen_eval.prompts_file (JSONL with "
                        "\"prompt\" and \"answer\") or data.eval_file")
    for name, value in (("gen_eval.max_new_tokens", g.max_new_tokens), ("gen_eval.batch_size", g.batch_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if g.max_prompts < 0:
        raise UserError(f"gen_eval.max_prompts must be >= 0 (0: all), got {g.max_prompts}")
    if not g.metrics:
        raise UserError(f"gen_eval.metrics is empty; name at least one of {', '.join(METRICS)}")
    bad = [m for m in g.metrics if m not in METRICS]
    if bad:
        raise UserError(f"gen_eval.metrics: unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")


# Fields that may differ when a run is resumed (they do not change what has been computed so far).
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint.save_every", "checkpoint.keep", "log_every", "eval_every",
                               "export", "mesh.data", "mesh.fsdp", "mesh.tensor", "steps_per_call",
                               "model.remat"}  # remat recomputes, it changes no update
                              | {f"report.{f.name}" for f in dataclasses.fields(ReportConfig)}
                              | {f"gen_eval.{f.name}" for f in dataclasses.fields(GenEvalConfig)})


# ------------------------------------------------------------------------------------------ tree <-> dict
def to_dict(node) -> Any:
    if isinstance(node, Objective):
        return {"name": node.name, **{f.name: to_dict(getattr(node, f.name)) for f in dataclasses.fields(node)}}
    if dataclasses.is_dataclass(node):
        return {f.name: to_dict(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, (tuple, list)):
        return [to_dict(x) for x in node]
    if isinstance(node, dict):
        return {k: to_dict(v) for k, v in node.items()}
    return node


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, raw, where: str):
    """An instance of dataclass ``cls`` from a dict (JSON), every field converted by its type."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise UserError(f"config {where}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    if cls is Objective:
        raw = dict(raw)
        name = raw.pop("name", None)
        if not isinstance(name, str):
            raise UserError(f"config {where}: the objective needs a 'name'")
        cls = get_objective(name)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"config {where}: unknown field(s) {', '.join(unknown)}; {cls.__name__} has "
                        f"{', '.join(sorted(names)) or 'no fields'}")
    return cls(**{k: _from_json(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()})


def _optional_dataclass(tp):
    """``X`` for a field typed ``X | None`` with ``X`` a dataclass, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _from_json(tp, value, where: str):
    origin = typing.get_origin(tp)
    inner = _optional_dataclass(tp)
    if inner is not None:
        return None if value is None else _build(inner, value, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) or tp is Objective:
        return _build(tp, value, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        item = typing.get_args(tp)[0]
        return tuple(_from_json(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def from_dict(raw: dict) -> TrainConfig:
    """A ``TrainConfig`` from ``to_dict``'s output (a workdir's ``config.json``). A flat dict written by the
    library before the config tree existed is refused with the way out."""
    if not isinstance(raw, dict) or "model" not in raw or not isinstance(raw.get("objective"), dict):
        raise UserError("this config.json was written by an older proxytune_jax (one flat TrainConfig); the run "
                        "cannot be resumed with this version: start it in a new --workdir (its exported final/ "
                        "folder, if any, still loads as a model)")
    return _build(TrainConfig, raw, "")


# ------------------------------------------------------------------------------------------ type checking
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(tp, value, where: str) -> None:
    origin = typing.get_origin(tp)
    inner = _optional_dataclass(tp)
    if inner is not None:
        if value is not None:
            _check_value(inner, value, where)
        return
    if tp is Objective:
        if not isinstance(value, Objective):
            raise UserError(f"config {where}: expected an objective (e.g. training.objectives.SFT()), got {value!r}")
        check_types(value, where)
        return
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise UserError(f"config {where}: expected {tp.__name__}(...), got {value!r}")
        check_types(value, where)
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            raise UserError(f"config {where}: expected a tuple, got {value!r}")
        for i, v in enumerate(value):
            _check_value(typing.get_args(tp)[0], v, f"{where}[{i}]")
        return
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is dict or origin is dict:
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise UserError(f"config {where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and value != value:
        raise UserError(f"config {where}: NaN is not a value; give a finite number")


def check_types(node, prefix: str = "") -> None:
    """Raise ``UserError`` naming the first field of the tree whose value does not have its declared type."""
    hints = _hints(type(node))
    for f in dataclasses.fields(node):
        _check_value(hints[f.name], getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name)


# ------------------------------------------------------------------------------------------ --set overrides
def _parse(tp, raw: str, where: str):
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = raw.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        value = json.loads(raw)
        if (tp is dict or origin is dict) and not isinstance(value, dict):
            raise ValueError(raw)
        return _from_json(tp, value, where)
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"--set {where}={raw}: cannot read {raw!r} as {_type_name(tp)}") from None


def _set_path(node, path: list[str], raw: str, where: str):
    key, rest = path[0], path[1:]
    if isinstance(node, dict):
        if rest:
            inner = node.get(key, {})
            if not isinstance(inner, dict):
                raise UserError(f"--set {where}: {key} is not a mapping")
            return {**node, key: _set_path(inner, rest, raw, where)}
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word is a string
        return {**node, key: value}
    if isinstance(node, Objective) and key == "name" and not rest:
        cls = get_objective(raw.strip())
        keep = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)
                if f.name in {g.name for g in dataclasses.fields(cls)}}
        return cls(**keep)
    if not dataclasses.is_dataclass(node):
        raise UserError(f"--set {where}: {'.'.join(path)} is not a config field")
    fields = {f.name for f in dataclasses.fields(node)}
    if key not in fields:
        raise UserError(f"--set {where}: unknown field {key!r} of {type(node).__name__}; its fields are "
                        f"{', '.join(sorted(fields))}")
    tp = _hints(type(node))[key]
    current = getattr(node, key)
    inner = _optional_dataclass(tp)
    if inner is not None and rest and current is None:
        current = inner()  # --set model.lora.r=8 turns LoRA on with the other fields' defaults
    if inner is not None and not rest and raw.strip().lower() in ("null", "none"):
        return dataclasses.replace(node, **{key: None})
    if rest:
        return dataclasses.replace(node, **{key: _set_path(current, rest, raw, where)})
    return dataclasses.replace(node, **{key: _parse(tp, raw, where)})


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``["optim.learning_rate=1e-3", "objective.loss_params.beta=0.5"]`` -> a new config."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write key=value, e.g. --set optim.learning_rate=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        config = _set_path(config, key.split("."), raw, key)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Run a config file and return its ``config`` (a ``TrainConfig``), with ``overrides`` applied, validated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; see experiments/configs/ for examples")
    spec = importlib.util.spec_from_file_location(f"_proxytune_config_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # objectives defined in the file resolve their type hints through it
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- report the user's broken file clearly
        raise UserError(f"config file {path} failed to run: {type(err).__name__}: {err}") from err
    config = getattr(module, "config", None)
    if not isinstance(config, TrainConfig):
        raise UserError(f"config file {path} must define `config = TrainConfig(...)` "
                        "(from proxytune_jax.training.config import TrainConfig)")
    config = apply_overrides(config, overrides)
    config.validate()
    return config


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("loss_params", "params"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_compatible(saved: dict, config: TrainConfig, workdir: Path) -> list[str]:
    """Compare a workdir's config.json with ``config``; raise on changes that would corrupt a resume and
    return the names of harmless changed fields."""
    from_dict(saved)  # refuses the old flat format with its own message
    old, new = _flatten(saved), _flatten(config.to_dict())
    for key, default in (("model.compute_dtype", ""), ("model.remat", "none")):  # runs saved before issue #23
        if "model" in saved:
            old.setdefault(key, default)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    bad = [k for k in changed if k not in RESUMABLE_CHANGES]
    if bad:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad[:5])
        raise UserError(f"{workdir} holds a run with a different configuration ({detail}); rerun with the same "
                        "settings to resume it, or use a new --workdir")
    return changed
