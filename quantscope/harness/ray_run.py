"""Comparison jobs as Ray tasks: one study or comparison spread over the machines of a Ray cluster.

The driver (the process running `quantscope sweep --ray` or `compare --ray`) prepares every job as it
would locally: the text tokenized, the windows cut, the record keys computed. Each (model, text,
format) job becomes one Ray task that declares what it needs: CPUs (`RayOptions.cpus`, also the
torch threads it uses), GPUs (one when the run's device is a GPU) and memory (the planner's estimate,
:mod:`quantscope.plan.worker_memory`). A job that no node of the cluster could ever run is refused
before anything is submitted, naming what it needs.

A task runs in a fresh Ray worker process (`max_calls=1`), as a local job runs in a fresh spawned
process, so its peak RSS is its own. Ray re-runs a task whose worker process or node died
(`max_retries`); a format that fails is a record with its error, as locally, not retried. The task
re-resolves the model on its node and refuses a model whose fingerprint differs from the driver's.
The driver stores each record as it arrives (the caller's store: same keys as a local run).

The baseline's reference (its log-probabilities, for KL divergence), `RayOptions.reference`:
"recompute" (the default) has every task compute it with a copy of the baseline beside its format,
as a local sweep's cells do; "share" runs the baseline first and hands its log-probabilities to the
other tasks through Ray's object store. benchmarks/ray_sweep.py measures both (README: Ray).

Ray is imported here only, and only when asked for: `pip install 'quantscope[ray]'`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from ..errors import QuantscopeError, one_line
from ..results.record import error_record
from .config import Job
from .worker import ReferenceStore, failure_message

INSTALL_HINT = "pip install 'quantscope[ray]' (or: pip install 'ray[default]')"
REFERENCE_MODES = ("recompute", "share")


def import_ray():
    try:
        import ray
    except ImportError:
        raise QuantscopeError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    # "auto": the cluster this machine belongs to (RAY_ADDRESS, else the last `ray start` here);
    # "local": a Ray instance started on this machine for this run; else HOST:PORT of the head
    address: str = "auto"
    cpus: float = 1.0  # CPUs per task: torch in the task runs this many threads
    gpus: float | None = None  # GPUs per task; None: 1 when the run's device is a GPU, else 0
    memory: int | None = None  # bytes per task; None: the planner's estimate of the task's peak
    max_retries: int = 2  # re-runs of a task whose worker process or node died
    reference: str = "recompute"  # see the module docstring
    runtime_env: dict | None = None  # Ray's per-task environment (pip packages, env vars), as given
    local_cpus: int | None = None  # address "local": CPUs of the instance (None: every core)
    object_store_bytes: int | None = None  # address "local": its object store (None: Ray's default)

    def __post_init__(self) -> None:
        if self.cpus <= 0 or (self.gpus is not None and self.gpus < 0) or (self.memory is not None and self.memory <= 0):
            raise QuantscopeError("--ray-cpus must be > 0, --ray-gpus >= 0 and --ray-memory > 0")
        if self.max_retries < 0:
            raise QuantscopeError(f"--ray-retries must be 0 or more, got {self.max_retries}")
        if self.reference not in REFERENCE_MODES:
            raise QuantscopeError(f"--ray-reference must be one of {', '.join(REFERENCE_MODES)}, not {self.reference!r}")


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[object]:
    """Ray, connected: the caller's own session when one is open, else `options.address` (shut down after)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if options.address == "local":
            ray.init(num_cpus=options.local_cpus, object_store_memory=options.object_store_bytes,
                     include_dashboard=False, **quiet)
        else:
            ray.init(address=_reachable(options.address), **quiet)
    except QuantscopeError:
        raise
    except Exception as e:
        raise QuantscopeError(f"could not connect to the Ray cluster at {options.address}: {one_line(e)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _reachable(address: str) -> str:
    """The head's HOST:PORT, checked to accept connections: Ray itself retries for minutes."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        resolved = canonicalize_bootstrap_address_or_die(address)
    except ConnectionError:
        raise QuantscopeError(f"--ray {address}: no Ray cluster found (start one with `ray start --head`, "
                              "give its HOST:PORT, or use --ray local)") from None
    except (ImportError, AttributeError, ValueError):  # Ray moved its helper: check what was given
        resolved = os.environ.get("RAY_ADDRESS") or address if address == "auto" else address
    host, _, port = resolved.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise QuantscopeError(f"--ray {address}: expected auto, local or the head's HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        where = address if resolved == address else f"{address} ({resolved})"
        raise QuantscopeError(f"cannot reach a Ray cluster at {where}: {e.strerror or e}") from None
    return resolved


@dataclass(frozen=True)
class RayTask:
    """One job for the cluster, with the key its record is stored under and a label for messages."""

    key: str
    label: str
    job: Job


def task_resources(job: Job, options: RayOptions) -> dict:
    """What the task of `job` asks Ray for: num_cpus, num_gpus and memory (bytes)."""
    gpus = options.gpus if options.gpus is not None else (1 if job.device.startswith("cuda") else 0)
    memory = options.memory if options.memory is not None else memory_estimate(job)
    return {"num_cpus": options.cpus, "num_gpus": gpus, **({"memory": memory} if memory else {})}


def memory_estimate(job: Job) -> int | None:
    """The planner's estimate of the job's peak memory (None for a model the planner cannot price)."""
    from ..plan.worker_memory import worker_memory_bytes
    from ..quantization import resolve

    fmt = resolve(job.format)
    linear = fmt.storage_bytes if fmt.kind in ("own", "calibrated") else None
    held = _reference_bytes(job) if job.ref_mode == "export" else 0
    try:
        return worker_memory_bytes(_config_dict(job.model_path), job.windows.shape[1], job.dtype, linear,
                                   reference_copy=job.ref_mode == "local", baseline_only=job.is_baseline,
                                   held_bytes=held)
    except QuantscopeError:
        return None


@functools.lru_cache(maxsize=16)
def _config_dict(model_path: str) -> dict:
    from ..model.load import load_config

    return load_config(model_path).to_dict()


def _describe(need: dict) -> str:
    parts = [f"{need.get('num_cpus', 0):g} CPU", f"{need.get('num_gpus', 0):g} GPU"]
    if need.get("memory"):
        parts.append(f"{need['memory'] / 2**30:.2f} GiB memory")
    return ", ".join(parts)


def check_fits(ray, needs: dict[str, dict]) -> None:
    """Refuse, before anything runs, a task that no live node of the cluster has the resources for."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    for label, need in needs.items():
        if not any(all(node.get(names[k], 0) >= v for k, v in need.items()) for node in nodes):
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0), n.get("memory", 0)), default={})
            have = _describe({k: biggest.get(v, 0) for k, v in names.items()})
            raise QuantscopeError(f"{label} needs {_describe(need)} per task and no node of the Ray cluster has "
                                  f"that (the largest has {have}): lower --ray-cpus/--ray-memory or add a node")


