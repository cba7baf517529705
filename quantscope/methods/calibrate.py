"""Sequential, block-by-block calibrated quantization of a decoder model (GPTQ, AWQ, AWQ+GPTQ).

The driver around the pure algorithms of :mod:`.gptq` and :mod:`.awq`, shaped like the reference
implementations' layer loops (IST-DASLab/gptq ``llama_sequential``, AutoAWQ's ``quantize``):

1. the calibration sequences are run through the model until the first decoder block, whose inputs
   (hidden states, and the keyword arguments the model passes it: position embeddings, attention
   mask, position ids) are caught by a forward pre-hook;
2. for each decoder block in order, the selected linears are grouped into *stages* of linears that
   read the same input tensor (q/k/v, o, gate/up, down for a Llama block), found by watching one
   forward pass; then
   - GPTQ ("true sequential"): stage by stage, the stage's input Hessian is accumulated with the
     earlier stages already quantized, and the stage solved (its linears stacked: rows are
     independent given a shared Hessian). On a Llama/Qwen2/Mistral-style block, once checked on
     real inputs to reproduce the block's output, the block is run as its parts (norm, attention
     up to o_proj, residual, norm, MLP up to down_proj) so attention is computed once per block
     instead of once per stage (2.6x faster on the embedded model); any other block is re-run up
     to each stage, with a pre-hook ending the pass there;
   - AWQ: one float forward collects per-stage activation statistics; scales are searched and
     folded group by group (:func:`awq.scale_groups`), then each linear is clipped and rounded;
   - AWQ+GPTQ: AWQ's scale search and folding, then GPTQ's stages instead of clipping + RTN;
3. the block's linears are replaced by ``QuantLinear`` via ``apply_plan(precomputed=...)``, and the
   block is re-run to turn its inputs into the next block's inputs (computed by the quantized block).

This module is the driver; the forward-pass plumbing (hooks, captured block inputs) is in
:mod:`.calib_capture`, the Llama-style block run as parts in :mod:`.calib_parts`, and one block's
per-method steps (steps 2 above) in :mod:`.calib_steps`.

Precision: the forward passes run in float32, or with ``-bf16fwd`` in bfloat16 (the reference runs its
calibration in fp16 on a GPU; on a CPU with AMX/AVX512-BF16 bfloat16 matmuls are several times faster).
In bfloat16 the block is cast for its passes only: every solve starts from the float32 weights,
Hessians are accumulated from the bfloat16 activations in float32/float64, and the block gets its
exact float32 parameters back before its linears are replaced.

Memory: the calibration activations (one hidden-state tensor per batch, overwritten in place by each
block's outputs) plus one block's statistics. Selected modules outside the decoder blocks
(embeddings, ``lm_head``) are rounded to nearest, and the report says so.

Deterministic: the same model, data and options give byte-identical packed weights (all CPU ops
used here are deterministic at a fixed thread count; the tests check it).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import QuantscopeError
from ..formats.qtensor import QuantizedTensor
from ..formats.spec import FormatSpec
from ..modules.names import is_block_list
# Choosing the modules to quantize, and installing the quantized modules (RTN outside the blocks,
# the precomputed QuantizedTensors inside them): the driver's only use of the module swap.
from ..modules.swap import apply_plan, select_modules
from . import awq
from .calib_capture import capture_inputs, cast_floats, find_stages, run_block
from .calib_parts import parts_match as _parts_match  # called through this module: tests can force the generic path
from .calib_steps import awq_block, awq_scale, gptq_block, gptq_parts
from .config import GPTQConfig


@dataclass(frozen=True)
class CalibConfig:
    batch_size: int = 8  # sequences per forward pass: larger uses the cores better, holds more at once
    awq: awq.AWQConfig = field(default_factory=awq.AWQConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("CalibConfig.batch_size must be >= 1")


# --- calibration data --------------------------------------------------------------------------

def _check_calib(calib) -> list[torch.Tensor]:
    if not isinstance(calib, (list, tuple)) or len(calib) == 0:
        raise QuantscopeError("calibration data is empty: need at least one token sequence")
    seqs = []
    for i, ids in enumerate(calib):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise QuantscopeError(f"calibration sample {i} is not a tensor of token ids")
        ids = ids.reshape(-1).long()
        if ids.numel() == 0:
            raise QuantscopeError(f"calibration sample {i} has no tokens")
        seqs.append(ids)
    return seqs


def _batches(seqs: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Consecutive runs of equal-length sequences, at most `size` per batch, stacked [b, len]."""
    out, run = [], []
    for s in seqs:
        if run and (len(run) == size or run[0].numel() != s.numel()):
            out.append(torch.stack(run))
            run = []
        run.append(s)
    out.append(torch.stack(run))
    return out


