"""fp32 vs int8 vision graph: time per image, relative error, session creation time and RSS.

Writes the `int8` and `int8-blocked` rewrites (export/vision_int8.py) of a package's fp32
vision.onnx into --out, then times all three on one image with --threads intra-op threads,
interleaved in one process (fp32, int8, int8-blocked, fp32, ...) so that a shared machine's load
falls on each alike: report the ratios and the load average, not the absolute times. Session
creation and RSS are measured in a fresh process per graph (also interleaved, median of 3).

    python -m llava_edge.benchmarks.vision_ab PKG_DIR --out DIR [--reps 7] [--threads 2] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, sys, time, numpy as np, onnxruntime as ort
def rss():
    d = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    return int(d["VmRSS"].split()[0]) / 1024, int(d["VmHWM"].split()[0]) / 1024
r0 = rss()[0]
o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[2]); o.log_severity_level = 3
t = time.perf_counter(); s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t
r1 = rss()[0]
shape = s.get_inputs()[0].shape
s.run(None, {"pixel_values": np.zeros((1, 3, shape[2], shape[3]), np.float32)})
print(json.dumps({"load_s": load, "session_rss_mb": r1 - r0, "peak_rss_mb": rss()[1]}))
"""


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def write_variants(package: Path, out: Path) -> dict[str, Path]:
    """{"fp32": the package's graph, "int8": ..., "int8-blocked": ...} with the rewrites under out."""
    from ..export.vision_int8 import options, quantize_vision

    graphs = {"fp32": package / "vision.onnx"}
    for name, cfg in options().items():
        if cfg is not None:
            (out / name).mkdir(parents=True, exist_ok=True)
            quantize_vision(graphs["fp32"], out / name / "vision.onnx", cfg)
            graphs[name] = out / name / "vision.onnx"
    return graphs


def time_interleaved(graphs: dict[str, Path], reps: int, threads: int) -> dict[str, dict]:
    """Median seconds per image of each graph, A/B interleaved, and its relative error vs the first."""
    from ..export.vision_int8 import relative_error

    sessions = {name: _session(p, threads) for name, p in graphs.items()}
    shape = next(iter(sessions.values())).get_inputs()[0].shape
    x = np.random.default_rng(0).standard_normal((1, 3, shape[2], shape[3])).astype(np.float32)
    outs = {name: s.run(None, {"pixel_values": x})[0] for name, s in sessions.items()}  # warm-up
    ref = next(iter(outs.values()))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(reps):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"pixel_values": x})
            times[name].append(time.perf_counter() - t)
    base = statistics.median(next(iter(times.values())))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "speedup_vs_first": base / statistics.median(t), "relative_error": relative_error(outs[name], ref),
                   "file_mb": sum(f.stat().st_size for f in graphs[name].parent.glob("vision.onnx*")) / 1e6}
            for name, t in times.items()}


def load_and_rss(graphs: dict[str, Path], threads: int, rounds: int = 3) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, p in graphs.items():
            out = subprocess.run([sys.executable, "-c", _CHILD, str(p), str(threads)], capture_output=True,
                                 text=True, check=True).stdout
            runs[name].append(json.loads(out))
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def to_markdown(timing: dict[str, dict], memory: dict[str, dict], load: tuple[float, ...], threads: int) -> str:
    lines = [f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {threads} intra-op threads, "
             f"{os.cpu_count()} cores",
             "", "| vision | median per image | speedup | rel. error vs fp32 | files | session RSS | "
             "session creation |",
             "|---|---|---|---|---|---|---|"]
    for name, t in timing.items():
        m = memory.get(name, {})
        lines.append(f"| {name} | {t['median_s'] * 1000:.0f} ms | x{t['speedup_vs_first']:.2f} | "
                     f"{t['relative_error']:.4f} | {t['file_mb']:.0f} MB | "
                     f"{m.get('session_rss_mb', float('nan')):.0f} MB | {m.get('load_s', float('nan')):.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="Where the int8 graphs are written.")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="Skip session creation time and RSS.")
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    graphs = write_variants(args.package, args.out)
    timing = time_interleaved(graphs, args.reps, args.threads)
    load = os.getloadavg()
    memory = {} if args.no_memory else load_and_rss(graphs, args.threads)
    md = to_markdown(timing, memory, load, args.threads)
    print(md)
    if args.md:
        args.md.write_text(md)


if __name__ == "__main__":
    main()
