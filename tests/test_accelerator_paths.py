"""Issue #23, accelerator-first compute: memory linear in sequence length on the portable path, remat
policies, mixed precision and the accelerator benchmark's CPU smoke run.

Memory is read from XLA's compiled memory analysis (``experiments/benchmarks/memory.py``'s
``train_step_temp_bytes``: nothing is allocated or run), so these tests are fast and deterministic.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxytune_jax.models import GPT2Config, backend, init_model, small_llama_config
from proxytune_jax.training.state import split_params

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "experiments" / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_step_memory_grows_linearly_on_the_portable_path():
    """Temp bytes of a tiny Llama train step at T and 8T: at most 9x on the portable path (blockwise
    attention, nothing [T, T] stored), while the stored-P attention (the pre-#23 path, still the CPU's below
    ``cpu_backend.BLOCKWISE_FROM``) grows faster than that, so the bound is not met by accident."""
    memory = _script("memory")
    cfg = memory.llama_shaped(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, max_positions=1024)
    t = 128
    with memory.compute_path("portable"):
        lean = [memory.train_step_temp_bytes(cfg, 1, n) for n in (t, 8 * t)]
    with memory.compute_path("stored-P"):
        stored = [memory.train_step_temp_bytes(cfg, 1, n) for n in (t, 8 * t)]
    assert lean[1] / lean[0] <= 9.0, lean
    assert stored[1] / stored[0] > 9.0, stored
    assert lean[1] < stored[1]
