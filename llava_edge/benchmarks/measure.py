"""Measuring primitives: a timing proxy around a backend, a peak-RSS sampler, percentiles, machine info.

The proxy is how the harness sees *inside* the real generation loop without changing it: every call
the pipeline makes into the backend is timed, so one run gives time to first token, each token's
latency, and the part of each token spent outside the inference engine (Python, sampling,
detokenizing) — the overhead the fast path must keep small.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CallLog:
    """What one generation run did in the backend, in perf_counter seconds."""

    prefill_end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # when each generated token was known
    busy_after_prefill: list[float] = field(default_factory=list)  # backend seconds per decode interval
    _busy: float = 0.0
    _steps: int = 0


class TimedBackend:
    """Forwards the Backend protocol and records when tokens become known and time spent inside.

    The pipeline embeds token k right after sampling it, so the start of each `embed` call after the
    prefill marks "token k is known"; the backend time between two such marks is the engine's share of
    that token, the rest is the runtime's own overhead.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.float_dtype = inner.float_dtype
        self.log = CallLog()

    def reset(self) -> None:
        self.log = CallLog()

    def __getattr__(self, item: str) -> Any:  # anything else the pipeline may use (prefix cache...)
        return getattr(self.inner, item)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.inner.encode_images(pixel_values)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        if self.log._steps > 0 and input_ids.shape[-1] == 1:  # a decode-step embed: the previous token is known
            self._mark(t0)
        out = self.inner.embed(input_ids)
        self.log._busy += time.perf_counter() - t0
        return out

    def new_cache(self, batch: int, max_len: int) -> Any:
        return self.inner.new_cache(batch, max_len)

    def step(self, cache: Any, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner.step(cache, inputs_embeds, attention_mask, position_ids)
        t1 = time.perf_counter()
        if self.log._steps == 0:
            self.log.prefill_end = t1
            self.log._busy = 0.0
        else:
            self.log._busy += t1 - t0
        self.log._steps += 1
        return out

    # the engine's slot path (runtime/backend.SlotBackend): prefill per slot, then decode steps
    def prefill_slot(self, kv: Any, slot: int, inputs_embeds: np.ndarray, **positions: Any) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner.prefill_slot(kv, slot, inputs_embeds, **positions)  # positions= (pruned prompts)
        t1 = time.perf_counter()
        self.log.prefill_end = t1  # the last prefill before the first decode step wins
        self.log._busy += t1 - t0
        self.log._steps += 1
        return out

    def decode_slots(self, kv: Any, inputs_embeds: np.ndarray, active: np.ndarray, **positions: Any) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner.decode_slots(kv, inputs_embeds, active, **positions)
        self.log._busy += time.perf_counter() - t0
        self.log._steps += 1
        return out

    def _mark(self, t: float) -> None:
        if self.log.token_times:
            self.log.busy_after_prefill.append(self.log._busy)
        self.log._busy = 0.0
        self.log.token_times.append(t)

    def finish(self, t_end: float) -> None:
        """The run returned at t_end: the last token is known then."""
        self._mark(t_end)


class PeakRSS:
    """Peak resident memory of this process while the context is open.

    On Linux the kernel keeps the peak (VmHWM) and resets it on request (/proc/self/clear_refs "5"), so a
    phase's peak costs two reads and no thread. Elsewhere a thread samples RSS every `interval_s`: on a
    machine with as many cores as onnxruntime threads, that thread's wake-ups can preempt the spinning
    workers and slow what is being measured, which is why it is only the fallback. ru_maxrss cannot be reset, so it
    cannot separate phases of one process (ours, then transformers)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_peak = False

    def __enter__(self) -> "PeakRSS":
        """Re-entrant: later phases (the runs after loading) extend the same peak."""
        now = rss_bytes()
        if not self.start:
            self.start = now
        self.peak = max(self.peak, now)
        self._kernel_peak = _reset_kernel_peak()
        if not self._kernel_peak:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        if self._kernel_peak:
            self.peak = max(self.peak, kernel_peak_bytes())
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, rss_bytes())


def _reset_kernel_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return kernel_peak_bytes() > 0
    except OSError:
        return False


def kernel_peak_bytes() -> int:
    """VmHWM of this process (peak RSS since start or the last reset), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the (unresettable) peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def machine_info(threads: int | None) -> dict[str, Any]:
    """Where the numbers came from. Load average is recorded because a shared machine skews
    absolute timings (ratios measured back to back in one run are what to compare)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "threads": threads, "memory_bytes": mem,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions(with_torch: bool) -> dict[str, str]:
    import onnxruntime

    from .. import __version__

    out = {"llava_edge": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "onnxruntime": onnxruntime.__version__}
    if with_torch:
        import torch
        import transformers

        out.update(torch=torch.__version__, transformers=transformers.__version__)
    return out
