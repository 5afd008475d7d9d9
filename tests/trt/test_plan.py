"""plan_build / build_engines without TensorRT: what is refused early and what a dry run plans."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from llava_edge.trt.builder import build_engines
from llava_edge.trt.plan import EngineBuildError, plan_build
from llava_edge.trt.presets import PRESETS
from llava_edge.package import load_manifest
from llava_edge.trt_env import TensorRTUnavailable


def test_dry_run_plan(trt_package):
    stages = []
    res = build_engines(trt_package, target="orin-nano", dry_run=True, on_stage=stages.append)
    p = res.plan
    assert not res.built and res.record is None
    assert p.trt_version == (10, 3) and p.attention == "standard" and p.attention_policy == "standard"
    assert p.memory.fits and p.limits.max_context == 256  # capped at the tiny model's context
    assert set(p.profiles) == {"vision", "embed", "decoder"}
    assert [x.name for x in p.profiles["decoder"]] == ["prefill", "decode"]
    assert any("fp32" in n for n in p.notes)  # fp32 package -> fp32 engines, said out loud
    assert any(s.startswith("plan") for s in stages)
    assert not (trt_package / "engines").exists()


def test_attention_policy_follows_version(trt_package):
    p = plan_build(trt_package, "10.9.0", "orin-agx")
    assert p.attention_policy == "plugin" and p.attention == "standard"
    assert any("plugin attention not possible" in n for n in p.notes)  # head_dim 16: below the kernels' 32


def test_plugins_on_needs_aot_capable_trt(trt_package):
    with pytest.raises(EngineBuildError, match="needs TensorRT >= 10.9"):
        plan_build(trt_package, "10.3.0.30", "orin-nano", plugins="on")
    with pytest.raises(EngineBuildError, match="auto, on or off"):
        plan_build(trt_package, "10.3", "orin-nano", plugins="maybe")


def test_refuses_old_trt_unknown_target_and_wrong_gpu(trt_package):
    with pytest.raises(EngineBuildError, match="too old"):
        plan_build(trt_package, "8.6.1", "orin-nano")
    with pytest.raises(EngineBuildError, match="unknown target"):
        plan_build(trt_package, "10.3", "orin-max")
    with pytest.raises(EngineBuildError, match="only on the architecture"):
        plan_build(trt_package, "10.15", "orin-nano", gpu_name="NVIDIA H100 80GB HBM3", gpu_compute_capability="9.0")
    with pytest.raises(EngineBuildError, match="needs a GPU"):
        plan_build(trt_package, "10.15", "auto")


def test_matmulnbits_package_is_refused_with_the_fix(trt_package):
    m = copy.deepcopy(load_manifest(trt_package))
    m.quantization = {"format": "matmulnbits", "bits": 4}
    with pytest.raises(EngineBuildError, match="--format qdq"):
        plan_build(trt_package, "10.15", "datacenter", manifest=m)
    m.quantization = {"format": "qdq", "bits": 4}
    assert plan_build(trt_package, "10.15", "datacenter", manifest=m).precision["decoder"] == "int4+float32"


def test_memory_fit_reduces_context_or_refuses(trt_package):
    m = load_manifest(trt_package)
    weights = sum(m.graphs[g].size_bytes for g in ("vision", "embed", "decoder"))
    # usable memory = weights + overhead + workspace + a little: the context must shrink
    tight = replace(PRESETS["orin-nano"], name="tight", runtime_overhead_gb=0.0, workspace_gb=0.0,
                    usable_gb=(weights + 3_000_000) / (1 << 30))  # ~128 tokens of this tiny model
    p = plan_build(trt_package, "10.3", tight)
    assert p.memory.fits and p.limits.max_context == 128 and any("context reduced" in n for n in p.notes)
    with pytest.raises(EngineBuildError, match="does not fit"):  # an explicit context is not silently changed
        plan_build(trt_package, "10.3", tight, max_context=256)
    hopeless = replace(tight, usable_gb=weights / 2 / (1 << 30))
    with pytest.raises(EngineBuildError, match="does not fit"):
        plan_build(trt_package, "10.3", hopeless)


def test_cli_overrides_reach_profiles(trt_package):
    p = plan_build(trt_package, "10.15", "datacenter", max_batch=2, max_context=128, max_images=2, workspace_gb=0.5)
    assert (p.limits.max_batch, p.limits.max_context, p.limits.max_images, p.limits.workspace_gb) == (2, 128, 2, 0.5)
    assert p.profiles["decoder"][1].shapes["attention_mask"][2] == (2, 128 + 1)  # whole cache + the new token
    assert p.profiles["decoder"][1].shapes["past_key_values.0.key"][2][::2] == (2, 128)
    pp = plan_build(trt_package, "10.15", "datacenter", max_batch=2, max_context=128, kv_cache="ping-pong")
    assert pp.profiles["decoder"][1].shapes["attention_mask"][2] == (2, 128) and pp.kv_cache == "ping-pong"
    assert p.profiles["vision"][0].shapes["pixel_values"][2][0] == 4


def test_build_without_tensorrt_says_so(trt_package, tensorrt_missing):
    if not tensorrt_missing:
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be tested")
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build_engines(trt_package, target="orin-nano")
    assert not any(p.name.startswith(".engines") for p in trt_package.iterdir())  # nothing left behind
    with pytest.raises(EngineBuildError, match="needs --target"):
        build_engines(trt_package, dry_run=True)


def test_in_place_is_the_default_and_checks_the_static_decoder(trt_package):
    import onnx

    from llava_edge.trt.builder import _engine_source

    p = plan_build(trt_package, "10.3", "orin-nano")
    assert p.kv_cache == "in-place" and "KV cache in-place" in p.describe()
    assert p.memory.kv_layout == "in-place" and p.memory.kv_buffers == 1
    assert p.checks["decoder"].ok
    with pytest.raises(EngineBuildError, match="kv_cache must be"):
        plan_build(trt_package, "10.3", "orin-nano", kv_cache="paged")
    # the decoder engine's source: the static variant next to decoder.onnx during the build, gone after
    with _engine_source(trt_package, "decoder.onnx", "static") as src:
        assert src.parent == trt_package and src.name.startswith(".")
        outs = [o.name for o in onnx.load(str(src), load_external_data=False).graph.output]
        assert outs[0] == "logits" and outs[1] == "new.0.key"
    assert not src.exists()
    with _engine_source(trt_package, "decoder.onnx", "portable") as src:
        assert src == trt_package / "decoder.onnx"
