"""The record TensorRT engines are saved with (``engines/engines.json``) and the check that refuses
engines built for another TensorRT release, GPU or package.

Why its own module: the builder writes it and the backend reads it, and neither side needs TensorRT
for it (the CPU tests check refusals without a GPU); ``trt_backend`` re-exports these names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..package import Manifest
from .ort_backend import BackendError

ENGINES_DIR = "engines"
RECORD_NAME = "engines.json"
RECORD_FORMAT = 1
ENGINE_GRAPHS = ("vision", "embed", "decoder")
ALLOW_GPU_MISMATCH_ENV = "LLAVA_EDGE_TRT_ALLOW_GPU_MISMATCH"

__all__ = ["ENGINES_DIR", "RECORD_NAME", "RECORD_FORMAT", "ENGINE_GRAPHS", "ALLOW_GPU_MISMATCH_ENV", "EngineFile",
           "EngineRecord", "EngineMismatchError", "check_engine_record"]


class EngineMismatchError(BackendError):
    """The package's engines were built for another TensorRT, GPU or package contents."""


@dataclass
class EngineFile:
    file: str  # relative to the package
    onnx_file: str
    onnx_size_bytes: int  # the graph's size in the manifest at build time (detects re-export / re-quantize)
    size_bytes: int
    precision: str  # "float16", "float32", "int4+float16"
    profiles: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EngineRecord:
    """What the engines were built with and for. Written last by the builder (engines/engines.json)."""

    format_version: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    target: str
    limits: dict[str, Any]  # max_batch, max_context, max_images, max_prompt, workspace_gb
    attention: str  # "standard" | "plugin" | "trt-attention"
    plugins: list[str]
    strongly_typed: bool
    kv_cache: str  # "ping-pong" (portable decoder graph) | "in-place" (static-cache graph, export/static_decoder)
    engines: dict[str, EngineFile]
    memory: dict[str, Any] = field(default_factory=dict)
    built_at: str = ""
    llava_edge_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EngineRecord":
        if d.get("format_version") != RECORD_FORMAT:
            raise EngineMismatchError(f"engine record format {d.get('format_version')!r} is not {RECORD_FORMAT}; "
                                      "rebuild the engines with this llava-edge (llava-edge build)")
        d = dict(d)
        d["engines"] = {k: EngineFile(**v) for k, v in d["engines"].items()}
        try:
            return EngineRecord(**d)
        except TypeError as e:
            raise EngineMismatchError(f"engine record is malformed: {e}") from e

    @staticmethod
    def load(package_dir: str | os.PathLike) -> "EngineRecord":
        path = Path(package_dir) / ENGINES_DIR / RECORD_NAME
        if not path.is_file():
            raise EngineMismatchError(f"{package_dir} has no TensorRT engines ({ENGINES_DIR}/{RECORD_NAME} missing): "
                                      f"run `llava-edge build {package_dir}` on the target device first")
        try:
            return EngineRecord.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError) as e:
            raise EngineMismatchError(f"{path} is not a valid engine record: {e}") from e


def _version_tuple(v: str) -> tuple[int, ...]:
    from ..kernels.trt_plugins import parse_trt_version

    return parse_trt_version(v)


def check_engine_record(record: EngineRecord, manifest: Manifest, tensorrt_version: str, gpu_name: str,
                        compute_capability: str, package_dir: str | os.PathLike | None = None,
                        allow_gpu_mismatch: bool = False) -> list[str]:
    """Refuse engines that cannot (or should not) run here; return warnings for the tolerable cases.

    * TensorRT version: a plan is only valid for the exact TensorRT release that built it (we build
      without the version-compatible flag, which costs performance and excludes plugins' fast paths).
    * Compute capability: the plan holds kernels for one SM architecture.
    * GPU name: same architecture but another model (e.g. built on AGX Orin, run on Orin Nano) loads,
      but tactics were timed on different hardware. Refused unless ``allow_gpu_mismatch`` (or the
      environment variable LLAVA_EDGE_TRT_ALLOW_GPU_MISMATCH=1): building a 7B on an 8 GB Nano may not
      fit, and building on a bigger Orin with the same JetPack is the documented way round.
    * Package contents: each graph must still have the size it had when its engine was built.
    """
    rebuild = "rebuild them here with `llava-edge build PKG`"
    if _version_tuple(record.tensorrt_version) != _version_tuple(tensorrt_version):
        raise EngineMismatchError(
            f"engines were built with TensorRT {record.tensorrt_version} but this is TensorRT {tensorrt_version}; "
            f"TensorRT plans only load in the release that built them: {rebuild}")
    if record.compute_capability != compute_capability:
        raise EngineMismatchError(
            f"engines were built for compute capability {record.compute_capability} ({record.gpu_name}) but this GPU "
            f"is {gpu_name} (compute capability {compute_capability}): {rebuild}")
    warnings: list[str] = []
    if record.gpu_name != gpu_name:
        msg = (f"engines were built on {record.gpu_name} but this GPU is {gpu_name} (same compute capability "
               f"{compute_capability})")
        if not allow_gpu_mismatch:
            raise EngineMismatchError(f"{msg}; {rebuild}, or set {ALLOW_GPU_MISMATCH_ENV}=1 to run them anyway "
                                      "(tactics were timed on the other GPU)")
        warnings.append(msg)
    for name in ENGINE_GRAPHS:
        if name not in record.engines:
            raise EngineMismatchError(f"engine record has no '{name}' engine; {rebuild}")
        ef = record.engines[name]
        graph = manifest.graphs.get(name)
        if graph is None or graph.file != ef.onnx_file or graph.size_bytes != ef.onnx_size_bytes:
            raise EngineMismatchError(
                f"the '{name}' engine was built from {ef.onnx_file} ({ef.onnx_size_bytes} bytes) but the package now "
                f"has {graph.file if graph else 'no such graph'} ({graph.size_bytes if graph else 0} bytes): the package "
                f"was re-exported or re-quantized after the build; {rebuild}")
        if package_dir is not None:
            path = Path(package_dir) / ef.file
            if not path.is_file() or path.stat().st_size != ef.size_bytes:
                raise EngineMismatchError(f"engine file {path} is missing or truncated; {rebuild}")
    return warnings
