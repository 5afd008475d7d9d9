"""Prefill attention at LLaVA-7B shapes (576 image tokens + text) vs PyTorch SDPA (causal).

Ours includes rotary and the KV-cache write; SDPA gets pre-rotated q/k and does not write a cache.
Usage: python benchmarks/kernels/bench_prefill_attention.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import bench_ms, measured_peak_gbps, require_cuda, write_results  # noqa: E402

PROMPTS = [(1, 640), (1, 1024), (4, 700), (8, 2048)]  # (batch, prompt tokens incl. 576 image tokens)


def main() -> None:
    torch = require_cuda()
    import torch.nn.functional as F

    from llava_edge.kernels.prefill_attention import prefill_attention
    from llava_edge.kernels.reference import prefill_attention_ref, rope_cos_sin

    H = kvH = 32
    D, S = 128, 4096
    dev = torch.device("cuda")
    cos, sin = rope_cos_sin(S, D, device=dev)
    peak = measured_peak_gbps(torch)
    rows = []
    for B, T in PROMPTS:
        mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.float16)  # noqa: E731
        q, k, v = mk(B, T, H, D), mk(B, T, kvH, D), mk(B, T, kvH, D)
        kc, vc = mk(B, kvH, S, D), mk(B, kvH, S, D)
        lens = torch.full((B,), T, dtype=torch.int32, device=dev)
        out = prefill_attention(q, k, v, kc, vc, lens, cos, sin)
        if B * T <= 2048:  # the reference is slow: check the smaller shapes
            kr, vr = kc.clone(), vc.clone()
            err = (out.float() - prefill_attention_ref(q, k, v, kr, vr, lens, cos, sin).float()).abs().max().item()
            assert err < 1e-2, f"prefill attention wrong at B={B} T={T}: max err {err}"
        else:
            err = None
        ms = bench_ms(lambda: prefill_attention(q, k, v, kc, vc, lens, cos, sin))
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ms_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        flops = 4 * B * H * T * T * D / 2  # causal: half of QK^T and PV
        nbytes = (q.numel() + k.numel() + v.numel()) * 2 * 2 + 2 * B * kvH * T * D * 2  # q,k,v in + out + cache
        rows.append({"batch": B, "tokens": T, "max_err": err, "ours_us": ms * 1e3, "sdpa_us": ms_sdpa * 1e3,
                     "speedup": ms_sdpa / ms, "ours_TFLOPs": flops / ms / 1e9, "bw_fraction": nbytes / ms / 1e6 / peak})
    write_results("prefill_attention", rows, ["batch", "tokens", "max_err", "ours_us", "sdpa_us", "speedup",
                                              "ours_TFLOPs", "bw_fraction"], torch, peak)


if __name__ == "__main__":
    main()
