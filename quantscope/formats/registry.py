"""The one registry of quantscope's own format families: family name -> (quantize, dequantize, size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import codebook, floats, integer, lowbit
from .spec import FormatSpec


@dataclass(frozen=True)
class Family:
    name: str
    quantize: Callable  # (w [out, in], spec) -> dict of storage tensors
    dequantize: Callable  # (tensors, spec, shape, rows=None) -> fp32 [rows or out, in]
    storage_bytes: Callable  # (spec, out, in) -> int
    description: str


FAMILIES: dict[str, Family] = {
    "float": Family("float", floats.quantize, floats.dequantize, floats.storage_bytes,
                    "weights stored in a float dtype, upcast to fp32 for CPU compute"),
    "fp8": Family("fp8", floats.quantize, floats.dequantize, floats.storage_bytes,
                  "float8 weight storage, one fp16 scale per output row"),
    "int": Family("int", integer.quantize, integer.dequantize, integer.storage_bytes,
                  "integer codes, fp16 scale (+ fp16 zero point) per group"),
    "codebook": Family("codebook", codebook.quantize, codebook.dequantize, codebook.storage_bytes,
                       "QLoRA 4-bit codebook with block-wise absmax"),
    "ternary": Family("ternary", lowbit.quantize, lowbit.dequantize, lowbit.storage_bytes,
                      "{-1, 0, +1} x per-group absmean scale"),
    "binary": Family("binary", lowbit.quantize, lowbit.dequantize, lowbit.storage_bytes,
                     "sign x per-group mean |w|"),
}


def family_of(spec: FormatSpec) -> Family:
    return FAMILIES[spec.family]


def storage_bytes(spec: FormatSpec, out_features: int, in_features: int) -> int:
    """Exact bytes of one [out, in] weight matrix stored in `spec`."""
    return family_of(spec).storage_bytes(spec, out_features, in_features)
