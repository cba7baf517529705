"""HQQ adapter: each selected nn.Linear becomes `hqq.core.quantize.HQQLinear` (calibration-free).

HQQLinear keeps only its packed codes `W_q` as a parameter; the per-group `scale` and `zero` live in
its `meta` dict and the bias in a plain attribute, so `storage_tensors` reads those too. Scale and
zero are kept in the model's dtype (`compute_dtype` = the weight dtype, fp32 for the harness), which
is what HQQ stores when it runs that dtype; 3-bit codes are packed 10 per int32 (3.2 bits per code).
HQQ's default PyTorch backend (dequantize, then matmul) is used: its fast kernels are CUDA-only.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import torch
from torch import nn

from quantscope.backends import BackendFormat
from quantscope.backends._common import (Include, check_divisible, require_all, require_selection,
                                         select_linears, tensors_in, walk_storage)


def version() -> str:
    return importlib.metadata.version("hqq")


def quantize(model: nn.Module, fmt: BackendFormat, include: Include,
             calib: list[torch.Tensor] | None = None) -> nn.Module:
    """Replace the selected nn.Linear modules of `model` in place; `calib` is unused."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    selected = select_linears(model, include)
    require_selection(selected, fmt.name)
    group = int(fmt.option("group_size"))
    check_divisible(selected, group, fmt.name)
    config = BaseQuantizeConfig(nbits=int(fmt.option("nbits")), group_size=group)
    for name, lin in selected:
        new = HQQLinear(lin, quant_config=config, compute_dtype=lin.weight.dtype,
                        device=str(lin.weight.device), del_orig=True)
        new.train(lin.training)
        model.set_submodule(name, new)
    require_all(selected, model, lambda m: isinstance(m, HQQLinear), fmt.name)
    return model


def _extra(mod: nn.Module) -> Iterator[torch.Tensor]:
    """HQQLinear's meta dict (scale, zero, and their own quantization meta if any) and plain bias."""
    meta = getattr(mod, "meta", None)
    if isinstance(meta, dict):
        yield from tensors_in(meta)
    bias = getattr(mod, "bias", None)
    if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter) \
            and "bias" not in mod._buffers:
        yield bias


def storage_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    return walk_storage(model, _extra)
