"""A comparison run: every job measured (or read back from the run directory) and paired.

With a run directory, each finished record is stored (SQLite, one transaction per record) under a
key of (model fingerprint, format, evaluation spec, version): re-running the same comparison reuses
what is done and measures only the rest. Failed formats are not stored, so they are retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import QuantscopeError
from ..evaluate.prompts import prompts_sha256
from ..placement import resolve_device, resolve_dtype
from ..results.keys import record_key
from .config import CompareConfig, Job
from .pairing import add_paired_statistics
from .preparation import Inputs, prepare
from .worker import ReferenceStore, run_job

# settings that change how a run is carried out, not its figures: not part of the run directory's name
_NOT_IN_RUN_NAME = ("formats", "isolate", "threads", "progress", "reference_cache_bytes")
# what a run directory belongs to: `show` pairs every record with the one baseline, so a second model or
# text in the same directory is refused (window_start_token may differ: calibrated formats added later
# move the scored windows, and their baseline is stored beside the first one)
RUN_BELONGS_TO = ("model_fingerprint", "text_sha256", "ctx", "scoring", "reference_fingerprint")


def eval_spec(job: Job) -> dict:
    """Everything besides the model and format that a record's numbers depend on."""
    calib = hashlib.sha256(job.calib.numpy().tobytes()).hexdigest() if job.calib is not None else None
    return {
        "text_sha256": job.common["text_sha256"], "ctx": job.common["ctx"], "windows": job.common["windows"],
        "window_start_token": job.common["window_start_token"], "scoring": job.common["scoring"],
        "include": list(job.include), "exclude": list(job.exclude), "calib_sha256": calib,
        "dtype": job.dtype, **({"device": job.device} if job.device != "cpu" else {}), "speed": asdict(job.speed) if job.measure_speed else None,
        "tasks": [[t.name, t.source, len(t.items), getattr(t, "shots", 0)] for t in job.tasks],
        "ctx_sweep": sorted(job.sweep_windows),
        # only when asked: records stored before lm-eval tasks existed keep their keys
        **({"lm_eval": job.lm_eval} if job.lm_eval else {}),
        **({"streamed": True} if job.streamed else {}),
        **({"generation": {"prompts_sha256": prompts_sha256([list(p) for p in job.gen_prompts]),
                           "tokens": job.gen_tokens}} if job.gen_prompts else {}),
        # records of runs that select more than the decoder linears were stored while a tied
        # embedding's parameters counted twice in bits_per_weight: those are measured again
        **({"tied_params": "once"} if job.include else {}),
        # --reference: the baseline is another model (absent: the model itself, as before the option)
        **({"reference": job.common["reference_fingerprint"]} if "reference_fingerprint" in job.common else {}),
    }


def job_key(job: Job) -> str:
    return record_key(job.common["model_fingerprint"], job.format, eval_spec(job), __version__)


