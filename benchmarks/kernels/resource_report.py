"""Registers, spills and shared memory of every kernel configuration at LLaVA-7B shapes, for Orin
(sm_87) and Hopper (sm_90), from ``ptxas -v`` on the PTX TensorRT would get. Runs on a CPU: nothing
here is a timing, only what the compiler decided, which is what the defaults were chosen from.

Usage: python benchmarks/kernels/resource_report.py  (writes benchmarks/results/kernel_resources.md)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # AOT compilation needs the real kernels
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import RESULTS  # noqa: E402

# (label, compile function name, kwargs); "default" marks what the plugins and wrappers use.
CONFIGS = [
    ("decode MHA, 8 splits (default)", "compile_decode_attention", dict(head_dim=128, group=1, num_splits=8)),
    ("decode GQA 4, 8 splits (default)", "compile_decode_attention", dict(head_dim=128, group=4, num_splits=8)),
    ("decode MHA, 8 warps", "compile_decode_attention", dict(head_dim=128, group=1, num_splits=8, num_warps=8)),
    ("prefill 64x64, 8 warps (default)", "compile_prefill_attention", dict(head_dim=128, group=1)),
    ("prefill 64x64, 4 warps", "compile_prefill_attention", dict(head_dim=128, group=1, num_warps=4)),
    ("prefill 64x32, 4 warps", "compile_prefill_attention", dict(head_dim=128, group=1, block_n=32, num_warps=4)),
    ("GEMV 8x1024 (default)", "compile_int4_matmul", dict(group_size=128, kernel="gemv")),
    ("GEMV 32x128 (before)", "compile_int4_matmul", dict(group_size=128, kernel="gemv", block_n=32, block_k=128)),
    ("GEMV 16x512", "compile_int4_matmul", dict(group_size=128, kernel="gemv", block_n=16, block_k=512)),
    ("GEMM 64x64x64, 8 warps (default)", "compile_int4_matmul", dict(group_size=128, kernel="gemm")),
    ("GEMM 64x64x64, 4 warps (before)", "compile_int4_matmul", dict(group_size=128, kernel="gemm", num_warps=4)),
]


def main() -> None:
    import triton

    from llava_edge.trt import plugins as tp
    from llava_edge.kernels.resources import resource_usage

    lines = ["# kernel_resources", "",
             f"ptxas -v on the AOT PTX (fp16, head_dim 128, group 128), triton {triton.__version__}. Per thread:",
             "registers, spill stores; per block: shared memory. 'blocks/SM' = resident blocks the register",
             "count allows (65536 registers per SM). Static: no timing, no GPU.", "",
             "| config | sm | warps | registers | spill stores B | shared KiB | blocks/SM |",
             "|---|---|---|---|---|---|---|"]
    for cc in (87, 90):
        for label, fn, kw in CONFIGS:
            r = resource_usage(getattr(tp, fn)("float16", cc=cc, **kw))
            lines.append(f"| {label} | {cc} | {r.num_warps} | {r.registers} | {r.spill_store_bytes} | "
                         f"{r.shared_bytes / 1024:.1f} | {r.blocks_per_sm_by_registers} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "kernel_resources.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