class _Tracker:
    """A Ray actor (no CPU of its own) that tasks tell when they start: the driver's running count."""

    def __init__(self):
        self.starts: dict = {}

    def started(self, index: int, node: str) -> int:
        self.starts.setdefault(index, []).append(node)
        return len(self.starts[index])

    def snapshot(self) -> dict:
        return self.starts


def _reference_bytes(job: Job) -> int:
    """Bytes of the baseline's float32 log-probabilities over every scored position of `job`."""
    vocab = _config_dict(job.model_path).get("vocab_size") or 0
    positions = job.windows.shape[0] * (job.windows.shape[1] - job.score_from) + len(job.gen_prompts) * job.gen_tokens
    return positions * vocab * 4


def _reference_keys(job: Job) -> list:
    return list(range(job.windows.shape[0])) + [("gen", i) for i in range(len(job.gen_prompts))]


class _Served(ReferenceStore):
    """The baseline's log-probabilities handed to a task; a private copy per read (Ray's are read-only)."""

    def get(self, i):
        return super().get(i).copy()


def _task(job: Job, model_ref: str, index: int, tracker, measure, n_out: int, *reference) -> object:
    """The body of every Ray task: measure `job` on this node; (record, exported arrays...) when n_out > 1."""
    import time

    import ray

    t0 = time.perf_counter()
    node = ray.util.get_node_ip_address()
    attempt = ray.get(tracker.started.remote(index, node)) if tracker is not None else 1
    refs = _Served()
    for k, arr in zip(_reference_keys(job), reference):
        refs.put(k, arr)
    try:
        if reference and any(arr is None for arr in reference):
            raise QuantscopeError("the baseline's reference could not be computed (see the baseline's row)")
        from ..logs import quiet_libraries
        from ..model.load import resolve as resolve_model
        from .preparation import versions

        here = versions()  # the record says what measured it: this node's torch and transformers
        if here["quantscope_version"] != job.common["quantscope_version"]:  # (record keys carry the version)
            raise QuantscopeError(f"node {node} runs quantscope {here['quantscope_version']}, the driver "
                                  f"{job.common['quantscope_version']}: install the same version on every node")
        job = replace(job, common={**job.common, **here})
        with quiet_libraries():
            _, path, fingerprint, _ = resolve_model(model_ref)
            if fingerprint != job.common["model_fingerprint"]:
                raise QuantscopeError(f"the model {model_ref} on node {node} is not the driver's "
                                      f"(fingerprint {fingerprint[:24]}, the driver's {job.common['model_fingerprint'][:24]})")
            rec = measure(replace(job, model_path=str(path)), refs)
    except QuantscopeError as e:
        rec = error_record(job.format, job.is_baseline, job.common, str(e))
    except Exception as e:  # a format that fails is a row with its reason, as in a local worker
        rec = error_record(job.format, job.is_baseline, job.common, failure_message(e))
    rec["ray"] = {"node": node, "node_id": ray.get_runtime_context().get_node_id()[:16], "attempt": attempt}
    if "error" not in rec:
        rec.setdefault("timings", {})["total"] = time.perf_counter() - t0  # (from the task's start)
    if n_out == 1:
        return rec
    ok = "error" not in rec
    if ok:
        held = sum(a.nbytes for a in refs.windows.values())
        rec.setdefault("notes", []).append(f"peak RSS includes the reference handed to the other tasks "
                                           f"({held / 2**20:.0f} MiB of log-probabilities, held until the task ended)")
    return (rec, *[refs.windows.get(k) if ok else None for k in _reference_keys(job)])


