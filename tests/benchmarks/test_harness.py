"""The benchmark harness on a tiny package: structure and internal consistency, never speed."""

from __future__ import annotations

import json

import pytest

from llava_edge.benchmarks.harness import BenchmarkError, run_benchmark
from llava_edge.benchmarks.report import markdown


@pytest.fixture(scope="module")
def package(gqa_fast_package):
    return gqa_fast_package


def test_run_benchmark_with_transformers_baseline(package, tiny_models, tmp_path):
    out_json, png = tmp_path / "r.json", tmp_path / "r.png"
    report = run_benchmark(package, backend="ort,ort-fast", batch=[1, 2], prompt_len=[8], new_tokens=6,
                           baseline="transformers", checkpoint=tiny_models["llava-hf-gqa"]["checkpoint"],
                           repeat=2, warmup=1, threads=1, out_json=out_json, plot=png, console=False)
    assert [(r.engine, r.batch) for r in report.results] == [
        ("ort", 1), ("ort-fast", 1), ("transformers", 1), ("ort", 2), ("ort-fast", 2), ("transformers", 2)]
    for r in report.results:
        assert r.repeats == 2 and r.new_tokens == 6
        assert r.ttft_ms > r.vision_ms > 0
        assert 0 < r.token_latency_ms["p50"] <= r.token_latency_ms["p90"] <= r.token_latency_ms["p99"]
        assert r.decode_tokens_per_s > 0 and r.throughput_tokens_per_s == pytest.approx(r.decode_tokens_per_s * r.batch)
        assert all(s["tokens"] == 6 for s in r.samples)  # eos ignored / suppressed: full length
        if r.engine == "transformers":
            assert r.overhead_fraction is None
        else:
            assert 0 <= r.overhead_fraction < 1
        assert r.peak_rss_bytes > 0
    by = {(r.engine, r.batch): r for r in report.results}
    for ratio in report.ratios:
        ours, hf = by[(ratio["engine"], ratio["batch"])], by[("transformers", ratio["batch"])]
        assert ratio["decode_tokens_per_s_ratio"] == pytest.approx(ours.decode_tokens_per_s / hf.decode_tokens_per_s)
        assert ratio["ttft_speedup"] == pytest.approx(hf.ttft_ms / ours.ttft_ms)
    assert len(report.ratios) == 4
    # the portable and the fast path see the same eos-free workload: same tokens
    assert all(v for k, v in report.outputs_identical.items() if "ort-fast" in k and "transformers" not in k)
    data = json.loads(out_json.read_text())
    assert data["versions"]["onnxruntime"] and data["versions"]["transformers"]
    assert data["machine"]["cpu_count"] >= 1 and data["package_bytes"] > 0
    assert png.stat().st_size > 1000
    assert "| engine |" in markdown(report, "llava-edge bench ...")


def test_bad_arguments(package):
    with pytest.raises(BenchmarkError, match="unknown backend"):
        run_benchmark(package, backend="ort-magic", console=False, new_tokens=2, repeat=1)
    with pytest.raises(BenchmarkError, match="tensorrt"):
        run_benchmark(package, backend="tensorrt", console=False, new_tokens=2, repeat=1)
    with pytest.raises(BenchmarkError, match="baseline"):
        run_benchmark(package, baseline="llama.cpp", console=False, new_tokens=2, repeat=1)


def test_text_only_benchmark_with_transformers_baseline(package, tiny_models):
    """--no-image --baseline transformers: no pixels reach either side, and both decode the same tokens."""
    report = run_benchmark(package, backend="ort", batch=[1], prompt_len=[8], new_tokens=4,
                           baseline="transformers", checkpoint=tiny_models["llava-hf-gqa"]["checkpoint"],
                           repeat=1, warmup=0, threads=1, with_image=False, console=False)
    assert [r.engine for r in report.results] == ["ort", "transformers"]
    assert all(r.vision_ms == 0 for r in report.results)
    assert report.outputs_identical == {"batch=1,prompt=8:ort==transformers": True}