# --- model structure ---------------------------------------------------------------------------

def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and is_block_list(name) and len(m) > 0:
            return name, m
    raise QuantscopeError("calibrated formats need a decoder model with a `layers` list of blocks "
                          f"(Llama/Qwen/Mistral style); {type(model).__name__} has none")


# --- the driver --------------------------------------------------------------------------------

def quantize_calibrated(model: nn.Module, spec: FormatSpec, calib: list[torch.Tensor],
                        include: Iterable[str] = (), exclude: Iterable[str] = (),
                        progress: Callable[[int, int, str], None] | None = None,
                        config: CalibConfig | None = None) -> tuple[nn.Module, dict]:
    """Quantize the selected linears of `model` in place with `spec`'s calibrated method
    (``gptq``, ``awq`` or ``awq+gptq``), block by block on the token sequences `calib`.

    `progress(done_blocks, total_blocks, label)` is called after each block. Returns the model and
    a report: per-layer seconds, dampening, fallbacks, AWQ exponents, and totals."""
    if spec.method not in ("gptq", "awq", "awq+gptq") or spec.family != "int":
        raise QuantscopeError(f"'{spec.name}' is not a calibrated integer format (gptq-/awq-/awq+gptq-)")
    cfg = config or CalibConfig()
    seqs = _check_calib(calib)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    report: dict = {"format": spec.name, "method": spec.method, "calib_sequences": len(seqs),
                    "calib_tokens": int(sum(s.numel() for s in seqs)), "batch_size": cfg.batch_size,
                    "layers": {}, "blocks": [], "fallbacks": [], "rtn_modules": [], "notes": []}
    with torch.no_grad():
        names = select_modules(model, include, exclude)
        prefix, layers = _decoder_layers(model)
        if spec.method in ("awq", "awq+gptq"):
            awq.scale_groups(layers[0])  # unsupported block types fail here, before any change
        per_block: list[list[str]] = [[] for _ in layers]
        outside = []
        for n in names:
            m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", n)
            if m and isinstance(model.get_submodule(n), nn.Linear):
                per_block[int(m[1])].append(m[2])
            else:
                outside.append(n)
        if outside:  # first, so the blocks are calibrated on what the quantized model computes
            apply_plan(model, {n: spec.rtn() for n in outside})
            report["rtn_modules"] = outside
            report["notes"].append(f"{len(outside)} selected module(s) outside the decoder blocks "
                                   f"rounded to nearest ({spec.rtn().name}), not calibrated")
        xs, rests = capture_inputs(model, layers[0], _batches(seqs, cfg.batch_size))
        xs, rests, fwd_dtype = forward_inputs(spec, xs, rests, report)
        stage_cache: dict = {}
        for i, block in enumerate(layers):
            t0 = time.perf_counter()
            path = calibrate_block(block, per_block[i], spec, xs, rests, f"{prefix}.{i}.", report, stage_cache,
                                   fwd_dtype, cfg)
            secs = time.perf_counter() - t0
            report["blocks"].append({"block": i, "seconds": secs, "layers": len(per_block[i]), "path": path})
            if progress is not None:
                progress(i + 1, len(layers), f"block {i + 1}/{len(layers)} {secs:.1f}s")
    report["fallbacks"] = [{"layer": n, "warning": r["fallback"]}
                           for n, r in report["layers"].items() if r.get("fallback")]
    report["notes"].extend(f"{f['layer']}: {f['warning']}" for f in report["fallbacks"])
    report["total_seconds"] = time.perf_counter() - t_start
    model.train(was_training)
    return model, report


