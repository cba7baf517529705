"""`compare --ray`: one comparison's formats as Ray tasks, stored like a local comparison.

The driver prepares the run exactly as :func:`quantscope.harness.run.compare` does, reuses what the run
directory holds under the same keys, and stores each record as its task finishes (failed formats are
not stored, so they are retried, as locally). With generation prompts the baseline runs first: every
format's job carries the baseline's continuations.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..errors import QuantscopeError
from .config import CompareConfig
from .pairing import add_paired_statistics
from .preparation import prepare
from .ray_run import RayOptions, RayTask, ray_session, run_jobs
from .run import RUN_BELONGS_TO, _continuations, job_key


def compare_on_ray(config: CompareConfig, options: RayOptions, on_record: Callable[[dict], None] | None = None,
                   run_dir: str | os.PathLike | None = None,
                   say: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """As `compare`, each format a Ray task on the cluster `options` names: (records, meta)."""
    from ..results.store import RunStore

    if config.stream:
        raise QuantscopeError("--stream and --ray cannot be combined: a Ray task measures its format with the "
                              "model in memory, on a node that has the memory it declares")
    with ray_session(options):  # an unreachable cluster is refused before the model is read
        prep = prepare(replace(config, stream=False))  # (the nodes must hold the model, not this machine)
        store = RunStore.open(run_dir, meta=prep.meta, same=RUN_BELONGS_TO) if run_dir is not None and Path(run_dir).exists() else None
        done: dict[str, dict] = {}
        try:
            todo = []
            for job in prep.jobs:
                rec = store.get(job_key(job)) if store else None
                if rec is None:
                    todo.append(job)
                    continue
                done[job.format] = dict(rec, reused=True)
                if on_record:
                    on_record(done[job.format])

            def measure(jobs) -> None:
                nonlocal store
                for task, rec in run_jobs([RayTask(job_key(j), j.format, j) for j in jobs], options, say=say):
                    if rec.get("error") and task.job.is_baseline:
                        raise QuantscopeError(f"the baseline could not be measured: {rec['error']}")
                    if run_dir is not None and not rec.get("error"):
                        if store is None:
                            store = RunStore.open(run_dir, meta=prep.meta, same=RUN_BELONGS_TO)
                        store.put(task.key, rec)
                    done[task.job.format] = rec
                    if on_record:
                        on_record(rec)

            base = prep.jobs[0]
            if base.gen_prompts:  # the formats' jobs need the baseline's continuations
                if base.format not in done:
                    measure([base])
                gen = _continuations(done[base.format])
                todo = [replace(j, gen_baseline=gen) for j in todo if not j.is_baseline]
            measure(todo)
            records = [done[j.format] for j in prep.jobs]
            add_paired_statistics(records)
            if store:
                store.update_meta({"last_formats": [r["format"] for r in records]})
        finally:
            if store:
                store.close()
    return records, prep.meta
