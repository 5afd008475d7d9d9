"""int4 GEMV/GEMM at LLaVA-7B linear shapes vs cuBLAS fp16 (torch.matmul on the dequantized weight).

Usage: python benchmarks/kernels/bench_int4_matmul.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import bench_ms, measured_peak_gbps, require_cuda, write_results  # noqa: E402

LINEARS = {"qkv": (3 * 4096, 4096), "o": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008)}
ROWS = [1, 4, 16, 640]  # decode batch sizes, then a prefill with the image tokens
GROUP = 128


def main() -> None:
    torch = require_cuda()
    from llava_edge.kernels.int4_matmul import int4_matmul
    from llava_edge.kernels.reference import pack_int4, unpack_int4

    dev = torch.device("cuda")
    peak = measured_peak_gbps(torch)
    rows = []
    for name, (N, K) in LINEARS.items():
        qw, sc = pack_int4(torch.randn(N, K) * 0.02, GROUP)
        qweight, scales = torch.from_numpy(qw).to(dev), torch.from_numpy(sc).to(dev)
        w16 = unpack_int4(qweight, scales, GROUP).to(torch.float16)
        for M in ROWS:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            y = int4_matmul(x, qweight, scales, GROUP)
            ref = (x.float() @ w16.float().T)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, f"int4 matmul wrong for {name} M={M}: rel err {err}"
            ms = bench_ms(lambda: int4_matmul(x, qweight, scales, GROUP))
            ms_cublas = bench_ms(lambda: x @ w16.T)
            nbytes = N * K // 2 + scales.numel() * 2 + (M * K + M * N) * 2
            rows.append({"linear": name, "N": N, "K": K, "M": M, "rel_err": err, "ours_us": ms * 1e3,
                         "cublas_fp16_us": ms_cublas * 1e3, "speedup": ms_cublas / ms,
                         "ours_GBps": nbytes / ms / 1e6, "bw_fraction": nbytes / ms / 1e6 / peak,
                         "TFLOPs": 2 * M * N * K / ms / 1e9})
    write_results("int4_matmul", rows, ["linear", "N", "K", "M", "rel_err", "ours_us", "cublas_fp16_us",
                                        "speedup", "ours_GBps", "bw_fraction", "TFLOPs"], torch, peak)


if __name__ == "__main__":
    main()
