"""XLA compiler options that the jitted train steps pass per ``jax.jit(compiler_options=...)``.

They are never process-global flags. Only XLA:CPU gets any: ``models.cpu_backend.compiler_options`` (temp
heaps of at most ``CPU_HEAP_BYTES``; why, and its benchmark, are in that module).
"""
from __future__ import annotations

from jax.sharding import Mesh

from proxytune_jax.models.cpu_backend import CPU_HEAP_BYTES
from proxytune_jax.models.cpu_backend import compiler_options as _cpu_options

__all__ = ["CPU_HEAP_BYTES", "compiler_options"]


def compiler_options(mesh: Mesh) -> dict | None:
    """The ``compiler_options`` for a ``jax.jit`` whose computation runs on ``mesh``; ``None`` off CPU."""
    if mesh.devices.flat[0].platform != "cpu":
        return None
    return _cpu_options()
