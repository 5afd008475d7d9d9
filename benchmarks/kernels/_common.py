"""Shared benchmark plumbing: refuse without CUDA, time each op three ways, write results.

Why three timings per op (every op, ours and every baseline, gets all three):

* ``graph_us``: ``triton.testing.do_bench_cudagraph``, the op captured many times in one CUDA graph
  and replayed: GPU time with no host launch cost, as a CUDA-graph / TensorRT runtime sees it. Speedups,
  GB/s and bandwidth fractions come from this column.
* ``eager_us``: ``triton.testing.do_bench``, the op called from Python. do_bench zeroes a 256 MiB
  buffer (L2 flush) before every call and times between events around the call, so when the flush
  takes longer than the Python launch (it usually does) the launch cost is hidden: this is GPU time
  of a Python-launched call with a cold L2, not what a Python loop pays.
* ``loop_us``: host wall time per call of back-to-back Python calls, synchronised once at the end:
  what a Python decode loop pays per call, launch overhead included (max of host and GPU time).

Cold L2 in the graph and loop timings: a graph replays the op back to back, so an 8 MiB int4 weight or
a batch-1 KV cache would stay in the 50-60 MiB L2 and the op would look faster than it is inside a
model (each layer's weights and cache are read once per token). So each timed op cycles through
enough independent copies of its inputs that at least ``Setup.cold_bytes`` (4x L2) are touched
before a copy comes round again; ``copies`` in the results says how many.

Bandwidth fraction = bytes the op must move / graph time / peak; peak is measured (a large
device-to-device copy, read + write), with the nominal figure for the detected GPU next to it.
Results are rewritten (atomically) after every row, so a run killed by its timeout still leaves the
rows it finished.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

RESULTS = Path(__file__).resolve().parents[1] / "results"
NOMINAL_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "A100": 2039.0, "L40S": 864.0,
                "RTX 4090": 1008.0, "Orin": 204.8}
MAX_COPIES = 64
# CUDA errors after which the context is unusable: stop the run (rows so far are already written)
# instead of recording the same error for every later op.
FATAL_CUDA = ("illegal memory access", "unspecified launch failure", "device-side assert",
              "misaligned address", "illegal instruction", "an illegal", "context is destroyed")


def require_cuda() -> Any:
    """Exit with a clear message (status 2) unless a CUDA GPU is usable: no CPU fallback numbers."""
    try:
        import torch
    except ImportError:
        sys.exit("benchmark needs torch with CUDA; torch is not installed")
    if not torch.cuda.is_available():
        sys.exit("benchmark needs a CUDA GPU: none is available here (refusing to report CPU or "
                 "interpreter timings as kernel performance)")
    return torch


class Timer(Protocol):
    """How an op is timed; milliseconds per call. The CPU smoke test passes a stub with fixed times."""

    name: str

    def eager_ms(self, fn: Callable[[], Any]) -> float: ...

    def graph_ms(self, fn: Callable[[], Any]) -> float: ...

    def loop_ms(self, fn: Callable[[], Any]) -> float: ...


class GpuTimer:
    """The real timer (see the module docstring for what each number means). Medians throughout."""

    name = ("eager: triton.testing.do_bench (L2 flushed before each call); graph: "
            "triton.testing.do_bench_cudagraph (replay, inputs rotated past L2); loop: host wall time "
            "of back-to-back Python calls (inputs rotated past L2)")

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def eager_ms(self, fn: Callable[[], Any]) -> float:
        from triton.testing import do_bench

        self.torch.cuda.synchronize()
        return float(do_bench(fn, warmup=25, rep=50, return_mode="median"))

    def graph_ms(self, fn: Callable[[], Any]) -> float:
        from triton.testing import do_bench_cudagraph

        # do_bench_cudagraph runs on a fresh side stream that does not wait for the default stream:
        # make sure the inputs are really there first.
        self.torch.cuda.synchronize()
        try:
            return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
        finally:
            try:
                self.torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - the original error is the one worth reporting
                pass

    def loop_ms(self, fn: Callable[[], Any]) -> float:
        sync = self.torch.cuda.synchronize
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        sync()
        est = (time.perf_counter() - t0) / 5
        n = max(10, min(2000, int(0.02 / max(est, 1e-7))))  # ~20 ms per repeat
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / n * 1e3)
        return statistics.median(times)


@dataclass
class Setup:
    """Everything a bench's ``run`` needs besides its cases; ``gpu_setup`` builds the real one."""

    torch: Any
    device: Any
    timer: Timer
    results_dir: Path
    cold_bytes: int  # each timed op rotates input copies until this many bytes are touched (> L2)
    copy_bytes: int  # size of the device-to-device copy that measures peak bandwidth
    l2_bytes: int | None = None
    peak_gbps: float | None = None  # filled by measure_peak


def gpu_setup() -> Setup:
    """The setup for a real run; exits (no numbers) unless a CUDA GPU is usable."""
    torch = require_cuda()
    dev = torch.device("cuda")
    l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)) or None
    return Setup(torch=torch, device=dev, timer=GpuTimer(torch), results_dir=RESULTS,
                 cold_bytes=4 * (l2 or 64 << 20), copy_bytes=1 << 29, l2_bytes=l2)


