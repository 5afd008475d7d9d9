"""int4 GEMV/GEMM at LLaVA-7B linear shapes vs cuBLAS fp16 (``x @ w16.T`` on the dequantized weight).

Two parts (timings: see _common):

* the linears table: qkv, o, gate_up, down at M = 1, 4, 16 (decode batches) and 640 (a prefill with
  the image tokens). Ours is int4_gemv for M <= GEMV_MAX_ROWS, else int4_gemm (int4_matmul's rule),
  called with ``out=`` so nothing is allocated inside a CUDA graph.
* a GEMV config sweep at N = K = 4096, M = 1 against the fp16 GEMV there (the issue's goal: int4 GEMV
  >= 2.5x faster than fp16). Every config in GEMV_CONFIGS is tried; one the kernel rejects is
  recorded with its error, not fatal. ``{}`` is the kernel's own defaults. Then the same at M = 4
  (batched decode): GEMV against the GEMM padded to 16 rows (SMALL_BATCH_CONFIGS), which decides
  GEMV_MAX_ROWS.

The packed weights are random bytes and random scales (a valid MatMulNBits tensor, made on the GPU:
quantizing random fp32 weights on the CPU would cost seconds per shape and time nothing more).

Usage: python benchmarks/kernels/bench_int4_matmul.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import (  # noqa: E402
    Section, Setup, bandwidth, copies_for, exit_if_wrong, gpu_setup, measure_peak, raise_if_fatal, ratio, reason,
    time_op, write_results,
)

LINEARS = {"qkv": (3 * 4096, 4096), "o": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008)}
ROWS = [1, 4, 16, 640]  # decode batch sizes, then a prefill with the image tokens
GROUP = 128
# int4_gemv keyword arguments to sweep (block_k may span several groups); a config the kernel rejects
# is recorded as failed, not fatal.
GEMV_CONFIGS: list[dict[str, Any]] = (
    [{}]  # the kernel's defaults (8 x 1024, 4 warps)
    + [{"block_n": bn, "block_k": bk} for bn in (4, 8, 16) for bk in (256, 512, 1024, 2048)]
    + [{"block_n": 32, "block_k": 128}, {"block_n": 32, "block_k": 512}]  # the first default; a wide 32-row tile
    + [{"block_n": 8, "block_k": 1024, "num_warps": 2}, {"block_n": 16, "block_k": 1024, "num_warps": 8}]
)
# Batched decode (M = 4): the GEMV (one program row per x row, so the weights are read M times, from L2
# if lucky) against the GEMM padded to 16 rows (weights read once, tensor cores), to set GEMV_MAX_ROWS.
SMALL_BATCH_CONFIGS: list[dict[str, Any]] = [{}] + [{"kernel": "gemm", "block_m": 16, "block_n": bn}
                                                   for bn in (16, 32, 64)]
GOAL_SPEEDUP = 2.5  # int4 GEMV vs fp16 GEMV at 4096 x 4096
TOLERANCE = 1e-2  # max abs error / max |reference|


@dataclass
class LinearCase:
    name: str
    N: int  # output features
    K: int  # input features
    M: int  # rows of x
    group: int = GROUP


@dataclass
class GemvSweep:
    N: int
    K: int
    M: int
    configs: list[dict[str, Any]]
    group: int = GROUP


def cases() -> list[LinearCase]:
    return [LinearCase(name, N, K, M) for name, (N, K) in LINEARS.items() for M in ROWS]


def sweep() -> list[GemvSweep]:
    return [GemvSweep(4096, 4096, 1, GEMV_CONFIGS), GemvSweep(4096, 4096, 4, SMALL_BATCH_CONFIGS)]


def _weights(N: int, K: int, group: int, copies: int, setup: Setup) -> list[tuple[Any, Any, Any]]:
    """``copies`` independent (qweight, scales, w16) triples; w16 is the fp16 dequantized weight."""
    torch = setup.torch
    from llava_edge.kernels.reference import unpack_int4

    out = []
    for _ in range(copies):
        qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=setup.device)
        sc = (torch.rand(N, K // group, device=setup.device) * 0.01 + 0.005).to(torch.float16)
        out.append((qw, sc, unpack_int4(qw, sc, group).to(torch.float16)))
    return out


def _rel_err(y: Any, x: Any, qw: Any, sc: Any, group: int) -> float:
    from llava_edge.kernels.reference import unpack_int4

    ref = x.float() @ unpack_int4(qw, sc, group).T
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _int4_bytes(N: int, K: int, M: int, group: int) -> int:
    """Packed weight, fp16 scales, x in and y out."""
    return N * K // 2 + N * (K // group) * 2 + (M * K + M * N) * 2


def _check_and_time(setup: Setup, fn: Any, x: Any, y: Any, ws: list, group: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Correctness on the first weight copy, then (only if right) the timings of ``fn`` over all copies."""
    try:
        fn(x, ws[0][0], ws[0][1], group, out=y, **cfg)
        err = _rel_err(y, x, ws[0][0], ws[0][1], group)
    except Exception as exc:  # noqa: BLE001 - e.g. a config the kernel rejects: recorded, not fatal
        raise_if_fatal(exc)
        return {"rel_err": None, "wrong": False, "eager_us": None, "graph_us": None, "loop_us": None,
                "copies": len(ws), "error": reason(exc)}
    if not err < TOLERANCE:
        return {"rel_err": err, "wrong": True, "eager_us": None, "graph_us": None, "loop_us": None,
                "copies": len(ws), "error": f"WRONG: rel err {err:.3g}"}
    t = time_op(setup, [lambda w=w: fn(x, w[0], w[1], group, out=y, **cfg) for w in ws])
    return {"rel_err": err, "wrong": False, **t}


