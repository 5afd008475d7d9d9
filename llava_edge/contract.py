"""The engine contract: the one place that names what the builder writes and the runtime binds.

Binding names, KV-layout names, optimization-profile indices, the engine record
(``engines/engines.json``) and the TensorRT version policy. ``trt/`` and ``runtime/`` both import it;
it imports neither TensorRT nor CUDA, so the CPU tests check every refusal. See docs/architecture.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import BackendError, UsageError
from .package import Manifest

# -- engine files ------------------------------------------------------------------------------------
ENGINES_DIR = "engines"
RECORD_NAME = "engines.json"
RECORD_FORMAT = 1
ENGINE_GRAPHS = ("vision", "embed", "decoder")
ALLOW_GPU_MISMATCH_ENV = "LLAVA_EDGE_TRT_ALLOW_GPU_MISMATCH"

# -- KV layouts: EngineRecord.kv_cache values, plus the plugin binding mode ----------------------------
KV_INPLACE = "in-place"  # static-cache decoder graph: one buffer per layer k/v, new.{i}.* scattered in
KV_PINGPONG = "ping-pong"  # portable decoder graph: two slabs swapped every step
KV_PLUGIN = "plugin"  # record attention "plugin" (kv_cache stays in-place): caches bound as past and present
KV_LAYOUTS = (KV_INPLACE, KV_PINGPONG)  # what `llava-edge build --kv-cache` accepts

# -- optimization profiles of every decoder engine -----------------------------------------------------
PREFILL_PROFILE, DECODE_PROFILE = 0, 1

# -- binding names --------------------------------------------------------------------------------------
PIXEL_VALUES, IMAGE_FEATURES = "pixel_values", "image_features"  # vision engine
INPUT_IDS, INPUTS_EMBEDS = "input_ids", "inputs_embeds"  # embed engine (inputs_embeds also feeds the decoder)
ATTENTION_MASK, POSITION_IDS, LOGITS = "attention_mask", "position_ids", "logits"
PROMPT_LENS, START_POS = "prompt_lens", "start_pos"  # plugin decoder instead of mask / positions


def past_names(num_layers: int) -> list[str]:
    """The decoder's cache inputs, k then v of each layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def kv_out_names(num_layers: int, layout: str) -> list[str]:
    """The decoder's cache outputs: this step's k/v (in-place) or the whole present (ping-pong, plugin)."""
    out = "new" if layout == KV_INPLACE else "present"
    return [f"{out}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# -- TensorRT version policy ------------------------------------------------------------------------------
PLUGIN_NAMESPACE = "llava_edge"
# The parser keys on op_type + plugin_namespace; a custom domain keeps the graph valid ONNX (the checker
# rejects unknown ops in the default domain). "trt.plugins" is the domain onnxruntime's TensorRT EP uses
# for TensorRT plugin nodes.
ONNX_DOMAIN = "trt.plugins"

# Input / output order of each plugin node (= the kernels' pointer parameter order). Outputs named
# "<x>_out" alias input "<x>": the caller binds one buffer to both (in-place cache / scratch).
PLUGIN_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "decode_attention": (
        ("q", "k", "v", "seq_lens", "cos", "sin", "k_cache", "v_cache", "partial_o", "partial_ml", "counters"),
        ("out", "k_cache_out", "v_cache_out", "partial_o_out", "partial_ml_out", "counters_out"),
    ),
    "prefill_attention": (
        ("q", "k", "v", "prompt_lens", "start_pos", "cos", "sin", "k_cache", "v_cache"),
        ("out", "k_cache_out", "v_cache_out"),
    ),
    "int4_matmul": (("x", "qweight", "scales"), ("y",)),
}

AttentionImpl = Literal["plugin", "trt-attention", "standard"]
AOT_MIN = (10, 9)
NATIVE_KV_MIN = (10, 15)


def parse_trt_version(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)`` (``tensorrt.__version__`` or a manifest string)."""
    parts = []
    for p in version.strip().split("."):
        if not p.isdigit():  # "10.9.0.post1", "10.15.0rc1": stop at the first non-numeric part
            digits = p[: len(p) - len(p.lstrip("0123456789"))]
            if digits:
                parts.append(int(digits))
            break
        parts.append(int(p))
    if not parts:
        raise UsageError(f"not a TensorRT version: {version!r}")
    return tuple(parts)


def attention_impl_for(trt_version: tuple[int, ...], prefer_native: bool = False) -> AttentionImpl:
    """How the exporter should express decoder attention for a target TensorRT version.

    * ``"standard"`` below 10.9: no AOT plugins (10.6-10.8 only have Python-callback plugins, which
      would tie the engine to a Python interpreter; JetPack 6 / TRT 10.3 has none at all).
    * ``"plugin"`` from 10.9: our fused AOT Triton plugins.
    * ``"trt-attention"`` from 10.15 when ``prefer_native``: TensorRT's own KV-cache attention layers
      (ONNX Attention / RotaryEmbedding / TensorScatter import); opt-in until measured to be faster.
    """
    v = tuple(trt_version) + (0,) * (2 - len(trt_version))
    if v < AOT_MIN:
        return "standard"
    if prefer_native and v >= NATIVE_KV_MIN:
        return "trt-attention"
    return "plugin"


# -- the engine record ---------------------------------------------------------------------------------
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
    attention: str  # AttentionImpl: "standard" | "plugin" | "trt-attention"
    plugins: list[str]
    strongly_typed: bool
    kv_cache: str  # KV_INPLACE | KV_PINGPONG
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
    if parse_trt_version(record.tensorrt_version) != parse_trt_version(tensorrt_version):
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
                f"has {graph.file if graph else 'no such graph'} ({graph.size_bytes if graph else 0} bytes): the "
                f"package was re-exported or re-quantized after the build; {rebuild}")
        if package_dir is not None:
            path = Path(package_dir) / ef.file
            if not path.is_file() or path.stat().st_size != ef.size_bytes:
                raise EngineMismatchError(f"engine file {path} is missing or truncated; {rebuild}")
    return warnings
