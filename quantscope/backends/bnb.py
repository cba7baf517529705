"""bitsandbytes adapter: LLM.int8() and 4-bit NF4/FP4 (optionally double-quantized) by module replacement.

Why module replacement: `BitsAndBytesConfig` only acts inside `from_pretrained` (it quantizes while
loading from disk), so it cannot quantize the already-loaded model the harness holds. It does run on
this CPU (checked with transformers 5.24 on a saved tiny Llama) and builds the same modules this adapter
builds: `bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold=6.0)` and `bnb.nn.Linear4bit` holding
`Int8Params` / `Params4bit`, quantized by bitsandbytes when moved to the device.

CPU notes (bitsandbytes 0.50.2):
- int8: inputs are cast fp32 -> fp16 inside MatMul8bitLt (bitsandbytes warns on every call);
  the outlier decomposition at `threshold` happens per call on the activations, so no outlier
  columns are stored beyond the int8 weights and their per-row fp32 scales (SCB).
- 4-bit: on CPUs with AVX512-BF16, `Linear4bit.forward` repacks the weights for its CPU kernel at
  the first inference call: absmax is dequantized (undoing double quantization) and stored as bf16,
  and compute runs in bf16. `quantize` triggers that repack with one zero-input call per module so
  `storage_tensors` reports what inference actually holds, whatever the order of measurement.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import torch
from torch import nn

from quantscope.backends import BackendFormat
from quantscope.backends._common import (Include, require_all, require_selection, select_linears,
                                         tensors_in, walk_storage)


def version() -> str:
    return importlib.metadata.version("bitsandbytes")


def _int8_linear(lin: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              has_fp16_weights=False, threshold=threshold, device="meta")
    new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return new.to(lin.weight.device)  # Int8Params.to quantizes (row-wise absmax int8 + SCB)


def _4bit_linear(lin: nn.Linear, quant_type: str, double_quant: bool) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            compute_dtype=lin.weight.dtype, quant_type=quant_type,
                            compress_statistics=double_quant, device="meta")
    new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=quant_type,
                                   compress_statistics=double_quant, module=new)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    new = new.to(lin.weight.device)  # Params4bit.to quantizes (blocks of 64)
    # Let bitsandbytes apply its CPU inference layout now (see module docstring).
    new.train(False)
    with torch.no_grad():
        new(torch.zeros(1, lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device))
    return new


def requantize_4bit(lin: nn.Linear, like: nn.Module) -> nn.Module:
    """`lin` quantized into the 4-bit format of `like`, a Linear4bit (LoRA merging and LoftQ)."""
    return _4bit_linear(lin, like.weight.quant_type, bool(like.weight.compress_statistics))


def quantize(model: nn.Module, fmt: BackendFormat, include: Include,
             calib: list[torch.Tensor] | None = None) -> nn.Module:
    """Replace the selected nn.Linear modules of `model` in place; `calib` is unused (RTN)."""
    import bitsandbytes as bnb

    selected = select_linears(model, include)
    require_selection(selected, fmt.name)
    kind = fmt.option("kind")
    for name, lin in selected:
        if kind == "int8":
            new = _int8_linear(lin, float(fmt.option("threshold")))
        else:
            new = _4bit_linear(lin, str(fmt.option("quant_type")), bool(fmt.option("double_quant")))
        new.train(lin.training)
        model.set_submodule(name, new)
    qtypes = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    require_all(selected, model, lambda m: isinstance(m, qtypes), fmt.name)
    return model


def _extra(mod: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors bitsandbytes keeps outside parameters: SCB / quant_state on the weight, matmul state."""
    weight = getattr(mod, "weight", None)
    for attr in ("SCB", "CB", "quant_state"):
        yield from tensors_in(getattr(weight, attr, None))
    state = getattr(mod, "state", None)  # Linear8bitLt's MatmulLtState (CB/SCB alias the weight)
    if state is not None and not isinstance(state, dict):
        yield from tensors_in(state)


def storage_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    return walk_storage(model, _extra)