def run(linear_cases: list[LinearCase], gemv_sweep: GemvSweep | list[GemvSweep] | None,
        setup: Setup) -> dict[str, list[dict[str, Any]]]:
    """Linears table (ours vs cuBLAS fp16) and the config sweeps (a config with ``kernel="gemm"`` runs
    int4_gemm); results written after every row. Rows with ``wrong`` failed correctness."""
    torch = setup.torch
    from llava_edge.kernels.int4_matmul import GEMV_MAX_ROWS, int4_gemm, int4_gemv

    measure_peak(setup)
    dev = setup.device
    summary_cols = ["linear", "N", "K", "M", "kernel", "rel_err", "ours_graph_us", "cublas_graph_us", "speedup",
                    "ours_GBps", "bw_fraction", "TFLOPs", "ours_eager_us", "cublas_eager_us", "ours_loop_us",
                    "cublas_loop_us", "error"]
    sweep_cols = ["M", "config", "rel_err", "graph_us", "eager_us", "loop_us", "speedup_vs_fp16", "GBps", "bw_fraction",
                  "error"]
    summary: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    sweep_note = ""

    def sections() -> list[Section]:
        return [Section("int4 linears vs cuBLAS fp16", summary_cols, summary,
                        "speedup = cuBLAS fp16 graph time / ours graph time."),
                Section("int4 GEMV config sweep", sweep_cols, sweep_rows, sweep_note)]

    for c in linear_cases:
        nbytes = _int4_bytes(c.N, c.K, c.M, c.group)
        ws = _weights(c.N, c.K, c.group, copies_for(nbytes, setup), setup)
        x = torch.randn(c.M, c.K, device=dev, dtype=torch.float16)
        y = torch.empty(c.M, c.N, device=dev, dtype=torch.float16)
        gemv = c.M <= GEMV_MAX_ROWS
        ours = _check_and_time(setup, int4_gemv if gemv else int4_gemm, x, y, ws, c.group, {})
        cublas = time_op(setup, [lambda w=w: x @ w[2].T for w in ws])
        gbps, frac = bandwidth(nbytes, ours["graph_us"], setup)
        summary.append({
            "linear": c.name, "N": c.N, "K": c.K, "M": c.M, "kernel": "gemv" if gemv else "gemm",
            "rel_err": ours["rel_err"], "wrong": ours["wrong"], "bytes": nbytes, "copies": ours["copies"],
            **{f"ours_{k}": ours[k] for k in ("graph_us", "eager_us", "loop_us")},
            **{f"cublas_{k}": cublas[k] for k in ("graph_us", "eager_us", "loop_us")},
            "speedup": ratio(cublas["graph_us"], ours["graph_us"]), "ours_GBps": gbps, "bw_fraction": frac,
            "TFLOPs": 2 * c.M * c.N * c.K / ours["graph_us"] / 1e6 if ours["graph_us"] else None,
            "error": "; ".join(f"{who}: {t['error']}" for who, t in (("ours", ours), ("cublas", cublas)) if t["error"])
                     or None,
        })
        print(f"int4 {c.name} M={c.M}: err {ours['rel_err']} ours graph {ours['graph_us']} us, "
              f"cublas {cublas['graph_us']} us", flush=True)
        write_results(setup, "int4_matmul", sections())
        del ws

    sweeps = [gemv_sweep] if isinstance(gemv_sweep, GemvSweep) else list(gemv_sweep or [])
    notes: list[str] = []
    for s in sweeps:
        nbytes = _int4_bytes(s.N, s.K, s.M, s.group)
        ws = _weights(s.N, s.K, s.group, copies_for(nbytes, setup), setup)
        x = torch.randn(s.M, s.K, device=dev, dtype=torch.float16)
        y = torch.empty(s.M, s.N, device=dev, dtype=torch.float16)
        fp16 = time_op(setup, [lambda w=w: x @ w[2].T for w in ws])
        head = f"N={s.N} K={s.K} M={s.M} group {s.group}; cuBLAS fp16: graph {fp16['graph_us']} us" + (
            f" (error: {fp16['error']})" if fp16["error"] else "")
        notes.append(head)
        mine: list[dict[str, Any]] = []
        for cfg in s.configs:
            kw = {k: v for k, v in cfg.items() if k != "kernel"}
            fn = int4_gemm if cfg.get("kernel") == "gemm" else int4_gemv
            r = _check_and_time(setup, fn, x, y, ws, s.group, kw)
            gbps, frac = bandwidth(nbytes, r["graph_us"], setup)
            mine.append({"config": " ".join(f"{k}={v}" for k, v in cfg.items()) or "(kernel defaults)",
                         "kwargs": cfg, "N": s.N, "K": s.K, "M": s.M, "bytes": nbytes, **r,
                         "speedup_vs_fp16": ratio(fp16["graph_us"], r["graph_us"]), "GBps": gbps,
                         "bw_fraction": frac, "fp16_graph_us": fp16["graph_us"],
                         "fp16_eager_us": fp16["eager_us"], "fp16_loop_us": fp16["loop_us"]})
            sweep_rows.append(mine[-1])
            print(f"int4 sweep M={s.M} {cfg}: err {r['rel_err']} graph {r['graph_us']} us", flush=True)
            ok = [row for row in mine if row["speedup_vs_fp16"]]
            if ok:
                best = max(ok, key=lambda row: row["speedup_vs_fp16"])
                goal = ""
                if s.M == 1:  # the goal is stated for the GEMV (4096 x 4096 in the real sweep)
                    goal = f" (goal {GOAL_SPEEDUP}x: {'met' if best['speedup_vs_fp16'] >= GOAL_SPEEDUP else 'NOT met'})"
                notes[-1] = (f"{head}. Best: {best['config']} at {best['graph_us']:.4g} us graph, "
                             f"{best['speedup_vs_fp16']:.3g}x fp16{goal}. "
                             f"Failed configs: {sum(1 for row in mine if row['graph_us'] is None)}.")
            sweep_note = " | ".join(notes)
            write_results(setup, "int4_matmul", sections())
        del ws
    write_results(setup, "int4_matmul", sections(), final=True)
    return {"summary": summary, "sweep": sweep_rows}


def main() -> None:
    setup = gpu_setup()
    rows = run(cases(), sweep(), setup)
    exit_if_wrong("int4 matmul", rows["summary"] + rows["sweep"])


if __name__ == "__main__":
    main()
