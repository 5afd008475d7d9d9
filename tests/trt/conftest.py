"""One tiny exported package for the TensorRT tests (a single preset keeps this folder fast on 2 CPUs).

The folder is tests/trt, not tests/tensorrt: the root conftest puts tests/ on sys.path, so a folder
named tensorrt there becomes an importable (empty) namespace package `tensorrt` whenever the real one is
not installed, and `importlib.util.find_spec("tensorrt")` checks elsewhere in the suite would be fooled.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def tensorrt_missing() -> bool:
    """True when no real TensorRT can be imported (the error-message tests need that)."""
    from llava_edge.runtime.trt_backend import TensorRTUnavailable, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable:
        return True
    return False


@pytest.fixture(scope="session")
def trt_package(tmp_path_factory):
    """A tiny GQA LLaVA package (fp32): structure-true graphs for the checker, profiles and the builder."""
    import torch

    from llava_edge.export.exporter import export_package
    from llava_edge.export.factory import build_checkpoint

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("trt")
    build_checkpoint(root / "checkpoint", "llava-hf-gqa")
    export_package(root / "checkpoint", root / "package")
    return root / "package"


@pytest.fixture(scope="session")
def trt_gpu() -> None:
    """Skip (with the reason) unless a real TensorRT, cuda-python and a CUDA GPU are all present."""
    from llava_edge.runtime.trt_backend import TensorRTUnavailable, gpu_info, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        pytest.skip(f"needs NVIDIA TensorRT (optional extra; not installable on CI or the H200 test machine, "
                    f"see shared/ARCHITECTURE.md): {e}")
    try:
        gpu_info(0)
    except Exception as e:  # noqa: BLE001 - any reason means skip, with the reason
        pytest.skip(f"needs a CUDA GPU for TensorRT: {e}")
