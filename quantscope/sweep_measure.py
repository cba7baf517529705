"""The real measurement behind `quantscope sweep`: one grid cell through the comparison harness.

Kept apart from :mod:`quantscope.sweep` (which only decides what is left to do and stores what is done)
so that the sweep logic can be tested with a fake measurement. `measure_on_ray` measures the cells
left to do as Ray tasks instead, prepared the same way, so a cell gives the same job either way.
"""

from __future__ import annotations

from typing import Callable, Iterator

from .errors import QuantscopeError
from .harness.config import CompareConfig, Job
from .harness.preparation import Inputs, prepare
from .harness.worker import run_job
from .quantization import resolve
from .sweep import Cell, MeasureAll


def _task_pairs(tasks) -> tuple[tuple[str, str], ...]:
    pairs = []
    for t in tasks:
        if "=" not in t:
            raise QuantscopeError(f"study task '{t}' must be NAME=PATH (e.g. arc-easy=data/ARC-Easy-Test.jsonl)")
        name, path = t.split("=", 1)
        pairs.append((name.strip(), path.strip()))
    return tuple(pairs)


def cell_job(model: str, fmt: str, eval_spec: dict, inputs: Inputs | None = None,
             stream: bool | None = None) -> tuple[Job, Inputs]:
    """The job that measures `fmt` of `model` on the evaluation in `eval_spec`, and the loaded inputs
    (hand them back for the next cell of the same model and text: nothing is loaded twice)."""
    cfg = CompareConfig(model=model, formats=(fmt,), text=eval_spec["text"], ctx=eval_spec["ctx"],
                        windows=eval_spec["windows"], score_second_half=eval_spec.get("score_second_half", False),
                        tasks=_task_pairs(eval_spec.get("tasks", ())), stream=stream)
    name = resolve(fmt).name
    prep = prepare(cfg, inputs)
    return next(j for j in prep.jobs if j.format == name), prep.inputs


def measure_cell(model: str, fmt: str, eval_spec: dict) -> dict:
    """Measure `fmt` of `model` on the evaluation in `eval_spec`, in a worker process."""
    return run_job(cell_job(model, fmt, eval_spec)[0], isolate=True)


def measure_on_ray(options, say: Callable[[str], None] | None = None, measure=None) -> MeasureAll:
    """A sweep's `measure_all`: every cell still to do as a Ray task on the connected cluster
    (quantscope.harness.ray_run), prepared here, on the driver, as `measure_cell` prepares it."""
    from .harness.ray_run import RayTask, run_jobs

    def measure_all(cells: list[Cell]) -> Iterator[tuple[Cell, dict]]:
        inputs: dict = {}
        tasks, by_key = [], {}
        for c in cells:
            # in memory: a task's node must hold the model (its declared memory), not this machine
            job, inputs[c.model, c.text] = cell_job(c.model, c.format, c.spec, inputs.get((c.model, c.text)),
                                                    stream=False)
            tasks.append(RayTask(c.key, f"{c.model} {c.format} {c.text}", job))
            by_key[c.key] = c
        extra = {"measure": measure} if measure is not None else {}
        for task, record in run_jobs(tasks, options, say=say, **extra):
            yield by_key[task.key], record

    return measure_all
