"""optimum-quanto adapter: `quantize(model, weights=qtype, include=names)` then `freeze(model)`.

Inference-mode workaround: quanto's packed qint4/qint2 weights (WeightQBitsTensor) fail under
`torch.inference_mode()` with "Cannot set version_counter for inference tensor" when the weights were
frozen outside it (the `.t()` view of the subclass is an inference tensor aliasing a normal one).
Freezing *inside* `torch.inference_mode()` makes the packed weights inference tensors themselves;
the model then evaluates under both `inference_mode` and `no_grad` (checked), so the harness needs no
special grad mode. The cost: these weights cannot be trained afterwards (quantscope never does).

Weights are quanto tensor subclasses (`_data` / `_scale` / `_shift`, packed codes nested one more
level) whose `.nbytes` is not the stored size: storage is counted from their inner tensors.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import torch
from torch import nn

from quantscope.backends import BackendFormat
from quantscope.backends._common import (Include, require_all, require_selection, select_linears,
                                         walk_storage)


def version() -> str:
    return importlib.metadata.version("optimum-quanto")


def _is_frozen_qlinear(mod: nn.Module) -> bool:
    from optimum.quanto import QModuleMixin, QTensor

    return isinstance(mod, QModuleMixin) and isinstance(mod.weight, QTensor)


def quantize(model: nn.Module, fmt: BackendFormat, include: Include,
             calib: list[torch.Tensor] | None = None) -> nn.Module:
    """Quantize and freeze the selected nn.Linear modules of `model` in place; `calib` is unused."""
    import optimum.quanto as oq

    selected = select_linears(model, include)
    require_selection(selected, fmt.name)
    qtype = {"qint8": oq.qint8, "qint4": oq.qint4, "qint2": oq.qint2,
             "qfloat8": oq.qfloat8}[str(fmt.option("qtype"))]
    names = [name for name, _ in selected]  # fnmatch patterns; module names hold no wildcards
    oq.quantize(model, weights=qtype, include=names)
    with torch.inference_mode():  # see module docstring
        oq.freeze(model)
    require_all(selected, model, _is_frozen_qlinear, fmt.name)
    return model


def storage_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    return walk_storage(model)
