"""The GPU benchmarks must refuse clearly on a machine without CUDA rather than report CPU timings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmarks would run")
@pytest.mark.parametrize("script", ["bench_decode_attention.py", "bench_prefill_attention.py", "bench_int4_matmul.py"])
def test_benchmark_refuses_without_cuda(script: str) -> None:
    spec = importlib.util.spec_from_file_location(script[:-3], BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        mod.main()
    assert not (BENCH.parent / "results" / f"{script[6:-3]}.json").exists()
