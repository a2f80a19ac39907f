"""XLA compiler options that the jitted train steps pass per ``jax.jit(compiler_options=...)``.

They are never process-global flags. Only XLA:CPU gets any.

CPU: ``xla_multiheap_size_constraint_per_heap = CPU_HEAP_BYTES`` (8 MiB)
-----------------------------------------------------------------------
XLA:CPU gives an executable's temporaries one allocation (a "heap") per call and frees it when the call ends.
glibc's malloc serves a request above its mmap threshold with a fresh ``mmap`` and unmaps it on ``free``. The
threshold adapts upward to freed blocks, but never past 32 MiB. So a temp heap larger than that is faulted in,
page by zeroed page, on every call.

Even the tiny online-distillation step of ``experiments/benchmarks/train.py`` has a temp heap above 32 MiB.
The option splits the temporaries into heaps of at most 8 MiB (about the same total), each below the
threshold, so malloc keeps reusing them instead of mapping and faulting in fresh zeroed pages on every call.
Telling glibc to keep freed memory (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``) would avoid the
faults too, but only process-wide. ``experiments/benchmarks/cpu_heaps.py`` measures minor page faults and
time per step of that train step with this option, without it, and with the glibc settings, each in a fresh
process, in one run.

The constraint is soft: a single buffer larger than 8 MiB still gets a heap of its own. Buffer assignment does
not change any arithmetic, so results are bit for bit the same.
"""
from __future__ import annotations

from jax.sharding import Mesh

CPU_HEAP_BYTES = 8 << 20


def compiler_options(mesh: Mesh) -> dict | None:
    """The ``compiler_options`` for a ``jax.jit`` whose computation runs on ``mesh``; ``None`` off CPU."""
    if mesh.devices.flat[0].platform != "cpu":
        return None
    return {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_BYTES}
