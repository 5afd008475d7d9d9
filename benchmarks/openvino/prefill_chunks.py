"""One prompt chunk of the fast decoder, prefilled by onnxruntime and by OpenVINO into the same in-place cache.

The measurement behind ``OV_MIN_PREFILL_TOKENS`` (llava_edge/runtime/ov_prefill.py): for each chunk length,
the time of ``FastOrtBackend.prefill_slot`` with the chunk on onnxruntime and on OpenVINO (every length sent
to OpenVINO here), after a 100-token context already in the slot (a chunk that continues a prompt, as all
but the first do), runtimes interleaved round by round; and how far apart the two runtimes' logits are
for the same chunk (relative to the largest logit; argmax equal or not).

usage: python prefill_chunks.py PKG [--rounds 5] [--threads 2] [--lengths 16,32,64,256,640]   (one JSON object)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from llava_edge.package import load_manifest
from llava_edge.runtime.backends import DECODER_GRAPHS, resolve_auto
from llava_edge.runtime.fast_backend import FastOrtBackend
from llava_edge.runtime.ov_prefill import PrefillEngine

CONTEXT = 100


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="16,32,64,256,640")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    m = load_manifest(args.package)
    decoder = DECODER_GRAPHS[resolve_auto(args.package, m, "cpu")][0]
    ort_be = FastOrtBackend(args.package, m, threads=args.threads, decoder=decoder)
    ov_be = FastOrtBackend(args.package, m, threads=args.threads, decoder=decoder, prefill=PrefillEngine.OPENVINO)
    ov_be.ov_prefill.min_tokens = 1  # every length to OpenVINO
    rng = np.random.default_rng(0)
    hidden = m.text.hidden_size
    context = (rng.standard_normal((1, CONTEXT, hidden)) * 0.02).astype(np.float32)
    chunks = {n: (rng.standard_normal((1, n, hidden)) * 0.02).astype(np.float32) for n in lengths}
    caches = {"onnxruntime": (ort_be, ort_be.new_slot_cache(1, CONTEXT + max(lengths))),
              "openvino": (ov_be, ov_be.new_slot_cache(1, CONTEXT + max(lengths)))}
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in lengths} for k in caches}
    logits: dict[str, dict[int, np.ndarray]] = {k: {} for k in caches}
    for r in range(args.rounds + 1):  # round 0 warms each shape up and is not kept
        for n in lengths:
            for name, (be, kv) in caches.items():
                kv.lengths[:] = 0
                be.prefill_slot(kv, 0, context)
                t = time.perf_counter()
                logits[name][n] = be.prefill_slot(kv, 0, chunks[n])
                if r:
                    times[name][n].append((time.perf_counter() - t) * 1000)
    rows = []
    for n in lengths:
        a, b = logits["onnxruntime"][n], logits["openvino"][n]
        ort_ms, ov_ms = (statistics.median(times[k][n]) for k in ("onnxruntime", "openvino"))
        rows.append({"tokens": n, "onnxruntime_ms": round(ort_ms, 1), "openvino_ms": round(ov_ms, 1),
                     "openvino_vs_onnxruntime": round(ov_ms / ort_ms, 3),
                     "logits_rel_diff": round(float(np.abs(a - b).max() / np.abs(a).max()), 5),
                     "argmax_equal": bool(a.argmax() == b.argmax())})
    import onnxruntime
    import openvino

    print(json.dumps({"package": str(args.package), "decoder": decoder, "threads": args.threads,
                      "context": CONTEXT, "rounds": args.rounds, "cpu": cpu_name(),
                      "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "chunks": rows},
                     indent=1))


if __name__ == "__main__":
    main()
