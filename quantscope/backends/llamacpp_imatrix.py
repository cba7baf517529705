"""llama.cpp's importance matrix ("imatrix"), computed on the torch baseline and handed to its quantizer.

llama.cpp's ``llama-imatrix`` tool runs the model over calibration text and accumulates, for every
weight matrix, the sum over tokens of each input column's squared activation (the ``src1`` of each
``mul_mat``); ``llama-quantize`` divides the sums by the token count and passes the per-column means to
``llama_model_quantize`` (``llama_model_quantize_params.imatrix``: an array of {name, data, size},
closed by a NULL name). The quantizer then weights each weight's squared error by them when it picks
block scales (and, for Q4_0 / Q5_0 with an imatrix, stores the first n_layer/8 ``ffn_down`` tensors as
Q4_1 / Q5_1: llama.cpp's own rule, see ``llama-quant.cpp``).

Neither tool is in a pip package, so the means are computed here with forward hooks on the torch
baseline, whose weights are exactly those of the F32 file llama.cpp quantizes (the same dequantized
GGUF), on quantscope's calibration sequences; names are the file's GGUF tensor names.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantscope.errors import QuantscopeError


def importance_matrix(model: nn.Module, calib: list[torch.Tensor], gguf_file: Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean over calibration tokens of each input column's squared activation}
    for every decoder linear of `model` (the baseline the F32 file `gguf_file` holds)."""
    import gguf

    from quantscope.model.gguf_meta import tensor_namer

    from ._common import select_linears

    if not calib:
        raise QuantscopeError("an importance matrix needs calibration sequences")
    reader = gguf.GGUFReader(str(gguf_file))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    in_file = {t.name for t in reader.tensors}
    namer = tensor_namer(arch, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    linears = select_linears(model, lambda n, m: ".layers." in f".{n}")
    handles = [m.register_forward_hook(hook(n)) for n, m in linears]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for seq in calib:
                model(input_ids=seq.reshape(1, -1).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, _ in linears:
        name = namer(n + ".weight")
        if name not in in_file:
            raise QuantscopeError(f"importance matrix: {n} is {name}, which {gguf_file.name} does not hold")
        out[name] = (sums[n] / counts[n]).cpu().numpy().astype(np.float32)
    return out


def as_c_array(imatrix: dict[str, np.ndarray]):
    """(`llama_model_imatrix_data` array closed by a NULL name, the Python objects it points into).
    Keep the second alive until the quantizer has returned."""
    import llama_cpp

    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(imatrix.items()):
        v = np.ascontiguousarray(values, dtype=np.float32)
        b = name.encode()
        keep += [v, b]
        arr[i].name, arr[i].data, arr[i].size = b, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    arr[len(imatrix)].name = None
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), (arr, keep)
