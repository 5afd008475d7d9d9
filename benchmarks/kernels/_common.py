"""Shared benchmark plumbing: refuse without CUDA, time with triton.testing.do_bench, write results.

Bandwidth fraction = bytes the kernel must move / time / peak. Peak is measured (a large
device-to-device copy, read + write) so the fraction is honest on any GPU, and the nominal figure for
the detected GPU is reported next to it when known.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parents[1] / "results"
NOMINAL_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "A100": 2039.0, "L40S": 864.0,
                "RTX 4090": 1008.0, "Orin": 204.8}


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


def bench_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100))


def measured_peak_gbps(torch) -> float:
    n = 1 << 29  # 512 MiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def nominal_gbps(name: str) -> float | None:
    return next((v for k, v in NOMINAL_GBPS.items() if k.lower() in name.lower()), None)


def write_results(stem: str, rows: list[dict[str, Any]], columns: list[str], torch, peak: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "measured_copy_gbps": round(peak, 1), "nominal_gbps": nominal_gbps(gpu),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {stem}", "", f"GPU: {gpu}; measured copy bandwidth {peak:.0f} GB/s "
             f"(nominal {meta['nominal_gbps'] or 'unknown'}); torch {meta['torch']}, triton {meta['triton']}; "
             f"{meta['date']}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
