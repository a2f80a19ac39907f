"""Device meshes and partition rules.

A mesh has three named axes, ``("data", "fsdp", "tensor")``, built in Auto (GSPMD) mode so the classic
``jax.jit(in_shardings=..., out_shardings=...)`` style works (jax 0.10's ``make_mesh`` defaults to Explicit).
Each model family declares ``partition_rules(config)``: an ordered tuple of ``(regex, PartitionSpec)`` matched
with ``re.search`` against a parameter's path joined by ``/`` (e.g. ``model/layers/3/self_attn/q_proj/weight``);
the first match wins, unmatched parameters are replicated. A spec whose axis does not divide the dimension is
dropped to replication for that dimension, so the same rules run on 1 CPU, 8 simulated devices or a pod.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batches are split over data x fsdp

# The mesh whose batch axes activations are constrained to while a step is traced (``activation_sharding``).
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Trace the block with ``constrain_batch`` active on ``mesh`` (the jitted train / eval steps do)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain_replicated(x: jax.Array) -> jax.Array:
    """``x`` constrained to be replicated while traced under ``activation_sharding`` (else ``x``): an embedding
    table gathered whole (as FSDP gathers every weight) before a lookup whose rows follow the batch."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.devices.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def constrain_batch(x: jax.Array) -> jax.Array:
    """An activation ``x [B, ...]`` constrained to rows over ``data x fsdp`` and the other dims replicated (the
    residual stream of a Megatron-style tensor-parallel block), while traced under ``activation_sharding``;
    ``x`` itself otherwise, or when ``B`` does not divide over the batch axes. Without it, XLA's partitioner
    may pick another layout for activations between the sharded matmuls and reshard them back."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if mesh.devices.size == 1 or x.shape[0] % ways:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES, *([None] * (x.ndim - 1)))))

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
    """``('model', 'layers', 0, 'q_proj', 'weight')`` (or jax key entries) -> ``model/layers/0/q_proj/weight``."""
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


# ----------------------------------------------------------------------------------------------------------------
# Multi-host and batch placement (training).
# ----------------------------------------------------------------------------------------------------------------

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str = "gloo", initialization_timeout: int = 300) -> int:
    """Join a multi-host run through JAX's own runtime and return this process's index.

    On TPU pods and SLURM/GPU clusters every argument may stay ``None`` (JAX detects the cluster). On CPUs
    (e.g. 2 processes on one laptop) pass ``coordinator_address="127.0.0.1:PORT"``, ``num_processes`` and
    ``process_id``; cross-process collectives then use ``cpu_collectives`` ("gloo" or "mpi"). Calling it a
    second time in the same process is a no-op. Must run before any other JAX call touches a device.
    After it, ``jax.devices()`` lists the devices of every process and ``make_mesh`` spans them all.
    """
    if _distributed_is_initialized():
        return jax.process_index()
    if cpu_collectives:
        try:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        except Exception as err:  # noqa: BLE001 -- an unknown value is a user mistake
            from proxytune_jax.errors import UserError
            raise UserError(f"cpu_collectives={cpu_collectives!r} is not supported by this jax ({err}); "
                            "use 'gloo' (or 'mpi' where jax was built with it)") from err
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    return jax.process_index()


def _distributed_is_initialized() -> bool:
    """Whether ``jax.distributed.initialize`` has already run in this process (public API, jax >= 0.10)."""
    return jax.distributed.is_initialized()


def _check_batch_divisible(rows: int, mesh: Mesh) -> None:
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if rows % n:
        from proxytune_jax.errors import UserError
        raise UserError(f"the global batch size {rows} is not divisible by data x fsdp = {n} devices; choose a "
                        "batch size that is a multiple of it")


def put_global_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch (a pytree of NumPy arrays holding the *global* batch, identical on every process)
    on ``mesh`` with the leading dimension over data x fsdp.

    Each process only copies the rows its own devices hold (``jax.make_array_from_callback``), so the same
    call works on one CPU, 8 simulated devices and many hosts. The leading dimension must be divisible by
    ``mesh.shape['data'] * mesh.shape['fsdp']``.
    """
    def one(x):
        x = np.asarray(x)
        _check_batch_divisible(x.shape[0], mesh)
        sharding = batch_sharding(mesh, x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, batch)


def put_stacked_batches(batches: Sequence[Any], mesh: Mesh) -> Any:
    """Place ``n`` host batches (same structure and shapes, global batches as for ``put_global_batch``) as
    one pytree of ``[n, B, ...]`` arrays: the step axis replicated, the rows over data x fsdp. This is the
    input of ``training.step.make_multi_step``."""
    if not batches:
        raise ValueError("put_stacked_batches needs at least one batch")

    def one(*xs):
        shapes = {np.shape(x) for x in xs}
        if len(shapes) > 1:
            raise ValueError(f"batches to stack differ in shape: {sorted(shapes)}")
        x = np.stack([np.asarray(v) for v in xs])
        _check_batch_divisible(x.shape[1], mesh)
        sharding = NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (x.ndim - 2))))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, *batches)


def suffix_shardings(tree: Any, reference: Any, reference_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves mirror ``reference`` leaves (e.g. Adam's ``mu``/``nu`` of params).

    A leaf whose path ends with a reference leaf's path and has the same shape takes that leaf's sharding;
    every other leaf (step counters, scalars) is replicated.
    """
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                                jax.tree.leaves(reference_shardings)):
        by_path[path_to_str(path)] = (tuple(getattr(leaf, "shape", ())), sh)

    def one(path, leaf):
        p = path_to_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        parts = p.split("/")
        for i in range(len(parts)):  # longest suffix first
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == shape:
                return hit[1]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def put_global(tree: Any, shardings: Any) -> Any:
    """Place host arrays (identical on every process) onto ``shardings`` that may span several processes;
    each process copies only the shards of its own devices. Single-process it equals ``jax.device_put``."""
    def one(x, sharding):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(one, tree, shardings)


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a *replicated* (or fully addressable) array, also when it spans several processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(x.addressable_shards[0].data)
