"""Prefill attention at LLaVA-7B shapes (576 image tokens + text) vs PyTorch SDPA (causal), per backend.

Ours includes rotary and the KV-cache write; SDPA (flash and efficient forced in turn; math would only
show the quadratic memory cost) gets pre-rotated q/k and writes no cache. Ours is called with ``out=``
and an explicit ``start_pos`` so nothing is allocated inside a CUDA graph. Timings: see _common.
Usage: python benchmarks/kernels/bench_prefill_attention.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import (  # noqa: E402
    Section, Setup, bandwidth, copies_for, exit_if_wrong, gpu_setup, measure_peak, raise_if_fatal, ratio, reason,
    sdpa_backend, time_op, write_results,
)

PROMPTS = [(1, 640), (1, 1024), (4, 700), (8, 2048)]  # (batch, prompt tokens incl. 576 image tokens)
SDPA_BACKENDS = ("flash", "efficient")  # names for _common.sdpa_backend
TOLERANCE = 1e-2  # max abs error vs the float32 reference, fp16


@dataclass
class PrefillCase:
    """One prompt shape; ``config`` goes to prefill_attention as keyword arguments (e.g. block_m)."""

    batch: int
    tokens: int
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    max_seq: int = 4096
    dtype: str = "float16"
    config: dict[str, Any] = field(default_factory=dict)


def cases() -> list[PrefillCase]:
    return [PrefillCase(b, t) for b, t in PROMPTS]


def _measure(c: PrefillCase, setup: Setup) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Correctness of ours on the first input copy, then timings of ours and each SDPA backend."""
    torch = setup.torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from llava_edge.kernels.prefill_attention import prefill_attention
    from llava_edge.kernels.reference import prefill_attention_ref, rope_cos_sin

    dev, dt = setup.device, getattr(torch, c.dtype)
    B, T, H, kvH, D, S = c.batch, c.tokens, c.heads, c.kv_heads, c.head_dim, c.max_seq
    elt = torch.empty((), dtype=dt).element_size()
    nbytes = (B * T * (H + 2 * kvH) * D) * elt + B * T * H * D * elt + 2 * B * kvH * T * D * elt  # q,k,v in; out; cache
    flops = 4 * B * H * T * T * D / 2  # causal: half of QK^T and PV
    copies = copies_for(nbytes, setup)
    cos, sin = rope_cos_sin(S, D, device=dev)
    lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    start = torch.zeros(B, dtype=torch.int32, device=dev)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    sets = [(mk(B, T, H, D), mk(B, T, kvH, D), mk(B, T, kvH, D), mk(B, kvH, S, D), mk(B, kvH, S, D))
            for _ in range(copies)]
    out = torch.empty(B, T, H, D, device=dev, dtype=dt)

    key = {"batch": B, "tokens": T, "heads": f"{H}/{kvH}"}
    q, k, v, kc, vc = sets[0]
    kr, vr = kc.clone(), vc.clone()
    err, wrong = None, None
    try:
        prefill_attention(q, k, v, kc, vc, lens, cos, sin, start_pos=start, out=out, **c.config)
        ref = prefill_attention_ref(q, k, v, kr, vr, lens, cos, sin)
        err = (out.float() - ref.float()).abs().max().item()
        wrong = not err < TOLERANCE
        del ref
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal (unless the CUDA context is gone)
        raise_if_fatal(exc)
        wrong = reason(exc)
    del kr, vr
    if wrong:
        t = {"eager_us": None, "graph_us": None, "loop_us": None, "copies": copies,
             "error": f"WRONG: max err {err}" if wrong is True else wrong}
    else:
        t = time_op(setup, [lambda s=s: prefill_attention(*s, lens, cos, sin, start_pos=start, out=out, **c.config)
                            for s in sets])
    timings = [{**key, "op": "ours", **t}]
    gqa = {"enable_gqa": True} if kvH != H else {}
    views = [(s[0].transpose(1, 2), s[1].transpose(1, 2), s[2].transpose(1, 2)) for s in sets]
    for name in SDPA_BACKENDS:
        with sdpa_kernel(sdpa_backend(name)):
            t = time_op(setup, [lambda a=a: F.scaled_dot_product_attention(*a, is_causal=True, **gqa) for a in views])
        timings.append({**key, "op": f"sdpa_{name}", **t})
    for t in timings:
        t["GBps"], t["bw_fraction"] = bandwidth(nbytes, t["graph_us"], setup)
        t["TFLOPs"] = flops / t["graph_us"] / 1e6 if t["graph_us"] else None
        t["bytes"], t["flops"] = nbytes, flops
    ours = timings[0]
    summary = {**key, "max_err": err, "wrong": bool(wrong), "bytes": nbytes, "flops": flops,
               **{f"ours_{k}": ours[k] for k in ("graph_us", "eager_us", "loop_us", "TFLOPs")},
               "bw_fraction": ours["bw_fraction"]}
    ran = [t for t in timings[1:] if t["graph_us"]]
    if ran:
        best = min(ran, key=lambda t: t["graph_us"])
        summary.update(best_sdpa=best["op"], sdpa_graph_us=best["graph_us"],
                       speedup=ratio(best["graph_us"], ours["graph_us"]),
                       speedup_loop=ratio(best["loop_us"], ours["loop_us"]))
    return summary, timings


def run(prefill_cases: list[PrefillCase], setup: Setup) -> dict[str, list[dict[str, Any]]]:
    """Measure every case (ours + SDPA backends); results written after every case. Summary rows with
    ``wrong`` failed correctness."""
    measure_peak(setup)
    summary_cols = ["batch", "tokens", "heads", "max_err", "ours_graph_us", "best_sdpa", "sdpa_graph_us", "speedup",
                    "ours_TFLOPs", "bw_fraction", "ours_eager_us", "ours_loop_us", "speedup_loop"]
    timing_cols = ["batch", "tokens", "heads", "op", "eager_us", "graph_us", "loop_us", "TFLOPs", "GBps",
                   "bw_fraction", "copies", "error"]
    summary: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []

    def sections() -> list[Section]:
        return [Section("Prefill attention vs SDPA causal (best backend by graph time)", summary_cols, summary,
                        "speedup = best SDPA graph time / ours graph time. Ours includes rotary and the cache "
                        "write, SDPA does not."),
                Section("Every op, every timing", timing_cols, timings,
                        "TFLOPs: causal attention FLOPs (4 B H T^2 D / 2) over each op's graph time.")]

    for c in prefill_cases:
        s, t = _measure(c, setup)
        summary.append(s)
        timings.extend(t)
        print(f"prefill B={c.batch} T={c.tokens}: err {s['max_err']} ours graph {s['ours_graph_us']} us, "
              f"speedup {s.get('speedup')}", flush=True)
        write_results(setup, "prefill_attention", sections())
    write_results(setup, "prefill_attention", sections(), final=True)
    return {"summary": summary, "timings": timings}


def main() -> None:
    setup = gpu_setup()
    rows = run(cases(), setup)
    exit_if_wrong("prefill attention", rows["summary"])


if __name__ == "__main__":
    main()
