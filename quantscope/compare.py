"""The comparison protocol: every format measured the same way, each in its own worker process.

`compare(config)` validates everything first (formats, model, text, window counts) so a bad input fails
before any work; then, for each format, a fresh worker process loads the baseline, makes the format,
scores the same token windows (perplexity, and KL divergence / top-1 agreement against the baseline
computed side by side, window by window), measures the weight bytes, prefill/decode speed and the
worker's peak RSS, and returns one record. A worker per format keeps peak-RSS figures separate (a
process's peak only grows) and isolates crashes: a format that kills its worker becomes a row with an
error, not a failed run.
"""

from __future__ import annotations

import copy
import gc
import math
import multiprocessing as mp
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .errors import QuantscopeError
from .formats.spec import FormatSpec
from .measure.speed import SpeedConfig
from .registry import BackendFormat, resolve_format

# The default run: the baseline plus the formats people reach for first. With 8 windows of 512 tokens
# it finishes in a few minutes on 2 CPU cores.
DEFAULT_FORMATS = ("fp32", "bf16", "int8", "int4-g128", "nf4")
# Fewer windows than this and the paired bootstrap over windows has too little to resample.
MIN_WINDOWS_FOR_CI = 5


@dataclass(frozen=True)
class CompareConfig:
    model: str = "default"  # 'default' (embedded SmolLM2), a local HF folder, a Hub id or a .gguf file
    formats: tuple[str, ...] = DEFAULT_FORMATS
    text: str = "python-docs"  # 'python-docs', a .txt or a .jsonl (field 'text')
    ctx: int = 512  # tokens per window
    windows: int = 8  # windows scored: 8 x 512 = 4,096 tokens keeps the default run to minutes
    score_second_half: bool = False  # llama.cpp convention: score only the second half of each window
    include: tuple[str, ...] = ()  # module-name patterns added to the default selection
    exclude: tuple[str, ...] = ()  # module-name patterns removed from it
    calib: str | None = None  # calibration text for GPTQ/AWQ; None: the evaluation text's head
    calib_samples: int = 128
    calib_seqlen: int = 512
    # keep the calibration head out of the evaluation windows even when no format of this run needs
    # calibration, so that runs with and without calibrated formats score the same windows
    # (recommend measures its ladder one format at a time)
    reserve_calib: bool = False
    speed: SpeedConfig = SpeedConfig()
    measure_speed: bool = True
    isolate: bool = True  # one worker process per format (separate peak RSS, crash isolation)
    dtype: str = "float32"  # baseline dtype
    threads: int | None = None  # torch threads in workers (None: torch's default)
    trust_remote_code: bool = False
    tasks: tuple[tuple, ...] = ()  # (task name, path) or (task name, path, limit) tuples, see evaluate.tasks
    task_limit: int | None = None  # questions per task, for tasks that do not give their own limit
    task_sample_seed: int | None = None
    task_shots: int = 0
    # lm-evaluation-harness task names run on every format (pip install 'quantscope[lmeval]'); with
    # lm_eval_include, tasks come from that directory of YAML configs only (lm-eval's own are not indexed)
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None
    ctx_sweep: tuple[int, ...] = ()  # extra context lengths: perplexity and KLD at each (long context)
    # The baseline's log-probabilities of the scored positions are kept in this process's memory and
    # served to each format's worker window by window, when they fit in this budget: every format is
    # then compared with one reference pass instead of recomputing it (half the work). Larger
    # evaluations fall back to computing the reference side by side in each worker.
    reference_cache_bytes: int = 6 * 2**30
    progress: bool = False  # progress bars with ETA on stderr (the CLI turns them on for a terminal)

    def __post_init__(self):
        if self.ctx < 2:
            raise QuantscopeError(f"--ctx must be at least 2, got {self.ctx}")
        if self.windows < 1:
            raise QuantscopeError(f"--windows must be at least 1, got {self.windows}")
        if not self.formats:
            raise QuantscopeError("no formats given")
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise QuantscopeError("--calib-samples must be >= 1 and --calib-seqlen >= 2")


