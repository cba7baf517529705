"""Quiet optional libraries' import-time chatter, for the span of a `with` block only.

torchao warns about missing CUDA kernels, torch's pytree about deprecations, bitsandbytes about a
per-call cast; none of it is about the user's run. The previous logger levels and warning filters are
restored on exit, so a library caller's own settings survive a call into quantscope.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes", "transformers.modeling_utils", "llama-cpp-python")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def check_threads(n: int | None) -> None:
    """A thread count a config may hold: None (torch's default) or a positive integer, refused up front
    (torch itself fails only when a worker sets it, deep in a run)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        from .errors import QuantscopeError

        raise QuantscopeError(f"--threads must be a positive integer (omit it for torch's default), not {n}")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, the previous count restored after."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
