"""Which compute path the models trace: chosen by backend at trace time.

``current()`` is ``jax.default_backend()`` ("cpu", "gpu", "tpu") unless a ``force(name)`` block overrides it
(tests and benchmarks use ``force("portable")`` to run the accelerator-default path on CPU). The paths:

* ``"cpu"``: the CPU-only tricks of ``models.cpu_backend`` (transposed small-batch dense behind an
  optimization barrier, causal query blocks sized for a 2-core CPU, heap options);
* ``"gpu"``: plain einsums; attention through cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``)
  where the layout allows, else the portable blockwise attention;
* ``"tpu"``: plain einsums; splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) when it
  imports, else the portable blockwise attention;
* ``"portable"`` (any other backend): plain einsums and ``attention.attend_blockwise`` (online softmax forward,
  recomputation backward, no stored [T, T]).

The choice is made while tracing: a function already jitted keeps the path it was traced with.
"""
from __future__ import annotations

import contextlib

import jax

PATHS = ("cpu", "gpu", "tpu", "portable")
_forced: list[str] = []


def current() -> str:
    """The compute path the next trace takes (see the module docstring)."""
    if _forced:
        return _forced[-1]
    name = jax.default_backend()
    return name if name in ("cpu", "gpu", "tpu") else "portable"


@contextlib.contextmanager
def force(name: str):
    """Trace with compute path ``name`` (one of ``PATHS``) inside the block."""
    if name not in PATHS:
        raise ValueError(f"compute path {name!r} is not one of {PATHS}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
