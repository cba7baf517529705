"""Ctrl-C that is quiet in every process: the parent reports it once, its children never print.

A terminal delivers SIGINT to the whole foreground process group, so a worker that is still starting
(importing torch, unpickling its job) dies with a `KeyboardInterrupt` traceback or a "Fatal Python
error: init_import_site" before any handler of ours exists. An ignored signal stays ignored across
exec, and a Python that starts with SIGINT ignored installs no KeyboardInterrupt handler; so the parent
ignores SIGINT only while it starts a child, with SIGINT blocked meanwhile so that a Ctrl-C in that
window is held and delivered to the parent (Linux keeps a blocked signal pending even while ignored),
and the child is stopped by its parent (terminate) instead. Off the main thread, or where the
platform lacks `pthread_sigmask`, children start as they would without it.

That window loses a Ctrl-C when the parent has other threads (torch's OpenMP workers, once it has
computed anything): the kernel hands a process-directed signal to a thread that does not block it, and
there the disposition is "ignore", so it is discarded and the run carries on to the end (seen in about
one try in six when the signal landed just as a worker started). So :func:`start_child` keeps that
window to the one instant it is needed: with the forkserver, workers are forked by the server, which
was itself started ignoring SIGINT and hands that to every child, so only the server's own start (once
per run, a fork and exec) happens with SIGINT ignored; each worker's start runs under
:func:`deferred_sigint`, which holds a Ctrl-C in a handler of ours and raises it once the worker is
registered (multiprocessing then stops it with the parent).
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


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """A SIGINT that arrives inside this block is raised (as the handler in place before would) when the
    block ends, not inside it; whichever thread the kernel delivers it to, nothing is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            if callable(old):
                old(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            elif old == signal.SIG_DFL:
                raise KeyboardInterrupt


def start_child(process, ctx) -> None:
    """Start multiprocessing `process` (of context `ctx`) born ignoring SIGINT, without losing a Ctrl-C
    that arrives meanwhile (the module's docstring says how)."""
    if ctx.get_start_method() != "forkserver":
        with children_ignore_sigint():
            process.start()
        return
    from multiprocessing import forkserver

    if not _server_running(forkserver):
        # while SIGINT is ignored, one delivered to another of our threads (torch's, once it has computed)
        # is lost: enter that window only to start the server, not for every worker it forks
        with children_ignore_sigint():
            forkserver.ensure_running()  # its workers inherit its ignored SIGINT
    with deferred_sigint():
        process.start()


def _server_running(forkserver) -> bool:
    """Whether multiprocessing's forkserver is already up (CPython keeps its pid on the module's
    singleton; where it does not, False: the caller then takes the old, always-correct path)."""
    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None) is not None


def start_server(ctx) -> None:
    """Start `ctx`'s forkserver now, if it is one (a no-op once it runs): it imports the measuring code
    while the caller prepares its inputs, instead of after. Born ignoring SIGINT, as in start_child."""
    if ctx.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with children_ignore_sigint():
        forkserver.ensure_running()


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
