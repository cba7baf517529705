"""How a comparison's worker processes start: forked from a server that imported the measuring code once.

Each format is measured in a fresh process (separate peak RSS, crash isolation: harness.worker). Started
with "spawn", every worker imported torch, transformers (whose model classes import the installed
quantization libraries: torchao, bitsandbytes ...) and quantscope again: about 10 s of CPU per format on
the 2-core machine the README's default run is timed on, a sixth of that run. multiprocessing's
"forkserver" imports them once, in a server process, and forks each worker from it: the worker is still
a fresh process (its own memory, nothing of the parent's state), and starts in a fraction of a second.
The worker restores the parent's environment and working directory as they are at the call (the server
keeps those of its own start). Where forkserver does not exist (Windows), workers spawn as before.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os

PRELOAD = ("quantscope.harness.preload",)


@functools.lru_cache(maxsize=1)
def worker_context():
    """The multiprocessing context workers start from (forkserver with PRELOAD, else spawn)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return mp.get_context("spawn")


def parent_state() -> tuple[dict, str]:
    """What a worker takes over from the process that starts it: its environment and working directory."""
    return dict(os.environ), os.getcwd()


def adopt(state: tuple[dict, str] | None) -> None:
    """In a worker: the parent's environment and working directory (a no-op for spawned workers)."""
    if state is None:
        return
    env, cwd = state
    if env != dict(os.environ):
        os.environ.clear()
        os.environ.update(env)
    os.chdir(cwd)
