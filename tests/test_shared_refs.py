"""The baseline's references handed to workers through memory files (harness.shared) give the same
figures as the pipe they replace and as an inline run, and leave nothing behind."""

import os

import numpy as np
import pytest

from quantscope.harness import CompareConfig, compare
from quantscope.harness import shared, worker

needs_memfd = pytest.mark.skipif(not shared.available(), reason="memory files (memfd_create) are Linux-only")


@needs_memfd
def test_shared_window_round_trip_and_close():
    arr = np.random.default_rng(0).standard_normal((7, 33)).astype(np.float32)
    w = shared.SharedWindow.of(arr)
    assert w.nbytes == arr.nbytes and w.shape == arr.shape
    np.testing.assert_array_equal(w.array(), arr)
    buf = bytearray(arr.nbytes + 12)  # a reused buffer may be longer than the window
    w.read_into(buf)
    np.testing.assert_array_equal(np.frombuffer(buf, np.float32, arr.size).reshape(arr.shape), arr)
    fd = w.fd
    w.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor (and with the last one, the memory) is gone


@needs_memfd
def test_isolated_run_through_memory_files_equals_pipe_and_inline(tiny_model_dir, monkeypatch):
    d, text = tiny_model_dir
    common = dict(model=str(d), text=str(text), formats=("int4-g128", "int8"), ctx=32, windows=3, measure_speed=False)
    held = worker.ReferenceStore()
    via_files, _ = compare(CompareConfig(**common), refs=held)
    assert len(held.windows) == 3 and all(isinstance(w, shared.SharedWindow) for w in held.windows.values())
    inline, _ = compare(CompareConfig(**common, isolate=False))
    monkeypatch.setenv("QUANTSCOPE_REFERENCE_PIPE", "1")  # (the workers take over this environment)
    piped = worker.ReferenceStore()
    via_pipe, _ = compare(CompareConfig(**common), refs=piped)
    assert all(isinstance(w, np.ndarray) for w in piped.windows.values())
    for a, b, c in zip(via_files, via_pipe, inline):
        assert not a.get("error") and not b.get("error")
        for key in ("perplexity", "kld_mean", "top1_agreement", "window_kld", "window_nll"):
            assert a[key] == b[key] == c[key], key
    assert via_files[1]["kld_mean"] > 0


@needs_memfd
def test_worker_side_reads_a_served_window(monkeypatch):
    """The worker's get(): the parent's descriptor arrives over the socket and fills the reused buffer."""
    import multiprocessing as mp

    arr = np.arange(24, dtype=np.float32).reshape(4, 6)
    a, b = mp.Pipe(duplex=True)
    held = shared.SharedWindow.of(arr)
    pr = worker._PipeReference(b)

    import threading

    def serve():
        msg = a.recv()
        assert msg == ("need", 2)
        shared.send_window(a, "shm", 2, held, os.getpid())

    t = threading.Thread(target=serve)
    t.start()
    got = pr.get(2)
    t.join()
    np.testing.assert_array_equal(got, arr)
