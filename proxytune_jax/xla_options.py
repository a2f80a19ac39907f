"""XLA compiler options that the jitted train steps pass per ``jax.jit(compiler_options=...)``.

They are never process-global flags. Only XLA:CPU gets any.

CPU: ``xla_multiheap_size_constraint_per_heap = CPU_HEAP_BYTES`` (8 MiB)
-----------------------------------------------------------------------
XLA:CPU gives an executable's temporaries one allocation (a "heap") per call and frees it when the call ends.
glibc's malloc serves a request above its mmap threshold with a fresh ``mmap`` and unmaps it on ``free``. The
threshold adapts upward to freed blocks, but never past 32 MiB. So a temp heap larger than that is faulted in,
page by zeroed page, on every call.

The tiny online-distillation step of ``experiments/benchmarks/train.py`` has a 37.2 MiB temp heap. The option
splits it into heaps of at most 8 MiB; their total is 37.3 MiB. Measured on one core (``getrusage`` minor page
faults over 30 steps, one process per setting):

    default (one 37.2 MiB heap)          9545 faults per step, median 77.5 ms per step
    heaps of at most 8 MiB (this option)  875 faults per step,  median 52.8 ms per step
    glibc told to keep freed memory       422 faults per step,  median 54.1 ms per step
    (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, process-global, for reference)

On 2 cores the step runs at 32-37 ms instead of 40-41 ms.

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
