"""``ReportConfig.profile`` / ``proxytune train --profile STEPS``: a ``jax.profiler`` trace of chosen steps.

STEPS is ``"A:B"`` (steps A to B, inclusive, 1-based) or ``"N"`` (N steps from the second step of this run on,
so the first step's compilation stays out of the trace). The trace goes to ``WORKDIR/profile``
(``plugins/profile/<time>/<host>.xplane.pb``, what TensorBoard's profile plugin and Perfetto/XProf read).
Steps run in jitted calls of ``steps_per_call``; the trace covers every call that holds a chosen step.
"""
from __future__ import annotations

from pathlib import Path

from proxytune_jax.errors import UserError


def parse_profile_steps(spec: str) -> tuple[int, int] | tuple[int] | None:
    """``""`` -> None, ``"5:8"`` -> (5, 8), ``"3"`` -> (3,) (a count); UserError naming the format otherwise."""
    spec = (spec or "").strip()
    if not spec:
        return None
    try:
        if ":" in spec:
            a, b = (int(x) for x in spec.split(":", 1))
            if 1 <= a <= b:
                return (a, b)
        else:
            n = int(spec)
            if n >= 1:
                return (n,)
    except ValueError:
        pass
    raise UserError(f"--profile {spec!r}: give steps as A:B (1 <= A <= B, e.g. 5:8) or a count N >= 1 "
                    "(N steps after the first)")


def profile_range(spec: str, start: int) -> tuple[int, int] | None:
    """The inclusive step range to trace in a run that starts after step ``start``."""
    parsed = parse_profile_steps(spec)
    if parsed is None:
        return None
    if len(parsed) == 1:
        return (start + 2, start + 1 + parsed[0])
    return parsed


class StepProfiler:
    """``before_step(step)`` when a step's batch is fetched (just before its call), ``after_call(last_step)``
    when a call has finished; starts the trace before the first chosen step, stops after the last."""

    def __init__(self, spec: str, logdir: Path, *, start: int, enabled: bool = True):
        self.range = profile_range(spec, start) if enabled else None
        self.logdir = Path(logdir)
        self.active = False
        self.done = False

    def before_step(self, step: int) -> None:
        if self.range and not self.active and not self.done and self.range[0] <= step <= self.range[1]:
            import jax
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after_call(self, last_step: int, outputs=None) -> None:
        if self.active and last_step >= self.range[1]:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            import jax
            if outputs is not None:
                jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active, self.done = False, True