@dataclass
class Job:
    """Everything a worker needs to measure one format (picklable)."""

    format: str
    is_baseline: bool
    model_path: str
    model_name: str
    model_ref: str
    dtype: str
    trust_remote_code: bool
    windows: torch.Tensor
    score_from: int
    calib: torch.Tensor | None
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    speed: SpeedConfig
    measure_speed: bool
    threads: int | None
    common: dict = field(default_factory=dict)  # fields copied into the record
    tasks: list = field(default_factory=list)  # loaded Task objects
    sweep_windows: dict = field(default_factory=dict)  # {ctx: [n, ctx] windows} for --ctx-sweep
    progress: bool = False  # tqdm bars on stderr (only when it is a terminal)
    ref_mode: str = "local"  # baseline: "export" its log-probs; others: "serve" (from the parent) or "local"
    lm_eval: dict = field(default_factory=dict)  # {"tasks", "include", "limit"} for --lm-eval-task


@dataclass
class Prepared:
    config: CompareConfig
    specs: list  # FormatSpec | BackendFormat, baseline first
    jobs: list[Job]
    notes: list[str]
    meta: dict


def versions() -> dict:
    import transformers

    return {"quantscope_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__}


def _baseline_name(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def prepare(config: CompareConfig) -> Prepared:
    """Validate the inputs and build one job per format; raises QuantscopeError on any bad input."""
    from .evaluate.text import head_samples, load_text, make_windows, tokenize
    from .model.load import load_config, load_tokenizer, resolve

    specs = []
    seen = set()
    for name in config.formats:
        s = resolve_format(name)
        if s.name not in seen:
            seen.add(s.name)
            specs.append(s)
    base_name = _baseline_name(config.dtype)
    notes: list[str] = []
    kind, path, fingerprint, model_name = resolve(config.model)
    try:
        tok = load_tokenizer(path, config.trust_remote_code)
        mcfg = load_config(path, config.trust_remote_code)
    except QuantscopeError:
        raise
    except Exception as e:
        hint = " (offline, or no such model?)" if kind == "hub" else ""
        raise QuantscopeError(f"could not load model '{config.model}'{hint}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if kind == "local":
        _check_safetensors(Path(path))
    max_pos = getattr(mcfg, "max_position_embeddings", None)
    if max_pos and config.ctx > max_pos:
        raise QuantscopeError(f"--ctx {config.ctx} is longer than the model's maximum ({max_pos} tokens)")
    text = load_text(config.text)
    ids = tokenize(tok, text.text)
    calibrated = any(_needs_calib(s) for s in specs)
    calib = None
    start = 0
    if calibrated or config.reserve_calib:
        need = config.calib_samples * config.calib_seqlen
        if config.calib is None or load_text(config.calib).sha256 == text.sha256:
            cids = ids
            start = need  # evaluation starts after the calibration head: disjoint by construction
            notes.append(f"calibration: the first {need} tokens of {text.name} ({config.calib_samples} x "
                         f"{config.calib_seqlen}); evaluation windows start after them (disjoint)")
            cname = text.name
        else:
            ctext = load_text(config.calib)
            cids = tokenize(tok, ctext.text)
            cname = ctext.name
            notes.append(f"calibration: {config.calib_samples} x {config.calib_seqlen} tokens from the head of {cname}")
        calib = head_samples(cids, config.calib_samples, config.calib_seqlen, cname)
        n = calib.shape[0]
        if n < config.calib_samples:
            notes.append(f"calibration text has room for only {n} samples of {config.calib_seqlen} tokens")
            if cids is ids:
                start = n * config.calib_seqlen
    windows = make_windows(ids, config.ctx, config.windows, start=start, source=text.name)
    overlap = calibration_overlap(calib, windows) if calib is not None else None
    # disjoint text still shares common phrases (0.3% of 8-grams between disjoint halves of
    # WikiText-2 test, measured); 2% and above means the same passages are in both
    if overlap is not None and overlap >= 0.02:
        notes.append(f"WARNING: {100 * overlap:.1f}% of the evaluation's 8-token sequences also occur in the "
                     "calibration data: calibrated formats are being scored partly on text they were fitted to")
    score_from = config.ctx // 2 if config.score_second_half else 1
    tasks = []
    if config.tasks:
        from .evaluate.tasks import load_task

        for tname, tpath, *own_limit in config.tasks:
            limit = own_limit[0] if own_limit else config.task_limit
            tasks.append(load_task(tname, tpath, limit=limit, sample_seed=config.task_sample_seed,
                                   shots=config.task_shots if tname == "mmlu" else 0))
    lm_eval = {}
    if config.lm_eval_tasks:
        from .evaluate.lmeval_adapter import _import_lm_eval

        _import_lm_eval()  # not installed: the install hint now, before any format is measured
        include = config.lm_eval_include
        if include is not None and not os.path.isdir(include):
            raise QuantscopeError(f"--lm-eval-include {include}: not a directory of lm-eval task YAML files")
        lm_eval = {"tasks": list(config.lm_eval_tasks), "include": include and os.path.abspath(include),
                   "limit": config.task_limit}
    sweep = {}
    for L in config.ctx_sweep:
        if max_pos and L > max_pos:
            raise QuantscopeError(f"--ctx-sweep {L} is longer than the model's maximum ({max_pos} tokens)")
        # about the same number of scored tokens at every length, from the same start of the text
        n = max(1, (config.windows * config.ctx) // L)
        sweep[L] = make_windows(ids, L, n, start=start, source=text.name)
    common = {
        "model": model_name,
        "model_ref": config.model,
        "model_fingerprint": fingerprint,
        "text": text.name,
        "text_sha256": text.sha256,
        "ctx": config.ctx,
        "windows": config.windows,
        "window_start_token": start,
        "scoring": "second-half" if config.score_second_half else "all-but-first",
        "calibration_overlap": overlap,
        **versions(),
    }
    jobs = []
    ordered = [resolve_format(base_name)] + [s for s in specs if s.name != base_name]
    vocab = getattr(mcfg, "vocab_size", None) or len(tok)
    ref_bytes = config.windows * (config.ctx - score_from) * vocab * 4
    cache_ref = ref_bytes <= config.reference_cache_bytes and not sweep and len(ordered) > 1
    for s in ordered:
        jobs.append(Job(format=s.name, is_baseline=s.name == base_name, model_path=str(path),
                        model_name=model_name, model_ref=config.model, dtype=config.dtype,
                        trust_remote_code=config.trust_remote_code, windows=windows,
                        score_from=score_from, calib=calib if _needs_calib(s) else None,
                        include=config.include, exclude=config.exclude, speed=config.speed,
                        measure_speed=config.measure_speed, threads=config.threads,
                        common=dict(common), tasks=tasks, sweep_windows=sweep,
                        progress=config.progress, lm_eval=lm_eval,
                        ref_mode=("export" if s.name == base_name else "serve") if cache_ref else "local"))
    if kind in ("embedded", "gguf"):
        notes.append("baseline = GGUF weights dequantized to FP32 by transformers (not an original "
                     "full-precision checkpoint)")
    meta = {**common, "formats": [s.name for s in ordered], "notes": notes, "machine": _machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": _config_dict(config)}
    return Prepared(config, ordered, jobs, notes, meta)


def _check_safetensors(folder: Path) -> None:
    """Read every safetensors header (cheap) so a corrupt or truncated weight file fails before any work."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise QuantscopeError(f"no weights in {folder} (expected *.safetensors)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
                if keys:
                    h.get_slice(keys[-1])
        except Exception as e:
            raise QuantscopeError(f"corrupt weight file {f}: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}") from None


def calibration_overlap(calib: torch.Tensor, windows: torch.Tensor, n: int = 8) -> float:
    """Share of the evaluation windows' n-token sequences that also occur in the calibration rows."""
    def grams(rows: torch.Tensor) -> set:
        out = set()
        for r in rows.tolist():
            out.update(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        return out

    ev = grams(windows)
    return len(ev & grams(calib)) / len(ev) if ev else 0.0


def _needs_calib(s) -> bool:
    if isinstance(s, FormatSpec):
        return s.calibrated
    return bool(getattr(s, "needs_calibration", False))  # BackendFormat, MixedSpec (mixed-auto)


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def _config_dict(config: CompareConfig) -> dict:
    d = asdict(config)
    d["formats"] = list(config.formats)
    return d


# ---------------------------------------------------------------- the worker

def _quantize(model, spec, job: Job, notes: list[str], record: dict | None = None):
    """Make `spec` from the baseline `model` (in place); returns (model, tensors-for-bytes or None).
    Fields a method adds to the record (mixed precision's plan and predicted KLD) go into `record`."""
    from .methods.mixed import MixedSpec
    from .model.swap import apply_plan, uniform_plan

    if isinstance(spec, MixedSpec):
        from .methods.mixed import quantize_mixed, sensitivity_windows
        from .model.load import cache_root
        from .sensitivity import SensitivityCache

        windows = sensitivity_windows(job.calib) if spec.needs_calibration else None
        cache = SensitivityCache(cache_root() / "sensitivity", f"{job.common['model_fingerprint']}|{job.dtype}")
        bar = None
        if windows is not None and job.progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"{spec.name}: sensitivity scan", unit="pass", leave=False)

        def scan_progress(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        result = quantize_mixed(model, spec, windows, job.include, job.exclude, cache=cache,
                                progress=scan_progress if bar is not None else None)
        if bar is not None:
            bar.close()
        notes.extend(result.notes)
        if record is not None:
            record.update(result.record_fields())
        return model, None
    if isinstance(spec, BackendFormat):
        from .backends import load_backend
        from .model.swap import select_modules

        backend = load_backend(spec.name)
        chosen = set(select_modules(model, job.include, job.exclude))
        calib = list(job.calib) if job.calib is not None else None
        extra = {}
        if spec.needs_source:  # an engine of its own (llama.cpp): it starts from the model's file
            extra = {"source": job.model_ref,
                     "n_ctx": max([job.windows.shape[1], *(int(c) for c in job.sweep_windows)])}
        model = backend.quantize(model, spec, lambda n, m: n in chosen, calib, **extra)
        if record is not None and hasattr(backend, "describe"):
            record.update(backend.describe(model))
        return model, list(backend.storage_tensors(model))
    if spec.calibrated:
        from .methods.calibrate import quantize_calibrated

        bar, step = None, None
        if job.progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"{spec.name}: calibrating", unit="block", leave=False)

            def step(done, total, label):
                bar.total = total
                bar.n = done
                bar.set_postfix_str(label, refresh=True)

        model, report = quantize_calibrated(model, spec, list(job.calib), include=job.include,
                                            exclude=job.exclude, progress=step)
        if bar is not None:
            bar.close()
        notes.extend(report.get("notes", []))
        return model, None
    with torch.no_grad():
        apply_plan(model, uniform_plan(model, spec, job.include, job.exclude))
    return model, None


def _malloc_trim():
    """glibc keeps freed per-window temporaries (logits, dequantized weights) in fragmented heaps, so
    a worker's RSS would creep up with the number of windows; returning them after each window keeps
    peak RSS a property of the format, not of --windows. A no-op where glibc is absent."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


class ReferenceStore:
    """The baseline's per-window log-probabilities, held by the process that runs the comparison."""

    def __init__(self):
        self.windows: dict[int, "np.ndarray"] = {}

    def put(self, i: int, logp) -> None:
        self.windows[i] = logp

    def get(self, i: int):
        if i not in self.windows:
            raise QuantscopeError("internal: the baseline's reference for window %d is missing" % i)
        return self.windows[i]


class _PipeReference:
    """Worker side of the reference exchange over the worker's pipe."""

    def __init__(self, conn):
        self.conn = conn
        self.buf: bytearray | None = None  # one receive buffer, reused for every window

    def put(self, i: int, logp) -> None:
        self.conn.send(("ref", i, logp))

    def get(self, i: int):
        """Window i's reference log-probs, received into a reused buffer (valid until the next get):
        unpickling a fresh 100 MB array per window fragments the heap and inflates peak RSS."""
        import numpy as np

        self.conn.send(("need", i))
        shape = self.conn.recv()
        n = int(np.prod(shape))
        if self.buf is None or len(self.buf) < 4 * n:
            self.buf = bytearray(4 * n)
        self.conn.recv_bytes_into(self.buf)
        return np.frombuffer(self.buf, dtype=np.float32, count=n).reshape(shape)


def measure_format(job: Job, progress: Callable | None = None, refs=None) -> dict:
    """Measure one format (runs in the worker process, or inline when isolate=False).

    `refs` exchanges the baseline's log-probabilities (ReferenceStore in-process, a pipe in a worker)."""
    from .evaluate.perplexity import score_windows
    from .measure.memory import peak_rss_bytes, reset_peak_rss, tensor_bytes, weight_bytes
    from .measure.speed import measure_speed
    from .model.load import load_model
    from .model.swap import select_modules

    if job.threads:
        torch.set_num_threads(job.threads)
    spec = resolve_format(job.format)
    rec: dict = {"format": job.format, **job.common, "baseline": job.is_baseline}
    notes: list[str] = []
    lm = load_model(job.model_path, dtype=job.dtype, trust_remote_code=job.trust_remote_code)
    base = lm.model
    selected = select_modules(base, job.include, job.exclude)
    mods = dict(base.named_modules())
    # a tied embedding and lm_head are one tensor: its parameters count once, like its bytes
    sel_tensors = list({mods[n].weight.data_ptr(): mods[n].weight for n in selected}.values())
    sel_params = int(sum(t.numel() for t in sel_tensors))
    base_bytes = weight_bytes(base)
    other_bytes = base_bytes - tensor_bytes(sel_tensors)
    del mods, sel_tensors  # hold no references to the float weights that quantization replaces
    export = None
    peak_before = 0  # the process's peak before a reset of the count (quantization's own peak)
    if job.is_baseline:
        qmodel, reference, qsec, storage = base, None, 0.0, None
        if job.ref_mode == "export" and refs is not None:
            export = lambda i, logp: refs.put(i, logp.numpy().copy())
    else:
        if job.ref_mode == "serve" and refs is not None:
            # the reference comes from the parent: quantize the baseline in place, no second copy
            qmodel, reference = base, (lambda i: torch.from_numpy(refs.get(i)))
            base = None
        else:
            qmodel, reference = copy.deepcopy(base), base
        gc.collect()
        peak_before = peak_rss_bytes()
        phase_peak = reset_peak_rss()
        rss_before = peak_rss_bytes()  # just after the reset, the peak is the current RSS
        t0 = time.perf_counter()
        qmodel, storage = _quantize(qmodel, spec, job, notes, rec)
        qsec = time.perf_counter() - t0
        if phase_peak:  # the quantization's own peak, next to where it started from
            rec["rss_before_quantize_bytes"] = rss_before
            rec["quantize_peak_rss_bytes"] = peak_rss_bytes()
        # an engine of its own reports its quantizer's time alone (not the one-off export to its format)
        own = getattr(qmodel, "quantscope_quantize_seconds", None)
        qsec = qsec if own is None else own
        lm.model = qmodel  # a backend that replaced the torch model lets the baseline's weights go
    qmodel.eval()
    bar = None
    if progress is None and job.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(job.windows), desc=f"{job.format}: scoring windows", unit="win", leave=False)
        progress = bar.update
    trim = _malloc_trim()
    step = progress

    def progress(n):  # noqa: F811 - wraps the caller's progress with a heap trim per window
        trim()
        if step is not None:
            step(n)

    scores = score_windows(qmodel, job.windows, reference=reference, score_from=job.score_from,
                           progress=progress, export=export)
    if bar is not None:
        bar.close()
    rec.update(scores.summary())
    if job.is_baseline:
        rec.update({"kld_mean": 0.0, "kld_stderr": 0.0, "kld_p99": 0.0, "kld_median": 0.0,
                    "top1_agreement": 1.0, "window_kld": [0.0] * len(job.windows)})
        notes.append("reference row: KL divergence is measured against this model")
    if job.sweep_windows:
        rec["ctx_sweep"] = {}
        for L, wins in job.sweep_windows.items():
            sc = score_windows(qmodel, wins, reference=reference, score_from=L // 2 if job.score_from > 1 else 1)
            summ = sc.summary()
            rec["ctx_sweep"][str(L)] = {k: summ.get(k) for k in (
                "tokens_scored", "perplexity", "perplexity_stderr", "kld_mean", "kld_stderr", "top1_agreement",
                "window_nll", "window_tokens")}  # per window: the paired delta at this length
            if job.is_baseline:
                rec["ctx_sweep"][str(L)].update({"kld_mean": 0.0, "kld_stderr": 0.0, "top1_agreement": 1.0})
    task_items = {}
    if job.tasks:
        from .evaluate.tasks import score_task

        for task in job.tasks:
            task_items[task.name] = score_task(qmodel, lm.tokenizer, task)
    if job.lm_eval:
        task_items.update(_lm_eval_items(qmodel, lm.tokenizer, job.lm_eval, rec))
    del reference, base, lm
    gc.collect()
    wb = weight_bytes(qmodel, storage)
    rec["weight_bytes"] = wb
    rec["quantized_params"] = sel_params
    rec["quantized_bytes"] = wb - other_bytes
    rec["bits_per_weight"] = 8.0 * (wb - other_bytes) / sel_params if sel_params else None
    rec["quantize_seconds"] = qsec
    if job.measure_speed:
        rec.update({k: v for k, v in measure_speed(qmodel, job.windows[0], job.speed).items()
                    if k != "generated"})
    else:
        rec["prefill_tokens_per_s"] = rec["decode_tokens_per_s"] = None
    rec["peak_rss_bytes"] = max(peak_before, peak_rss_bytes())
    if isinstance(spec, BackendFormat):
        from .backends import load_backend

        rec["backend"] = spec.backend
        rec["backend_version"] = load_backend(spec.name).version()
    else:
        rec["backend"] = "quantscope"
        rec["spec"] = spec.to_dict()
    if task_items:
        rec["task_items"] = {k: v.to_dict() for k, v in task_items.items()}
    rec["notes"] = notes
    return rec


def quiet_library_logs() -> None:
    """Silence import-time chatter of optional libraries (torchao's missing CUDA kernels, torch's
    pytree deprecations, bitsandbytes' per-call cast notice) in processes quantscope owns."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "bitsandbytes", "transformers.modeling_utils",
                 "llama-cpp-python"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _worker_main(job: Job, conn) -> None:
    quiet_library_logs()
    try:
        rec = measure_format(job, refs=_PipeReference(conn))
        conn.send(("ok", rec))
    except QuantscopeError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # a format that fails is a row with its reason, not a failed run
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} [{tb}]"))
    finally:
        conn.close()


def run_job(job: Job, isolate: bool = True, refs: ReferenceStore | None = None) -> dict:
    """Measure one job, in a fresh spawned process when `isolate`; errors become a record with `error`.

    `refs` holds the baseline's log-probabilities: filled by the baseline's job, served to the others."""
    refs = refs if refs is not None else ReferenceStore()
    if job.ref_mode == "serve" and not refs.windows:
        job.ref_mode = "local"  # no baseline pass in this process to serve from: compute side by side
    if not isolate:
        try:
            return measure_format(job, refs=refs)
        except QuantscopeError as e:
            return _error_record(job, str(e))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    p = ctx.Process(target=_worker_main, args=(job, child), daemon=True)
    p.start()
    child.close()
    msg = None
    try:
        while True:
            m = parent.recv()
            if m[0] == "ref":
                refs.put(m[1], m[2])
            elif m[0] == "need":
                arr = refs.get(m[1])
                parent.send(arr.shape)
                parent.send_bytes(arr)
            else:
                msg = m
                break
    except (EOFError, BrokenPipeError):
        pass
    p.join()
    if msg is None:
        code = p.exitcode
        why = (f"killed by signal {-code}" + (" (SIGKILL: out of memory?)" if code == -9 else "")
               if code is not None and code < 0 else f"exit code {code}")
        return _error_record(job, f"worker process died ({why})")
    status, payload = msg
    return payload if status == "ok" else _error_record(job, payload)


def _error_record(job: Job, message: str) -> dict:
    return {"format": job.format, **job.common, "baseline": job.is_baseline, "error": message}


def _perplexity_delta(r: dict, base: dict) -> None:
    """`perplexity_delta` of r against base, paired over their (identical) windows, with its interval."""
    from .evaluate import stats

    d, lo, hi = stats.paired_ratio_bootstrap_ci(base["window_nll"], base["window_tokens"],
                                                r["window_nll"], r["window_tokens"])
    r["perplexity_delta"] = d
    if len(r["window_nll"]) < MIN_WINDOWS_FOR_CI:
        # resampling 1-4 windows gives a degenerate, far too narrow interval: give none
        r["perplexity_delta_ci"], r["perplexity_delta_significant"] = None, False
    else:
        r["perplexity_delta_ci"] = [lo, hi]
        r["perplexity_delta_significant"] = stats.significant(lo, hi)


def add_paired_statistics(records: list[dict]) -> None:
    """Paired deltas against the baseline row (same windows, same questions), in place.

    A run directory can hold baselines scored on different windows: formats that calibrate on the
    head of the text (GPTQ/AWQ, mixed-auto) shift the evaluation windows past it, and `recommend`
    measures such formats in their own comparison. Each record is paired with the baseline scored on
    its windows (same `window_start_token`)."""

    baselines = [r for r in records if r.get("baseline") and "error" not in r]
    if not baselines:
        return
    by_start = {}
    for b in baselines:
        by_start.setdefault(b.get("window_start_token"), b)
    for r in records:
        if "error" in r or "window_nll" not in r:
            continue
        base = by_start.get(r.get("window_start_token"), baselines[0])
        if r is base or r.get("baseline"):
            r["perplexity_delta"], r["perplexity_delta_ci"] = 0.0, [0.0, 0.0]
        else:
            _perplexity_delta(r, base)
        for L, cell in (r.get("ctx_sweep") or {}).items():
            base_cell = (base.get("ctx_sweep") or {}).get(L)
            if r is base or r.get("baseline"):
                cell["perplexity_delta"], cell["perplexity_delta_ci"] = 0.0, [0.0, 0.0]
            elif base_cell and "window_nll" in cell and "window_nll" in base_cell:
                _perplexity_delta(cell, base_cell)
        if "task_items" in r:
            r["tasks"] = _task_summaries(r, base)
            if r is not base and not r.get("baseline"):
                r["task_categories"] = _category_summaries(r, base)


def eval_spec(job: Job) -> dict:
    """Everything besides the model and format that a record's numbers depend on."""
    import hashlib

    calib = hashlib.sha256(job.calib.numpy().tobytes()).hexdigest() if job.calib is not None else None
    return {
        "text_sha256": job.common["text_sha256"], "ctx": job.common["ctx"], "windows": job.common["windows"],
        "window_start_token": job.common["window_start_token"], "scoring": job.common["scoring"],
        "include": list(job.include), "exclude": list(job.exclude), "calib_sha256": calib,
        "dtype": job.dtype, "speed": asdict(job.speed) if job.measure_speed else None,
        "tasks": [[t.name, t.source, len(t.items), getattr(t, "shots", 0)] for t in job.tasks],
        "ctx_sweep": sorted(job.sweep_windows),
        # only when asked: records stored before lm-eval tasks existed keep their keys
        **({"lm_eval": job.lm_eval} if job.lm_eval else {}),
        # records of runs that select more than the decoder linears were stored while a tied
        # embedding's parameters counted twice in bits_per_weight: those are measured again
        **({"tied_params": "once"} if job.include else {}),
    }


def _lm_eval_items(model, tokenizer, spec: dict, rec: dict) -> dict:
    """lm-eval's per-document answers as TaskScores under "lm-eval:<task>", paired like our own tasks."""
    from transformers import PreTrainedModel

    from .evaluate.lmeval_adapter import run_lm_eval, to_task_scores

    if not isinstance(model, PreTrainedModel):
        raise QuantscopeError(f"--lm-eval-task needs a transformers model; this format runs a "
                              f"{type(model).__name__} (lm-eval's HFLM cannot wrap it)")
    out = run_lm_eval(model, tokenizer, spec["tasks"], limit=spec["limit"], include_path=spec["include"],
                      include_defaults=spec["include"] is None)
    rec["lm_eval_version"] = out["lm_eval_version"]
    return {f"lm-eval:{name}": to_task_scores(out, name) for name in out["tasks"]
            if "per_item" in out["tasks"][name] and "acc" in out["tasks"][name]["per_item"]}


def job_key(job: Job) -> str:
    from .store import record_key

    return record_key(job.common["model_fingerprint"], job.format, eval_spec(job), __version__)


def default_run_dir(config: CompareConfig, root: str = "quantscope-runs") -> str:
    """`quantscope-runs/<model>-<text>-<hash of the evaluation settings>`: the same command resumes."""
    import hashlib
    import json
    import re

    key = json.dumps({k: v for k, v in _config_dict(config).items() if k not in ("formats", "isolate", "threads", "progress", "reference_cache_bytes")},
                     sort_keys=True, default=str)
    short = lambda s: re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(str(s).rstrip("/")))[:24].strip("-") or "x"
    return os.path.join(root, f"{short(config.model)}-{short(config.text)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}")


def _task_summaries(r: dict, base: dict) -> dict:
    """{task: {n, acc, acc_ci, acc_norm, acc_norm_ci, delta, delta_ci, mcnemar_p, significant}}, paired
    with the baseline's answers to the same questions."""
    from .evaluate.tasks import CATEGORIES, TaskScores, cloze_perplexity, summarize

    out = {}
    for name, items in r["task_items"].items():
        s = TaskScores.from_dict(items)
        b_items = base.get("task_items", {}).get(name) if r is not base else None
        b = TaskScores.from_dict(b_items) if b_items else None
        summary = summarize(s, b)
        if s.target_nll is not None:  # cloze tasks (LAMBADA): the target word's perplexity too
            summary.update(cloze_perplexity(s, b))
        plain = name.removeprefix("lm-eval:").replace("_", "-")  # lm-eval's arc_easy is our arc-easy
        summary["category"] = CATEGORIES.get(name, CATEGORIES.get(plain, "user"))
        out[name] = summary
    return out


def _category_summaries(r: dict, base: dict) -> dict:
    """{category: pooled paired accuracy delta} over the tasks both records answered."""
    from .evaluate.tasks import TaskScores, category_deltas

    pairs = {name: (TaskScores.from_dict(items), TaskScores.from_dict(base["task_items"][name]))
             for name, items in r["task_items"].items() if name in base.get("task_items", {})}
    return category_deltas(pairs, {n: r["tasks"][n]["category"] for n in pairs}) if pairs else {}


def paired_tasks(r: dict, ref: dict) -> dict:
    """`r`'s task accuracy paired with any other record `ref` answering the same questions (GPTQ against
    round-to-nearest on the same grid, say): a record-shaped dict whose deltas are r minus ref."""
    tasks = _task_summaries(r, ref)
    return {"format": f"{r['format']} - {ref['format']}", "tasks": tasks,
            "task_categories": _category_summaries({**r, "tasks": tasks}, ref)}


def compare(config: CompareConfig, on_record: Callable[[dict], None] | None = None,
            run_dir: str | os.PathLike | None = None) -> tuple[list[dict], dict]:
    """Run the comparison: (records, meta). `on_record` sees each record as it is finished.

    With `run_dir`, every finished record is stored (SQLite, one transaction per record) under a key of
    (model fingerprint, format, evaluation spec, version): re-running the same comparison reuses what is
    done and measures only the rest. Failed formats are not stored, so they are retried."""
    prep = prepare(config)
    from pathlib import Path

    from .store import RunStore

    # an existing run directory is opened up front (to reuse its records); a new one only once the
    # baseline has been measured, so a run that fails on bad input leaves nothing behind
    store = RunStore.open(run_dir, meta=prep.meta) if run_dir is not None and Path(run_dir).exists() else None
    records = []
    refs = ReferenceStore()
    try:
        for job in prep.jobs:
            key = job_key(job) if run_dir is not None else None
            rec = store.get(key) if store else None
            if rec is not None and job.is_baseline and job.ref_mode == "export" and any(
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
                    if store is None:
                        store = RunStore.open(run_dir, meta=prep.meta)
                    store.put(key, rec)
            if on_record:
                on_record(rec)
            records.append(rec)
        add_paired_statistics(records)
        if store:
            store.update_meta({"last_formats": [r["format"] for r in records]})
    finally:
        if store:
            store.close()
    return records, prep.meta


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