def _measure(job: Job, refs) -> dict:
    from .worker import measure_format

    return measure_format(job, refs=refs)


def _plan(tasks: list[RayTask], share: bool) -> tuple[list[tuple[RayTask | None, Job]], dict]:
    """(the jobs to submit, in order, with their RayTask or None for a reference-only job; for each
    format job that is handed the baseline's reference, the index of the job exporting it)."""
    if not share:
        return [(t, replace(t.job, ref_mode="local")) for t in tasks], {}
    from .preparation import baseline_format

    def group(job: Job) -> tuple:  # jobs scored on the same windows share one reference
        c = job.common
        return (c["model_fingerprint"], c["text_sha256"], c["ctx"], c["windows"], c["window_start_token"],
                c["scoring"], job.dtype, job.device, job.gen_prompts)

    plan: list[tuple[RayTask | None, Job]] = []
    exporter: dict = {}  # group -> index in plan of its exporting job
    served: dict = {}  # index in plan of a format job -> index of its exporter
    for t in sorted(tasks, key=lambda t: not t.job.is_baseline):  # baselines first: they export
        job, g = t.job, group(t.job)
        if job.sweep_windows:  # a context sweep scores more than the windows: each task computes its own
            plan.append((t, replace(job, ref_mode="local")))
        elif job.is_baseline:
            exporter[g] = len(plan)
            plan.append((t, replace(job, ref_mode="export")))
        else:
            if g not in exporter:  # a reference-only pass of the baseline (its record is not kept)
                exporter[g] = len(plan)
                plan.append((None, replace(job, format=baseline_format(job.dtype).name, is_baseline=True,
                                           calib=None, tasks=(), lm_eval={}, measure_speed=False, ref_mode="export")))
            served[len(plan)] = exporter[g]
            plan.append((t, replace(job, ref_mode="serve")))
    return plan, served


