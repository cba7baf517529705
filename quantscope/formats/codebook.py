"""4-bit codebook formats from QLoRA (Dettmers et al., 2023): NF4 and FP4 with block-wise absmax.

Each row is cut into blocks of 64 input columns (a last partial block is allowed); a block's weights are
divided by its absmax and each is replaced by the index of the nearest codebook value. The absmax is
stored in float16 (bitsandbytes keeps it in fp32; quantscope stores every scale in 16 bits). With `-dq`
(double quantization) the absmaxes are themselves quantized: their mean is subtracted and they are
stored as int8 with one fp32 scale per 256 blocks (QLoRA uses an 8-bit float for this second level;
a linear int8 is used here and measured like everything else).

The codebooks are the published bitsandbytes values (`get_4bit_type("nf4"/"fp4")`), in their code order.
"""

from __future__ import annotations

import math

import torch

from .packing import pack_bits, packed_row_bytes, unpack_bits
from .spec import FormatSpec

NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (e2m1 with its own exponent bias), divided by its absmax 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODEBOOK = tuple(v / 12.0 for v in _FP4_RAW)

DQ_BLOCK = 256  # absmaxes per second-level scale


def codebook(variant: str, device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK if variant == "nf4" else FP4_CODEBOOK, dtype=torch.float32, device=device)


def nearest_code(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Index (into cb's code order) of the nearest codebook value, for every element of x."""
    vals, order = torch.sort(cb)
    mids = (vals[1:] + vals[:-1]) / 2
    idx = torch.bucketize(x.contiguous(), mids)
    return order[idx].to(torch.uint8)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    out_f, in_f = w.shape
    nb = math.ceil(in_f / block)
    pad = nb * block - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(out_f, nb, block)


def _double_quant(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = absmax.reshape(-1)
    offset = flat.mean()
    centred = flat - offset
    n = flat.numel()
    ng = math.ceil(n / DQ_BLOCK)
    padded = torch.nn.functional.pad(centred, (0, ng * DQ_BLOCK - n)).view(ng, DQ_BLOCK)
    scale = (padded.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(padded / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return {"absmax_q": q.reshape(-1)[:n].view(absmax.shape).clone(),
            "absmax_scale": scale.float().contiguous(), "absmax_offset": offset.reshape(1).float()}


def block_absmax(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stored per-block absmaxes as fp32 [out, n_blocks] (the second level undone for -dq)."""
    if "absmax" in t:
        return t["absmax"].float()
    q = t["absmax_q"]
    n = q.numel()
    scale = t["absmax_scale"].repeat_interleave(DQ_BLOCK)[:n].view(q.shape)
    return (q.float() * scale + t["absmax_offset"]).clamp_min(1e-12)


def quantize(w: torch.Tensor, spec: FormatSpec) -> dict[str, torch.Tensor]:
    w = w.detach().float()
    out_f, in_f = w.shape
    wb = _blocks(w, spec.group_size)
    amax = wb.abs().amax(-1).clamp_min(1e-12)
    if spec.double_quant:
        t = _double_quant(amax)
    else:
        t = {"absmax": amax.half().contiguous()}
    stored = block_absmax(t)  # quantize against exactly what is stored
    x = (wb / stored.unsqueeze(-1)).reshape(out_f, -1)[:, :in_f]
    codes = nearest_code(x, codebook(spec.variant, x.device))
    t["qweight"] = pack_bits(codes, 4)
    return t


def dequantize(t: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int],
               rows: torch.Tensor | None = None) -> torch.Tensor:
    _, in_f = shape
    absmax = block_absmax(t)
    packed = t["qweight"]
    if rows is not None:
        absmax, packed = absmax[rows], packed[rows]
    codes = unpack_bits(packed, 4, in_f)
    w = codebook(spec.variant, codes.device)[codes.to(torch.int32)]
    block = spec.group_size
    full = (in_f // block) * block
    nfull = full // block
    if nfull:  # in place, per block: this runs in every forward pass
        w[:, :full].unflatten(1, (nfull, block)).mul_(absmax[:, :nfull, None])
    if full < in_f:
        w[:, full:].mul_(absmax[:, -1:])
    return w


def storage_bytes(spec: FormatSpec, out_f: int, in_f: int) -> int:
    nb = math.ceil(in_f / spec.group_size)
    codes = out_f * packed_row_bytes(in_f, 4)
    if not spec.double_quant:
        return codes + 2 * out_f * nb
    n = out_f * nb
    return codes + n + 4 * math.ceil(n / DQ_BLOCK) + 4
