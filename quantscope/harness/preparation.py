"""Before any work: validate every input and build one job per format, baseline first.

The model reference is resolved, its tokenizer and config loaded and its safetensors headers read
once into :class:`Inputs`, with the evaluation text tokenized; `recommend` measures its ladder one
format at a time and hands the same Inputs to every step. :func:`calibration_head` is the one place
the calibration tokens are cut from a text (`compare` and `save` both use it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..dtypes import short_name
from ..model.checks import check_safetensors, check_shapes, check_tokenizer_files, skeleton
from ..errors import QuantscopeError
from ..placement import resolve_device, resolve_dtype
from ..quantization import Format, resolve, resolve_all
from .config import CompareConfig, Job


@dataclass
class Inputs:
    """A model reference resolved and a text tokenized, once (reused by every step of a ladder)."""

    model_ref: str
    text_ref: str
    trust_remote_code: bool
    kind: str  # embedded | local | hub | gguf
    path: str
    fingerprint: str
    model_name: str
    tokenizer: object
    model_config: object
    text: object  # evaluate.text.TextSource
    ids: torch.Tensor
    # a GGUF model's file (the embedded default, or a .gguf): the streamed pass reads it directly, and
    # `path` (its dequantized cache) is built only when a run is in memory
    gguf_file: str | None = None
    _texts: dict = field(default_factory=dict)  # other texts (calibration) tokenized: {ref: (source, ids)}

    def matches(self, config: CompareConfig) -> bool:
        return (config.model, config.text, config.trust_remote_code) == (
            self.model_ref, self.text_ref, self.trust_remote_code)

    def tokens_of(self, ref: str):
        """(TextSource, token ids) of another text, tokenized once."""
        from ..evaluate.text import load_text, tokenize

        if ref not in self._texts:
            src = load_text(ref)
            self._texts[ref] = (src, self.ids if src.sha256 == self.text.sha256 else tokenize(self.tokenizer, src.text))
        return self._texts[ref]


def load_inputs(model: str, text: str, trust_remote_code: bool = False) -> Inputs:
    """Resolve `model` (tokenizer, config, a read of every safetensors header) and tokenize `text`."""
    from ..evaluate.text import load_text, tokenize
    from ..model.load import cache_is_valid, gguf_file, load_config, load_tokenizer, resolve as resolve_model

    kind, path, fingerprint, model_name = resolve_model(model, build_cache=False)
    gguf = gguf_file(model) if kind in ("embedded", "gguf") else None
    # a GGUF model's tokenizer and config come from its cache when it is built, else from the file
    # itself (transformers' GGUF reader, metadata only), so a streamed run never builds the cache
    read_from = gguf if gguf is not None and not cache_is_valid(Path(path)) else None
    shapes = None
    if kind == "local":  # missing or corrupt weights are the error to report, before the tokenizer's
        shapes = check_safetensors(Path(path))
        check_tokenizer_files(Path(path))
    try:
        tok = load_tokenizer(path, trust_remote_code, gguf=read_from)
        mcfg = load_config(path, trust_remote_code, gguf=read_from)
    except QuantscopeError:
        raise
    except Exception as e:
        hint = " (offline, or no such model?)" if kind == "hub" else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QuantscopeError(f"could not load model '{model}'{hint}: {type(e).__name__}: {first}") from None
    if shapes is not None:
        check_shapes(Path(path), shapes, mcfg, trust_remote_code)
    src = load_text(text)
    return Inputs(model, text, trust_remote_code, kind, str(path), fingerprint, model_name, tok, mcfg,
                  src, tokenize(tok, src.text), gguf_file=str(gguf) if gguf is not None else None)


def check_selection(model_config, include, exclude, trust_remote_code: bool = False) -> None:
    """--include/--exclude checked on the model's skeleton (meta tensors: no memory, no weights read), so
    a pattern that matches nothing or leaves nothing to quantize fails before the baseline is loaded."""
    if not include and not exclude:
        return
    from ..modules.swap import select_modules

    model = skeleton(model_config, trust_remote_code)
    if model is not None:  # (an architecture that cannot be built this way: each worker checks the real model)
        select_modules(model, include, exclude)


@dataclass(frozen=True)
class CalibrationHead:
    tokens: torch.Tensor  # [n, seqlen] token ids
    source: str  # the text's name
    eval_start: int  # where the evaluation windows of the same text start (0: another text)
    notes: tuple[str, ...]


def calibration_head(ids: torch.Tensor, name: str, samples: int, seqlen: int, *, same_text: bool) -> CalibrationHead:
    """The first `samples` x `seqlen` tokens of a text. When it is the evaluation text, evaluation
    starts after them: disjoint by construction."""
    from ..evaluate.text import head_samples

    calib = head_samples(ids, samples, seqlen, name)
    n = calib.shape[0]
    if same_text:
        notes = [f"calibration: the first {samples * seqlen} tokens of {name} ({samples} x {seqlen}); "
                 "evaluation windows start after them (disjoint)"]
    else:
        notes = [f"calibration: {samples} x {seqlen} tokens from the head of {name}"]
    if n < samples:
        notes.append(f"calibration text has room for only {n} samples of {seqlen} tokens")
    return CalibrationHead(calib, name, n * seqlen if same_text else 0, tuple(notes))


def calibration_overlap(calib: torch.Tensor, windows: torch.Tensor, n: int = 8) -> float:
    """Share of the evaluation windows' n-token sequences that also occur in the calibration rows."""
    def grams(rows: torch.Tensor) -> set:
        out = set()
        for r in rows.tolist():
            out.update(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        return out

    ev = grams(windows)
    return len(ev & grams(calib)) / len(ev) if ev else 0.0


def versions() -> dict:
    import transformers

    from .. import __version__

    return {"quantscope_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__}


@dataclass
class Prepared:
    config: CompareConfig
    formats: list[Format]  # baseline first
    jobs: list[Job]
    notes: list[str]
    meta: dict
    inputs: Inputs


def placement(config: CompareConfig, model_config=None) -> tuple[str, str]:
    """(device, baseline dtype) of a run, resolved and checked: a device that is not here, or a dtype it
    cannot compute, fails before any work. `auto` dtype on an accelerator reads the checkpoint's own
    (from `model_config`, else from config.json)."""
    device = resolve_device(config.device)
    if config.dtype.strip().lower() != "auto" or device == "cpu":
        return device, resolve_dtype(config.dtype, device)
    if model_config is None:
        from ..model.load import load_config, resolve as resolve_model

        model_config = load_config(resolve_model(config.model)[1], config.trust_remote_code)
    own = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return device, resolve_dtype("auto", device, str(own) if own is not None else None)


def baseline_format(dtype: str) -> Format:
    """The baseline row's format for a resolved dtype ('float32' -> fp32)."""
    return resolve(short_name(dtype))


def prepare(config: CompareConfig, inputs: Inputs | None = None) -> Prepared:
    """Validate the inputs and build one job per format; raises QuantscopeError on any bad input.
    Pass the `inputs` of an earlier prepare with the same model and text to skip loading them again."""
    from ..evaluate.text import make_windows
    from ..measure.machine import machine_info

    formats = resolve_all(config.formats)
    device = resolve_device(config.device)  # a device that is not here: before the model is read
    if inputs is None or not inputs.matches(config):
        inputs = load_inputs(config.model, config.text, config.trust_remote_code)
    text, ids, mcfg = inputs.text, inputs.ids, inputs.model_config
    device, dtype = placement(config, mcfg)
    base = baseline_format(dtype)
    check_selection(mcfg, config.include, config.exclude, config.trust_remote_code)
    ref = None
    if config.reference is not None:
        from .reference import reference_of

        ref = reference_of(load_inputs(config.reference, config.text, config.trust_remote_code), inputs)
    notes: list[str] = []
    max_pos = getattr(mcfg, "max_position_embeddings", None)
    if max_pos and config.ctx > max_pos:
        raise QuantscopeError(f"--ctx {config.ctx} is longer than the model's maximum ({max_pos} tokens)")
    calib, start = None, 0
    if any(f.needs_calibration for f in formats) or config.reserve_calib:
        csrc, cids = inputs.tokens_of(config.calib) if config.calib is not None else (text, ids)
        same = csrc.sha256 == text.sha256
        head = calibration_head(cids, text.name if same else csrc.name, config.calib_samples,
                                config.calib_seqlen, same_text=same)
        calib, start = head.tokens, head.eval_start
        notes.extend(head.notes)
    windows = make_windows(ids, config.ctx, config.windows, start=start, source=text.name)
    overlap = calibration_overlap(calib, windows) if calib is not None else None
    # disjoint text still shares common phrases (0.3% of 8-grams between disjoint halves of
    # WikiText-2 test, measured); 2% and above means the same passages are in both
    trains = [f.name for f in formats if f.kind == "recovered"]
    if trains and not start and overlap is not None and overlap >= 0.02:  # (the same text: disjoint by construction)
        raise QuantscopeError(f"{100 * overlap:.1f}% of the evaluation's 8-token sequences also occur in the training "
                              f"text of {trains[0]}: LoRA would be scored on text it was trained on; train on "
                              "another text, or on the evaluation file itself (its head is cut off, disjoint)")
    if trains and calib is not None:
        notes.append(f"LoRA training ({', '.join(trains)}) uses these calibration tokens: "
                     + ("the evaluation windows start after them, disjoint spans of the same text" if start
                        else f"checked: {100 * (overlap or 0):.2f}% of the evaluation's 8-token sequences occur in them"))
    if overlap is not None and overlap >= 0.02:
        notes.append(f"WARNING: {100 * overlap:.1f}% of the evaluation's 8-token sequences also occur in the "
                     "calibration data: calibrated formats are being scored partly on text they were fitted to")
    score_from = config.ctx // 2 if config.score_second_half else 1
    tasks = _load_tasks(config)
    lm_eval = _lm_eval_spec(config)
    gen_ids, gen_kinds = _gen_prompts(config, inputs.tokenizer, max_pos)
    sweep = {}
    for L in config.ctx_sweep:
        if max_pos and L > max_pos:
            raise QuantscopeError(f"--ctx-sweep {L} is longer than the model's maximum ({max_pos} tokens)")
        # about the same number of scored tokens at every length, from the same start of the text
        n = max(1, (config.windows * config.ctx) // L)
        sweep[L] = make_windows(ids, L, n, start=start, source=text.name)
    common = {
        "model": inputs.model_name, "model_ref": config.model, "model_fingerprint": inputs.fingerprint,
        "text": text.name, "text_sha256": text.sha256, "ctx": config.ctx, "windows": config.windows,
        "window_start_token": start, "scoring": "second-half" if config.score_second_half else "all-but-first",
        "calibration_overlap": overlap, "device": device, "dtype": dtype, **versions(),
    }
    if ref is not None:
        common.update(reference_model=ref.name, reference_fingerprint=ref.fingerprint)
    # with a reference, every format (the baseline's own dtype too) is a row of --model
    ordered = [base] + [f for f in formats if ref is not None or f.name != base.name]
    streamed = _choose_stream(config, inputs, [f.name for f in ordered], dtype, notes)
    vocab = getattr(mcfg, "vocab_size", None) or len(inputs.tokenizer)
    ref_bytes = (config.windows * (config.ctx - score_from) + len(gen_ids) * config.gen_tokens) * vocab * 4
    cache_ref = ref_bytes <= config.reference_cache_bytes and not sweep and len(ordered) > 1
    model_path = inputs.path
    if inputs.gguf_file and not streamed:  # the in-memory path loads the GGUF's dequantized cache
        from ..model.load import ensure_gguf_cache

        model_path = str(ensure_gguf_cache(Path(inputs.gguf_file), Path(inputs.path)))
    jobs = []
    for i, f in enumerate(ordered):
        is_base = i == 0
        path, name, model_ref, own = model_path, inputs.model_name, config.model, dict(common)
        if ref is not None and is_base:
            path, name, model_ref = ref.path, ref.name, ref.ref
            own.update(model=ref.name, model_ref=ref.ref, model_fingerprint=ref.fingerprint)
        jobs.append(Job(format=f.name, is_baseline=is_base, model_path=path, model_name=name,
                        model_ref=model_ref, dtype=dtype, device=device, trust_remote_code=config.trust_remote_code,
                        windows=windows, score_from=score_from, calib=calib if f.needs_calibration else None,
                        include=config.include, exclude=config.exclude, speed=config.speed,
                        measure_speed=config.measure_speed, threads=config.threads, common=own,
                        tasks=tasks, sweep_windows=sweep, progress=config.progress, lm_eval=lm_eval,
                        gen_prompts=gen_ids, gen_kinds=gen_kinds, gen_tokens=config.gen_tokens if gen_ids else 0,
                        ref_mode=("export" if is_base else "serve") if cache_ref else "local",
                        reference_path=ref.path if ref is not None and not is_base else None))
    if streamed:
        from .stream import check_streamable

        if ref is not None:
            raise QuantscopeError("--reference measures two models, each whole in memory: not available with --stream")

        check_streamable(ordered[1:], getattr(mcfg, "model_type", None), jobs[0])
        jobs = [replace(j, streamed=True, measure_speed=False, source_path=inputs.gguf_file or "") for j in jobs]
    base_kind = ref.kind if ref is not None else inputs.kind
    if base_kind in ("embedded", "gguf", "compressed"):
        from ..model.load import dequantized_note

        notes.append(dequantized_note(base_kind, dtype))
    if ref is not None:
        notes.append(f"baseline: {ref.name} (--reference {ref.ref}); KL divergence, top-1 agreement and the paired "
                     f"deltas of every row of {inputs.model_name} are measured against it")
    if device != "cpu" or dtype != "float32":
        notes.append(f"baseline in {dtype} on {device}; every format runs on {device}")
    meta = {**common, "reference_fingerprint": ref.fingerprint if ref is not None else None,
            "formats": [f.name for f in ordered], "notes": notes, "machine": machine_info(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config.to_dict()}
    return Prepared(config, ordered, jobs, notes, meta, inputs)


def _load_tasks(config: CompareConfig) -> tuple:
    if not config.tasks:
        return ()
    from ..evaluate.tasks import load_task

    out = []
    for tname, tpath, *own_limit in config.tasks:
        limit = own_limit[0] if own_limit else config.task_limit
        out.append(load_task(tname, tpath, limit=limit, sample_seed=config.task_sample_seed,
                             shots=config.task_shots if tname == "mmlu" else 0))
    return tuple(out)


def _gen_prompts(config: CompareConfig, tokenizer, max_pos) -> tuple[tuple, tuple]:
    """--gen-prompts encoded once: (token ids per prompt, "text"/"chat" per prompt)."""
    if config.gen_prompts is None:
        return (), ()
    from ..evaluate.prompts import encode_prompts, load_prompts

    _, prompts = load_prompts(config.gen_prompts)
    ids = encode_prompts(tokenizer, prompts, config.gen_tokens, max_pos)
    return tuple(tuple(x) for x in ids), tuple(p.kind for p in prompts)


def _lm_eval_spec(config: CompareConfig) -> dict:
    if not config.lm_eval_tasks:
        return {}
    from ..evaluate.lmeval_adapter import import_lm_eval

    import_lm_eval()  # not installed: the install hint now, before any format is measured
    include = config.lm_eval_include
    if include is not None and not os.path.isdir(include):
        raise QuantscopeError(f"--lm-eval-include {include}: not a directory of lm-eval task YAML files")
    return {"tasks": list(config.lm_eval_tasks), "include": include and os.path.abspath(include),
            "limit": config.task_limit}


def _choose_stream(config: CompareConfig, inputs: Inputs, formats: list[str], dtype: str, notes: list[str]) -> bool:
    """Whether this run is streamed: as asked, or (not asked) when the planner's in-memory estimate
    exceeds the memory available. Either way a run that does not fit even streamed is refused here."""
    if config.stream is False:
        return False
    from ..dtypes import short_name
    from ..measure.machine import available_memory_bytes
    from ..plan.stream import stream_plan

    if not inputs.gguf_file and (inputs.kind == "hub" or not list(Path(inputs.path).glob("*.safetensors"))):
        if config.stream:
            raise QuantscopeError(f"--stream reads a GGUF file or safetensors shards from a local folder; "
                                  f"{config.model} has none (download it first, or run without --stream)")
        return False
    try:
        plan = stream_plan(inputs.model_config.to_dict(), formats, config.windows, config.ctx, short_name(dtype),
                           config.calib_samples, config.calib_seqlen)
    except QuantscopeError:  # an architecture the planner does not know: no automatic choice
        plan = None
    avail = available_memory_bytes()
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    if config.stream is None:
        if plan is None or avail is None or plan.in_memory_bytes <= avail:
            return False
        notes.append(f"streamed: in memory this run needs about {gib(plan.in_memory_bytes)} (planner) and "
                     f"{gib(avail)} is available; --no-stream runs it in memory anyway")
    if plan is not None and avail is not None and plan.total_bytes > avail:
        raise QuantscopeError(f"{config.model} does not fit even streamed: one block in flight "
                              f"({gib(plan.in_flight_bytes)}) with the rest needs about {gib(plan.total_bytes)}, "
                              f"{gib(avail)} is available")
    return True
