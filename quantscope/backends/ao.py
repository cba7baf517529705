"""torchao adapter: `quantize_(model, config, filter_fn)` with the configs that run on this CPU.

torchao 0.18 on CPU (measured): Int8WeightOnlyConfig and Int8DynamicActivationInt8WeightConfig run
(Int8Tensor: int8 qdata, fp32 per-row scale, int8 zero point). Int4WeightOnlyConfig does not
(mslk missing / no CPU layout / CUDA only, see BACKEND_FORMATS), so the int4 weight-only format here is
IntxWeightOnlyConfig(int4), whose IntxUnpackedToInt8Tensor stores each 4-bit code in an int8 byte:
the measured weight_bytes show that honestly.

Weights become tensor subclasses whose `.nbytes` reports the dequantized size, so storage is counted
from their inner tensors (`__tensor_flatten__`). `set_inductor_config=False` is passed so torchao does
not rewrite torch._inductor's global config as a side effect.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import torch
from torch import nn

from quantscope.backends import BackendFormat
from quantscope.backends._common import (Include, check_divisible, require_all, require_selection,
                                         select_linears, walk_storage)
from quantscope.errors import QuantscopeError


def version() -> str:
    return importlib.metadata.version("torchao")


def _config(fmt: BackendFormat) -> object:
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    kind = fmt.option("config")
    if kind == "int8wo":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if kind == "int8dq":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if kind == "intx4wo":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                    granularity=PerGroup(int(fmt.option("group_size"))))
    raise QuantscopeError(f"{fmt.name}: torchao config {kind!r} has no adapter")


def _is_quantized(mod: nn.Module) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(getattr(mod, "weight", None), TorchAOBaseTensor)


def quantize(model: nn.Module, fmt: BackendFormat, include: Include,
             calib: list[torch.Tensor] | None = None) -> nn.Module:
    """Quantize the selected nn.Linear weights of `model` in place; `calib` is unused."""
    from torchao.quantization import quantize_

    selected = select_linears(model, include)
    require_selection(selected, fmt.name)
    group = dict(fmt.options).get("group_size")
    if group is not None:  # torchao would skip, not refuse, layers the group does not divide
        check_divisible(selected, int(group), fmt.name)
    names = {name for name, _ in selected}
    quantize_(model, _config(fmt), filter_fn=lambda mod, fqn: fqn in names)
    require_all(selected, model, _is_quantized, fmt.name)
    return model


def storage_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    return walk_storage(model)
