"""Where a format's measurement spends its time, and which kernel its layers run.

Each record carries `timings`: seconds per phase of its worker — `startup` (spawning the process and
unpickling the job), `load` (imports and the model's weights), `quantize`, `reference` (the baseline's
pass, whose log-probabilities every other format is compared with) or `evaluate` (a format's
perplexity/KLD pass), `ctx_sweep`, `tasks`, `lm_eval`, `generation`, `speed` (the decode loop), and
`total` (the worker's wall time as the parent saw it). `--verbose` prints them per format.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

# the phases in the order a worker runs them (for printing)
PHASES = ("startup", "load", "quantize", "reference", "evaluate", "ctx_sweep", "tasks", "lm_eval",
          "generation", "speed", "total")


class _Span:
    seconds = 0.0


class Timings:
    """Seconds per phase; `with clock("evaluate") as t:` times a block (t.seconds after it)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[_Span]:
        span = _Span()
        t0 = time.perf_counter()
        try:
            yield span
        finally:
            span.seconds = time.perf_counter() - t0
            self.add(phase, span.seconds)


def describe(timings: dict | None) -> str:
    """'load 2.1s, quantize 0.4s, evaluate 9.8s, speed 3.0s, total 16.0s' (known phases in order)."""
    if not timings:
        return "no timings recorded"
    keys = [k for k in PHASES if k in timings] + sorted(k for k in timings if k not in PHASES)
    return ", ".join(f"{k} {timings[k]:.1f}s" for k in keys)


def kernel_label(model, fmt, device: str) -> str:
    """What the format's decode steps run: a library's own kernels, quantscope's packed-code kernel(s)
    with their layer counts where they differ, or "ref" (dequantize + fp32 matmul per call)."""
    from ..modules.qmodules import kernels_used

    if fmt.kind == "library":
        return f"{fmt.spec.backend} (its own)"
    used = kernels_used(model, "cpu" if str(device) == "cpu" else str(device))
    if not used:
        return "dense (torch matmul)"
    if len(used) == 1:
        return next(iter(used))
    return " + ".join(f"{name} x{n}" for name, n in sorted(used.items()))
