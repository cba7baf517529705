"""Integer formats: int8 per channel and intN with groups along the input dimension.

Layout (shared with GPTQ/AWQ, which only choose codes and parameters differently):
- groups of `G` consecutive input columns in each output row; the last group may be partial
  (576 inputs with G=128 give 4 full groups and one of 64);
- `scales` [out, n_groups] float16, `zeros` [out, n_groups] float16 holding integers (asymmetric only);
  symmetric formats use the implicit zero point 2^(N-1) and store no zeros;
- codes q in [0, 2^N - 1], dequantized as (q - zero) * scale, packed densely per row.

Codes are always computed from the float16-rounded scale and zero, so dequantization reproduces
exactly what the quantizer chose.
"""

from __future__ import annotations

import math

import torch

from .packing import pack_bits, packed_row_bytes, unpack_bits
from .spec import FormatSpec

_MIN_SCALE = 2.0 ** -20


def n_groups(in_f: int, group: int | None) -> int:
    return 1 if group is None else math.ceil(in_f / group)


def group_width(in_f: int, group: int | None) -> int:
    return in_f if group is None else group


def _grouped(w: torch.Tensor, group: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, G], padding a partial last group with its own last value
    (so padding never widens the group's min/max)."""
    out_f, in_f = w.shape
    g = group_width(in_f, group)
    pad = n_groups(in_f, group) * g - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, g)


def minmax_params(w: torch.Tensor, bits: int, symmetric: bool, group: int | None):
    """Round-to-nearest parameters per group: (scales fp16 [out, ng], zeros fp16 [out, ng]).

    Asymmetric: scale = (max - min) / (2^N - 1), zero = round(-min / scale).
    Symmetric: scale = max|w| / (2^(N-1) - 1), zero = 2^(N-1).
    """
    wg = _grouped(w.float(), group)
    qmax = 2 ** bits - 1
    if symmetric:
        amax = wg.abs().amax(-1)
        scale = (amax / (2 ** (bits - 1) - 1)).clamp_min(_MIN_SCALE).half()
        zero = torch.full_like(scale, 2 ** (bits - 1))
        return scale, zero.half()
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    scale = ((wmax - wmin) / qmax)
    const = scale == 0
    scale = torch.where(const, wmax.abs(), scale).clamp_min(_MIN_SCALE).half()
    zero = torch.round(-wmin / scale.float()).clamp(0, qmax)
    return scale, zero.half()


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group: int | None) -> torch.Tensor:
    """Codes (uint8 [out, in]) of `w` for given fp16 scales/zeros [out, n_groups]."""
    out_f, in_f = w.shape
    wg = _grouped(w.float(), group)
    q = torch.round(wg / scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1))
    q = q.clamp(0, 2 ** bits - 1).reshape(out_f, -1)[:, :in_f]
    return q.to(torch.uint8)


def from_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               spec: FormatSpec) -> dict[str, torch.Tensor]:
    """Storage tensors for chosen codes and parameters (used by RTN, GPTQ and AWQ alike).

    Symmetric 8-bit codes are stored as signed int8 (q - 128), the layout CPU int8 matmul kernels take."""
    if spec.bits == 8 and spec.symmetric:
        qweight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    else:
        qweight = pack_bits(codes, spec.bits)
    t = {"qweight": qweight, "scales": scales.half().contiguous()}
    if not spec.symmetric:
        t["zeros"] = zeros.half().contiguous()
    return t


def quantize(w: torch.Tensor, spec: FormatSpec) -> dict[str, torch.Tensor]:
    w = w.detach().float()
    scales, zeros = minmax_params(w, spec.bits, spec.symmetric, spec.group_size)
    codes = quantize_codes(w, scales, zeros, spec.bits, spec.group_size)
    return from_codes(codes, scales, zeros, spec)


def dequantize(t: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int],
               rows: torch.Tensor | None = None) -> torch.Tensor:
    _, in_f = shape
    packed, scales = t["qweight"], t["scales"]
    zeros = t.get("zeros")
    if rows is not None:
        packed, scales = packed[rows], scales[rows]
        zeros = zeros[rows] if zeros is not None else None
    if packed.dtype == torch.int8:  # symmetric 8-bit: signed codes, zero point already removed
        w = packed.to(torch.float32)
    else:
        w = unpack_bits(packed, spec.bits, in_f).to(torch.float32)
        if zeros is None:
            w.sub_(2 ** (spec.bits - 1))
    # in-place per group (this runs in every forward pass: no padded copies)
    n = w.shape[0]
    g = group_width(in_f, spec.group_size)
    full = (in_f // g) * g
    s = scales.to(torch.float32)
    z = zeros.to(torch.float32) if zeros is not None else None
    nfull = full // g
    if nfull:
        wv = w[:, :full].unflatten(1, (nfull, g))
        if z is not None:
            wv.sub_(z[:, :nfull, None])
        wv.mul_(s[:, :nfull, None])
    if full < in_f:
        tail = w[:, full:]
        if z is not None:
            tail.sub_(z[:, -1:])
        tail.mul_(s[:, -1:])
    return w


def storage_bytes(spec: FormatSpec, out_f: int, in_f: int) -> int:
    ng = n_groups(in_f, spec.group_size)
    per_group = 2 if spec.symmetric else 4  # fp16 scale (+ fp16 zero)
    return out_f * packed_row_bytes(in_f, spec.bits) + out_f * ng * per_group
