"""LoRA adapters in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's: ``base_model.model.<HF module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` (``<HF module>`` from the family's ``HF_NAMES``, e.g. ``model.layers.0.self_attn.q_proj``), which
is our adapter layout (``models.lora``) as is. Written folders load with
``peft.PeftModel.from_pretrained(transformers_model, folder)``; folders written by PEFT load here (LoRA on
linear layers; DoRA, biases, per-module ranks and ``modules_to_save`` are refused with a message).

>>> adapter, cfg = load_adapter("runs/expert_lora/final", base_params, base_config)
>>> model = load_pretrained_with_adapter("base_small", "runs/expert_lora/final")   # unmerged
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from proxytune_jax.errors import UserError
from proxytune_jax.atomic import write_json_atomic
from proxytune_jax.models import family_of, lora
from proxytune_jax.models.lora import LORA_A, LORA_B, LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _hf_modules(params, model_config) -> dict[str, tuple[str, ...]]:
    """HF module name (``model.layers.0.self_attn.q_proj``) -> our kernel path, for every linear layer."""
    from proxytune_jax.models.hf_io import hf_name
    table = family_of(model_config.model_type)[0].HF_NAMES
    out = {}
    for path in lora.linear_kernels(params).values():
        name, _ = hf_name("/".join(path), table)
        out[name[: -len(".weight")]] = path
    return out


def _save_safetensors_atomic(tensors: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _peft_target_modules(hf_names: list[str], all_names: list[str], cfg: LoraConfig) -> list[str]:
    """The ``target_modules`` PEFT needs to rebuild exactly these adapted modules: their short names when
    those select exactly them (the usual case), else the full module names."""
    short = sorted({n.split(".")[-1] for n in hf_names})
    if sorted(n for n in all_names if n.split(".")[-1] in short) == sorted(hf_names):
        return short
    return sorted(hf_names)


def save_adapter(path: str | os.PathLike, adapter, cfg: LoraConfig, params, model_config, *,
                 base_model_name_or_path: str = "") -> Path:
    """Write ``adapter`` (``models.lora``; ``params`` are its base model's, for the module names) as a PEFT
    folder. Files are written atomically (a temporary file renamed over the old one)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lora.check_adapter(params, adapter, cfg)
    modules = _hf_modules(params, model_config)
    by_path = {p: n for n, p in modules.items()}
    tensors, names = {}, []
    for kpath, ab in lora.adapter_leaves(adapter).items():
        name = by_path[tuple(str(k) for k in kpath)]
        names.append(name)
        for which in (LORA_A, LORA_B):
            tensors[f"{PREFIX}{name}.{which}.weight"] = np.ascontiguousarray(
                np.asarray(jax.device_get(ab[which]), np.float32))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": _peft_target_modules(names, list(modules), cfg),
        "base_model_name_or_path": base_model_name_or_path or None, "bias": "none",
        # GPT-2's Conv1D stores [in, out]; PEFT flags it (the LoRA factors keep the Linear layout either way)
        "fan_in_fan_out": model_config.model_type == "gpt2", "use_rslora": cfg.use_rslora,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    _save_safetensors_atomic(tensors, path / WEIGHTS_FILE)
    write_json_atomic(path / CONFIG_FILE, config)
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """``(LoraConfig, raw dict)`` of a PEFT folder; ``UserError`` for anything but plain LoRA."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}; pass a PEFT LoRA adapter folder (adapter_config.json + "
                        f"{WEIGHTS_FILE}), e.g. the final/ folder of `proxytune train` with model.lora set")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err.msg}); re-export the adapter") from None
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{file}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters (\"LORA\") are "
                        "supported")
    unsupported = [k for k, bad in (("use_dora", raw.get("use_dora")), ("rank_pattern", raw.get("rank_pattern")),
                                    ("alpha_pattern", raw.get("alpha_pattern")),
                                    ("modules_to_save", raw.get("modules_to_save")),
                                    ("lora_bias", raw.get("lora_bias")),
                                    ("layer_replication", raw.get("layer_replication")),
                                    ("trainable_token_indices", raw.get("trainable_token_indices")))
                   if bad]
    if raw.get("bias", "none") != "none":
        unsupported.append(f"bias={raw.get('bias')!r}")
    if unsupported:
        raise UserError(f"{file} uses {', '.join(unsupported)}, which this library does not support; merge the "
                        "adapter into the model with peft (merge_and_unload) and pass the merged folder instead")
    targets = raw.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    cfg = LoraConfig(r=int(raw.get("r", 8)), alpha=float(raw.get("lora_alpha", 8)),
                     dropout=float(raw.get("lora_dropout") or 0.0), target_modules=targets or ("all-linear",),
                     use_rslora=bool(raw.get("use_rslora", False)))
    return cfg, raw


def load_adapter(path: str | os.PathLike, params, model_config) -> tuple[dict, LoraConfig]:
    """``(adapter, LoraConfig)`` from a PEFT folder, checked against the base ``params`` (module names and
    shapes: an adapter of another base model is a ``UserError`` naming the mismatches)."""
    path = Path(path)
    cfg, _ = read_adapter_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        hint = (" It holds adapter_model.bin (PyTorch pickle): re-save it with peft's save_pretrained "
                "(safe_serialization=True)." if (path / "adapter_model.bin").is_file() else "")
        raise UserError(f"{path} has no {WEIGHTS_FILE}.{hint}")
    modules = _hf_modules(params, model_config)
    adapter: dict = {}
    unknown, other = [], []
    found: dict[str, dict] = {}
    with safe_open(file, framework="numpy") as st:
        for key in st.keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _KEY.fullmatch(name)
            if not m:
                other.append(key)
                continue
            found.setdefault(m["module"], {})[m["which"]] = st.get_tensor(key).astype(np.float32)
    if other:
        raise UserError(f"{file} holds tensors that are not LoRA factors of linear layers ({other[:3]}); only "
                        "lora_A / lora_B weights are supported (merge other parts with peft first)")
    for name, ab in found.items():
        if name not in modules:
            unknown.append(name)
            continue
        if set(ab) != {LORA_A, LORA_B}:
            raise UserError(f"{file}: {name} has only {sorted(ab)}; the adapter file is incomplete")
        native = lora._native_path(params, modules[name])
        adapter = lora._set(adapter, native, {k: jax.numpy.asarray(v) for k, v in ab.items()})
    if unknown:
        raise UserError(f"the adapter {path} does not fit this base model ({model_config.model_type}): it adapts "
                        f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}, which the model lacks; pass "
                        "the base model the adapter was trained on")
    lora.check_adapter(params, adapter, cfg, source=f"the adapter {path}")
    return adapter, cfg


def attach_adapter(model, path: str | os.PathLike, *, merged: bool = False):
    """``model`` (NNX) with the PEFT adapter at ``path`` applied, unmerged (default; shares the base arrays)
    or merged into a new copy of the adapted kernels."""
    from flax import nnx
    params = nnx.to_pure_dict(nnx.split(model)[1])
    adapter, cfg = load_adapter(path, params, model.config)
    return lora.with_adapter(model, adapter, cfg, merged=merged, source=f"the adapter {path}")


def load_pretrained_with_adapter(base: str | os.PathLike, adapter_dir: str | os.PathLike, *, merged: bool = False,
                                 **kwargs):
    """``load_pretrained(base, **kwargs)`` with the PEFT adapter at ``adapter_dir`` applied."""
    from proxytune_jax.models.hf_io import load_pretrained
    return attach_adapter(load_pretrained(base, **kwargs), adapter_dir, merged=merged)
