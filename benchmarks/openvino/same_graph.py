"""The same graphs of a llava-edge cpu-int4 package in onnxruntime and in OpenVINO (CPU, 2 threads).

Would an OpenVINO backend over our own packages beat onnxruntime anywhere? OpenVINO compiles every graph
we write (MatMulNBits, GroupQueryAttention and GatherBlockQuantized included), so this times each graph in
both runtimes on the same inputs: the int8 vision tower on one 336 px image, the int4 decoder's prefill of
640 positions (576 image + 64 text) and one decode step after them. Timings are medians of RUNS after a
warm-up; onnxruntime's decode step here copies the cache in and out (plain ``run``), so it is slower than
the runtime's in-place step (`llava-edge bench` reports that one).

Agreement: the decoder's logits from each runtime against a reference, the same graph with every
MatMulNBits at accuracy_level 0 (int4 weights, fp32 arithmetic) in onnxruntime. The package's graphs
use accuracy_level 4 (int8 activations, what makes our prefill fast), so onnxruntime's own logits are not
the reference: the table says how far each runtime is from exact int4-weight arithmetic.

usage: python same_graph.py PKG [RUNS]   (prints one JSON object)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov

MAX_LEN = 2048


def median_s(f: Callable[[], Any], runs: int) -> float:
    f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 4)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def exact_twin(graph: Path, workdir: Path) -> Path:
    """The graph with accuracy_level 0 on every MatMulNBits, beside a hard link to (or a copy of) its weights."""
    model = onnx.load(str(graph), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    for data in graph.parent.glob(graph.name + ".data"):  # onnxruntime refuses a symlink out of the directory
        try:
            os.link(data, workdir / data.name)
        except OSError:  # another filesystem
            shutil.copy(data, workdir / data.name)
    out = workdir / graph.name
    onnx.save(model, str(out))
    return out


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return round(float(np.abs(a - ref).max() / np.abs(ref).max()), 5)


def main(pkg: Path, runs: int) -> dict[str, Any]:
    man = json.loads((pkg / "manifest.json").read_text())
    graphs = {k: pkg / (v["file"] if isinstance(v, dict) else v) for k, v in man["graphs"].items()}
    core, res = ov.Core(), {"package": pkg.name, "onnxruntime": ort.__version__, "openvino": ov.__version__}
    precisions = ("f32", "bf16")

    def compiled(path: Path, precision: str) -> ov.CompiledModel:
        return core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": precision})

    px = np.random.default_rng(0).standard_normal((1, 3, 336, 336)).astype(np.float32)
    s = session(graphs["vision"])
    ref = s.run(None, {"pixel_values": px})[0]
    res["vision_ort_s"] = median_s(lambda: s.run(None, {"pixel_values": px}), runs)
    for p in precisions:
        r = compiled(graphs["vision"], p).create_infer_request()
        res[f"vision_ov_{p}_s"] = median_s(lambda: r.infer({"pixel_values": px}), runs)
        res[f"vision_ov_{p}_vs_ort"] = rel_diff(r.infer({"pixel_values": px})[0], ref)

    name = next(g for g in ("decoder_fast_int4", "decoder_fast", "decoder") if g in graphs)
    s = session(graphs[name])
    names = {i.name for i in s.get_inputs()}
    t = man["text"]
    past = sorted(n for n in names if n.startswith("past_key_values."))

    def feeds(n: int, start: int) -> dict[str, np.ndarray]:
        f = {"inputs_embeds": (np.random.default_rng(1).standard_normal((1, n, t["hidden_size"])) * 0.02
                               ).astype(np.float32),
             "seqlens_k": np.array([start + n - 1], np.int32), "total_sequence_length": np.array(start + n, np.int32),
             "logits_index": np.array([n - 1], np.int64),
             "position_ids": np.arange(start, start + n, dtype=np.int64)[None]}
        f.update({k: np.zeros((1, t["num_kv_heads"], MAX_LEN, t["head_dim"]), np.float32) for k in past})
        return {k: v for k, v in f.items() if k in names}

    prefill, step = feeds(640, 0), feeds(1, 640)
    with tempfile.TemporaryDirectory() as tmp:
        ref = session(exact_twin(graphs[name], Path(tmp))).run(["logits"], prefill)[0]
    got = s.run(["logits"], prefill)[0]
    res["decoder"] = name
    res["prefill640_ort_s"] = median_s(lambda: s.run(["logits"], prefill), runs)
    res["decode1_ort_copying_s"] = median_s(lambda: s.run(["logits"], step), runs)
    res["prefill_ort_vs_exact"] = rel_diff(got, ref)
    res["prefill_ort_argmax_equal"] = bool(got.argmax() == ref.argmax())
    for p in precisions:
        try:
            cm = compiled(graphs[name], p)
            r = cm.create_infer_request()
            out = r.infer(prefill)[cm.output("logits")]
            res[f"prefill640_ov_{p}_s"] = median_s(lambda: r.infer(prefill), runs)
            res[f"decode1_ov_{p}_s"] = median_s(lambda: r.infer(step), runs)
            res[f"prefill_ov_{p}_vs_exact"] = rel_diff(out, ref)
            res[f"prefill_ov_{p}_argmax_equal"] = bool(out.argmax() == ref.argmax())
        except Exception as e:  # noqa: BLE001 - a graph OpenVINO refuses is a result too
            res[f"decoder_ov_{p}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3), indent=1))