def measure_peak(setup: Setup) -> float:
    """Copy bandwidth (read + write, GB/s) from a large device-to-device copy; stored on the setup."""
    torch = setup.torch
    src = torch.empty(setup.copy_bytes, dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    ms = setup.timer.eager_ms(lambda: dst.copy_(src))
    setup.peak_gbps = 2 * setup.copy_bytes / ms / 1e6
    return setup.peak_gbps


def copies_for(nbytes: int, setup: Setup) -> int:
    """Input copies an op cycles through so that a copy is reused only after ``cold_bytes`` (see top)."""
    return max(1, min(MAX_COPIES, -(-setup.cold_bytes // max(1, nbytes))))


def reason(exc: BaseException, caught: list | None = None) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    for w in caught or []:  # SDPA says *why* a backend refused only in warnings
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if text and text not in msg:
            msg += f" [{text}]"
    return msg[:400]


def exit_if_wrong(what: str, rows: list[dict[str, Any]]) -> None:
    """End a bench with an error (status 1) when any case failed its correctness check: its timings
    were not taken, and a wrong kernel must not look like a finished run."""
    wrong = [r for r in rows if r["wrong"]]
    if wrong:
        sys.exit(f"{what} WRONG for {len(wrong)} case(s): see the error column")


def raise_if_fatal(exc: BaseException) -> None:
    if any(s in str(exc).lower() for s in FATAL_CUDA):
        raise exc


def time_op(setup: Setup, fns: list[Callable[[], Any]]) -> dict[str, Any]:
    """Eager, graph and loop time (us) of one op whose calls cycle through ``fns`` (one per input copy).

    Never raises for an op that merely fails (a backend refusing a shape, a config the kernel rejects,
    a capture that fails): that column is None and ``error`` says why. Errors that leave the CUDA
    context unusable are re-raised.
    """
    res: dict[str, Any] = {"eager_us": None, "graph_us": None, "loop_us": None, "copies": len(fns), "error": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fns[0]()  # compiles; a refusal shows up here, not inside a capture
        except Exception as exc:  # noqa: BLE001
            raise_if_fatal(exc)
            res["error"] = reason(exc, caught)
            return res
    it = itertools.cycle(fns)

    def fn() -> Any:
        return next(it)()

    errors = []
    for col, timing in (("eager_us", setup.timer.eager_ms), ("graph_us", setup.timer.graph_ms),
                        ("loop_us", setup.timer.loop_ms)):
        try:
            res[col] = timing(fn) * 1e3
        except Exception as exc:  # noqa: BLE001
            raise_if_fatal(exc)
            errors.append(f"{col[:-3]}: {reason(exc)}")
    res["error"] = "; ".join(errors) or None
    return res


def sdpa_backend(name: str) -> Any:
    """``torch.nn.attention.SDPBackend`` by short name, for ``sdpa_kernel``: each baseline forced in turn."""
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def bandwidth(nbytes: int, us: float | None, setup: Setup) -> tuple[float | None, float | None]:
    """(GB/s, fraction of measured peak) for ``nbytes`` moved in ``us``; None when there is no time."""
    if not us:
        return None, None
    gbps = nbytes / us / 1e3
    return gbps, (gbps / setup.peak_gbps if setup.peak_gbps else None)


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def nominal_gbps(name: str) -> float | None:
    return next((v for k, v in NOMINAL_GBPS.items() if k.lower() in name.lower()), None)


def device_name(setup: Setup) -> str:
    if setup.device.type == "cuda":
        return setup.torch.cuda.get_device_name(setup.device)
    return f"none ({setup.device.type}; not a performance run)"


def meta(setup: Setup) -> dict[str, Any]:
    """Where and how the numbers were taken; written at the top of every results file."""
    gpu = device_name(setup)
    return {
        "gpu": gpu, "measured_copy_gbps": round(setup.peak_gbps, 1) if setup.peak_gbps else None,
        "nominal_gbps": nominal_gbps(gpu), "l2_bytes": setup.l2_bytes, "cold_bytes": setup.cold_bytes,
        "torch": setup.torch.__version__, "triton": __import__("triton").__version__,
        "python": platform.python_version(), "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "timer": setup.timer.name, "speedups_and_bandwidth_from": "graph_us (CUDA-graph replay)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


@dataclass
class Section:
    """One table of a results file: title, a line of notes, the columns shown in markdown, the rows."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    notes: str = ""


def write_results(setup: Setup, stem: str, sections: list[Section], final: bool = False) -> Path:
    """Write ``<stem>.json`` (every field of every row) and ``<stem>.md`` (the listed columns) atomically."""
    setup.results_dir.mkdir(parents=True, exist_ok=True)
    m = meta(setup)
    data = {"meta": m, "sections": [{"title": s.title, "notes": s.notes, "columns": s.columns, "rows": s.rows}
                                    for s in sections]}
    l2 = f"{m['l2_bytes'] / 2**20:.0f} MiB" if m["l2_bytes"] else "unknown"
    lines = [f"# {stem}", "",
             f"GPU: {m['gpu']}; measured copy bandwidth {_fmt(m['measured_copy_gbps'])} GB/s (nominal "
             f"{m['nominal_gbps'] or 'unknown'}); L2 {l2}; torch {m['torch']}, triton {m['triton']}; {m['date']}",
             "",
             f"Timing: {m['timer']}. Speedups, GB/s and bw_fraction use **graph** times. Each op cycles "
             f"through `copies` input sets touching >= {m['cold_bytes'] / 2**20:.3g} MiB before reuse. "
             "Times in microseconds, medians."]
    for s in sections:
        lines += ["", f"## {s.title}", ""] + ([s.notes, ""] if s.notes else [])
        lines += ["| " + " | ".join(s.columns) + " |", "|" + "---|" * len(s.columns)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in s.columns) + " |" for r in s.rows]
    for path, text in ((setup.results_dir / f"{stem}.json", json.dumps(data, indent=2)),
                       (setup.results_dir / f"{stem}.md", "\n".join(lines) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    md = setup.results_dir / f"{stem}.md"
    if final:
        print(md.read_text())
    return md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return ""
    return str(v).replace("|", "/").replace("\n", " ")
