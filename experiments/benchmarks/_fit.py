"""What a benchmark may run on this machine: a compiled step whose XLA memory plan does not fit is reported as
"does not fit (N GB)" and skipped, and one that still runs out of memory is reported and skipped, so a run never
dies half-way and every row measured so far is kept (rows are printed as they finish)."""
from __future__ import annotations

import os

import jax

GB = 1e9


def memory_budget_bytes(fraction: float = 0.85) -> float:
    """``fraction`` of the memory a step may use: the accelerator's limit, or on CPU the memory available now
    (``MemAvailable`` of /proc/meminfo, else the physical memory)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return fraction * stats["bytes_limit"]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return fraction * info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError):
        return fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def xla_peak_bytes(compiled) -> float:
    """temp + arguments + outputs − aliased bytes of a compiled executable (XLA's plan); nan if unknown."""
    ma = compiled.memory_analysis()
    if ma is None:
        return float("nan")
    return float(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                 - ma.alias_size_in_bytes)


def human(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.2f} MB"


def does_not_fit(peak: float, budget: float) -> str | None:
    """The note for a step that should not be run, or None."""
    return f"does not fit ({human(peak)} > {human(budget)})" if peak == peak and peak > budget else None


def is_out_of_memory(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or isinstance(err, MemoryError)
