"""Helpers shared by the backend adapters: choosing linears, walking storage, checking coverage.

No backend library is imported here. The storage walk exists because the libraries keep weights in
places a parameter/buffer walk misses (HQQ's `meta` dict and plain `bias` attribute, bitsandbytes'
`quant_state`) and in tensor subclasses whose `.nbytes` reports the dequantized size (torchao,
optimum-quanto): those are opened through `__tensor_flatten__` down to plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from quantscope.errors import QuantscopeError

Include = Callable[[str, nn.Module], bool]


def select_linears(model: nn.Module, include: Include) -> list[tuple[str, nn.Linear]]:
    """The (name, module) pairs of every nn.Linear in `model` that `include` accepts, listed up front
    so callers may replace modules while iterating."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and include(name, mod)]


def plain_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors behind `t`: itself, or the inner tensors of a wrapper subclass (recursively)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if inner is not None:
                yield from plain_tensors(inner)
    else:
        yield t


def tensors_in(obj: object, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held in `obj`: a tensor, or the values of a dict / list / tuple / plain object's
    attributes (used for bitsandbytes QuantState and HQQ meta dicts), two levels deep at most."""
    if isinstance(obj, torch.Tensor):
        yield from plain_tensors(obj)
    elif _depth > 2 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype)):
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, _depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v, _depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        for v in vars(obj).values():
            yield from tensors_in(v, _depth + 1)


def walk_storage(model: nn.Module,
                 extra: Callable[[nn.Module], Iterable[torch.Tensor]] | None = None
                 ) -> Iterator[torch.Tensor]:
    """Every module's own parameters and buffers (opened down to plain tensors), plus whatever
    `extra(module)` reports the backend keeps outside them. May repeat shared storage."""
    for mod in model.modules():
        for t in mod.parameters(recurse=False):
            yield from plain_tensors(t)
        for t in mod.buffers(recurse=False):
            yield from plain_tensors(t)
        if extra is not None:
            yield from extra(mod)


def require_all(selected: list[tuple[str, nn.Module]], model: nn.Module,
                is_quantized: Callable[[nn.Module], bool], fmt_name: str) -> None:
    """Raise QuantscopeError if the backend left any selected linear unquantized (some libraries
    skip layers they cannot handle with only a log line)."""
    missed = [name for name, _ in selected if not is_quantized(model.get_submodule(name))]
    if missed:
        raise QuantscopeError(
            f"{fmt_name}: the backend left {len(missed)} of {len(selected)} selected linears "
            f"unquantized (first: {missed[0]})")


def require_selection(selected: list[tuple[str, nn.Module]], fmt_name: str) -> None:
    """Raise QuantscopeError if `include` matched no nn.Linear at all."""
    if not selected:
        raise QuantscopeError(f"{fmt_name}: no nn.Linear module matched the include filter")


def check_divisible(selected: list[tuple[str, nn.Linear]], block: int, fmt_name: str) -> None:
    """Raise QuantscopeError naming the first linear whose input width is not a multiple of `block`."""
    for name, mod in selected:
        if mod.in_features % block:
            raise QuantscopeError(
                f"{fmt_name}: {name} has in_features={mod.in_features}, not a multiple of the "
                f"block/group size {block}")
