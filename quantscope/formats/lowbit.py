"""Experimental sub-2-bit formats: ternary (BitNet b1.58-style absmean) and binary (sign x mean|w|).

Ternary: per group of G input columns, scale = mean|w|; codes = clamp(round(w / scale), -1, 1),
packed base-3 five to a byte (1.6 bits/weight + the fp16 scale). Binary: codes = sign(w) (zero maps
to +1), scale = mean|w| per group, 1 bit per weight + the fp16 scale. Post-training, with no
quantization-aware training, these are expected to destroy a model; they are here to be measured.
"""

from __future__ import annotations

import math

import torch

from .integer import _grouped, n_groups
from .packing import pack_bits, pack_ternary, packed_row_bytes, ternary_row_bytes, unpack_bits, unpack_ternary
from .spec import FormatSpec


def _scales(w: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = w.shape
    g = w.abs()
    # mean over the real (unpadded) columns of each group
    ng = n_groups(in_f, group)
    pad = ng * group - in_f
    if pad:
        g = torch.nn.functional.pad(g, (0, pad))
    counts = torch.full((ng,), float(group), device=w.device)
    counts[-1] = group - pad
    return (g.view(out_f, ng, group).sum(-1) / counts).clamp_min(1e-8).half()


def quantize(w: torch.Tensor, spec: FormatSpec) -> dict[str, torch.Tensor]:
    w = w.detach().float()
    out_f, in_f = w.shape
    scales = _scales(w, spec.group_size)
    wg = _grouped(w, spec.group_size) / scales.float().unsqueeze(-1)
    wg = wg.reshape(out_f, -1)[:, :in_f]
    if spec.family == "ternary":
        codes = (torch.round(wg).clamp(-1, 1) + 1).to(torch.uint8)
        return {"qweight": pack_ternary(codes), "scales": scales}
    codes = (wg >= 0).to(torch.uint8)
    return {"qweight": pack_bits(codes, 1), "scales": scales}


def dequantize(t: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int],
               rows: torch.Tensor | None = None) -> torch.Tensor:
    _, in_f = shape
    packed, scales = t["qweight"], t["scales"]
    if rows is not None:
        packed, scales = packed[rows], scales[rows]
    if spec.family == "ternary":
        vals = unpack_ternary(packed, in_f).float() - 1
    else:
        vals = unpack_bits(packed, 1, in_f).float() * 2 - 1
    n = vals.shape[0]
    g = spec.group_size
    ng = scales.shape[1]
    pad = ng * g - in_f
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    return (vals.view(n, ng, g) * scales.float().unsqueeze(-1)).reshape(n, ng * g)[:, :in_f]


def storage_bytes(spec: FormatSpec, out_f: int, in_f: int) -> int:
    row = ternary_row_bytes(in_f) if spec.family == "ternary" else packed_row_bytes(in_f, 1)
    return out_f * row + 2 * out_f * math.ceil(in_f / spec.group_size)
