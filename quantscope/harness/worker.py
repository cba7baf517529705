"""One format measured in a worker process of its own, and the baseline's reference exchange.

A fresh process per format (forked from a server that imported the measuring code once:
harness.processes) keeps peak-RSS figures separate (a process's peak only grows) and
isolates crashes: a format that kills its worker becomes a row with an error, not a failed run. The
baseline's worker exports its per-window log-probabilities to the parent; each later worker asks for
them window by window over its pipe (as memory-file descriptors where the OS has them: harness.shared),
so KL divergence costs one reference pass per run and a quantized worker never holds a second copy of
the model.
"""

from __future__ import annotations

import copy
import gc
import os
import time
import traceback
from dataclasses import replace
from typing import Callable

import torch

from ..errors import QuantscopeError
from ..interrupt import become_worker, start_child
from ..logs import quiet_libraries, torch_threads
from ..measure.memory import heap_trimmer
from ..quantization import QuantizeOptions, quantize, resolve
from ..results.record import error_record, new_record
from .config import Job
from . import shared
from .processes import adopt, parent_state, worker_context
from .timings import Timings, kernel_label


class ReferenceStore:
    """The baseline's per-window log-probabilities, held by the process that runs the comparison."""

    def __init__(self):
        self.windows: dict = {}
        self.key: str | None = None  # the baseline job they belong to (harness.run.job_key)

    def reset(self, key: str) -> None:
        self.windows, self.key = {}, key

    def put(self, i: int, logp) -> None:
        self.windows[i] = logp

    def get(self, i: int):
        if i not in self.windows:
            raise QuantscopeError("internal: the baseline's reference for window %d is missing" % i)
        w = self.windows[i]
        return w.array() if isinstance(w, shared.SharedWindow) else w


class _PipeReference:
    """Worker side of the reference exchange: each window in a memory file whose descriptor crosses the
    worker's pipe (harness.shared), or, where those do not exist, the numbers themselves."""

    def __init__(self, conn):
        self.conn = conn
        self.buf: bytearray | None = None  # one receive buffer, reused for every window

    def put(self, i: int, logp) -> None:
        if shared.available() and isinstance(i, int):
            w = shared.SharedWindow.of(logp)
            try:
                shared.send_window(self.conn, "refshm", i, w, os.getpid())
            finally:
                w.close()  # the parent holds its own descriptor now
        else:
            self.conn.send(("ref", i, logp))

    def get(self, i: int):
        """Window i's reference log-probs: mapped from the baseline's memory file, or received into a
        reused buffer (valid until the next get): unpickling a fresh 100 MB array per window fragments
        the heap and inflates peak RSS."""
        import numpy as np

        self.conn.send(("need", i))
        shape = self.conn.recv()
        w = None
        if shape[0] == "shm":  # ("shm", i, shape) and the descriptor (shared.send_window)
            w, shape = shared.recv_window(self.conn, shape[2]), shape[2]
        n = int(np.prod(shape))
        if self.buf is None or len(self.buf) < 4 * n:
            self.buf = bytearray(4 * n)
        if w is not None:
            try:  # one copy out of the file into the reused buffer (a mapping per window would add to
                w.read_into(self.buf)  # the peak until it is collected)
            finally:
                w.close()
        else:
            self.conn.recv_bytes_into(self.buf)
        return np.frombuffer(self.buf, dtype=np.float32, count=n).reshape(shape)


def _bars():
    """A quantize Progress callback drawing one tqdm bar per label prefix (calibration blocks, a scan)."""
    from tqdm import tqdm

    bars: dict = {}

    def step(label: str, done: int, total: int) -> None:
        key = label.split(" (")[0]
        bar = bars.get(key)
        if bar is None:
            bar = bars[key] = tqdm(desc=key, total=total, unit="step", leave=False)
        bar.total, bar.n = total, done
        bar.set_postfix_str(label[len(key):].strip(" ()"), refresh=True)
        if done >= total:
            bar.close()

    return step


