"""The engine record: refusing engines from another TensorRT, GPU or package; clear errors without TensorRT."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llava_edge.package import load_manifest
from llava_edge import trt_env
from llava_edge.contract import (
    ENGINES_DIR, RECORD_FORMAT, RECORD_NAME, EngineFile, EngineMismatchError, EngineRecord, check_engine_record,
)
from llava_edge.runtime.trt_backend import TrtBackend
from llava_edge.trt_env import TensorRTUnavailable


def _record(manifest, **kw) -> EngineRecord:
    engines = {n: EngineFile(file=f"engines/{n}.plan", onnx_file=g.file, onnx_size_bytes=g.size_bytes, size_bytes=10,
                             precision=manifest.dtype) for n, g in manifest.graphs.items()}
    base = dict(format_version=RECORD_FORMAT, tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7",
                target="orin-nano", limits={"max_batch": 1}, attention="standard", plugins=[], strongly_typed=True,
                kv_cache="ping-pong", engines=engines)
    base.update(kw)
    return EngineRecord(**base)


def test_matching_record_passes_and_round_trips(trt_package):
    m = load_manifest(trt_package)
    rec = _record(m)
    assert check_engine_record(rec, m, "10.3.0.30", "Orin", "8.7") == []
    again = EngineRecord.from_dict(json.loads(rec.to_json()))
    assert again == rec


@pytest.mark.parametrize("trt,gpu,cc,match", [
    ("10.3.0.26", "Orin", "8.7", "TensorRT 10.3.0.30 but this is TensorRT 10.3.0.26"),
    ("11.4.0", "Orin", "8.7", "only load in the release that built them"),
    ("10.3.0.30", "NVIDIA H100 80GB HBM3", "9.0", "compute capability 8.7"),
    ("10.3.0.30", "NVIDIA Jetson AGX Orin", "8.7", "LLAVA_EDGE_TRT_ALLOW_GPU_MISMATCH"),
])
def test_mismatches_are_refused(trt_package, trt, gpu, cc, match):
    m = load_manifest(trt_package)
    with pytest.raises(EngineMismatchError, match=match):
        check_engine_record(_record(m), m, trt, gpu, cc)


def test_gpu_name_mismatch_can_be_allowed(trt_package):
    m = load_manifest(trt_package)
    warnings = check_engine_record(_record(m), m, "10.3.0.30", "Orin (nvgpu)", "8.7", allow_gpu_mismatch=True)
    assert len(warnings) == 1 and "built on Orin" in warnings[0]


def test_stale_or_missing_engines_are_refused(trt_package, tmp_path):
    m = load_manifest(trt_package)
    rec = _record(m)
    rec.engines["decoder"].onnx_size_bytes += 1
    with pytest.raises(EngineMismatchError, match="re-exported or re-quantized"):
        check_engine_record(rec, m, "10.3.0.30", "Orin", "8.7")
    rec = _record(m)
    with pytest.raises(EngineMismatchError, match="missing or truncated"):
        check_engine_record(rec, m, "10.3.0.30", "Orin", "8.7", package_dir=tmp_path)
    del rec.engines["embed"]
    with pytest.raises(EngineMismatchError, match="no 'embed' engine"):
        check_engine_record(rec, m, "10.3.0.30", "Orin", "8.7")


def test_record_load_errors(tmp_path):
    with pytest.raises(EngineMismatchError, match="llava-edge build"):
        EngineRecord.load(tmp_path)
    (tmp_path / ENGINES_DIR).mkdir()
    (tmp_path / ENGINES_DIR / RECORD_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(EngineMismatchError, match="format 99"):
        EngineRecord.load(tmp_path)


def test_backend_without_tensorrt_is_a_clear_error(trt_package, tensorrt_missing):
    if not tensorrt_missing:
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be tested")
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed.*--backend ort"):
        TrtBackend(trt_package, load_manifest(trt_package))


def test_missing_gpu_is_a_clear_error(monkeypatch):
    """A cuda-python that sees no device -> TensorRTUnavailable naming the reason."""
    class FakeCudart:
        @staticmethod
        def cudaGetDeviceCount():
            return 100, 0  # cudaErrorNoDevice

    monkeypatch.setattr(trt_env, "import_cudart", lambda: FakeCudart)
    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU is visible"):
        trt_env.gpu_info(0)


def test_importing_the_backend_imports_neither_tensorrt_nor_cuda():
    code = ("import sys, llava_edge.runtime.trt_backend, llava_edge.trt.builder, llava_edge.trt.presets; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('tensorrt','cuda','torch','transformers')]; "
            "print(bad); assert not [m for m in bad if not m.startswith(('torch','transformers'))] ; "
            "import llava_edge.runtime.trt_backend as t; assert 'torch' not in sys.modules or True")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the runtime module itself must not pull torch (the builder may, via onnx only — checked here too)
    code2 = ("import sys, llava_edge.runtime.trt_backend; "
             "assert not any(m.split('.')[0] in ('torch','transformers','tensorrt','cuda') for m in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
