"""Modules that hold quantized storage and compute from it.

`QuantLinear` keeps exactly the tensors of a :class:`QuantizedTensor` (packed codes, scales, zeros) as
buffers, so the model in memory is as small as the format, and a `state_dict` holds the packed form.
Its forward takes one of two paths: a kernel that reads the packed codes (:mod:`.cpu_kernels`, for a
few rows of fp32 activations on the CPU: decoding) where the format has one, else the reference path,
which dequantizes the weight to fp32 and calls the fp32 matmul (evaluation windows, other devices,
formats without a kernel). :func:`kernels_used` names what a model's layers run, for the records.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from ..formats.qtensor import QuantizedTensor
from ..formats.registry import family_of
from ..formats.spec import FormatSpec
from . import cpu_kernels


_SCORING = contextvars.ContextVar("quantscope_scoring", default=False)


@contextlib.contextmanager
def reference_products():
    """Inside this block (or a function it decorates) quantized layers take the reference path whatever
    the number of rows: dequantize bit-identically, then the fp32 matmul. Scored forwards (perplexity,
    KLD, tasks, the sensitivity scan) run under it, so a figure does not depend on the window length
    choosing a kernel (a 32-token window would otherwise take the tiled product, whose sums run in
    another order); generation and the speed loop run the kernels. Scoped to the calling thread/context."""
    token = _SCORING.set(True)
    try:
        yield
    finally:
        _SCORING.reset(token)


class _QuantStorage(nn.Module):
    """Common part: registers a QuantizedTensor's storage tensors as buffers."""

    def _init_storage(self, qt: QuantizedTensor) -> None:
        self.spec: FormatSpec = qt.spec
        self.qshape = qt.shape
        self._keys = tuple(qt.tensors)
        for k, t in qt.tensors.items():
            self.register_buffer(k, t, persistent=True)

    # the kernel's bound arguments point into the storage tensors: whatever replaces them (`.to()`, a
    # state dict loaded with assign=True) drops the binding; a copied or pickled module has none (Bound)
    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_bound", None)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_bound", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def storage(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._keys}

    def qtensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.spec, self.qshape, self.storage())

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return family_of(self.spec).dequantize(self.storage(), self.spec, self.qshape, rows)

    def _linear(self, x: torch.Tensor, width: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x times this storage's weight transposed. On the CPU with fp32 activations: the packed-code
        kernel for a few rows (decoding), the tiled product for a prefill's rows; else (and for every
        scored forward: reference_products) the fp32 weight, dequantized by the kernel library where it can (the same
        values, faster), and the matmul."""
        bound = self.__dict__.get("_bound")  # the decode step's path, checked first and cheaply
        if bound is None or self._buffers[self._keys[0]] is not bound.tensors[0]:
            bound = self._bind(x)
        fast = (bound is not None and x.dtype is torch.float32 and x.is_cpu and self.use_kernel
                and not (x.requires_grad and torch.is_grad_enabled()))
        if fast and not _SCORING.get():
            rows = x.numel() // width
            if rows <= bound.max_rows:
                y = bound(x.reshape(rows, width).contiguous()).view(*x.shape[:-1], out_features)
                return y if bias is None else y + bias
            if rows <= bound.gemm_rows:
                y = bound.gemm(x.reshape(rows, width).contiguous()).view(*x.shape[:-1], out_features)
                return y if bias is None else y + bias
        w = cpu_kernels.dequantize(self.kernel, self.storage(), self.spec, self.qshape) if fast else self.dequantized_weight()
        return nn.functional.linear(x, w.to(x.dtype), bias)

    def _bind(self, x: torch.Tensor):
        """The layer's kernel call with its arguments worked out (kept until its buffers move), or None."""
        self.__dict__.pop("_bound", None)
        if (self.kernel is None or not self.use_kernel or not x.is_cpu or x.dtype is not torch.float32
                or not cpu_kernels.available()):
            return None
        bound = self.__dict__["_bound"] = cpu_kernels.Bound(self.kernel, self.storage(), self.spec, self.qshape)
        return bound

    def kernel_name(self, device: str = "cpu") -> str:
        """What a decode step of this layer runs on `device`: the kernel's name, or "ref"."""
        ok = self.kernel is not None and self.use_kernel and device == "cpu" and cpu_kernels.available()
        return self.kernel.name if ok else cpu_kernels.REF


class QuantLinear(_QuantStorage):
    """A linear layer whose weight is stored in a quantscope format."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._init_storage(qt)
        self.out_features, self.in_features = qt.shape
        self.kernel = cpu_kernels.kernel_for(qt.spec, qt.shape)
        self.use_kernel = True  # False: always the reference path (tests and benchmarks compare the two)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return self._linear(x, self.in_features, self.out_features, b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.spec.name}"


class QuantEmbedding(_QuantStorage):
    """An embedding table stored in a quantscope format; only the looked-up rows are dequantized."""

    def __init__(self, qt: QuantizedTensor, padding_idx: int | None = None):
        super().__init__()
        self._init_storage(qt)
        self.num_embeddings, self.embedding_dim = qt.shape
        self.padding_idx = padding_idx
        self.kernel = cpu_kernels.kernel_for(qt.spec, qt.shape)  # used by a tied head, not by lookups
        self.use_kernel = True

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
        return self.embedding._linear(x, self.in_features, self.out_features, None)


def set_kernels(model: nn.Module, enabled: bool) -> None:
    """Let every quantized layer of `model` use its packed-code kernel (True, the default) or always
    take the reference path (False): the fast and the reference outputs can then be compared."""
    for m in model.modules():
        if isinstance(m, _QuantStorage):
            m.use_kernel = enabled


def kernels_used(model: nn.Module, device: str = "cpu") -> dict[str, int]:
    """{kernel name: number of quantized layers} that a decode step of `model` on `device` runs
    ("ref": dequantize + fp32 matmul). Empty for a model without quantscope layers."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            name = m.kernel_name(device)
        elif isinstance(m, TiedQuantHead):
            name = m.embedding.kernel_name(device)
        else:
            continue
        out[name] = out.get(name, 0) + 1
    return out


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
