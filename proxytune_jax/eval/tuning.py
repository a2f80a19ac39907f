"""Metrics specific to decoding-time tuning: gap closed and the share of changed top-1 tokens."""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def gap_closed_one(base: float, proxy: float, tuned: float) -> float:
    """``(proxy − base) / (tuned − base)`` for one task, uncapped (can be < 0 or > 1). NaN when
    ``tuned == base`` (the gap is undefined)."""
    denom = tuned - base
    if denom == 0:
        return float("nan")
    return (proxy - base) / denom


def gap_closed(base: Mapping[str, float] | float, proxy: Mapping[str, float] | float,
               tuned: Mapping[str, float] | float) -> float:
    """Gap closed averaged uncapped over tasks (Liu et al. 2024; ``docs/methods.md`` §3.2). Scalars mean one
    task; dicts map task -> score and must share keys. Tasks with an undefined gap (``tuned == base``) are
    left out of the mean; NaN when no task has a defined gap."""
    if not isinstance(base, Mapping):
        return gap_closed_one(float(base), float(proxy), float(tuned))  # type: ignore[arg-type]
    if set(base) != set(proxy) or set(base) != set(tuned):  # type: ignore[arg-type]
        from proxytune_jax.errors import UserError

        raise UserError("gap_closed: base, proxy and tuned must score the same tasks")
    values = [gap_closed_one(base[k], proxy[k], tuned[k]) for k in base]  # type: ignore[index]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def top1_changed_share(logits, base_logits, mask=None) -> float:
    """Share of valid positions whose argmax under ``logits`` differs from the argmax under ``base_logits``
    ([..., V] each, the same vocabulary). The paper reports 13–25% for proxy-tuned vs base Llama-2."""
    a = np.asarray(logits).argmax(-1)
    b = np.asarray(base_logits).argmax(-1)
    changed = a != b
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        return float(changed[m].mean()) if m.any() else float("nan")
    return float(changed.mean()) if changed.size else float("nan")
