"""Modules that hold quantized storage and dequantize in their forward pass.

`QuantLinear` keeps exactly the tensors of a :class:`QuantizedTensor` (packed codes, scales, zeros) as
buffers, so the model in memory is as small as the format, and a `state_dict` holds the packed form.
Dequantizing on every forward is the honest cost of weight-only quantization without fused kernels on
this CPU; speed rows measure it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.qtensor import QuantizedTensor
from ..formats.registry import family_of
from ..formats.spec import FormatSpec


_INT8_KERNEL_MAX_ROWS = 4  # above this, dequantize + fp32 matmul is faster on this CPU


class _QuantStorage(nn.Module):
    """Common part: registers a QuantizedTensor's storage tensors as buffers."""

    def _init_storage(self, qt: QuantizedTensor) -> None:
        self.spec: FormatSpec = qt.spec
        self.qshape = qt.shape
        self._keys = tuple(qt.tensors)
        for k, t in qt.tensors.items():
            self.register_buffer(k, t, persistent=True)

    def storage(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._keys}

    def qtensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.spec, self.qshape, self.storage())

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return family_of(self.spec).dequantize(self.storage(), self.spec, self.qshape, rows)


class QuantLinear(_QuantStorage):
    """A linear layer whose weight is stored in a quantscope format."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._init_storage(qt)
        self.out_features, self.in_features = qt.shape
        s = qt.spec
        self._int8_kernel = (s.family == "int" and s.bits == 8 and s.symmetric and s.group_size is None
                             and hasattr(torch, "_weight_int8pack_mm"))
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if self._int8_kernel and x.dtype == torch.float32 and x.numel() <= _INT8_KERNEL_MAX_ROWS * self.in_features:
            # per-channel symmetric int8, a few rows (decoding): torch's CPU int8 weight-only matmul, no
            # dequantized copy. Its cost grows linearly with the rows (0.69 s for 512 rows of a 1536x576
            # layer vs 0.03 s dequantize + sgemm, measured here), so prefill takes the dequantize path.
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight,
                                          self.scales.reshape(-1).to(torch.float32))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + b if b is not None else y
        w = self.dequantized_weight().to(x.dtype)
        return nn.functional.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.spec.name}"


class QuantEmbedding(_QuantStorage):
    """An embedding table stored in a quantscope format; only the looked-up rows are dequantized."""

    def __init__(self, qt: QuantizedTensor, padding_idx: int | None = None):
        super().__init__()
        self._init_storage(qt)
        self.num_embeddings, self.embedding_dim = qt.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        rows = self.dequantized_weight(uniq)
        return rows[inv].reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.spec.name}"


class TiedQuantHead(nn.Module):
    """An output head that shares a QuantEmbedding's storage (tied word embeddings, stored once)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.embedding = embedding  # a shared submodule: its buffers are counted once by storage walks
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.embedding.dequantized_weight().to(x.dtype))


def ragged_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, input width, group size) of every quantized linear whose width is not a multiple of its
    format's group size: its last group per row is partial. Measured as stored, but serving formats
    (compressed-tensors, GGUF) need whole groups, so a result on such layers says so."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            g = getattr(m.spec, "group_size", None)
            if g and m.in_features % g:
                out.append((name, m.in_features, g))
    return out
