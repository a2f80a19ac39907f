"""Device meshes and partition rules.

A mesh has three named axes, ``("data", "fsdp", "tensor")``, built in Auto (GSPMD) mode so the classic
``jax.jit(in_shardings=..., out_shardings=...)`` style works (jax 0.10's ``make_mesh`` defaults to Explicit).
Each model family declares ``partition_rules(config)``: an ordered tuple of ``(regex, PartitionSpec)`` matched
with ``re.search`` against a parameter's path joined by ``/`` (e.g. ``model/layers/3/self_attn/q_proj/kernel``);
the first match wins, unmatched parameters are replicated. A spec whose axis does not divide the dimension is
dropped to replication for that dimension, so the same rules run on 1 CPU, 8 simulated devices or a pod.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batches are split over data x fsdp

Rules = Sequence[tuple[str, P]]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the named mesh axes; -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"MeshConfig {self}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"MeshConfig {self} needs {int(np.prod(sizes))} devices but {num_devices} are available; "
                "set the axis sizes so their product is the device count (or use -1 on one axis)")
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh in Auto mode over ``devices`` (default: all)."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                         devices=devices)


def path_to_str(path) -> str:
    """``('model', 'layers', 0, 'q_proj', 'kernel')`` (or jax key entries) -> ``model/layers/0/q_proj/kernel``."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide their dimension (e.g. a 2-wide tensor axis over 5 kv heads)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and dim % size == 0 else None)
    return P(*out[: len(shape)])


def spec_for(path: str, shape: tuple[int, ...], rules: Rules, mesh: Mesh) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return _fit_spec(spec, shape, mesh)
    return P()


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """A pytree of ``NamedSharding`` matching ``tree`` (arrays or ShapeDtypeStructs) by the rules."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_to_str(path), shape, rules, mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def shard_tree(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on ``mesh`` according to ``rules``."""
    return jax.device_put(tree, tree_shardings(tree, rules, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
