"""Every engine step while an image request arrives beside 3 running streams, in-process (no HTTP).

What `bench-serve --arrival` reports as one p99 over token intervals, broken into the steps that make it: each
step's wall time from the newcomer's arrival to its first token, with the newcomer's state (waiting for its
vision encoder: PREFILL with 0 positions computed; then its chunks), against the steady step with the same 3
streams after. The server's settings: 16-token chunks, prefill budget 2, 4 slots.

usage: python benchmarks/arrival_steps.py PKG [BACKEND] [--threads 2]   (prints the slowest steps)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from llava_edge.runtime.pipeline import Pipeline, Request
from llava_edge.runtime.scheduler import SERVE_PREFILL_CHUNK
from llava_edge.runtime.sequence import Status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("backend", nargs="?", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    pipe = Pipeline.from_package(args.package, backend=args.backend, threads=args.threads, prefix_cache=0)
    pipe.image_cache_mb = 0
    engine = pipe.make_engine(max_slots=4, prefill_chunk=SERVE_PREFILL_CHUNK)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(5)]

    def seq(i: int, n: int):
        return pipe.sequences([Request([(f"What is in the picture? {i}", None)], [pics[i]])], n, engine=engine)[0]

    warm = seq(4, 4)  # one request alone first: sessions warm, costs measured
    engine.add(warm)
    while not engine.scheduler.idle():
        engine.step()
    running = [seq(i, 400) for i in range(3)]
    for s in running:
        engine.add(s)
    while any(s.status is not Status.RUNNING for s in running):
        engine.step()
    for _ in range(10):
        engine.step()
    newcomer = seq(3, 2)
    log = []
    arrived = time.perf_counter()
    engine.add(newcomer)
    while not newcomer.generated:
        t = time.perf_counter()
        engine.step()
        log.append(((t - arrived) * 1000, (time.perf_counter() - t) * 1000, newcomer.computed))
    ttft = (time.perf_counter() - arrived) * 1000
    steady = []
    for _ in range(10):
        t = time.perf_counter()
        engine.step()
        steady.append((time.perf_counter() - t) * 1000)
    steps = np.array([ms for _, ms, _ in log])
    print(f"{pipe.backend.name}: TTFT {ttft:.0f} ms beside 3 streams; steady step {np.median(steady):.0f} ms; "
          f"{len(log)} steps meanwhile: p50 {np.median(steps):.0f}, p90 {np.percentile(steps, 90):.0f}, "
          f"max {steps.max():.0f} ms")
    print("slowest steps (ms after arrival, step ms, newcomer's positions computed after it):")
    for at, ms, computed in sorted(log, key=lambda r: -r[1])[:6]:
        print(f"  {at:7.0f} {ms:6.0f} {computed:5d}")


if __name__ == "__main__":
    main()
