"""The one table of dtype names: what a user or a config.json writes (fp32, bfloat16, torch.float16,
half ...), the short name a baseline row carries (`fp32`), and the torch dtype it means. Importing
this module does not import torch (the planner reads dtypes from config.json without it)."""

from __future__ import annotations

from .errors import QuantscopeError

# short name -> torch's name
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def short_name(name: str) -> str:
    """'float32', 'torch.float32' or 'fp32' -> 'fp32' (the baseline format's name)."""
    key = str(name).lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in TORCH_NAMES:
        raise QuantscopeError(f"unknown dtype '{name}' (use float32, bfloat16 or float16)")
    return key


def torch_name(name: str) -> str:
    """'fp32' or 'float32' -> 'float32'."""
    return TORCH_NAMES[short_name(name)]


def torch_dtype(name: str):
    import torch

    return getattr(torch, torch_name(name))
