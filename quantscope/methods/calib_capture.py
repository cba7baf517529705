"""The forward-pass plumbing of the calibrated driver: catching a decoder block's inputs, running a
block on them, and watching (or stopping) a pass at a chosen linear with forward pre-hooks.

Every hook is registered for one pass and removed in a ``finally``: no module keeps a hook.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import QuantscopeError
from ..placement import module_device


class Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


class _Caught(Exception):
    """Raised by a hook to carry a module's inputs out of the forward pass that reached it."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args_, self.kwargs = args, kwargs


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_inputs(model: nn.Module, first: nn.Module, batches: list[torch.Tensor], device=None):
    """Inputs of the first decoder block per batch: hidden states, and (args, kwargs) for the rest.
    Keyword arguments depend only on the batch shape (no padding mask is passed), so batches of one
    shape share one dict. The token batches go to `device`, by default the first block's (a streamed
    model's blocks are on the meta device until read: it passes the embedding's)."""
    def hook(_mod, args, kwargs):
        raise _Caught(args, kwargs)

    xs, rest, shared = [], [], {}
    device = device if device is not None else module_device(first)  # the token batches go where the model is
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Caught as c:
                args, kwargs = c.args_, dict(c.kwargs)
                x = args[0] if args else kwargs.pop("hidden_states")
                for k in ("cache", "past_key_values", "past_key_value"):
                    if k in kwargs:
                        kwargs[k] = None
                xs.append(x.detach())
                rest.append(shared.setdefault(tuple(ids.shape), (tuple(args[1:]), kwargs)))
            else:
                raise QuantscopeError("internal: the first decoder block was never called")
    finally:
        handle.remove()
    return xs, rest


def run_block(block: nn.Module, x: torch.Tensor, rest) -> torch.Tensor:
    args, kwargs = rest
    return _block_output(block(x, *args, **kwargs))


def find_stages(block: nn.Module, names: list[str], x: torch.Tensor, rest) -> tuple[list[list[str]], list[str]]:
    """Group `names` (block-local linears) by the input tensor they read, in call order.
    Returns (stages, names never called)."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for n in names:
        def hook(_mod, args, n=n):
            if not any(m == n for m, _ in seen):
                seen.append((n, args[0]))
        handles.append(block.get_submodule(n).register_forward_pre_hook(hook))
    try:
        run_block(block, x, rest)
    finally:
        for h in handles:
            h.remove()
    stages: list[tuple[torch.Tensor, list[str]]] = []
    for n, inp in seen:
        for t, members in stages:
            if t is inp:
                members.append(n)
                break
        else:
            stages.append((inp, [n]))
    called = {n for n, _ in seen}
    return [m for _, m in stages], [n for n in names if n not in called]


def feed(block: nn.Module, xs, rests, module: nn.Module, fn: Callable[[torch.Tensor], None],
          stop: bool = True) -> None:
    """Run the block on every batch, passing `module`'s input to `fn`; stop there if `stop`."""
    def hook(_mod, args):
        fn(args[0])
        if stop:
            raise Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run_all(block, xs, rests)
    finally:
        handle.remove()


def run_all(block: nn.Module, xs, rests) -> None:
    """Run the block on every batch; a hook raising Stop ends that batch's pass where it has seen enough."""
    for x, rest in zip(xs, rests):
        try:
            run_block(block, x, rest)
        except Stop:
            pass


def input_of(run: Callable[[], object], module: nn.Module) -> torch.Tensor:
    """`module`'s input during `run()`, which is stopped as soon as `module` is reached."""
    def hook(_mod, args):
        raise _Caught(args, {})

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Caught as c:
        return c.args_[0]
    finally:
        handle.remove()
    raise QuantscopeError(f"internal: {type(module).__name__} was not reached")


def cast_floats(obj, dtype, memo: dict):
    """`obj` (nested tuples/lists/dicts of tensors) with its floating tensors cast to `dtype`;
    objects seen before (batches of one shape share their keyword arguments) are cast once."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.to(dtype) if obj.is_floating_point() else obj
    elif isinstance(obj, (tuple, list)):
        out = type(obj)(cast_floats(o, dtype, memo) for o in obj)
    elif isinstance(obj, dict):
        out = {k: cast_floats(v, dtype, memo) for k, v in obj.items()}
    else:
        out = obj
    memo[id(obj)] = out
    return out
