"""Hugging Face folders <-> Flax models: ``load_pretrained`` and ``save_pretrained``.

``load_pretrained`` also takes a Hub id (``org/name``), resolved through the Hugging Face cache
(``proxytune_jax.models.hub``).

A folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Each family declares ``HF_NAMES``: ``(our path regex, HF name template,
transpose?)``, e.g. ``model/layers/3/self_attn/q_proj/weight`` <-> ``model.layers.3.self_attn.q_proj.weight``
(our ``Linear.weight`` is ``[out, in]`` like PyTorch's; GPT-2's ``Conv1D`` weights are transposed).
Saved folders load in transformers' PyTorch ``AutoModelForCausalLM``; tokenizers are not touched here
(use ``transformers.AutoTokenizer`` and its ``save_pretrained``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from proxytune_jax.atomic import commit, temporary_name, write_json_atomic
from proxytune_jax.errors import UserError
from proxytune_jax.jsonl import read_json_file
from proxytune_jax.models import abstract_model, config_from_hf, family_of, partition_rules
from proxytune_jax.models.hub import resolve_model_path
from proxytune_jax.sharding import spec_for

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def hf_name(our_path: str, table) -> tuple[str, bool]:
    """Our '/'-joined param path -> (HF tensor name, transpose?) by the family's ``HF_NAMES`` table."""
    for pattern, template, transpose in table:
        m = re.fullmatch(pattern, our_path)
        if m:
            return m.expand(template), transpose
    raise KeyError(f"no Hugging Face name for parameter {our_path!r}")