def _options(job: Job, kind: str) -> QuantizeOptions:
    cache = None
    if kind == "mixed":  # mixed-auto's sensitivity scans are cached per model and baseline dtype
        from ..methods.sensitivity import SensitivityCache
        from ..model.load import cache_root

        cache = SensitivityCache(cache_root() / "sensitivity", f"{job.common['model_fingerprint']}|{job.dtype}")
    work = job.work_dir
    if kind == "recovered" and work is None:  # no run directory: LoRA checkpoints in the cache, per model
        from ..model.load import cache_root

        work = str(cache_root() / "recover" / job.common["model_fingerprint"][:16])
    return QuantizeOptions(include=job.include, exclude=job.exclude, calib=job.calib, source=job.model_ref,
                           n_ctx=job.n_ctx, progress=_bars() if job.progress else None, sensitivity_cache=cache,
                           work_dir=work)


def measure_format(job: Job, progress: Callable | None = None, refs=None) -> dict:
    """Measure one format (in the worker process, or inline when isolate=False): torch's thread count
    is set for the measurement and restored after it."""
    with torch_threads(job.threads):
        return _measure(job, progress, refs)


def _measure(job: Job, progress: Callable | None, refs) -> dict:
    from ..evaluate.perplexity import score_windows
    from ..measure.memory import (current_rss_bytes, peak_device_bytes, peak_rss_bytes, reset_peak_device,
                                  reset_peak_rss, tensor_bytes, weight_bytes)
    from ..measure.speed import measure_speed
    from ..model.load import load_model
    from ..modules.swap import select_modules

    fmt = resolve(job.format)
    rec = new_record(format=job.format, baseline=job.is_baseline, **job.common)
    notes: list[str] = []
    clock = Timings()
    reset_peak_device(job.device)  # (inline runs share the process: this format's peak only)
    with clock("load"):
            lm = load_model(job.model_path, dtype=job.dtype, trust_remote_code=job.trust_remote_code, device=job.device)
    base = lm.model
    selected = select_modules(base, job.include, job.exclude)
    mods = dict(base.named_modules())
    # a tied embedding and lm_head are one tensor: its parameters count once, like its bytes
    sel_tensors = list({mods[n].weight.data_ptr(): mods[n].weight for n in selected}.values())
    sel_params = int(sum(t.numel() for t in sel_tensors))
    other_bytes = weight_bytes(base) - tensor_bytes(sel_tensors)
    del mods, sel_tensors  # hold no references to the float weights that quantization replaces
    export = None
    peak_before = 0  # the process's peak before a reset of the count (quantization's own peak)
    if job.is_baseline:
        qmodel, reference, qsec, storage = base, None, 0.0, None
        if job.ref_mode == "export" and refs is not None:
            own = not isinstance(refs, _PipeReference)  # (a pipe's put copies the numbers out itself)
            export = lambda i, logp: refs.put(i, logp.cpu().numpy().copy() if own else logp.cpu().numpy())  # noqa: E731
    else:
        if job.ref_mode == "serve" and refs is not None:
            # the reference comes from the parent: quantize the baseline in place, no second copy
            qmodel, reference = base, (lambda i: torch.from_numpy(refs.get(i)))
            base = None
        elif job.reference_path is not None:  # --reference: the baseline is another model, loaded beside
            qmodel, reference = base, load_model(job.reference_path, dtype=job.dtype,
                                                 trust_remote_code=job.trust_remote_code, device=job.device).model
        else:
            qmodel, reference = copy.deepcopy(base), base
        gc.collect()
        peak_before = peak_rss_bytes()
        phase_peak = reset_peak_rss()
        rss_before = current_rss_bytes()
        done = quantize(qmodel, fmt, _options(job, fmt.kind))
        if phase_peak:  # the quantization's own peak, next to where it started from
            rec["rss_before_quantize_bytes"] = rss_before
            rec["quantize_peak_rss_bytes"] = peak_rss_bytes()
        qmodel, storage, qsec = done.model, done.storage, done.seconds
        clock.add("quantize", qsec)
        notes.extend(done.notes)
        rec.update(done.record)
        lm.model = qmodel  # a backend that replaced the torch model lets the baseline's weights go
    qmodel.eval()
    bar = None
    if progress is None and job.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(job.windows), desc=f"{job.format}: scoring windows", unit="win", leave=False)
        progress = bar.update
    trim, step = heap_trimmer(), progress

    def after_window(n):  # the caller's progress, with a heap trim per window
        trim()
        if step is not None:
            step(n)

    # the baseline's pass is the reference pass: the log-probabilities every other format is compared with
    with clock("reference" if job.is_baseline else "evaluate") as t_eval:
        scores = score_windows(qmodel, job.windows, reference=reference, score_from=job.score_from,
                               progress=after_window, export=export)
    if bar is not None:
        bar.close()
    rec.update(scores.summary())
    rec["eval_seconds"] = t_eval.seconds
    rec["eval_tokens_per_s"] = scores.n_tokens / t_eval.seconds if t_eval.seconds > 0 else None
    if job.is_baseline:
        rec.update({"kld_mean": 0.0, "kld_stderr": 0.0, "kld_p99": 0.0, "kld_median": 0.0,
                    "top1_agreement": 1.0, "window_kld": [0.0] * len(job.windows)})
        notes.append("reference row: KL divergence is measured against this model")
    if job.sweep_windows:
        with clock("ctx_sweep"):
            rec["ctx_sweep"] = _ctx_sweep(qmodel, job, reference)
    task_items = {}
    if job.tasks:
        from ..evaluate.tasks import score_task

        with clock("tasks"):
            for task in job.tasks:
                task_items[task.name] = score_task(qmodel, lm.tokenizer, task)
    if job.lm_eval:
        from ..modules.qmodules import reference_products

        with clock("lm_eval"), reference_products():
            task_items.update(_lm_eval_items(qmodel, lm.tokenizer, job.lm_eval, rec))
    if job.gen_prompts:
        from .agreement import measure_generation

        with clock("generation"):
            rec["generation"] = measure_generation(qmodel, job, reference, refs)
    del reference, base, lm
    gc.collect()
    wb = weight_bytes(qmodel, storage)
    rec.update({"weight_bytes": wb, "quantized_params": sel_params, "quantized_bytes": wb - other_bytes,
                "bits_per_weight": 8.0 * (wb - other_bytes) / sel_params if sel_params else None,
                "quantize_seconds": qsec})
    rec["kernel"] = kernel_label(qmodel, fmt, job.device)
    if job.measure_speed:
        with clock("speed"):
            rec.update({k: v for k, v in measure_speed(qmodel, job.windows[0], job.speed).items() if k != "generated"})
    else:
        rec["prefill_tokens_per_s"] = rec["decode_tokens_per_s"] = None
    rec["peak_rss_bytes"] = max(peak_before, peak_rss_bytes())
    rec["peak_device_bytes"] = peak_device_bytes(job.device)
    if fmt.kind != "library":
        rec["backend"] = fmt.backend
        rec["spec"] = fmt.spec.to_dict()
    if task_items:
        rec["task_items"] = {k: v.to_dict() for k, v in task_items.items()}
    rec["notes"] = notes
    rec["timings"] = clock.seconds
    return rec


