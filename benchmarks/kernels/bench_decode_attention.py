"""Decode attention at LLaVA-7B shapes (32 heads, head_dim 128, fp16) vs PyTorch SDPA, per backend.

Checks correctness against the reference first, then times (see _common for eager / graph / loop):
ours (rotary + KV append + split-K attention, one launch, no allocation: caller-owned workspace and
output) and SDPA with each backend forced (flash, efficient, math) on the already-rotated cache
(attention only: rotary and the append are not counted, so the comparison favours SDPA). A backend
that refuses a shape gets None and the reason. GQA rows give SDPA ``enable_gqa=True`` (no repeated
k/v). Then a num_splits sweep at batch 1, context 4096 to judge the default choice.

Our kernel writes the new token into the cache at ``seq_lens`` on every call; seq_lens does not
change, so every timed call does the same work.

Usage: python benchmarks/kernels/bench_decode_attention.py
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

MAX_SEQ = 4096 + 64  # one cache size for every case, as the runtime allocates it
MHA = [(1, 600), (1, 1024), (1, 2048), (1, 4096), (4, 1024), (8, 2048), (16, 600), (16, 4096)]  # (batch, context)
SPLITS_SWEEP = [1, 2, 4, 8, 16, 32, 64]  # at batch 1, context 4096
SPLITS_WARPS8 = [8, 16, 32]  # the same with num_warps=8
SDPA_BACKENDS = ("flash", "efficient", "math")  # names for _common.sdpa_backend ("cudnn" exists too)
TOLERANCE = 1e-2  # max abs error vs the float32 reference, fp16


@dataclass
class DecodeCase:
    """One decode step shape. ``config`` goes to decode_attention as keyword arguments (room for
    ``num_warps`` once the kernel takes it); ``num_splits`` None means the kernel's default."""

    batch: int
    context: int  # tokens already in the cache
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    max_seq: int = MAX_SEQ
    num_splits: int | None = None
    dtype: str = "float16"
    config: dict[str, Any] = field(default_factory=dict)


def cases() -> list[DecodeCase]:
    """The issue's shapes: MHA rows, then one GQA row (32 q heads / 8 kv heads)."""
    return [DecodeCase(b, c) for b, c in MHA] + [DecodeCase(1, 4096, kv_heads=8)]


def sweep() -> list[DecodeCase]:
    """Splits at the default 4 warps, then 8 warps where ptxas shows no spill (127 registers against
    168 + 8 B spilled at 4, benchmarks/results/kernel_resources.md) around the likely best splits."""
    return ([DecodeCase(1, 4096, num_splits=s) for s in SPLITS_SWEEP]
            + [DecodeCase(1, 4096, num_splits=s, config={"num_warps": 8}) for s in SPLITS_WARPS8])


def _bytes(c: DecodeCase, elt: int) -> int:
    """What a decode step must move: K and V over context + 1 tokens, q in and out."""
    return 2 * c.batch * c.kv_heads * (c.context + 1) * c.head_dim * elt + 2 * c.batch * c.heads * c.head_dim * elt


