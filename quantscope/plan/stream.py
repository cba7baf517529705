"""Peak memory of a comparison, streamed (:mod:`quantscope.harness.stream`) and in memory, from
config.json only: what decides ``--stream`` when it is not given, and what ``plan --stream`` prints.

Streamed, the process holds (each part exact from the shapes unless marked as an estimate):

- the parts outside the decoder blocks at the baseline dtype: embedding, final norm, an untied head;
- one block in flight: the float block read from the shards, the copy being quantized, and the
  quantized result (its bytes in the largest of the formats);
- the hidden-state streams: windows x ctx x hidden at the baseline dtype, for the baseline and every
  format; a calibrated format adds its calibration stream (samples x seqlen x hidden, float32);
- ESTIMATE: one window's activations through a block (:func:`.planner.activation_bytes`), one chunk
  of the head's logits (the chunk of :func:`quantscope.evaluate.hidden.chunk_tokens`), rounding's
  float32 workspace of the largest matrix, and a GPTQ Hessian (in x in, float64) per calibrated format;
- ASSUMED: the runtime itself (Python, torch, transformers: 0.45 GiB resident after import, measured
  on the machines this was written on).

In memory, a format's worker holds the model at the baseline dtype and its quantized form (the
quantized model replaces the float one module by module, so at most both), plus the same runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from quantscope.formats.registry import storage_bytes
from quantscope.formats.spec import parse_format
from quantscope.plan.devices import GiB
from quantscope.plan.geometry import DTYPE_BYTES, Geometry, dtype_name, geometry
from quantscope.plan.planner import RuntimeAssumptions, activation_bytes
from quantscope.plan.weights import model_tensors

RUNTIME_BYTES = int(0.45 * GiB)  # resident after importing torch + transformers + quantscope (measured)
_CALIBRATED = ("gptq", "awq", "awq+gptq")


@dataclass(frozen=True)
class StreamPlan:
    outside_bytes: int  # embedding, final norm, untied head at the baseline dtype
    block_bytes: int  # one decoder block at the baseline dtype
    in_flight_bytes: int  # float block + copy being quantized + quantized block
    stream_bytes: int  # hidden-state streams (baseline + formats + calibration)
    workspace_bytes: int  # ESTIMATE, blocks phase: one window's activations, rounding/Hessian workspace
    head_bytes: int  # ESTIMATE, head phase: one chunk of logits (+ the head's compute copy)
    runtime_bytes: int  # ASSUMED
    total_bytes: int  # outside + streams + runtime + the larger phase (in flight + workspace, or head)
    in_memory_bytes: int  # the in-memory path's estimate, for the same formats

    def to_dict(self) -> dict:
        return asdict(self)


def _bytes(name: str) -> int:
    return DTYPE_BYTES[dtype_name(name, "dtype")]


def stream_plan(config: dict | Geometry, formats: Sequence[str], windows: int, ctx: int, dtype: str,
                calib_samples: int = 128, calib_seqlen: int = 512, compute: str | None = None) -> StreamPlan:
    """Predicted peak memory of a streamed comparison of `formats` (the baseline stored in `dtype`, its blocks
    computed in `compute`, by default `dtype`: see :func:`quantscope.placement.compute_dtype`).

    The pass has two phases that do not overlap: the blocks (one in flight, with rounding's and the
    activations' workspace) and the head (a compute-dtype copy of the head when the dtypes differ, and one
    chunk of logits); the peak is the larger, on top of what both hold (runtime, outside parts, streams)."""
    from quantscope.evaluate.hidden import chunk_tokens

    g = geometry(config)
    el = _bytes(dtype)
    cel = _bytes(compute) if compute else el
    tensors = model_tensors(g)
    outside_t = [t for t in tensors if ".layers." not in t.name]
    outside = sum(t.numel for t in outside_t) * el
    block = [t for t in tensors if t.name.startswith("model.layers.0.")]
    block_params = sum(t.numel for t in block)
    block_float = block_params * el
    specs = [parse_format(f) for f in formats]
    linears = [t for t in block if t.role == "linear"]

    def quantized(spec) -> int:
        return sum(storage_bytes(spec, *t.shape) for t in linears) + sum(t.numel for t in block if t.role != "linear") * el

    q_block = max((quantized(s) for s in specs), default=0)
    # a format's step holds the float block, its copy and the quantized result; the baseline's cast to the
    # compute dtype holds the stored block and its compute copy
    in_flight = max(2 * block_float + q_block, block_float + block_params * cel if cel != el else 0)
    calibrated = [s for s in specs if s.method in _CALIBRATED]
    streams = (1 + len(specs)) * windows * ctx * g.hidden * cel
    streams += len(calibrated) * calib_samples * calib_seqlen * g.hidden * 4
    largest = max(t.numel for t in linears)
    widest_in = max(t.shape[1] for t in linears)
    block_work = activation_bytes(g, ctx, 1, RuntimeAssumptions(activation_dtype=compute or dtype))
    block_work += 2 * largest * 4  # round-to-nearest works on a float32 copy of the weight and its codes
    if calibrated:
        block_work += 2 * widest_in * widest_in * 8
    head_work = 16 * min(ctx, chunk_tokens(g.vocab)) * g.vocab  # 4 float32 [chunk, vocab] arrays
    if cel != el:  # the head's compute copy (a tied head is the embedding's tensor: copied too)
        head_work += (g.vocab * g.hidden + g.hidden) * cel
    total = outside + max(in_flight + block_work, head_work) + streams + RUNTIME_BYTES
    return StreamPlan(outside, block_float, in_flight, streams, block_work, head_work, RUNTIME_BYTES, total,
                      in_memory_bytes(g, formats, dtype))


def in_memory_bytes(config: dict | Geometry, formats: Sequence[str], dtype: str) -> int:
    """Estimated peak of the in-memory path: the float model and the largest quantized form side by side."""
    from quantscope.plan.weights import weight_bytes_for_model_config

    g = geometry(config)
    short = dtype_name(dtype, "dtype")
    float_bytes = weight_bytes_for_model_config(g, short, baseline_dtype=short)
    quant = max((weight_bytes_for_model_config(g, f, baseline_dtype=short) for f in formats), default=0)
    return float_bytes + quant + RUNTIME_BYTES