def _ctx_sweep(qmodel, job: Job, reference) -> dict:
    from ..evaluate.perplexity import score_windows

    out = {}
    for L, wins in job.sweep_windows.items():
        sc = score_windows(qmodel, wins, reference=reference, score_from=L // 2 if job.score_from > 1 else 1)
        summ = sc.summary()
        out[str(L)] = {k: summ.get(k) for k in (
            "tokens_scored", "perplexity", "perplexity_stderr", "kld_mean", "kld_stderr", "top1_agreement",
            "window_nll", "window_tokens")}  # per window: the paired delta at this length
        if job.is_baseline:
            out[str(L)].update({"kld_mean": 0.0, "kld_stderr": 0.0, "top1_agreement": 1.0})
    return out


def _lm_eval_items(model, tokenizer, spec: dict, rec: dict) -> dict:
    """lm-eval's per-document answers as TaskScores under "lm-eval:<task>", paired like our own tasks."""
    from transformers import PreTrainedModel

    from ..evaluate.lmeval_adapter import run_lm_eval, to_task_scores

    if not isinstance(model, PreTrainedModel):
        raise QuantscopeError(f"--lm-eval-task needs a transformers model; this format runs a "
                              f"{type(model).__name__} (lm-eval's HFLM cannot wrap it)")
    out = run_lm_eval(model, tokenizer, spec["tasks"], limit=spec["limit"], include_path=spec["include"],
                      include_defaults=spec["include"] is None)
    rec["lm_eval_version"] = out["lm_eval_version"]
    return {f"lm-eval:{name}": to_task_scores(out, name) for name in out["tasks"]
            if "per_item" in out["tasks"][name] and "acc" in out["tasks"][name]["per_item"]}


def failure_message(e: Exception) -> str:
    """A failed format's row: the exception's type, first line and where it was raised (call in `except`)."""
    tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} [{tb}]"


