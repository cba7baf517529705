"""Streamed evaluation: the baseline and every format measured in one pass over the decoder blocks,
with the model never materialised whole.

The model is a skeleton on the meta device (:mod:`quantscope.model.blocks`), its weights read from the
safetensors shards or straight from a GGUF file (:mod:`quantscope.model.gguf_source`: the job's
`source_path`, never a dequantized cache); its embedding, final norm and head are read once. The
evaluation windows are embedded and the first block's inputs caught (the calibrated driver's capture:
hidden states plus the keyword arguments the model passes its blocks). Then, block by block, the block
is read from the weights and

- for every format: a copy of the float block is quantized (own formats: round-to-nearest through the
  same module swap as in memory; GPTQ/AWQ: the calibrated driver's one-block step, on *that format's*
  calibration stream, so block i is calibrated on what the quantized blocks before it compute, as
  GPTQ's sequential mode does) and the format's hidden-state stream is carried through it;
- the baseline's stream is carried through the float block, which is then dropped.

So each block is read once per run, not once per format, and memory holds one block in flight (plus
one quantized copy) and the streams: windows x ctx x hidden per format. At the end the final norm and
head turn each stream into log-probabilities a chunk of positions at a time (:mod:`..evaluate.hidden`).

Every window is its own batch of one, as :func:`..evaluate.perplexity.score_windows` runs it, so the
streamed figures equal the in-memory ones to float rounding (tests/test_stream.py). Log-likelihood
tasks ride the same pass: each distinct task input is one more sequence through the blocks, scored at
the end from its continuation's positions. Speed is not measured here (no whole model exists to time),
nor are the in-memory-only measurements (lm-eval, generation, context sweeps): asking for them with
--stream is refused up front.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import QuantscopeError
from ..measure.memory import heap_trimmer, model_tensors, peak_device_bytes, peak_rss_bytes, reset_peak_device, tensor_bytes
from ..methods.calib_capture import capture_inputs, cast_floats, run_block
from ..methods.calibrate import CalibConfig, _batches, _check_calib, calibrate_block, forward_inputs
from ..model.blocks import TensorSource, check_complete, release, streamed_skeleton
from ..model.gguf_source import open_source
from ..modules.qmodules import reference_products
from ..modules.names import block_prefix, block_names
from ..modules.qmodules import QuantEmbedding, QuantLinear, TiedQuantHead
from ..modules.swap import apply_plan, select_modules
from ..placement import compute_dtype
from ..quantization import Format, resolve
from ..results.record import new_record
from .config import Job

STREAMABLE_KINDS = ("own", "calibrated")
STREAMABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # blocks called as their model calls them, norm + lm_head


def check_streamable(formats: list[Format], model_type: str | None, job: Job) -> None:
    """Refuse, in one line and before any work, what the streamed path cannot measure."""
    if model_type not in STREAMABLE_TYPES:
        raise QuantscopeError(f"--stream supports {', '.join(STREAMABLE_TYPES)} models; this one is "
                              f"{model_type!r}: run it in memory (--no-stream)")
    bad = [f.name for f in formats if f.kind not in STREAMABLE_KINDS]
    if bad:
        raise QuantscopeError(f"--stream measures quantscope's own and calibrated (GPTQ/AWQ) formats; "
                              f"{', '.join(bad)} need the whole model in memory: run them without --stream")
    asked = [what for what, on in (("--lm-eval-task", job.lm_eval), ("--gen-prompts", job.gen_prompts),
                                   ("--ctx-sweep", job.sweep_windows)) if on]
    if asked:
        raise QuantscopeError(f"{', '.join(asked)} run(s) on a whole model: not available with --stream")


@dataclass
class _Lane:
    """One format's pass: its hidden-state stream and what it has cost so far."""

    job: Job
    fmt: Format
    xs: list
    outside: nn.Module | None = None  # a copy of the skeleton with selected embedding/head quantized
    calib: tuple | None = None  # (xs, rests, forward dtype) of its calibration stream
    report: dict = field(default_factory=lambda: {"layers": {}, "notes": []})
    stage_cache: dict = field(default_factory=dict)
    block_bytes: int = 0
    quantize_seconds: float = 0.0
    forward_seconds: float = 0.0