def default_run_dir(config: CompareConfig, root: str = "quantscope-runs") -> str:
    """`quantscope-runs/<model>-<text>-<hash of the evaluation settings>`: the same command resumes."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_RUN_NAME}
    if settings.get("stream") is None:  # named as before --stream existed
        settings.pop("stream", None)
    if settings.get("reference") is None:  # named as before --reference existed
        settings.pop("reference", None)
    device = resolve_device(config.device)
    if device == "cpu":  # named as before --device existed: `auto` and `cpu` on a CPU machine are one run
        settings.pop("device")
        settings["dtype"] = resolve_dtype(config.dtype, device)
    else:
        settings["device"] = device
    key = json.dumps(settings, sort_keys=True, default=str)

    def short(s) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(str(s).rstrip("/")))[:24].strip("-") or "x"

    return os.path.join(root, f"{short(config.model)}-{short(config.text)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}")


def compare(config: CompareConfig, on_record: Callable[[dict], None] | None = None,
            run_dir: str | os.PathLike | None = None, inputs: Inputs | None = None,
            on_note: Callable[[str], None] | None = None,
            refs: ReferenceStore | None = None) -> tuple[list[dict], dict]:
    """Run the comparison: (records, meta). `on_record` sees each record as it is finished; `on_note`
    the line saying a run is streamed, before it starts. `inputs` (from an earlier prepare with the same
    model and text) skips loading them again; `refs` (from an earlier call with the same baseline and
    windows) keeps the baseline's log-probabilities, so a later call measuring more formats does not run
    the reference pass again (recommend's ladder)."""
    from ..results.store import RunStore

    if config.isolate and config.stream is not True:  # the worker server imports while this process prepares
        from ..interrupt import start_server
        from .processes import worker_context

        start_server(worker_context())
    prep = prepare(config, inputs)
    # an existing run directory is opened up front (to reuse its records); a new one only once the
    # baseline has been measured, so a run that fails on bad input leaves nothing behind
    store = RunStore.open(run_dir, meta=prep.meta, same=RUN_BELONGS_TO) if run_dir is not None and Path(run_dir).exists() else None
    if prep.jobs[0].streamed:
        if on_note is not None:
            on_note(next((n for n in prep.notes if n.startswith("streamed:")),
                         "streamed (--stream): the model is read block by block, every format in one pass"))
        return _compare_streamed(prep, store, run_dir, on_record), prep.meta
    records = []
    refs = refs if refs is not None else ReferenceStore()
    gen_base = None  # the baseline's continuations, handed to every format's job
    try:
        for job in prep.jobs:
            key = job_key(job) if run_dir is not None else None
            if run_dir is not None:  # LoRA-recovered formats train (and resume) inside the run directory
                job = replace(job, work_dir=os.path.join(str(run_dir), "recover"))
            rec = store.get(key) if store else None
            if job.gen_prompts and not job.is_baseline:
                job = replace(job, gen_baseline=gen_base)
            elif job.gen_prompts and rec is not None:  # resumed: the stored continuations, not new ones
                job = replace(job, gen_baseline=_continuations(rec))
            if job.is_baseline and refs.key != job_key(job):
                refs.reset(job_key(job))  # another baseline's (or windows') log-probabilities: not these
            if rec is not None and job.is_baseline and job.ref_mode == "export" and not refs.windows and any(
                    not store.has(job_key(j)) for j in prep.jobs[1:]):
                # stored, but the formats still to measure need its log-probabilities: one pass over the
                # windows only (its tasks, context sweep and speed are in the stored record)
                again = run_job(replace(job, tasks=(), sweep_windows={}, measure_speed=False, lm_eval={}),
                                isolate=config.isolate, refs=refs)
                if again.get("error"):
                    raise QuantscopeError(f"the baseline could not be measured: {again['error']}")
            if rec is not None:
                rec = dict(rec, reused=True)
            else:
                rec = run_job(job, isolate=config.isolate, refs=refs)
                if rec.get("error") and job.is_baseline:
                    raise QuantscopeError(f"the baseline could not be measured: {rec['error']}")
                if run_dir is not None and not rec.get("error"):
                    store = _put(store, run_dir, prep.meta, key, rec)
            if job.is_baseline and job.gen_prompts:
                gen_base = _continuations(rec)
            if on_record:
                on_record(rec)
            records.append(rec)
        _pair(records, store)
    finally:
        if store:
            store.close()
    return records, prep.meta


def _put(store, run_dir, meta: dict, key: str, rec: dict):
    """Store a finished record; the run directory is created with the first one. Returns the store."""
    from ..results.store import RunStore

    if store is None:
        store = RunStore.open(run_dir, meta=meta, same=RUN_BELONGS_TO)
    store.put(key, rec)
    return store


def _pair(records: list[dict], store) -> None:
    add_paired_statistics(records)
    if store:
        store.update_meta({"last_formats": [r["format"] for r in records]})


def _continuations(rec: dict) -> tuple:
    return tuple(tuple(c) for c in rec["generation"]["continuations"])


def _compare_streamed(prep, store, run_dir, on_record) -> list[dict]:
    """The streamed pass (harness.stream) over the baseline and every format not already stored; the
    baseline is streamed again whenever a format is (its hidden states are every format's reference)."""
    from .stream import stream_jobs

    keys = [job_key(j) if run_dir is not None else None for j in prep.jobs]
    stored = [store.get(k) if store else None for k in keys]
    todo = [j for j, r in zip(prep.jobs, stored) if r is None]
    if todo and not todo[0].is_baseline:
        todo = [prep.jobs[0], *todo]
    try:
        fresh = {}
        if todo:
            bar = None
            if prep.config.progress:
                from tqdm import tqdm

                bar = tqdm(desc="streamed: blocks", unit="block", leave=False)
            step = (lambda done, total, label: (setattr(bar, "total", total), bar.update(1))) if bar else None  # noqa: E731
            recs = stream_jobs(todo, prep.inputs.model_config, progress=step, tokenizer=prep.inputs.tokenizer)
            if bar is not None:
                bar.close()
            fresh = {r["format"]: r for r in recs}
        records = []
        for job, key, rec in zip(prep.jobs, keys, stored):
            if rec is not None:
                rec = dict(rec, reused=True)
            else:
                rec = fresh[job.format]
                if run_dir is not None:
                    store = _put(store, run_dir, prep.meta, key, rec)
            if on_record:
                on_record(rec)
            records.append(rec)
        _pair(records, store)
    finally:
        if store:
            store.close()
    return records
