"""Float storage formats: fp32, bf16, fp16 (a cast) and fp8 (e4m3 / e5m2) with per-row scales.

CPU compute: quantscope keeps activations in fp32; a layer stored in bf16/fp16/fp8 is upcast to fp32
in its forward pass. So these rows measure the storage rounding error and the real bytes, not the
speed of native 16-bit/8-bit matmuls (which this CPU does not have for fp8).
"""

from __future__ import annotations

import torch

from .spec import FormatSpec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_FP16_MIN_NORMAL = 2.0 ** -14


def quantize(w: torch.Tensor, spec: FormatSpec) -> dict[str, torch.Tensor]:
    w = w.detach().float()
    if spec.family == "float":
        return {"weight": w.to(_DTYPES[spec.variant]).contiguous()}
    dt = _FP8[spec.variant]
    fmax = torch.finfo(dt).max
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = (amax / fmax).clamp_min(_FP16_MIN_NORMAL).to(torch.float16)
    codes = (w / scale.float()).clamp(-fmax, fmax).to(dt)
    return {"codes": codes.contiguous(), "scales": scale.squeeze(1).contiguous()}


def dequantize(t: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int],
               rows: torch.Tensor | None = None) -> torch.Tensor:
    if spec.family == "float":
        w = t["weight"] if rows is None else t["weight"][rows]
        return w.float()
    codes, scales = t["codes"], t["scales"]
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
    return codes.float() * scales.float().unsqueeze(-1)


def storage_bytes(spec: FormatSpec, out_f: int, in_f: int) -> int:
    if spec.family == "float":
        return out_f * in_f * spec.bits // 8
    return out_f * in_f + 2 * out_f
