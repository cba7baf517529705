"""Ctrl-C that is quiet in every process: the parent reports it once, its children never print.

A terminal delivers SIGINT to the whole foreground process group, so a worker that is still starting
(importing torch, unpickling its job) dies with a `KeyboardInterrupt` traceback or a "Fatal Python
error: init_import_site" before any handler of ours exists. An ignored signal stays ignored across
exec, and a Python that starts with SIGINT ignored installs no KeyboardInterrupt handler; so the parent
ignores SIGINT only while it starts a child, with SIGINT blocked meanwhile so that a Ctrl-C in that
window is held and delivered to the parent (Linux keeps a blocked signal pending even while ignored),
and the child is stopped by its parent (terminate) instead. Off the main thread, or where the
platform lacks `pthread_sigmask`, children start as they would without it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Start child processes inside this block: they are born ignoring SIGINT. A SIGINT that arrives
    meanwhile reaches this process, as KeyboardInterrupt, when the block ends. (multiprocessing's
    resource tracker unblocks SIGINT when it first starts: start it before entering.)"""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _exit_on_sigterm(signum, frame):
    """Unwind as SystemExit, except inside a finalizer (`__del__`), where Python would print the exception
    as "ignored" and carry on: there the worker exits at once (nothing of ours is left to clean up)."""
    f = frame
    while f is not None:
        if f.f_code.co_name == "__del__":
            import os

            os._exit(128 + signum)
        f = f.f_back
    raise SystemExit(128 + signum)


def become_worker() -> None:
    """In a child process: ignore SIGINT (its parent reports Ctrl-C and stops it), and let the parent's
    SIGTERM unwind the stack as SystemExit, so `subprocess.run` and `with` blocks stop what they
    started (a grandchild born ignoring SIGINT would otherwise outlive us) without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
