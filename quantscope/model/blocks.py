"""A model read one part at a time from its safetensors shards: the streamed path's loader.

The model is built as a skeleton (parameters on the meta device, no memory; buffers such as rotary
frequencies computed for real, as accelerate's ``init_empty_weights(include_buffers=False)`` does)
and its tensors are read from the shards only when a part is needed: the embedding and head once,
each decoder block when its turn comes (:meth:`BlockSource.load`), and dropped again
(:func:`release`). A shard is opened for one read and closed after it, so the memory map's pages do
not stay resident: peak memory is that of the part in flight, not of the checkpoint.

The shards are checked up front: every file an index names must exist, every tensor the skeleton
has must be stored (a tied head excepted), with the shape the config gives.

A GGUF file is read the same way, tensor by tensor (:class:`.gguf_source.GGUFBlockSource`;
:func:`.gguf_source.open_source` picks the reader for a path): the streamed pass sees only :class:`TensorSource`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..dtypes import torch_dtype
from ..errors import QuantscopeError
from .checks import check_safetensors


class TensorSource:
    """A model's weights read by Hugging Face tensor name: `shapes` ({name: shape}), :meth:`read`,
    :meth:`nbytes` (stored bytes) and :meth:`load` (a module filled from them); `folder` names the
    weights in messages."""

    folder: Path
    shapes: dict[str, tuple]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def nbytes(self, names) -> int:
        raise NotImplementedError

    def load(self, module: nn.Module, prefix: str, dtype: str, device: str) -> nn.Module:
        """Fill `module`'s parameters (state-dict names under `prefix`) from the weights, cast to `dtype`
        on `device`; buffers are moved to `device` as they are."""
        from accelerate.utils import set_module_tensor_to_device

        names = [n for n, _ in module.named_parameters()]
        tensors = self.read([prefix + n for n in names])
        dt = torch_dtype(dtype)
        for n in names:
            set_module_tensor_to_device(module, n, device, value=tensors.pop(prefix + n), dtype=dt)
        for n, b in list(module.named_buffers()):
            if b.device != torch.device(device) and b.device.type != "meta":
                set_module_tensor_to_device(module, n, device, value=b)
        return module


class BlockSource(TensorSource):
    """The safetensors weights of a local model folder, read by tensor name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.shapes = check_safetensors(self.folder)  # every header readable
        self.file_of: dict[str, Path] = {}
        self.dtype_of: dict[str, str] = {}
        from safetensors import safe_open

        for f in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.file_of[k] = f
                    self.dtype_of[k] = h.get_slice(k).get_dtype()

    def nbytes(self, names) -> int:
        """Stored bytes of the named tensors (from the headers)."""
        size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
        total = 0
        for n in names:
            k = 1
            for s in self.shapes[n]:
                k *= s
            total += k * size.get(self.dtype_of[n], 4)
        return total

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once for the read and closed after it."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            if n not in self.file_of:
                raise QuantscopeError(f"{self.folder}: tensor {n} is not in the weights")
            by_file[self.file_of[n]].append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for n in ns:
                    out[n] = h.get_tensor(n)
        return out


def streamed_skeleton(config, dtype: str, trust_remote_code: bool = False) -> nn.Module:
    """The model `config` describes with its parameters on the meta device (no memory) and its buffers
    real, built in `dtype` (rotary frequencies and the like are computed as a real load computes them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     dtype=torch_dtype(dtype))
    except Exception as e:
        raise QuantscopeError(f"this architecture cannot be streamed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}): run it in memory (--no-stream)") from None
    return model.eval()


def check_complete(model: nn.Module, source: TensorSource) -> bool:
    """Every parameter the skeleton has is stored with its shape; True when the output head is tied to the
    embedding (then it is not stored, and shares the embedding's tensor once that is loaded)."""
    head = model.get_output_embeddings()
    head_name = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or (tied and name == head_name):
            continue
        seen.add(id(p))
        if name not in source.shapes:
            raise QuantscopeError(f"{source.folder}: tensor {name} is not in the weights")
        if tuple(source.shapes[name]) != tuple(p.shape):
            raise QuantscopeError(f"{source.folder}: {name} is {list(source.shapes[name])} in the weights but "
                                  f"{list(p.shape)} by the model's config")
    return tied and head_name is not None and head_name not in source.shapes


def release(module: nn.Module) -> None:
    """Drop `module`'s parameters back to the meta device (their memory is freed)."""
    module.to("meta")