def _flat_params(state) -> list[tuple[str, nnx.Variable]]:
    return [("/".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json_file(index, what="weight index", fix=_REEXPORT)["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise UserError(f"{index} lists shard files that are missing: {missing}; copy the complete folder")
        return {name: path / f for name, f in weight_map.items()}
    files = [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        hint = (" It holds PyTorch .bin weights: convert them with transformers "
                "(AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, safe_serialization=True))."
                if list(path.glob("*.bin")) else "")
        raise UserError(f"{path} has no {SINGLE_FILE} (nor {INDEX_FILE}).{hint}")
    names = {}
    for f in files:
        with safe_open(f, framework="numpy") as st:
            names.update({k: f for k in st.keys()})
    return names


_REEXPORT = "re-export the checkpoint (save_pretrained) or copy the file again from its source"



def generation_eos_ids(path: str | os.PathLike) -> tuple[int, ...] | None:
    """The ``eos_token_id`` of a folder's ``generation_config.json`` as a tuple (None without one)."""
    gpath = Path(path) / "generation_config.json"
    if not gpath.is_file():
        return None
    eos = read_json_file(gpath, what="generation config", fix="fix or delete generation_config.json")
    eos = eos.get("eos_token_id") if isinstance(eos, dict) else None
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{gpath}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return tuple(ids)


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, *, mesh: Mesh | None = None,
                    progress: bool = True, revision: str | None = None):
    """A Flax model from a Hugging Face folder (config.json + safetensors, single or sharded) or Hub id.

    ``path`` is a local folder or a Hub id (``org/name``), fetched through the Hugging Face cache (at
    ``revision``, default ``main``; ``HF_HUB_OFFLINE=1`` reads the cache only): see
    :func:`proxytune_jax.models.hub.resolve_model_path`; an existing local folder always wins.

    Params are cast to ``dtype`` (float32 or bfloat16; logits are float32 either way). With ``mesh``, each
    tensor is placed directly with its family's partition rules (no full copy on one device).
    Raises UserError for a folder without config.json, an unsupported model_type, and missing or
    mis-shaped tensors (all named). ``progress=False`` hides the per-tensor progress bar.
    """
    label = Path(os.fspath(path)).name  # a Hub id's name, not its snapshot's commit hash
    path = resolve_model_path(path, revision=revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model folder "
                        "(config.json + *.safetensors), e.g. one written by save_pretrained")
    config = config_from_hf(read_json_file(config_file, what="model config", fix=_REEXPORT))
    gen_eos = generation_eos_ids(path)
    if gen_eos is not None:
        config = dataclasses.replace(config, generation_eos_token_id=gen_eos)
    family = family_of(config.model_type)[0]
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    params = _flat_params(abstract_state)
    files = _weight_files(path)
    rules = partition_rules(config)
    prefix = getattr(family, "HF_OPTIONAL_PREFIX", None)

    missing, misshaped, used, loaded = [], [], set(), []
    handles: dict[Path, object] = {}
    for our_path, var in tqdm(params, desc=f"loading {label}", unit="tensor", leave=False, disable=not progress):
        name, transpose = hf_name(our_path, family.HF_NAMES)
        if name not in files and prefix and name.startswith(prefix) and name[len(prefix):] in files:
            name = name[len(prefix):]
        if name not in files:
            missing.append(name)
            continue
        used.add(name)
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="numpy")
        shape = tuple(handles[f].get_slice(name).get_shape())
        if transpose:
            shape = shape[::-1]
        if shape != tuple(var.shape):
            misshaped.append(f"{name}: file has {shape if not transpose else shape[::-1]}, "
                             f"model expects {tuple(var.shape)[::-1] if transpose else tuple(var.shape)}")
            continue
        array = handles[f].get_tensor(name)
        array = (array.T if transpose else array).astype(var.dtype)
        if mesh is not None:
            sharding = NamedSharding(mesh, spec_for(our_path, array.shape, rules, mesh))
            array = jax.device_put(array, sharding)
        else:
            array = jnp.asarray(array)
        loaded.append((our_path, var.replace(array)))
    handles.clear()
    if missing or misshaped:
        problems = []
        if missing:
            problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                            + (" ..." if len(missing) > 20 else ""))
        if misshaped:
            problems.append(f"mis-shaped tensors ({len(misshaped)}): {'; '.join(misshaped[:20])}")
        raise UserError(f"{path} does not match its config.json ({config.model_type}): "
                        + " | ".join(problems) + ". Re-export the checkpoint or fix config.json")

    ignored = tuple(getattr(family, "HF_IGNORED", ()))
    unexpected = [n for n in files if n not in used and not any(re.search(p, n) for p in ignored)
                  and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} tensors were not used: {unexpected[:10]}", stacklevel=2)

    state = nnx.from_flat_state([(tuple(_path_key(p) for p in our_path.split("/")), v) for our_path, v in loaded])
    return nnx.merge(graphdef, state)


def _path_key(part: str):
    return int(part) if part.isdigit() else part


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise UserError(f"max_shard_size {size!r} is not a size; use bytes (int) or e.g. '500MB', '5GB'")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def save_pretrained(model, path: str | os.PathLike, *, max_shard_size: int | str | None = "5GB") -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + safetensors, sharded with an index when the
    params exceed ``max_shard_size``) that transformers' PyTorch ``AutoModelForCausalLM`` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    family = family_of(config.model_type)[0]
    tensors: dict[str, np.ndarray] = {}
    for our_path, var in _flat_params(nnx.state(model, nnx.Param)):
        name, transpose = hf_name(our_path, family.HF_NAMES)
        array = np.asarray(jax.device_get(var[...]))
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)

    hf_config = config.to_hf_dict()
    hf_config["dtype"] = str(model.dtype)  # "float32" | "bfloat16"
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if limit is not None and shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    # Every file is written to a temporary name first (a full disk fails here and leaves the old model whole),
    # then each is fsynced and renamed into place, config.json last; a previous save's other weight files go.
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written: list[tuple[Path, Path]] = []
    try:
        for fname, shard in zip(names, shards):
            tmp = temporary_name(path / fname)
            written.append((tmp, path / fname))
            save_file(shard, str(tmp), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                     "weight_map": {name: fname for fname, shard in zip(names, shards) for name in shard}}
            written.append((temporary_name(path / INDEX_FILE), path / INDEX_FILE))
            write_json_atomic(written[-1][0], index)
        written.append((temporary_name(path / "config.json"), path / "config.json"))
        write_json_atomic(written[-1][0], hf_config)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    gen_eos = getattr(config, "generation_eos_token_id", None)
    if gen_eos is not None and not (path / "generation_config.json").exists():
        write_json_atomic(path / "generation_config.json",
                          {"eos_token_id": list(gen_eos) if isinstance(gen_eos, tuple) else gen_eos})
    keep = {final.name for _, final in written}
    for tmp, final in written:
        commit(tmp, final)
    for stale in [path / INDEX_FILE, *path.glob("model*.safetensors")]:  # a previous save's other weights
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return path
