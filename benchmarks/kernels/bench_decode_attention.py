"""Decode attention at LLaVA-7B shapes (32 heads, MHA, head_dim 128) vs PyTorch SDPA over the cache.

Checks correctness against the reference first, then times: ours (rotary + KV append + split-K
attention, one launch) and SDPA (attention only, on already-rotated cache; rotary/append not counted,
so the comparison favours SDPA). Usage: python benchmarks/kernels/bench_decode_attention.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import bench_ms, measured_peak_gbps, require_cuda, write_results  # noqa: E402

CONTEXTS = [(1, 128), (1, 1024), (1, 4096), (4, 1024), (8, 2048), (16, 4096)]  # (batch, tokens in cache)


def main() -> None:
    torch = require_cuda()
    import torch.nn.functional as F

    from llava_edge.kernels.decode_attention import DecodeWorkspace, decode_attention, default_num_splits
    from llava_edge.kernels.reference import decode_attention_ref, rope_cos_sin

    H = kvH = 32
    D, S = 128, 4096 + 64
    dev = torch.device("cuda")
    cos, sin = rope_cos_sin(S, D, device=dev)
    peak = measured_peak_gbps(torch)
    rows = []
    for B, ctx in CONTEXTS:
        q = torch.randn(B, H, D, device=dev, dtype=torch.float16)
        k, v = torch.randn(B, kvH, D, device=dev, dtype=torch.float16), torch.randn(B, kvH, D, device=dev, dtype=torch.float16)
        kc = torch.randn(B, kvH, S, D, device=dev, dtype=torch.float16)
        vc = torch.randn_like(kc)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        splits = default_num_splits(B, kvH, S, 64, dev)
        ws = DecodeWorkspace.allocate(B, H, kvH, D, splits, dev)
        kr, vr = kc.clone(), vc.clone()
        out = decode_attention(q, k, v, kc, vc, lens, cos, sin, num_splits=splits, workspace=ws)
        ref = decode_attention_ref(q, k, v, kr, vr, lens, cos, sin)
        err = (out.float() - ref.float()).abs().max().item()
        assert err < 1e-2, f"decode attention wrong at B={B} ctx={ctx}: max err {err}"
        ms = bench_ms(lambda: decode_attention(q, k, v, kc, vc, lens, cos, sin, num_splits=splits, workspace=ws))
        qs, ks, vs = q[:, :, None], kc[:, :, : ctx + 1], vc[:, :, : ctx + 1]
        ms_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs))
        nbytes = 2 * B * kvH * (ctx + 1) * D * 2 + 2 * B * H * D * 2  # K+V read, q in + out
        rows.append({"batch": B, "context": ctx, "splits": splits, "max_err": err, "ours_us": ms * 1e3,
                     "sdpa_us": ms_sdpa * 1e3, "speedup": ms_sdpa / ms, "ours_GBps": nbytes / ms / 1e6,
                     "bw_fraction": nbytes / ms / 1e6 / peak})
    write_results("decode_attention", rows, ["batch", "context", "splits", "max_err", "ours_us", "sdpa_us",
                                             "speedup", "ours_GBps", "bw_fraction"], torch, peak)


if __name__ == "__main__":
    main()
