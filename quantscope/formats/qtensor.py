"""A quantized weight matrix: its format, its shape, and the tensors that store it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..finite import all_finite

from .registry import family_of
from .spec import FormatSpec


@dataclass
class QuantizedTensor:
    spec: FormatSpec
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return family_of(self.spec).dequantize(self.tensors, self.spec, self.shape, rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel


def quantize_tensor(w: torch.Tensor, spec: FormatSpec) -> QuantizedTensor:
    """Quantize a 2-D weight [out, in] with plain round-to-nearest (calibrated methods live in methods/)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not all_finite(w):
        from ..errors import QuantscopeError

        raise QuantscopeError("weight contains NaN or Inf values: refusing to quantize a broken model")
    fam = family_of(spec)
    with torch.no_grad():
        t = fam.quantize(w, spec)
    return QuantizedTensor(spec, (int(w.shape[0]), int(w.shape[1])), t)
