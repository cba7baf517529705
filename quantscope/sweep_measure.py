"""The real measurement behind `quantscope sweep`: one grid cell through the comparison harness.

Kept apart from :mod:`quantscope.sweep` (which only decides what is left to do and stores what is done)
so that the sweep logic can be tested with a fake measurement.
"""

from __future__ import annotations

from .errors import QuantscopeError
from .harness.config import CompareConfig
from .harness.preparation import prepare
from .harness.worker import run_job
from .quantization import resolve


def _task_pairs(tasks) -> tuple[tuple[str, str], ...]:
    pairs = []
    for t in tasks:
        if "=" not in t:
            raise QuantscopeError(f"study task '{t}' must be NAME=PATH (e.g. arc-easy=data/ARC-Easy-Test.jsonl)")
        name, path = t.split("=", 1)
        pairs.append((name.strip(), path.strip()))
    return tuple(pairs)


def measure_cell(model: str, fmt: str, eval_spec: dict) -> dict:
    """Measure `fmt` of `model` on the evaluation in `eval_spec`, in a worker process."""
    cfg = CompareConfig(model=model, formats=(fmt,), text=eval_spec["text"], ctx=eval_spec["ctx"],
                        windows=eval_spec["windows"], score_second_half=eval_spec.get("score_second_half", False),
                        tasks=_task_pairs(eval_spec.get("tasks", ())))
    name = resolve(fmt).name
    job = next(j for j in prepare(cfg).jobs if j.format == name)
    return run_job(job, isolate=True)
