"""Shared fixtures: tiny checkpoints in each layout and their exported packages, built once per run."""

from __future__ import annotations

import os

import numpy as np
import pytest

# One OpenMP thread for torch here and in the subprocesses the tests start. The tests' models are tiny, so
# a second thread buys little, and OpenMP's spinning barrier makes every op wait for a time slice whenever
# the other core is busy (a server under test, a second process): a 40x256 linear took 0.06 ms on one
# thread and 2.6-4.2 ms on two with one other busy process, which made tests/synthetic/test_checkpoint.py
# 218 s instead of 20 s. torch reads the variable when it is imported (below).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton kernels run in Triton's CPU interpreter when there is no GPU. TRITON_INTERPRET must be set
# before ``triton.jit`` decorates them (before ``llava_edge.kernels.*`` is imported): here, at import.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No test folder may be named like an optional package (tests/ is on sys.path: a folder "tensorrt" would
# be an importable namespace package and fool ``importlib.util.find_spec("tensorrt")``).

PRESETS = ["llava-hf-v1.5", "llava-hf-gqa", "original-v1"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, dict]:
    """preset -> {"checkpoint": dir, "package": dir, "model": the LlavaForConditionalGeneration written}."""
    from llava_edge.export.exporter import export_package
    from llava_edge.export.factory import build_checkpoint

    root = tmp_path_factory.mktemp("models")
    out = {}
    for preset in PRESETS:
        ckpt = root / preset / "checkpoint"
        model, spec = build_checkpoint(ckpt, preset)
        pkg = root / preset / "package"
        export_package(ckpt, pkg)
        out[preset] = {"checkpoint": ckpt, "package": pkg, "model": model, "spec": spec}
    return out


@pytest.fixture(scope="session")
def gqa_fast_package(tiny_models, tmp_path_factory):
    """The GQA tiny model's package plus its fast (GroupQueryAttention) decoder, built once; read-only."""
    import shutil

    from llava_edge.export.fast_decoder import export_fast_decoder

    pkg = tmp_path_factory.mktemp("gqa_fast") / "pkg"
    shutil.copytree(tiny_models["llava-hf-gqa"]["package"], pkg)
    export_fast_decoder(tiny_models["llava-hf-gqa"]["checkpoint"], pkg)
    return pkg


@pytest.fixture(scope="session")
def images():
    """Real-world-like odd inputs: portrait, landscape, grayscale, RGBA, tiny, palette."""
    from PIL import Image

    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 97 * 41 * 3).reshape(97, 41, 3).astype(np.uint8)
    return {
        "portrait": Image.fromarray(gradient),
        "landscape": Image.fromarray(rng.integers(0, 255, (33, 120, 3), dtype=np.uint8)),
        "grayscale": Image.fromarray(rng.integers(0, 255, (50, 51), dtype=np.uint8)),
        "rgba": Image.fromarray(rng.integers(0, 255, (40, 61, 4), dtype=np.uint8)),
        "tiny": Image.fromarray(rng.integers(0, 255, (3, 5, 3), dtype=np.uint8)),
        "palette": Image.fromarray(rng.integers(0, 255, (45, 45, 3), dtype=np.uint8)).convert("P"),
    }


@pytest.fixture(scope="session")
def plugin_package(tmp_path_factory):
    """A tiny GQA package (4 heads, 2 kv heads) with head_dim 32: the smallest the attention kernels take
    (the other tiny presets have head_dim 16). For the plugin-attention decoder graph tests."""
    from llava_edge.export.exporter import export_package
    from llava_edge.export.factory import TinySpec, build_checkpoint

    root = tmp_path_factory.mktemp("plugin")
    spec = TinySpec(hidden=128, heads=4, kv_heads=2, intermediate=128, pad_to_square=False, seed=5)
    build_checkpoint(root / "checkpoint", spec)
    export_package(root / "checkpoint", root / "package")
    return root / "package"


# -- TensorRT: one tiny package, and the real-TensorRT gates -----------------------------------------
@pytest.fixture
def tensorrt_missing() -> bool:
    """True when no real TensorRT can be imported (the error-message tests need that)."""
    from llava_edge.trt_env import TensorRTUnavailable, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable:
        return True
    return False


@pytest.fixture(scope="session")
def trt_package(tmp_path_factory):
    """A tiny GQA LLaVA package (fp32): structure-true graphs for the checker, profiles and the builder."""
    from llava_edge.export.exporter import export_package
    from llava_edge.export.factory import build_checkpoint

    root = tmp_path_factory.mktemp("trt")
    build_checkpoint(root / "checkpoint", "llava-hf-gqa")
    export_package(root / "checkpoint", root / "package")
    return root / "package"


@pytest.fixture(scope="session")
def trt_gpu() -> None:
    """Skip (with the reason) unless a real TensorRT, cuda-python and a CUDA GPU are all present."""
    from llava_edge.trt_env import TensorRTUnavailable, gpu_info, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        pytest.skip(f"needs NVIDIA TensorRT (optional extra `llava-edge[tensorrt]`, or JetPack's): {e}")
    try:
        gpu_info(0)
    except Exception as e:  # noqa: BLE001 - any reason means skip, with the reason
        pytest.skip(f"needs a CUDA GPU for TensorRT: {e}")


# The longest files first. The README's command gives each pytest-xdist worker whole files, in collection
# order; a long file handed out last becomes the tail of the run while the other worker idles (longest job
# first is the usual list-scheduling rule). Measured per file with --durations=0 on 2 cores; a file missing
# from the list keeps its place after these.
LONGEST_FIRST = ("tests/serve/test_ray.py", "tests/synthetic/test_train.py", "tests/export/test_checkpoint.py",
                 "tests/serve/test_kiosk.py", "tests/robust/test_safe_output.py", "tests/export/test_targets.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep order
