"""PeakRSS: a phase's peak memory, without a sampling thread where the kernel keeps the peak."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from llava_edge.benchmarks import measure


def _allocate_and_free(nbytes: int) -> None:
    a = np.ones(nbytes // 8)
    a[::4096] = 2.0  # touch every page
    del a


@pytest.mark.parametrize("kernel", [True, False])
def test_peak_of_a_phase_sees_a_freed_allocation(monkeypatch, kernel):
    if kernel and not measure._reset_kernel_peak():
        pytest.skip("no resettable VmHWM here (not Linux >= 4.0)")
    if not kernel:
        monkeypatch.setattr(measure, "_reset_kernel_peak", lambda: False)
    threads = threading.active_count()
    mem = measure.PeakRSS(interval_s=0.001)
    with mem:
        assert threading.active_count() == threads + (0 if kernel else 1)  # no sampler where the kernel keeps it
        _allocate_and_free(400 << 20)
        if not kernel:  # the sampler must see the allocation: hold it over a few of its intervals
            a = np.ones(400 << 17)
            a[::512] = 2.0
            threading.Event().wait(0.05)
            del a
    assert mem.peak - mem.start > 300 << 20
    # a later phase without the allocation keeps the first phase's peak, and measures only its own
    before = mem.peak
    with mem:
        pass
    assert mem.peak == before
    fresh = measure.PeakRSS()
    with fresh:
        pass
    assert fresh.peak - fresh.start < 100 << 20  # the reset forgot the earlier, freed allocation
