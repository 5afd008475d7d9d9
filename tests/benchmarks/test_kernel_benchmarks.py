"""The GPU benchmarks: they refuse without CUDA, and their whole code path runs on CPU.

The benchmarks run once, later, on a GPU, so every line of them must already have run here: each
bench's ``run`` is driven with tiny shapes under TRITON_INTERPRET (correctness check against the
reference, every op and SDPA backend, every column, the sweeps, the results files) with a stub timer
that returns fixed times, into tmp_path. The stub's numbers are not measurements; the tests only use
them to check which time the derived columns (speedup, GB/s, bandwidth fraction) are computed from.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"
RESULTS = BENCH.parent / "results"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks themselves run next "
                              "(gpu_check.sh); the smoke test would only spend the test budget compiling")


def _load(script: str) -> Any:
    spec = importlib.util.spec_from_file_location(script[:-3], BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _snapshot() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.iterdir()} if RESULTS.exists() else {}


class StubTimer:
    """Fixed, distinct times per timing kind; calls the op (graph twice, to go round the input copies)."""

    name = "stub timer: fixed times, CPU smoke test (not a measurement)"
    EAGER_MS, GRAPH_MS, LOOP_MS = 0.004, 0.002, 0.010

    def __init__(self) -> None:
        self.calls = 0

    def _call(self, fn: Callable[[], Any], n: int = 1) -> None:
        for _ in range(n):
            fn()
            self.calls += 1

    def eager_ms(self, fn: Callable[[], Any]) -> float:
        self._call(fn)
        return self.EAGER_MS

    def graph_ms(self, fn: Callable[[], Any]) -> float:
        self._call(fn, 2)
        return self.GRAPH_MS

    def loop_ms(self, fn: Callable[[], Any]) -> float:
        self._call(fn)
        return self.LOOP_MS


def _setup(mod: Any, tmp_path: Path, cold_bytes: int) -> Any:
    return mod.Setup(torch=torch, device=torch.device("cpu"), timer=StubTimer(), results_dir=tmp_path,
                     cold_bytes=cold_bytes, copy_bytes=1 << 16)


def _peak() -> float:
    return 2 * (1 << 16) / StubTimer.EAGER_MS / 1e6  # measure_peak times the copy with eager_ms


def _check_files(tmp_path: Path, stem: str, before: dict[str, float], titles: list[str]) -> dict[str, Any]:
    """Both files in tmp_path (and nothing new in benchmarks/results); md tables well formed."""
    assert _snapshot() == before, "a smoke run wrote into benchmarks/results"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    md = (tmp_path / f"{stem}.md").read_text()
    assert [s["title"] for s in data["sections"]] == titles
    assert data["meta"]["timer"] == StubTimer.name and data["meta"]["gpu"].startswith("none (cpu")
    assert data["meta"]["measured_copy_gbps"] == pytest.approx(_peak(), rel=1e-3)
    assert "use **graph** times" in md and StubTimer.name in md
    for s in data["sections"]:
        assert f"## {s['title']}" in md
        for r in s["rows"]:
            assert set(s["columns"]) <= set(r), f"row of {s['title']!r} lacks columns"
    tables = [t.splitlines() for t in md.split("\n\n") if t.startswith("| ")]
    assert len(tables) == len(titles)
    for t in tables:  # every row has as many cells as the header (a stray '|' in a value would break it)
        assert {ln.count("|") for ln in t[2:]} <= {t[0].count("|")}
    return data


def _check_timing(row: dict[str, Any], peak: float) -> None:
    """Every timing column set from the stub (or None with a reason); GB/s from the graph time."""
    if row["error"] and row["graph_us"] is None:
        return
    assert row["eager_us"] == pytest.approx(StubTimer.EAGER_MS * 1e3)
    assert row["graph_us"] == pytest.approx(StubTimer.GRAPH_MS * 1e3)
    assert row["loop_us"] == pytest.approx(StubTimer.LOOP_MS * 1e3)
    gbps = row["bytes"] / (StubTimer.GRAPH_MS * 1e3) / 1e3
    assert row["GBps"] == pytest.approx(gbps) and row["bw_fraction"] == pytest.approx(gbps / peak)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmarks would run")
@pytest.mark.parametrize("script", ["bench_decode_attention.py", "bench_prefill_attention.py", "bench_int4_matmul.py"])
def test_benchmark_refuses_without_cuda(script: str) -> None:
    mod = _load(script)
    before = _snapshot()
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        mod.main()
    assert _snapshot() == before, "no results file may appear without a GPU"


def test_time_op_records_failures_instead_of_stopping() -> None:
    common = _load("_common.py")
    setup = common.Setup(torch=torch, device=torch.device("cpu"), timer=StubTimer(), results_dir=Path("/nonexistent"),
                         cold_bytes=1, copy_bytes=1)

    def refuses() -> None:
        raise RuntimeError("No available kernel. Aborting execution.")

    t = common.time_op(setup, [refuses])
    assert (t["eager_us"], t["graph_us"], t["loop_us"]) == (None, None, None) and "No available kernel" in t["error"]

    class NoGraph(StubTimer):
        def graph_ms(self, fn: Callable[[], Any]) -> float:
            raise RuntimeError("operation not permitted when stream is capturing")

    setup.timer = NoGraph()
    t = common.time_op(setup, [lambda: None, lambda: None])
    assert t["eager_us"] == pytest.approx(4.0) and t["loop_us"] == pytest.approx(10.0) and t["graph_us"] is None
    assert t["error"].startswith("graph: RuntimeError: operation not permitted") and t["copies"] == 2

    def poisons() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        common.time_op(setup, [poisons])


def test_gpu_loop_timer_counts_every_call() -> None:
    """GpuTimer.loop_ms with a fake torch: host time per call over a synchronised back-to-back loop."""
    common = _load("_common.py")
    syncs: list[int] = []
    calls: list[int] = []

    class FakeCuda:
        @staticmethod
        def synchronize() -> None:
            syncs.append(len(calls))

    class FakeTorch:
        cuda = FakeCuda

    def op() -> None:
        calls.append(1)
        t = time.perf_counter()
        while time.perf_counter() - t < 1e-4:
            pass

    ms = common.GpuTimer(FakeTorch).loop_ms(op)
    assert 0.1 <= ms < 5  # each call spins 0.1 ms
    n = (len(calls) - 6) // 3
    assert 10 <= n <= 2000 and len(calls) == 6 + 3 * n and syncs[-1] == len(calls)


@cpu_only
def test_decode_bench_whole_path_on_cpu(tmp_path: Path) -> None:
    mod = _load("bench_decode_attention.py")
    tiny = dict(heads=4, head_dim=32, max_seq=64)
    cases = [mod.DecodeCase(1, 40, kv_heads=4, **tiny), mod.DecodeCase(2, 23, kv_heads=2, **tiny)]
    sweep = [mod.DecodeCase(1, 40, kv_heads=4, num_splits=s, **tiny) for s in (1, 2)]
    before = _snapshot()
    setup = _setup(mod, tmp_path, cold_bytes=50_000)
    rows = mod.run(cases, sweep, setup)
    data = _check_files(tmp_path, "decode_attention", before, [
        "Decode attention vs SDPA (best backend by graph time)", "Every op, every timing",
        "num_splits sweep (ours only)"])
    assert data["sections"][0]["rows"] == rows["summary"]
    peak = _peak()

    assert len(rows["summary"]) == 2 and len(rows["timings"]) == 2 * (1 + len(mod.SDPA_BACKENDS))
    for s in rows["summary"]:
        assert s["wrong"] is False and s["max_err"] < mod.TOLERANCE
        assert s["ours_graph_us"] == pytest.approx(2.0) and s["best_sdpa"].startswith("sdpa_")
        assert s["speedup"] == pytest.approx(1.0)  # the stub gives every op the same time
    assert {t["op"] for t in rows["timings"]} == {"ours"} | {f"sdpa_{b}" for b in mod.SDPA_BACKENDS}
    for t in rows["timings"]:
        assert t["copies"] > 1  # inputs rotated (cold_bytes > one input set)
        assert t["graph_us"] is not None or t["error"], "a missing time needs a reason"
        _check_timing(t, peak)
    assert all(t["graph_us"] for t in rows["timings"] if t["op"] in ("ours", "sdpa_math"))
    assert [r["splits"] for r in rows["sweep"]] == [1, 2] and sum(r["default"] for r in rows["sweep"]) == 1
    for r in rows["sweep"]:
        assert r["wrong"] is False and r["max_err"] < mod.TOLERANCE
        _check_timing(r, peak)
    assert "Best: " in data["sections"][2]["notes"]


@cpu_only
def test_int4_bench_whole_path_on_cpu(tmp_path: Path) -> None:
    mod = _load("bench_int4_matmul.py")
    # N = 64 rows: the interpreter runs one program per BLOCK_N rows, so time grows with N (256 took 4x);
    # K = 256 is two groups, and 64 still spans several tiles of the swept block_n = 16
    n, k = 64, 256
    cases = [mod.LinearCase("tiny", n, k, 1), mod.LinearCase("tiny", n, k, 8)]
    sweep = [mod.GemvSweep(n, k, 1, [{}, {"block_n": 16, "block_k": 64}, {"block_n": 16, "not_an_option": 1}]),
             mod.GemvSweep(n, k, 4, [{"kernel": "gemm", "block_m": 16, "block_n": 16}])]
    before = _snapshot()
    rows = mod.run(cases, sweep, _setup(mod, tmp_path, cold_bytes=15_000))
    data = _check_files(tmp_path, "int4_matmul", before, ["int4 linears vs cuBLAS fp16", "int4 GEMV config sweep"])
    peak = _peak()

    assert [r["kernel"] for r in rows["summary"]] == ["gemv", "gemm"]
    for r in rows["summary"]:
        assert r["wrong"] is False and r["rel_err"] < mod.TOLERANCE and r["copies"] > 1 and r["error"] is None
        assert r["ours_graph_us"] == pytest.approx(2.0) and r["cublas_graph_us"] == pytest.approx(2.0)
        assert r["ours_eager_us"] == pytest.approx(4.0) and r["cublas_loop_us"] == pytest.approx(10.0)
        assert r["speedup"] == pytest.approx(1.0)
        assert r["ours_GBps"] == pytest.approx(r["bytes"] / 2.0 / 1e3) and r["bw_fraction"] == pytest.approx(
            r["ours_GBps"] / peak)
        assert r["TFLOPs"] == pytest.approx(2 * r["M"] * n * k / 2.0 / 1e6)
    ok, bad, gemm = rows["sweep"][:2], rows["sweep"][2], rows["sweep"][3]
    assert [r["config"] for r in ok] == ["(kernel defaults)", "block_n=16 block_k=64"]
    assert gemm["config"] == "kernel=gemm block_m=16 block_n=16" and gemm["M"] == 4
    for r in ok + [gemm]:
        assert r["wrong"] is False and r["rel_err"] < mod.TOLERANCE and r["speedup_vs_fp16"] == pytest.approx(1.0)
        _check_timing(r, peak)
    assert bad["graph_us"] is None and bad["rel_err"] is None and "TypeError" in bad["error"]
    notes = data["sections"][1]["notes"]
    assert "Best: " in notes and "goal 2.5x" in notes and "Failed configs: 1" in notes
    assert "M=4" in notes.split(" | ")[1] and "goal" not in notes.split(" | ")[1]


@cpu_only
def test_prefill_bench_whole_path_on_cpu(tmp_path: Path) -> None:
    mod = _load("bench_prefill_attention.py")
    cases = [mod.PrefillCase(1, 40, heads=4, kv_heads=2, head_dim=32, max_seq=64)]
    before = _snapshot()
    rows = mod.run(cases, _setup(mod, tmp_path, cold_bytes=100_000))
    _check_files(tmp_path, "prefill_attention", before, [
        "Prefill attention vs SDPA causal (best backend by graph time)", "Every op, every timing"])
    peak = _peak()

    (s,) = rows["summary"]
    assert s["wrong"] is False and s["max_err"] < mod.TOLERANCE and s["speedup"] == pytest.approx(1.0)
    assert [t["op"] for t in rows["timings"]] == ["ours"] + [f"sdpa_{b}" for b in mod.SDPA_BACKENDS]
    for t in rows["timings"]:
        assert t["copies"] > 1 and (t["graph_us"] is not None or t["error"])
        _check_timing(t, peak)
        if t["graph_us"]:
            assert t["TFLOPs"] == pytest.approx(t["flops"] / 2.0 / 1e6)
    assert rows["timings"][0]["graph_us"] is not None