def _measure(c: DecodeCase, setup: Setup, with_sdpa: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Correctness of ours, then timings of ours (and SDPA backends): (summary row, timing rows)."""
    torch = setup.torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from llava_edge.kernels.decode_attention import DecodeWorkspace, decode_attention, default_num_splits
    from llava_edge.kernels.reference import decode_attention_ref, rope_cos_sin

    dev, dt = setup.device, getattr(torch, c.dtype)
    B, H, kvH, D, S = c.batch, c.heads, c.kv_heads, c.head_dim, c.max_seq
    elt = torch.empty((), dtype=dt).element_size()
    nbytes = _bytes(c, elt)
    copies = copies_for(nbytes, setup)
    cos, sin = rope_cos_sin(S, D, device=dev)
    lens = torch.full((B,), c.context, dtype=torch.int32, device=dev)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    sets = [(mk(B, H, D), mk(B, kvH, D), mk(B, kvH, D), mk(B, kvH, S, D), mk(B, kvH, S, D)) for _ in range(copies)]
    splits = c.num_splits or default_num_splits(B, kvH, S, c.config.get("block_n", 64), dev)
    ws = DecodeWorkspace.allocate(B, H, kvH, D, splits, dev)
    out = torch.empty(B, H, D, device=dev, dtype=dt)

    key = {"batch": B, "context": c.context, "heads": f"{H}/{kvH}", "splits": splits}
    q, k, v, kc, vc = sets[0]
    kr, vr = kc.clone(), vc.clone()
    err, wrong = None, None
    try:
        decode_attention(q, k, v, kc, vc, lens, cos, sin, num_splits=splits, workspace=ws, out=out, **c.config)
        ref = decode_attention_ref(q, k, v, kr, vr, lens, cos, sin)
        err = (out.float() - ref.float()).abs().max().item()
        wrong = not err < TOLERANCE  # NaN is wrong too
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal (unless the CUDA context is gone)
        raise_if_fatal(exc)
        wrong = reason(exc)
    del kr, vr
    timings = []
    if wrong:  # a wrong kernel's time means nothing
        t = {"eager_us": None, "graph_us": None, "loop_us": None, "copies": copies,
             "error": f"WRONG: max err {err}" if wrong is True else wrong}
    else:
        t = time_op(setup, [lambda s=s: decode_attention(*s, lens, cos, sin, num_splits=splits, workspace=ws,
                                                         out=out, **c.config) for s in sets])
    timings.append({**key, "op": "ours", **t})
    if with_sdpa:
        gqa = {"enable_gqa": True} if kvH != H else {}
        views = [(s[0][:, :, None], s[3][:, :, : c.context + 1], s[4][:, :, : c.context + 1]) for s in sets]
        for name in SDPA_BACKENDS:
            with sdpa_kernel(sdpa_backend(name)):
                t = time_op(setup, [lambda a=a: F.scaled_dot_product_attention(*a, **gqa) for a in views])
            timings.append({**key, "op": f"sdpa_{name}", **t})
    for t in timings:
        t["GBps"], t["bw_fraction"] = bandwidth(nbytes, t["graph_us"], setup)
        t["bytes"] = nbytes
    ours = timings[0]
    summary = {**key, "max_err": err, "wrong": bool(wrong), "ours_graph_us": ours["graph_us"],
               "ours_eager_us": ours["eager_us"], "ours_loop_us": ours["loop_us"],
               "ours_GBps": ours["GBps"], "bw_fraction": ours["bw_fraction"], "bytes": nbytes}
    ran = [t for t in timings[1:] if t["graph_us"]]
    if ran:
        best = min(ran, key=lambda t: t["graph_us"])
        summary.update(best_sdpa=best["op"], sdpa_graph_us=best["graph_us"],
                       speedup=ratio(best["graph_us"], ours["graph_us"]),
                       speedup_eager=ratio(best["eager_us"], ours["eager_us"]),
                       speedup_loop=ratio(best["loop_us"], ours["loop_us"]))
    return summary, timings


def run(main_cases: list[DecodeCase], sweep_cases: list[DecodeCase], setup: Setup) -> dict[str, list[dict[str, Any]]]:
    """Measure every case (ours + SDPA backends) and the num_splits sweep (ours only); write results
    after every row. Returns the rows by section; ``summary`` rows with ``wrong`` failed correctness."""
    from llava_edge.kernels.decode_attention import default_num_splits

    measure_peak(setup)
    summary_cols = ["batch", "context", "heads", "splits", "max_err", "ours_graph_us", "best_sdpa", "sdpa_graph_us",
                    "speedup", "ours_GBps", "bw_fraction", "ours_eager_us", "ours_loop_us", "speedup_loop"]
    timing_cols = ["batch", "context", "heads", "op", "eager_us", "graph_us", "loop_us", "GBps", "bw_fraction",
                   "copies", "error"]
    sweep_cols = ["splits", "warps", "max_err", "graph_us", "eager_us", "loop_us", "GBps", "bw_fraction", "default",
                  "error"]
    summary: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    sweep_note = ""

    def sections() -> list[Section]:
        return [
            Section("Decode attention vs SDPA (best backend by graph time)", summary_cols, summary,
                    "speedup = best SDPA graph time / ours graph time (speedup_loop: the same from loop times). "
                    "Ours includes rotary and the KV append, SDPA does not."),
            Section("Every op, every timing", timing_cols, timings,
                    "GBps / bw_fraction: the same byte count (K+V over context+1, q, out) over each op's graph time."),
            Section("num_splits sweep (ours only)", sweep_cols, sweep_rows, sweep_note),
        ]

    for c in main_cases:
        s, t = _measure(c, setup, with_sdpa=True)
        summary.append(s)
        timings.extend(t)
        print(f"decode B={c.batch} ctx={c.context} heads={c.heads}/{c.kv_heads}: err {s['max_err']} "
              f"ours graph {s['ours_graph_us']} us, speedup {s.get('speedup')}", flush=True)
        write_results(setup, "decode_attention", sections())
    for c in sweep_cases:
        default = default_num_splits(c.batch, c.kv_heads, c.max_seq, c.config.get("block_n", 64), setup.device)
        s, t = _measure(c, setup, with_sdpa=False)
        warps = c.config.get("num_warps", 4)
        sweep_rows.append({"batch": c.batch, "context": c.context, "heads": s["heads"], "splits": s["splits"],
                           "warps": warps, "max_err": s["max_err"], "wrong": s["wrong"],
                           "default": s["splits"] == default and warps == 4,
                           **{k: t[0][k] for k in ("graph_us", "eager_us", "loop_us", "GBps", "bw_fraction",
                                                   "copies", "error", "bytes")}})
        print(f"decode sweep splits={s['splits']} warps={warps}: graph {t[0]['graph_us']} us", flush=True)
        ok = [r for r in sweep_rows if r["graph_us"]]
        if ok:
            best = min(ok, key=lambda r: r["graph_us"])
            dflt = next((r for r in ok if r["default"]), None)
            c0 = sweep_cases[0]
            sweep_note = (f"batch {c0.batch}, context {c0.context}, heads {c0.heads}/{c0.kv_heads}. Best: "
                          f"{best['splits']} splits, {best['warps']} warps ({best['graph_us']:.4g} us graph); default "
                          + (f"{dflt['splits']} splits ({dflt['graph_us']:.4g} us)." if dflt else "not in the sweep."))
        write_results(setup, "decode_attention", sections())
    write_results(setup, "decode_attention", sections(), final=True)
    return {"summary": summary, "timings": timings, "sweep": sweep_rows}


def main() -> None:
    setup = gpu_setup()
    rows = run(cases(), sweep(), setup)
    exit_if_wrong("decode attention", rows["summary"] + rows["sweep"])


if __name__ == "__main__":
    main()
