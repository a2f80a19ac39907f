"""``TrainConfig``: the plain dataclass a training run is described by, and loading it from a Python file.

A config file (e.g. ``experiments/configs/sft_tiny.py``) is ordinary Python that defines a module-level
``config = TrainConfig(...)``. ``--set key=value`` overrides fields; values are parsed by the field's type
(``int``, ``float``, ``bool`` as true/false/1/0, ``str``, ``dict`` as JSON). Relative paths are relative to the
current directory.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

from proxytune_jax.errors import UserError

OBJECTIVES = ("sft", "online_distillation", "online_distillation_chunked", "offline_topk", "bayesian")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # what to train
    objective: str = "sft"  # one of OBJECTIVES
    student: str = ""  # Hugging Face folder with the initial weights of the trained model
    teacher: str = ""  # online_distillation(_chunked): the teacher's folder (same tokenizer)
    proxy: str = ""  # bayesian: the proxy model M sampled for the posterior (default: the student itself)
    tokenizer: str = ""  # folder for AutoTokenizer (default: the student's folder)
    param_dtype: str = "float32"  # "float32" or "bfloat16" (params and optimizer moments)
    # data
    train_file: str = ""  # JSONL: {"prompt", "response"} or {"text"} per line
    eval_file: str = ""  # optional held-out JSONL, scored every eval_every steps and at the end
    topk_cache: str = ""  # offline_topk: teacher top-k cache written for train_file
    eval_topk_cache: str = ""  # offline_topk: the cache for eval_file
    max_length: int = 128  # tokens per row
    batch_size: int = 8  # global batch (rows per optimizer step, over all devices)
    pack: bool = False  # pack examples into full rows instead of padding each one
    shuffle: bool = True
    seed: int = 0  # data order and the PRNG key of the train state
    # optimization (see training.optim.OptimConfig)
    steps: int = 1000
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must be divisible by it)
    steps_per_call: int = 1  # optimizer steps per jitted call (a scan; training.step.make_multi_step):
    #   the same updates, less per-call overhead (dispatch, host sync): matters for small models
    # objective hyperparameters
    loss: str = "forward_kl"  # online_distillation: any proxytune_jax.losses name
    loss_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. {"beta": 0.5} for generalized_jsd
    temperature: float = 1.0
    kd_weight: float = 1.0  # weight of the distillation term
    ce_weight: float = 0.0  # weight of cross-entropy on the response tokens
    chunk_size: int = 0  # online_distillation_chunked: positions per chunk (0: the losses module's default)
    topk_mode: str = "renormalize"  # offline_topk: "renormalize" or "tail_bucket"
    ngram_n: int = 2  # bayesian: n-gram context window of the prior (counted over train_file)
    gamma: float = 2.0  # bayesian: prior blend of n-gram estimate and label (>= 1)
    prior_support: int = 32  # bayesian: n-gram continuations kept per context
    posterior_bins: int = 100  # bayesian: m grid values of each P(w)
    posterior_samples: int = 8  # bayesian: K proxy samples per position
    alpha: float = 0.5  # bayesian: weight of KL(prior || student)
    beta: float = 0.5  # bayesian: weight of KL(posterior || student)
    # devices
    mesh_data: int = -1  # -1: all remaining devices
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    # bookkeeping
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (when eval_file is set)
    export: bool = True  # write the final params as a Hugging Face folder DIR/final

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective {self.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
        if not self.student:
            raise UserError("config.student is empty; set it to the Hugging Face folder of the model to train")
        if not self.train_file:
            raise UserError("config.train_file is empty; set it to a JSONL file")
        if self.objective.startswith("online_distillation") and not self.teacher:
            raise UserError(f"objective {self.objective} needs config.teacher (a Hugging Face folder)")
        if self.objective == "online_distillation_chunked" and self.ce_weight:
            raise UserError("online_distillation_chunked has no separate cross-entropy term (it never builds the "
                            "full logits); set ce_weight=0 and use loss='hinton_kd' to mix CE in")
        if self.objective == "offline_topk" and not self.topk_cache:
            raise UserError("objective offline_topk needs config.topk_cache (a teacher top-k cache of train_file)")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise UserError(f"param_dtype must be 'float32' or 'bfloat16', got {self.param_dtype!r}")
        for name in ("steps", "batch_size", "save_every", "keep_checkpoints", "log_every", "grad_accum_steps",
                     "steps_per_call"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum_steps:
            raise UserError(f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                            f"{self.grad_accum_steps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that may differ when a run is resumed (they do not change what has been computed so far).
RESUMABLE_CHANGES = frozenset({"steps", "save_every", "keep_checkpoints", "log_every", "eval_every", "export",
                               "mesh_data", "mesh_fsdp", "mesh_tensor", "steps_per_call"})


def _parse_value(field: dataclasses.Field, raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "dict":
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError(raw)
            return value
        return raw
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"--set {field.name}={raw}: cannot read {raw!r} as {kind}") from None


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``["steps=10", "loss_kwargs={\\"beta\\": 0.5}"]`` -> a new config."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise UserError(f"--set {key}: unknown config field; fields are {', '.join(fields)}")
        changes[key] = _parse_value(fields[key], raw)
    return dataclasses.replace(config, **changes)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Run a config file and return its ``config`` (a ``TrainConfig``), with ``overrides`` applied."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; see experiments/configs/ for examples")
    spec = importlib.util.spec_from_file_location(f"_proxytune_config_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
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


def check_resume_compatible(saved: dict, config: TrainConfig, workdir: Path) -> list[str]:
    """Compare a workdir's config.json with ``config``; raise on changes that would corrupt a resume and
    return the names of harmless changed fields."""
    current = config.to_dict()
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    bad = [k for k in changed if k not in RESUMABLE_CHANGES]
    if bad:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in bad[:5])
        raise UserError(f"{workdir} holds a run with a different configuration ({detail}); rerun with the same "
                        "settings to resume it, or use a new --workdir")
    return changed