def _real_bytes(module: nn.Module) -> int:
    return tensor_bytes(t for t in model_tensors(module) if t.device.type != "meta")


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module`'s float parameters outside quantized modules cast to `dtype` (quantized modules compute in
    their input's dtype and keep their stored codes and scales)."""
    for m in module.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding, TiedQuantHead)):
            continue
        for n, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype:
                setattr(m, n, nn.Parameter(p.data.to(dtype), requires_grad=False))
    return module


def _head(model: nn.Module, comp: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    norm, out = model.get_decoder().norm, model.get_output_embeddings()
    weight = getattr(out, "weight", None)  # (a tied quantized head has none: it computes in its input's dtype)
    if weight is not None and weight.dtype != comp:  # a compute copy, for the scoring only
        norm, out = _cast(copy.deepcopy(norm), comp), _cast(copy.deepcopy(out), comp)
    return lambda h: out(norm(h))


def _load_outside(model: nn.Module, source: TensorSource, dtype: str, device: str) -> None:
    from accelerate.utils import set_module_tensor_to_device

    from ..dtypes import torch_dtype

    tied = check_complete(model, source)
    head = model.get_output_embeddings()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)
             if block_prefix(n) is None and not (tied and n not in source.shapes)]
    tensors = source.read(names)
    for n in names:
        set_module_tensor_to_device(model, n, device, value=tensors.pop(n), dtype=torch_dtype(dtype))
    if tied:  # a tied head shares the embedding's tensor, as the real load leaves it
        head.weight = model.get_input_embeddings().weight
    for n, b in list(model.named_buffers()):
        if b.device != torch.device(device):
            set_module_tensor_to_device(model, n, device, value=b)


@reference_products()  # every scored pass: the reference path at any window length
def stream_jobs(jobs: list[Job], model_config, progress: Callable[[int, int, str], None] | None = None,
                tokenizer=None) -> list[dict]:
    """Measure the baseline `jobs[0]` and the formats `jobs[1:]` in one streamed pass; one record per job.
    The jobs' log-likelihood tasks ride the same pass: each distinct task input is one more sequence
    carried through the blocks beside the evaluation windows (`tokenizer` encodes them)."""
    base = jobs[0]
    if not base.is_baseline:
        raise QuantscopeError("internal: the streamed pass starts with the baseline's job")
    fmts = [resolve(j.format) for j in jobs]
    check_streamable(fmts[1:], getattr(model_config, "model_type", None), base)
    t_start = time.perf_counter()
    reset_peak_device(base.device)
    dtype, device = base.dtype, base.device
    comp = getattr(torch, compute_dtype(dtype, device))
    model = streamed_skeleton(model_config, dtype, base.trust_remote_code)
    source = open_source(base.source_path or base.model_path, model)  # a GGUF file, or safetensors shards
    _load_outside(model, source, dtype, device)
    blocks = block_names(model)
    if not blocks:
        raise QuantscopeError(f"{type(model).__name__} has no numbered decoder blocks to stream")
    layers = model.get_submodule(blocks[0].rpartition(".")[0])
    selected = select_modules(model, base.include, base.exclude)
    per_block: list[list[str]] = [[] for _ in blocks]
    outside_sel = []
    for n in selected:
        p = block_prefix(n)
        if p is None:
            outside_sel.append(n)
        else:
            per_block[blocks.index(p)].append(n[len(p) + 1:])
    mods = dict(model.named_modules())
    sel = list({id(mods[n].weight): mods[n].weight for n in selected}.values())
    sel_params = int(sum(t.numel() for t in sel))
    sel_float_bytes = int(sum(t.numel() * t.element_size() for t in sel))
    del mods, sel
    outside_bytes = _real_bytes(model)
    windows = [w[None] for w in base.windows]
    tasks = _task_parts(base, tokenizer, model_config)
    windows += [torch.tensor(r.tokens, dtype=torch.long)[None] for _, _, rows in tasks for r in rows]
    trim = heap_trimmer()
    with torch.no_grad():
        xs_base, rests = _inputs(model, layers[0], windows, device, comp)
        lanes = [_lane(j, f, model, xs_base, windows, outside_sel, comp) for j, f in zip(jobs[1:], fmts[1:])]
        base_bytes, base_fwd = 0, 0.0
        read_seconds = 0.0  # reading blocks from the shards
        for i, bname in enumerate(blocks):
            t0 = time.perf_counter()
            block = source.load(layers[i], bname + ".", dtype, device)
            read_seconds += time.perf_counter() - t0
            for lane in lanes:
                _advance(lane, block, per_block[i], bname + ".", rests, comp)
            base_bytes += _real_bytes(block)
            _cast(block, comp)
            t0 = time.perf_counter()
            for j in range(len(xs_base)):
                xs_base[j] = run_block(block, xs_base[j], rests[j])
            base_fwd += time.perf_counter() - t0
            release(block)
            gc.collect()
            trim()  # the block's freed activations back to the system: the peak stays one block's
            if progress is not None:
                progress(i + 1, len(blocks), f"block {i + 1}/{len(blocks)}")
    from ..evaluate.hidden import chunk_tokens, score_hidden

    t0 = time.perf_counter()
    vocab = model.get_output_embeddings().weight.shape[0]
    made: dict = {}  # one head (and one compute copy of it) per distinct model: lanes without their own share it
    heads = [made.setdefault(id(m), _head(m, comp)) for m in [model] + [ln.outside or model for ln in lanes]]
    n_w = len(base.windows)
    ref_scores, scores = score_hidden(base.windows, base.score_from, (heads[0], xs_base[:n_w]),
                                      [(h, ln.xs[:n_w]) for h, ln in zip(heads[1:], lanes)], chunk_tokens(vocab))
    task_items = [_task_items(tasks, h, xs[n_w:]) for h, xs in zip(heads, [xs_base] + [ln.xs for ln in lanes])]
    head_seconds = time.perf_counter() - t0
    peak, peak_dev = peak_rss_bytes(), peak_device_bytes(device)
    total = time.perf_counter() - t_start
    common_notes = ["streamed: the model was read block by block and never held whole; every row was measured "
                    "in one pass, so peak RSS is that pass's (shared by all rows); speed is not measured when streamed"]
    if comp != getattr(torch, dtype):
        common_notes.append(f"streamed on a CPU without native {dtype} matrix units: the weights are stored in "
                            f"{dtype} (and counted so) but each block computes in float32 (quantscope.placement.compute_dtype)")
    base_total = outside_bytes + base_bytes
    other = base_total - sel_float_bytes
    out = []
    rec = new_record(format=base.format, baseline=True, **base.common)
    rec.update(ref_scores.summary())
    rec.update({"kld_mean": 0.0, "kld_stderr": 0.0, "kld_p99": 0.0, "kld_median": 0.0, "top1_agreement": 1.0,
                "window_kld": [0.0] * len(base.windows), "eval_seconds": base_fwd + head_seconds / (1 + len(lanes)),
                "weight_bytes": base_total, "quantized_params": sel_params, "quantized_bytes": base_total - other,
                "bits_per_weight": 8.0 * (base_total - other) / sel_params if sel_params else None,
                "quantize_seconds": 0.0, "backend": "quantscope", "spec": fmts[0].spec.to_dict(),
                "notes": ["reference row: KL divergence is measured against this model", *common_notes]})
    out.append(rec)
    for lane, sc in zip(lanes, scores):
        wb = (_real_bytes(lane.outside) if lane.outside is not None else outside_bytes) + lane.block_bytes
        rec = new_record(format=lane.job.format, baseline=False, **lane.job.common)
        rec.update(sc.summary())
        rec.update({"eval_seconds": lane.forward_seconds + head_seconds / (1 + len(lanes)), "weight_bytes": wb,
                    "quantized_params": sel_params, "quantized_bytes": wb - other,
                    "bits_per_weight": 8.0 * (wb - other) / sel_params if sel_params else None,
                    "quantize_seconds": lane.quantize_seconds, "backend": "quantscope", "spec": lane.fmt.spec.to_dict(),
                    "notes": [*dict.fromkeys(lane.report["notes"]), *common_notes]})
        out.append(rec)
    evaluate = [base_fwd] + [ln.forward_seconds for ln in lanes]
    quantize = [0.0] + [ln.quantize_seconds for ln in lanes]
    for rec, items, fwd, qsec in zip(out, task_items, evaluate, quantize):
        if items:
            rec["task_items"] = items
        share = head_seconds / len(out)  # the head's scoring, shared evenly
        rec["timings"] = {"load": read_seconds, "quantize": qsec, "reference" if rec["baseline"] else "evaluate": fwd + share,
                          "total": total}
        rec["eval_tokens_per_s"] = rec["tokens_scored"] / (fwd + share) if fwd + share > 0 else None
        rec["kernel"] = "streamed (no speed loop)"
        rec.update({"prefill_tokens_per_s": None, "decode_tokens_per_s": None, "peak_rss_bytes": peak,
                    "peak_device_bytes": peak_dev, "streamed": True, "stream_seconds": total})
    return out


def _task_parts(job: Job, tokenizer, model_config) -> list[tuple]:
    """(task, its token pairs, its distinct inputs) per task, as the in-memory scorer builds them."""
    if not job.tasks:
        return []
    from ..evaluate.tasks.scoring import task_pairs, task_rows

    if tokenizer is None:
        raise QuantscopeError("internal: streamed tasks need the tokenizer")
    max_len = getattr(model_config, "max_position_embeddings", None)
    return [(t, pairs, task_rows(pairs, max_len)) for t in job.tasks for pairs in [task_pairs(tokenizer, t)]]


def _task_items(tasks: list[tuple], head, xs: list) -> dict:
    """Each task's per-item scores (TaskScores.to_dict) from its inputs' final hidden states."""
    from ..evaluate.tasks.scoring import score_rows_from_hidden, task_scores

    out, k = {}, 0
    for task, pairs, rows in tasks:
        scored = score_rows_from_hidden(rows, xs[k:k + len(rows)], head, len(pairs))
        out[task.name] = task_scores(task, pairs, scored).to_dict()
        k += len(rows)
    return out


def _inputs(model: nn.Module, first: nn.Module, batches: list, device: str, comp: torch.dtype):
    """The first block's inputs for `batches` (hidden states and keyword arguments) in the compute dtype."""
    xs, rests = capture_inputs(model, first, batches, device)
    memo: dict = {}
    return [x.to(comp) for x in xs], [cast_floats(r, comp, memo) for r in rests]


def _lane(job: Job, fmt: Format, model: nn.Module, xs_base: list, windows: list, outside_sel: list[str],
          comp: torch.dtype) -> _Lane:
    """A format's stream at the first block: the baseline's block inputs, or, when the embedding is
    selected, its own (from a copy of the skeleton with the selected outside modules quantized)."""
    lane = _Lane(job, fmt, [x.clone() for x in xs_base])
    spec = fmt.spec
    first = model.get_submodule(block_names(model)[0])
    if outside_sel:  # rounded to nearest, as the in-memory drivers do outside the blocks
        lane.outside = copy.deepcopy(model)
        apply_plan(lane.outside, {n: spec if fmt.kind == "own" else spec.rtn() for n in outside_sel})
        first = lane.outside.get_submodule(block_names(lane.outside)[0])
        lane.xs = _inputs(lane.outside, first, windows, job.device, comp)[0]
        if fmt.kind == "calibrated":
            lane.report["notes"].append(f"{len(outside_sel)} selected module(s) outside the decoder blocks rounded "
                                        f"to nearest ({spec.rtn().name}), not calibrated")
    if fmt.kind == "calibrated":
        seqs = _check_calib(list(job.calib) if job.calib is not None else None)
        cxs, crests = _inputs(lane.outside or model, first, _batches(seqs, CalibConfig().batch_size), job.device, comp)
        lane.calib = forward_inputs(spec, cxs, crests, lane.report)
    return lane


def _advance(lane: _Lane, block: nn.Module, local: list[str], bprefix: str, rests: list, comp: torch.dtype) -> None:
    """Quantize a copy of the float `block` for this lane's format and carry its stream through it."""
    t0 = time.perf_counter()
    qb = copy.deepcopy(block)
    stored = next(qb.parameters()).dtype
    if lane.calib is not None:
        cxs, crests, fwd = lane.calib
        calibrate_block(_cast(qb, comp), local, lane.fmt.spec, cxs, crests, bprefix, lane.report, lane.stage_cache, fwd)
        _cast(qb, stored)  # counted as stored (the float tensors left are norms: their values are unchanged)
    elif local:
        apply_plan(qb, {n: lane.fmt.spec for n in local})
    lane.block_bytes += _real_bytes(qb)
    _cast(qb, comp)
    t1 = time.perf_counter()
    for j in range(len(lane.xs)):
        lane.xs[j] = run_block(qb, lane.xs[j], rests[j])
    lane.quantize_seconds += t1 - t0
    lane.forward_seconds += time.perf_counter() - t1
    del qb
