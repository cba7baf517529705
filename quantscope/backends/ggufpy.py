"""llama.cpp block formats through the `gguf` package (gguf-py): quantized in Python, run dequantized.

Each selected nn.Linear becomes a `GGUFBlockLinear` whose only weight storage is the raw GGUF block
bytes `gguf.quants.quantize` produces (a uint8 buffer [out, in / block * bytes_per_block], the
layout a .gguf file holds). Its forward dequantizes them with `gguf.quants.dequantize` (numpy) on
every call and runs an fp32 matmul. This measures the *format's* quality and memory faithfully; it
is not llama.cpp's kernels, so its speed is not llama.cpp's speed (dequantizing every call costs
about 20 ns per weight here, ~2 s per forward pass of a 135M model).

Only the types gguf-py 0.19 can quantize are offered (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, MXFP4): the
k-quants and i-quants are dequantize-only in gguf-py and need llama.cpp's own quantizer.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from quantscope.backends import BackendFormat
from quantscope.backends._common import (Include, check_divisible, require_all, require_selection,
                                         select_linears, walk_storage)
from quantscope.errors import QuantscopeError


def version() -> str:
    return importlib.metadata.version("gguf")


class GGUFBlockLinear(nn.Module):
    """A linear layer whose weight is stored as GGUF blocks of one ggml type, dequantized per call."""

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.qtype = qtype  # a gguf.GGMLQuantizationType value
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # dtype of the activations / dequantized weight
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, qtype: int) -> GGUFBlockLinear:
        from gguf import GGMLQuantizationType, quants

        w = lin.weight.detach().to("cpu", torch.float32).numpy()
        blocks = torch.from_numpy(quants.quantize(w, GGMLQuantizationType(qtype)))
        bias = None if lin.bias is None else lin.bias.detach().clone()
        return cls(blocks.to(lin.weight.device), qtype, lin.in_features, lin.out_features, bias,
                   lin.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        w = quants.dequantize(self.blocks.cpu().numpy(), GGMLQuantizationType(self.qtype))
        return torch.from_numpy(w).to(self.blocks.device, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        from gguf import GGMLQuantizationType

        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"type={GGMLQuantizationType(self.qtype).name}")


def quantize(model: nn.Module, fmt: BackendFormat, include: Include,
             calib: list[torch.Tensor] | None = None) -> nn.Module:
    """Replace the selected nn.Linear modules of `model` in place; `calib` is unused."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = str(fmt.option("qtype"))
    if name not in GGMLQuantizationType.__members__:
        raise QuantscopeError(f"{fmt.name}: gguf {version()} has no {name} type; pip install -U gguf")
    qtype = GGMLQuantizationType[name]
    selected = select_linears(model, include)
    require_selection(selected, fmt.name)
    check_divisible(selected, GGML_QUANT_SIZES[qtype][0], fmt.name)
    for name, lin in selected:
        new = GGUFBlockLinear.from_linear(lin, int(qtype))
        new.train(lin.training)
        model.set_submodule(name, new)
    require_all(selected, model, lambda m: isinstance(m, GGUFBlockLinear), fmt.name)
    return model


def storage_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    return walk_storage(model)