def run_jobs(tasks: list[RayTask], options: RayOptions, say: Callable[[str], None] | None = None,
             measure: Callable[[Job, object], dict] = _measure) -> Iterator[tuple[RayTask, dict]]:
    """Measure `tasks` on the connected cluster; yield (task, record) as each finishes, in any order.

    `measure(job, refs) -> record` runs in the task (the harness's measurement unless a test swaps it).
    Stopping the iteration (an exception, Ctrl-C) cancels the tasks still queued or running."""
    if not tasks:
        return
    ray = import_ray()
    plan, served = _plan(tasks, options.reference == "share")
    resources = [task_resources(job, options) for _, job in plan]
    check_fits(ray, {f"format {job.format}": need for (_, job), need in zip(plan, resources)})
    tracker = ray.remote(num_cpus=0)(_Tracker).remote()
    remote = ray.remote(max_calls=1)(_task)
    refs: list = []  # per plan entry: its return refs (the record first)
    pending: dict = {}  # record ref -> (plan index, RayTask or None, job)
    for i, ((task, job), need) in enumerate(zip(plan, resources)):
        n_out = 1 + len(_reference_keys(job)) if job.ref_mode == "export" else 1
        job = replace(job, threads=job.threads or max(1, int(options.cpus)), progress=False)
        here = os.path.expanduser(job.model_ref)
        model_ref = os.path.abspath(here) if os.path.exists(here) else job.model_ref  # workers have another cwd
        out = remote.options(name=f"quantscope {job.format}", max_retries=options.max_retries, num_returns=n_out,
                             runtime_env=options.runtime_env, **need).remote(
            job, model_ref, i, tracker, measure, n_out, *(refs[served[i]][1:] if i in served else ()))
        refs.append(out if n_out > 1 else [out])
        pending[refs[-1][0]] = (i, task, job)
    status = _Status(len(tasks), say)
    try:
        while pending:
            ray.wait(list(pending), num_returns=1, timeout=1.0)
            started = set(ray.get(tracker.snapshot.remote()))
            # every one ready by now: a task that ended after the snapshot is not counted as running
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                _, task, job = pending.pop(ref)
                rec = _result(ray, ref, job, options)
                if task is not None:
                    status.finished(rec)
                    yield task, rec
            waiting = {i for i, task, _ in pending.values() if task is not None}
            status.show(waiting & started)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _result(ray, ref, job: Job, options: RayOptions) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        why = one_line(e).replace("\x1b", "")[:300]
        return error_record(job.format, job.is_baseline, job.common,
                            f"Ray task failed after {options.max_retries + 1} attempts: {type(e).__name__}: {why}")


class _Status:
    """done / running / queued / failed, said whenever it changes."""

    def __init__(self, total: int, say: Callable[[str], None] | None):
        self.total, self.say, self.done, self.failed, self.last = total, say, 0, 0, None

    def finished(self, rec: dict) -> None:
        self.done += 1
        self.failed += 1 if rec.get("error") else 0

    def show(self, running: set) -> None:
        queued = self.total - self.done - len(running)
        now = (self.done, len(running), queued, self.failed)
        if self.say is not None and now != self.last:
            self.say(f"ray: {self.done - self.failed} done, {len(running)} running, {queued} queued, "
                     f"{self.failed} failed (of {self.total})")
        self.last = now
