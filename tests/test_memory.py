"""Peak RSS is the measuring process's own: a spawned worker must not inherit its parent's peak."""

import multiprocessing as mp
import sys

import pytest

from quantscope.measure.memory import current_rss_bytes, peak_rss_bytes


def _child_peak(conn):
    from quantscope.measure.memory import peak_rss_bytes as peak

    conn.send(peak())
    conn.close()


def test_peak_is_at_least_current():
    assert peak_rss_bytes() >= current_rss_bytes() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="exec carries ru_maxrss over on Linux")
def test_spawned_worker_does_not_report_the_parents_peak():
    big = bytearray(1 << 30)  # 1 GiB touched in the parent (zero-filled pages are still resident)
    for i in range(0, len(big), 4096):
        big[i] = 1
    parent_rss = current_rss_bytes()
    assert parent_rss > 1 << 30
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_child_peak, args=(b,))
    p.start()
    child = a.recv()
    p.join()
    del big
    # the child imports torch (a few hundred MB); it never held the parent's gigabyte
    assert 0 < child < parent_rss - (512 << 20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux's")
def test_reset_peak_measures_one_phase():
    from quantscope.measure.memory import reset_peak_rss

    big = bytearray(512 << 20)
    for i in range(0, len(big), 4096):
        big[i] = 1
    before = peak_rss_bytes()
    del big
    assert reset_peak_rss()
    assert peak_rss_bytes() < before - (256 << 20)  # the freed half-gigabyte is no longer the peak