def _worker_main(job: Job, conn, spawned_at: float, state=None) -> None:
    started = time.time()  # (wall clocks: the parent's and this process's agree)
    become_worker()  # Ctrl-C is the parent's to report; it stops this process
    adopt(state)  # forked from the worker server: the parent's environment and directory
    with quiet_libraries():
        try:
            rec = measure_format(job, refs=_PipeReference(conn))
            rec.setdefault("timings", {})["startup"] = max(0.0, started - spawned_at)
            conn.send(("ok", rec))
        except QuantscopeError as e:
            conn.send(("error", str(e)))
        except Exception as e:  # a format that fails is a row with its reason, not a failed run
            conn.send(("error", failure_message(e)))
        finally:
            conn.close()


def run_job(job: Job, isolate: bool = True, refs: ReferenceStore | None = None) -> dict:
    """Measure one job, in a fresh spawned process when `isolate`; errors become a record with `error`.

    `refs` holds the baseline's log-probabilities: filled by the baseline's job, served to the others."""
    refs = refs if refs is not None else ReferenceStore()
    if job.ref_mode == "serve" and not refs.windows:
        job = replace(job, ref_mode="local")  # no baseline pass here to serve from: compute side by side
    if not isolate:
        t0 = time.perf_counter()
        try:
            rec = measure_format(job, refs=refs)
            rec.setdefault("timings", {})["total"] = time.perf_counter() - t0
            return rec
        except QuantscopeError as e:
            return error_record(job.format, job.is_baseline, job.common, str(e))
    ctx = worker_context()
    parent, child = ctx.Pipe(duplex=True)
    spawned_at = time.time()
    state = parent_state() if ctx.get_start_method() == "forkserver" else None
    p = ctx.Process(target=_worker_main, args=(job, child, spawned_at, state), daemon=True)
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # (it unblocks SIGINT the first time it starts)
    start_child(p, ctx)  # the worker is born deaf to the terminal's Ctrl-C (quantscope.interrupt)
    child.close()
    msg = None
    try:
        while True:
            m = parent.recv()
            if m[0] == "ref":
                refs.put(m[1], m[2])
            elif m[0] == "refshm":
                refs.put(m[1], shared.recv_window(parent, m[2]))
            elif m[0] == "need":
                held = refs.windows.get(m[1])
                if isinstance(held, shared.SharedWindow):
                    shared.send_window(parent, "shm", m[1], held, p.pid)
                    continue
                arr = refs.get(m[1])
                parent.send(arr.shape)
                parent.send_bytes(arr)
            else:
                msg = m
                break
    except (EOFError, BrokenPipeError):
        pass
    except BaseException:  # Ctrl-C (or any failure here): the worker stops with us, silently
        p.terminate()
        p.join(10)
        if p.is_alive():
            p.kill()
        raise
    p.join()
    if msg is None:
        code = p.exitcode
        why = (f"killed by signal {-code}" + (" (SIGKILL: out of memory?)" if code == -9 else "")
               if code is not None and code < 0 else f"exit code {code}")
        return error_record(job.format, job.is_baseline, job.common, f"worker process died ({why})")
    status, payload = msg
    if status != "ok":
        return error_record(job.format, job.is_baseline, job.common, payload)
    payload.setdefault("timings", {})["total"] = time.time() - spawned_at
    return payload
