"""The one table of dtype names: what a user types (fp32, bf16, fp16 or torch's own names), the
torch dtype it means, and the short name a baseline row carries (`fp32`)."""

from __future__ import annotations

import torch

from .errors import QuantscopeError

# short name -> (torch's name, torch dtype)
DTYPES = {
    "fp32": ("float32", torch.float32),
    "bf16": ("bfloat16", torch.bfloat16),
    "fp16": ("float16", torch.float16),
}
_BY_TORCH_NAME = {torch_name: short for short, (torch_name, _) in DTYPES.items()}


def short_name(name: str) -> str:
    """'float32' or 'fp32' -> 'fp32' (the baseline format's name)."""
    if name in DTYPES:
        return name
    if name in _BY_TORCH_NAME:
        return _BY_TORCH_NAME[name]
    raise QuantscopeError(f"unknown dtype '{name}' (use float32, bfloat16 or float16)")


def torch_name(name: str) -> str:
    """'fp32' or 'float32' -> 'float32'."""
    return DTYPES[short_name(name)][0]


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[short_name(name)][1]
