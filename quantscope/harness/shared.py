"""The baseline's reference log-probabilities held in anonymous shared memory, handed to workers by descriptor.

A window's reference is a [tokens, vocab] float32 array: 100 MB for 512 tokens of the embedded model's
49152-token vocabulary, 800 MB for the default run's 8 windows. Sent over a worker's pipe, every window
is copied into the pipe and out of it again for every format (about 1.5 s of a format's 12 s in the
README's default run on 2 cores), and the process running the comparison holds all of them in its heap.
Here the baseline's worker writes each window once into a memory file (Linux `memfd_create`: no path, no
size limit of /dev/shm) and passes its descriptor to the parent over the pipe's socket (SCM_RIGHTS); each
later worker receives the descriptor and reads the window straight into its one reused buffer: one copy
instead of the pipe's two and a pickle. The memory belongs to the descriptors:
when the last one closes — the parent's, at the end of the run, or when the run is killed — it is gone, so a
killed run leaves nothing behind in shared memory.

Where memory files do not exist (not Linux), or QUANTSCOPE_REFERENCE_PIPE=1, the references travel over
the pipe as before (harness.worker).
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np


def available() -> bool:
    """Whether references are shared through memory files here (Linux, Python with memfd_create), unless
    QUANTSCOPE_REFERENCE_PIPE=1 asks for the pipe (workers take over the caller's environment)."""
    if os.environ.get("QUANTSCOPE_REFERENCE_PIPE") == "1":
        return False
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


class SharedWindow:
    """One reference window in a memory file: its descriptor (owned: closed with the object) and shape."""

    def __init__(self, fd: int, shape: tuple[int, ...]):
        self.fd, self.shape = fd, tuple(int(s) for s in shape)

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape))

    @classmethod
    def of(cls, arr: np.ndarray) -> "SharedWindow":
        """A memory file holding a copy of float32 `arr`."""
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        fd = os.memfd_create("quantscope-reference", os.MFD_CLOEXEC)
        try:
            view, done = memoryview(arr).cast("B"), 0
            while done < len(view):
                done += os.write(fd, view[done:])
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, arr.shape)

    def array(self) -> np.ndarray:
        """The window as a float32 array mapped from the file (private: writes would stay in this process)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=np.float32)
        mm = mmap.mmap(self.fd, self.nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return np.frombuffer(mm, dtype=np.float32).reshape(self.shape)

    def read_into(self, buf) -> None:
        """Copy the window's bytes into writable buffer `buf` (at least :attr:`nbytes` long)."""
        view, done = memoryview(buf).cast("B")[:self.nbytes], 0
        while done < self.nbytes:
            got = os.preadv(self.fd, [view[done:]], done)
            if got <= 0:
                raise OSError(f"reference memory file ended after {done} of {self.nbytes} bytes")
            done += got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass

    def __reduce__(self):  # a descriptor means nothing in another process: hand the numbers over instead
        return (np.array, (self.array(),))


def send_window(conn, tag: str, key, window: SharedWindow, pid: int) -> None:
    """Send `window` over multiprocessing Connection `conn` (a socket) to process `pid`: the message, then
    the descriptor."""
    from multiprocessing import reduction

    conn.send((tag, key, window.shape))
    reduction.send_handle(conn, window.fd, pid)


def recv_window(conn, shape) -> SharedWindow:
    """The descriptor that follows a message sent by :func:`send_window`, as an owned SharedWindow."""
    from multiprocessing import reduction

    return SharedWindow(reduction.recv_handle(conn), shape)
