"""One tiny exported package for the TensorRT tests (a single preset keeps this folder fast on 2 CPUs)."""

from __future__ import annotations

import pytest


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


def have_tensorrt_gpu() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable, cuda-python importable and a CUDA GPU visible."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt is not installed (optional extra; not installable on CI, see ARCHITECTURE.md)"
    try:
        from llava_edge.runtime.trt_backend import gpu_info

        gpu_info(0)
    except Exception as e:  # noqa: BLE001 - any reason means skip
        return False, f"no usable CUDA GPU for TensorRT: {e}"
    return True, ""
