"""What onnxruntime's CPU kernels can do for one prefill matmul: int4 MatMulNBits against MLAS's int8 GEMM.

Prefill of the 640-position image prompt is 85% MatMulNBits (int4 weights, int8 activations with
accuracy_level 4). This times that kernel alone on the edge-1b shapes for several row counts M and block
sizes, next to DynamicQuantizeMatMul (MLAS's int8 GEMM, per-column int8 weights, what the int8 vision
tower runs) and fp32 MatMul on the same shape, in one process, interleaved, median of rounds. The
weights are random: these kernels' speed does not depend on the values (denormals aside: none here).
Each kernel runs the same weights again and again, so at small M they sit in the last-level cache and
the numbers there are not what a decode step (which streams every weight from memory) sees.

usage: python matmul_ceiling.py [--threads 2] [--rounds 5] [--m 32,64,128,256,640,1280]
prints GMAC/s (multiply-adds per second) per kernel and M, and the onnxruntime version.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (K, N) of the edge-1b decoder's matmuls: fused q/k/v, o_proj, fused gate/up, down_proj
SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 11264), "down": (5632, 2048)}


def _model(node, inits, m: int, k: int, n: int):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # what onnxruntime 1.31 reads
    return model


def nbits(rng, m: int, k: int, n: int, bits: int, block: int):
    """MatMulNBits, symmetric (no zero points), accuracy_level 4: the cpu-int4 decoder's kernel."""
    blobs = rng.integers(0, 256, size=(n, k // block, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * (k // block)) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    return _model(node, [numpy_helper.from_array(blobs, "w"), numpy_helper.from_array(scales, "s")], m, k, n)


def int8_gemm(rng, m: int, k: int, n: int):
    """DynamicQuantizeMatMul: per-tensor uint8 activations, per-column int8 weights (MLAS QGEMM)."""
    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    scales = (rng.random(n) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")
    return _model(node, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scales, "s")], m, k, n)


def fp32(rng, m: int, k: int, n: int):
    w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
    return _model(helper.make_node("MatMul", ["x", "w"], ["y"]), [numpy_helper.from_array(w, "w")], m, k, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--m", default="32,64,128,256,640,1280", help="row counts (positions per prefill call)")
    ap.add_argument("--shapes", default="gate_up", help=f"comma-separated, of {', '.join(SHAPES)}, or all")
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    rng = np.random.default_rng(0)
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    print(f"onnxruntime {ort.__version__}, {args.threads} threads; GMAC/s, median of {args.rounds} rounds")
    print("| shape | M | int4 block 128 | int4 block 256 | int8 block 256 | int8 GEMM (QGEMM) | fp32 |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        k, n = SHAPES[shape]
        for m in (int(v) for v in args.m.split(",")):
            kernels = {"b128": nbits(rng, m, k, n, 4, 128), "b256": nbits(rng, m, k, n, 4, 256),
                       "int8 b256": nbits(rng, m, k, n, 8, 256), "qgemm": int8_gemm(rng, m, k, n),
                       "fp32": fp32(rng, m, k, n)}
            sessions = {name: ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                        for name, model in kernels.items()}
            x = {"x": (rng.standard_normal((m, k)) * 0.5).astype(np.float32)}
            reps = max(1, 2048 // m)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(args.rounds):
                for name, s in sessions.items():
                    s.run(None, x)
                    t = time.perf_counter()
                    for _ in range(reps):
                        s.run(None, x)
                    times[name].append((time.perf_counter() - t) / reps)
            cells = [f"{m * k * n / np.median(times[name]) / 1e9:.0f}" for name in sessions]
            print(f"| {shape} {k}x{n} | {m} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