def forward_inputs(spec: FormatSpec, xs: list[torch.Tensor], rests: list, report: dict):
    """The captured block inputs in the dtype of the calibration forward passes ("-bf16fwd" in the name:
    bfloat16; AWQ and plain GPTQ: float32, as captured): (xs, rests, dtype), the report noting a cast."""
    calib_dtype = GPTQConfig.from_spec(spec).calib_dtype
    fwd_dtype = getattr(torch, calib_dtype)
    if fwd_dtype != torch.float32:
        memo: dict = {}
        xs = [x.to(fwd_dtype) for x in xs]
        rests = [cast_floats(r, fwd_dtype, memo) for r in rests]
        report["calib_dtype"] = calib_dtype
        report["notes"].append(f"calibration forward passes in {calib_dtype} (weights solved from "
                               "their float32 values, Hessians accumulated in float32/float64)")
    return xs, rests, fwd_dtype


def calibrate_block(block: nn.Module, local: list[str], spec: FormatSpec, xs: list[torch.Tensor], rests: list,
                    bprefix: str, report: dict, stage_cache: dict, fwd_dtype: torch.dtype = torch.float32,
                    config: CalibConfig | None = None) -> str:
    """One decoder block of the sequential loop: its linears `local` (block-local names) solved with
    `spec`'s method on the block's calibration inputs `xs` and replaced by QuantLinears, and `xs`
    overwritten with the quantized block's outputs (the next block's inputs). The streamed path calls
    it once per block as the blocks are read; `stage_cache` is shared across the blocks of one run.
    Returns the path taken ("parts", "block" or "none")."""
    cfg = config or CalibConfig()
    pre: dict[str, QuantizedTensor] = {}
    saved, masters = None, None
    with torch.no_grad():
        if fwd_dtype != torch.float32:  # float32 originals of everything the cast below rounds
            saved = {k: v for k, v in block.state_dict().items()}
            masters = {n: saved[f"{n}.weight"] for n in local}
            block.to(fwd_dtype)
        outputs_done, path = False, "none"
        if local:
            key = (type(block), tuple(local))
            if key not in stage_cache:
                stage_cache[key] = find_stages(block, local, xs[0], rests[0])
            stages, uncalled = stage_cache[key]
            if spec.method in ("gptq", "awq+gptq") and ("parts", key) not in stage_cache:
                stage_cache["parts", key] = _parts_match(block, local, xs[0], rests[0])
            path = "block"
            if spec.method == "awq":
                awq_block(block, stages, spec, xs, rests, bprefix, report["layers"], pre, cfg.awq)
            else:
                if spec.method == "awq+gptq":
                    awq_scale(block, stages, spec, xs, rests, bprefix, report["layers"], cfg.awq)
                if stage_cache["parts", key]:
                    gptq_parts(block, local, spec, xs, rests, bprefix, report["layers"], pre, masters)
                    outputs_done, path = True, "parts"
                else:
                    gptq_block(block, stages, spec, xs, rests, bprefix, report["layers"], pre, masters)
            for n in uncalled:
                report["notes"].append(f"{bprefix}{n} never ran on the calibration data: rounded to nearest")
        if not outputs_done:  # this block's outputs are the next block's inputs
            for j in range(len(xs)):
                xs[j] = run_block(block, xs[j], rests[j])
        if saved is not None:  # back to float32, with the exact original values
            block.to(torch.float32)
            block.load_state_dict(saved)
        if local:
            apply_plan(block, {n: spec if n in pre else spec.rtn() for n in local}, precomputed=pre)
    return path
