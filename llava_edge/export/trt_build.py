"""`llava-edge build`: a model package -> TensorRT engines (vision, embed, decoder) inside the package.

Two halves:

* :func:`plan_build` — pure, no TensorRT: resolves the target preset and limits, checks every graph
  against the ONNX ops of the TensorRT version (``trt_ops``), picks the attention path
  (``kernels.trt_plugins.attention_impl_for``), sizes the optimization profiles (``trt_presets``) and
  checks the memory budget, shrinking the context to fit when the user did not ask for one. Tested on
  CPU; also what ``build_engines(..., dry_run=True)`` returns on a machine without TensorRT.
* :func:`build_engines` — the TensorRT part, with the ``tensorrt`` Python API (no polygraphy: one
  fewer dependency on Jetson, and we need the progress monitor and timing cache directly):
  ``Builder.create_network(1 << STRONGLY_TYPED)`` — TensorRT 11 requires strongly typed networks and
  ignores the flag, 10.x accepts it ("NetworkDefinitionCreationFlag", TensorRT Python API docs
  10.x and 11.0); precision therefore comes from the ONNX (fp16 package -> fp16 engine, INT4
  DequantizeLinear -> INT4 weights) and no FP16 builder flag is set. ``OnnxParser.parse_from_file``
  (reads external data next to the file), ``IBuilderConfig.set_memory_pool_limit(WORKSPACE)``,
  ``IOptimizationProfile.set_shape`` per profile, ``IBuilderConfig.create_timing_cache / set_timing_cache
  / get_timing_cache().serialize()`` for timing-cache reuse, ``IProgressMonitor`` (TensorRT >= 10.0)
  for progress, an ``ILogger`` writing ``engines/build.log``.

The decoder engine is built from a variant of the package's decoder, derived at build time from
``decoder.onnx`` into a temporary file next to it (it shares the decoder's external weights) and
deleted afterwards; the portable graph stays as it is for onnxruntime:
* TensorRT >= 10.9 with ``--plugins auto`` (default) or ``on``: the plugin-attention graph
  (``export/plugin_decoder.py``: our ``prefill_attention`` AOT Triton plugin per layer, caches as input
  + aliased output); the record says ``attention: "plugin"``, ``kv_cache: "in-place"`` and the runtime
  binds it with ``runtime/trt_plugin_kv.py``. ``auto`` falls back to the next graph (with a note) when
  the kernels cannot take the model (head_dim not a power of two >= 32).
* otherwise (TensorRT 10.3 = JetPack 6, ``--plugins off``): the static-cache standard-op graph
  (``export/static_decoder.py``: the whole KV cache in, this step's k/v out); the record says
  ``attention: "standard"``, ``kv_cache: "in-place"``.
Both keep one cache buffer at run time and capture decode steps in CUDA graphs.
``kv_cache="ping-pong"`` builds the portable graph as before (two cache buffers, no graphs).

Engines are written to a staging directory inside the package and renamed to ``engines/`` only when
all three built, with ``engines/engines.json`` (the record the runtime checks) written last; an
interrupted build never leaves engines that look valid.

NOT run against a real TensorRT in this repository (none is installable here or on the test GPU
machine, see shared/ARCHITECTURE.md): the TensorRT calls follow the documented API and are covered by
tests that skip without TensorRT + a GPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from .. import __version__
from ..kernels.trt_plugins import AOT_MIN, ONNX_DOMAIN, AttentionImpl, attention_impl_for, parse_trt_version
from ..package import Manifest, load_manifest, replace_dir
from ..runtime.trt_backend import (
    ENGINE_GRAPHS, ENGINES_DIR, RECORD_FORMAT, RECORD_NAME, EngineFile, EngineRecord, gpu_info, import_tensorrt,
)
from . import trt_ops
from .plugin_decoder import PluginDecoderConfig, PluginDecoderError, make_plugin_decoder, write_plugin_decoder
from .static_decoder import StaticDecoderError, make_static_decoder, write_static_decoder
from .trt_presets import (
    GiB, KV_LAYOUTS, PRESETS, BuildLimits, MemoryBudget, ModelDims, Profile, TargetPreset, detect_target,
    estimate_memory, max_context_that_fits, plugin_decoder_profiles, prefill_tokens_per_pass, profile_shapes,
    resolve_limits,
)
from ..runtime import trt_backend as _runtime  # PLUGIN_ENGINES_RUNNABLE, read at plan time

Plugins = Literal["auto", "on", "off"]
BUILD_LOG = "build.log"
TIMING_CACHE = "timing.cache"
# TensorRT version a dry run assumes when none is given: what the target ships (JetPack 6 -> 10.3).
DRY_RUN_TRT = {"orin-agx": "10.3", "orin-nx": "10.3", "orin-nano": "10.3", "datacenter": "10.15"}

__all__ = ["EngineBuildError", "BuildPlan", "BuildResult", "plan_build", "build_engines"]


class EngineBuildError(Exception):
    """The package cannot be built for this target; the message says why and what to change."""


@dataclass
class BuildPlan:
    target: TargetPreset
    trt_version: tuple[int, ...]
    limits: BuildLimits
    profiles: dict[str, list[Profile]]
    attention_policy: AttentionImpl  # what this TensorRT version could use best
    attention: str  # what the package's decoder graph actually contains
    register_plugins: bool
    checks: dict[str, trt_ops.GraphCheck]
    memory: MemoryBudget
    precision: dict[str, str]
    kv_cache: str = "in-place"  # "in-place" (static-cache decoder graph) | "ping-pong" (portable graph)
    notes: list[str] = field(default_factory=list)
    # which graph the decoder engine is built from: "static" (static_decoder), "plugin" (plugin_decoder,
    # prefill kind), "portable" (ping-pong)
    decoder_graph: str = "static"

    def describe(self) -> str:
        v = ".".join(map(str, self.trt_version))
        lines = [f"target {self.target.name} ({self.target.description}), TensorRT {v}",
                 f"limits: batch {self.limits.max_batch}, context {self.limits.max_context}, images "
                 f"{self.limits.max_images}, prompt {self.limits.max_prompt}, workspace {self.limits.workspace_gb} GiB",
                 f"attention: {self.attention} (best for TensorRT {v}: {self.attention_policy}); KV cache "
                 f"{self.kv_cache}; decoder graph: {self.decoder_graph}",
                 f"precision: {', '.join(f'{k} {p}' for k, p in self.precision.items())}",
                 f"memory: {self.memory.describe()}"]
        lines += [c.describe() for c in self.checks.values()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class BuildResult:
    package_dir: Path
    plan: BuildPlan
    record: EngineRecord | None  # None for a dry run
    log_path: Path | None
    seconds: float
    built: bool


# ---------------------------------------------------------------------------------------- planning
def _resolve_target(target: str | TargetPreset, gpu_name: str | None, gpu_memory: int | None) -> TargetPreset:
    if isinstance(target, TargetPreset):
        return target
    if target == "auto":
        if gpu_name is None:
            raise EngineBuildError("--target auto needs a GPU to look at; name a target "
                                   f"({', '.join(PRESETS)}) for a dry run")
        return detect_target(gpu_name, gpu_memory)
    if target not in PRESETS:
        raise EngineBuildError(f"unknown target {target!r}; use auto or one of {', '.join(PRESETS)}")
    preset = PRESETS[target]
    if target == "datacenter" and gpu_memory:
        preset = replace(detect_target(gpu_name or "GPU", gpu_memory), name="datacenter")
    return preset


def _intermediate_size(model, hidden: int) -> int | None:
    """The MLP width from the decoder's up_proj initializer dims (structure only, no weights loaded)."""
    for init in model.graph.initializer:
        if "mlp.up_proj" in init.name or "mlp.gate_proj" in init.name:
            dims = [d for d in init.dims if d != hidden]
            if dims:
                return int(max(dims))
    return None


def _precision(manifest: Manifest, graph: str) -> str:
    q = manifest.quantization or {}
    if graph == "decoder" and q:
        return f"int{q.get('bits', 4)}+{manifest.dtype}"
    return manifest.dtype


def plan_build(package_dir: str | Path, trt_version: str | tuple[int, ...], target: str | TargetPreset = "auto",
               max_batch: int | None = None, max_context: int | None = None, max_images: int | None = None,
               workspace_gb: float | None = None, plugins: Plugins = "auto", gpu_name: str | None = None,
               gpu_memory: int | None = None, gpu_compute_capability: str | None = None,
               manifest: Manifest | None = None, kv_cache: str = "in-place") -> BuildPlan:
    """Everything about a build that does not need TensorRT; raises :class:`EngineBuildError` early
    for what would fail (or not fit) later. ``kv_cache="in-place"`` checks (and sizes for) the
    static-cache decoder derived from the package's decoder, in memory."""
    import onnx

    root = Path(package_dir)
    manifest = manifest or load_manifest(root)
    version = parse_trt_version(trt_version) if isinstance(trt_version, str) else tuple(trt_version)
    if version < (10, 0):
        raise EngineBuildError(f"TensorRT {'.'.join(map(str, version))} is too old: llava-edge needs >= 10.0 "
                               "(JetPack 6 ships 10.3)")
    if kv_cache not in KV_LAYOUTS:
        raise EngineBuildError(f"kv_cache must be one of {', '.join(KV_LAYOUTS)}, not {kv_cache!r}")
    if plugins not in ("auto", "on", "off"):
        raise EngineBuildError(f"--plugins must be auto, on or off, not {plugins!r}")
    preset = _resolve_target(target, gpu_name, gpu_memory)
    notes: list[str] = []
    if preset.compute_capability and gpu_compute_capability and preset.compute_capability != gpu_compute_capability:
        raise EngineBuildError(
            f"target {preset.name} is compute capability {preset.compute_capability} but this GPU ({gpu_name}) is "
            f"{gpu_compute_capability}: TensorRT engines run only on the architecture they were built on. Build on "
            "the device (or another Orin with the same JetPack), or use --target datacenter/auto here")
    if preset.unified_memory and version >= (11, 4):
        notes.append("TensorRT >= 11.4 supports Orin only on JetPack >= 7.2.2")
    q = manifest.quantization or {}
    if q and q.get("format") != "qdq":
        raise EngineBuildError(
            f"the decoder is quantized in format {q.get('format')!r} (onnxruntime MatMulNBits); TensorRT needs the "
            "standard DequantizeLinear form: re-run `llava-edge quantize ... --format qdq`")
    if q and q.get("bits") not in (4, None):
        raise EngineBuildError(f"{q.get('bits')}-bit block quantization: TensorRT takes INT4 block-quantized "
                               "weights only")
    if manifest.dtype == "float32":
        notes.append("the package is float32: strongly typed networks keep the ONNX precision, so the engines will be "
                     "fp32 (2x memory, slower); export with --dtype fp16 for fp16 engines")

    # which decoder graph: the plugin-attention graph where TensorRT can take AOT plugins (>= 10.9) and it
    # is asked for (--plugins on, or auto: the runtime backend binds plugin engines, trt_plugin_kv), else
    # the static-cache standard-op one (10.3, --plugins off, or a model the kernels cannot take)
    aot = version >= AOT_MIN
    if plugins == "on" and not aot:
        raise EngineBuildError(f"--plugins on needs TensorRT >= {AOT_MIN[0]}.{AOT_MIN[1]} (AOT Python plugins); "
                               f"this is {'.'.join(map(str, version))} (JetPack 6 = 10.3): use --plugins auto/off")
    if plugins == "on" and kv_cache != "in-place":
        raise EngineBuildError("--plugins on builds the plugin-attention decoder, which keeps one in-place cache; "
                               "it cannot be combined with --kv-cache ping-pong")
    want_plugin = kv_cache == "in-place" and aot and (plugins == "on" or (plugins == "auto" and _runtime.PLUGIN_ENGINES_RUNNABLE))
    missing = _missing_kernel_modules() if want_plugin and plugins == "auto" else []
    if missing:  # auto must not turn a working runtime-only install into a failing build
        want_plugin = False
        notes.append(f"plugin attention needs {', '.join(missing)} at build time (AOT-compiling the kernels: "
                     "pip install 'llava-edge[kernels]'); not installed, so standard ops are used")
    decoder_graph = "portable" if kv_cache == "ping-pong" else "static"

    # graphs against the parser of this TensorRT
    checks: dict[str, trt_ops.GraphCheck] = {}
    decoder_model = None
    for name in ENGINE_GRAPHS:
        graph = manifest.graphs[name]
        model = onnx.load(str(root / graph.file), load_external_data=False)
        if name == "decoder":
            decoder_model = model
            if want_plugin:
                try:
                    model = make_plugin_decoder(model, manifest.text.num_heads, manifest.text.num_kv_heads,
                                                manifest.text.head_dim, _plugin_config(manifest))
                    decoder_graph = "plugin"
                except PluginDecoderError as e:
                    if plugins == "on":
                        raise EngineBuildError(f"--plugins on: cannot make the plugin-attention decoder: {e}") from e
                    notes.append(f"plugin attention not possible for this decoder ({e}); standard ops used")
            if decoder_graph == "static":
                model = _static_decoder(model)
        allowed = plugins != "off" and aot
        checks[name] = trt_ops.check_model(model, name, version, fp8=preset.fp8, plugins_allowed=allowed)
    bad = [c.describe() for c in checks.values() if not c.ok]
    if bad:
        raise EngineBuildError("the package has graphs TensorRT "
                               f"{'.'.join(map(str, version))} cannot import:\n" + "\n".join(bad))

    # attention: what this version could do best vs what the decoder graph contains
    policy = attention_impl_for(version)
    dec_ops = checks["decoder"].op_counts
    if checks["decoder"].plugins:
        attention = "plugin"
    elif "Attention" in dec_ops or "TensorScatter" in dec_ops:
        attention = "trt-attention"
    else:
        attention = "standard"
    register = attention == "plugin" or (plugins == "on" and any(f"{ONNX_DOMAIN}::" in k for k in dec_ops))
    if (attention == "standard" and policy != "standard" and plugins == "auto" and decoder_graph != "plugin"
            and not _runtime.PLUGIN_ENGINES_RUNNABLE):
        notes.append(f"TensorRT {'.'.join(map(str, version))} could run our fused attention plugin; --plugins auto "
                     "keeps standard attention ops until the TensorRT runtime backend binds plugin engines "
                     "(--plugins on builds the plugin-attention decoder now)")
    if plugins == "on" and attention != "plugin":
        notes.append("--plugins on: plugins are registered but the decoder graph contains no plugin nodes")

    # limits, profiles, memory
    t = manifest.text
    inter = _intermediate_size(decoder_model, t.hidden_size) if decoder_model is not None else None
    dims = ModelDims.from_manifest(manifest, inter)
    weights = {n: manifest.graphs[n].size_bytes for n in ENGINE_GRAPHS}
    elt = 4 if manifest.dtype == "float32" else 2
    try:
        limits = resolve_limits(preset, t.max_context, manifest.vision.num_image_tokens, max_batch, max_context,
                                max_images, workspace_gb)
    except ValueError as e:
        raise EngineBuildError(str(e)) from e

    def budget(lim: BuildLimits) -> MemoryBudget:
        return estimate_memory(preset, dims, weights, lim.max_context, lim.max_batch, lim.max_prompt,
                               lim.workspace_gb, kv_layout=kv_cache, bytes_per_elem=elt)

    memory = budget(limits)
    if not memory.fits:
        fit = max_context_that_fits(preset, dims, weights, limits.max_batch,
                                    prefill_tokens=limits.max_images * dims.num_image_tokens + preset.prompt_text_tokens,
                                    workspace_gb=limits.workspace_gb, kv_layout=kv_cache, bytes_per_elem=elt)
        need = limits.max_images * dims.num_image_tokens + 64  # one prompt with its images + a short answer
        why = f"{memory.describe()}.\nLargest context that fits with the {kv_cache} KV cache: {fit} tokens"
        if kv_cache == "ping-pong":
            inplace = max_context_that_fits(preset, dims, weights, limits.max_batch, workspace_gb=limits.workspace_gb,
                                            kv_layout="in-place", bytes_per_elem=elt)
            why += f" (the in-place cache, the default, would allow {inplace})"
        why += "."
        if max_context is not None or fit < need:
            raise EngineBuildError(
                f"does not fit on {preset.name}: {why} A prompt with {limits.max_images} image(s) needs at least "
                f"{need}. Options: --max-context {fit if fit >= need else need}, --max-batch 1, smaller "
                "--workspace-gb, an int4 (--format qdq) decoder, or a bigger target")
        limits = resolve_limits(preset, t.max_context, manifest.vision.num_image_tokens, max_batch, fit,
                                max_images, workspace_gb)
        memory = budget(limits)
        notes.append(f"context reduced from {preset.max_context} to {fit} to fit {preset.name} "
                     f"({preset.usable_gb} GiB usable)")
    if kv_cache == "in-place" and prefill_tokens_per_pass(limits.max_prompt) < limits.max_prompt:
        notes.append(f"prefill runs in chunks of up to {prefill_tokens_per_pass(limits.max_prompt)} tokens "
                     f"(static-cache decoder; a {limits.max_prompt}-token prompt takes "
                     f"{-(-limits.max_prompt // prefill_tokens_per_pass(limits.max_prompt))})")
    profiles = profile_shapes(manifest, limits, kv_cache)
    if decoder_graph == "plugin":
        profiles["decoder"] = plugin_decoder_profiles(manifest, limits)
    return BuildPlan(target=preset, trt_version=version, limits=limits,
                     profiles=profiles, attention_policy=policy, attention=attention,
                     register_plugins=register, checks=checks, memory=memory,
                     precision={n: _precision(manifest, n) for n in ENGINE_GRAPHS}, kv_cache=kv_cache, notes=notes,
                     decoder_graph=decoder_graph)


def _missing_kernel_modules() -> list[str]:
    """What the plugin build needs and is not installed: ``register_plugins`` AOT-compiles our Triton
    kernels (triton, and torch which the kernel modules import). Running the engine needs neither."""
    import importlib.util

    return [m for m in ("triton", "torch") if importlib.util.find_spec(m) is None]


def _plugin_config(manifest: Manifest) -> PluginDecoderConfig:
    """Rotary tables cover the model's whole context (the engine's max context is never larger)."""
    return PluginDecoderConfig(kind="prefill", max_positions=manifest.text.max_context)


def _static_decoder(model):
    try:
        return make_static_decoder(model)
    except StaticDecoderError as e:
        raise EngineBuildError(f"cannot build the in-place KV decoder from this package's decoder: {e}") from e


# ------------------------------------------------------------------------------------ TensorRT part
def _make_logger(trt, log_file):
    class _FileLogger(trt.ILogger):
        """Everything from INFO up goes to engines/build.log; errors are also kept for the exception."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.INFO):  # lower value = more severe
                log_file.write(f"[{getattr(severity, 'name', severity)}] {msg}\n")
                log_file.flush()
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return _FileLogger()


def _make_progress(trt, emit: Callable[[str], None]):
    if not hasattr(trt, "IProgressMonitor"):  # < 10.0 never gets here; keep the builder working anyway
        return None

    class _Progress(trt.IProgressMonitor):
        """Top-level optimizer phases to on_stage (TensorRT calls this from its threads: no state shared
        beyond the emit call)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            if not parent_phase:
                emit(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            pass

    return _Progress()


def _plugin_hint(plugin_graph: bool) -> str:
    # The plugin path (AOT Triton kernels, aliased plugin I/O, a preview feature) has never met a real
    # TensorRT in this project's tests; the standard-op graph is the fallback a user can take at once.
    return ("\n(this is the plugin-attention decoder; `llava-edge build --plugins off` builds the standard-op "
            "graph instead)") if plugin_graph else ""


def _build_one(trt, logger, onnx_path: Path, profiles: list[Profile], workspace_gb: float, cache_bytes: bytes | None,
               emit: Callable[[str], None], fp32: bool = False, aliased_plugin_io: bool = False) -> tuple[bytes, bytes]:
    """One ONNX graph -> serialized plan; returns (plan, updated timing cache). ``aliased_plugin_io``
    turns on the preview feature plugin outputs aliased to inputs need (``PreviewFeature
    .ALIASED_PLUGIN_IO_10_03``; our attention plugins update the KV cache in place)."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errs}{_plugin_hint(aliased_plugin_io)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * GiB))
    if aliased_plugin_io:
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    if fp32 and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default and would round fp32 matmuls to 10-bit mantissas: an fp32 package is
        # asked for precision (tests, reference runs), so keep it exact.
        config.clear_flag(trt.BuilderFlag.TF32)
    monitor = _make_progress(trt, emit)
    if monitor is not None:
        config.progress_monitor = monitor
    net_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for prof in profiles:
        if set(prof.shapes) != net_inputs:
            raise EngineBuildError(f"profile {prof.name} names {sorted(prof.shapes)} but {onnx_path.name} has inputs "
                                   f"{sorted(net_inputs)}")
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.shapes.items():
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(cache_bytes or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path.name}: {'; '.join(logger.errors[-3:]) or 'see build.log'}"
                               f"{_plugin_hint(aliased_plugin_io)}")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


@contextlib.contextmanager
def _engine_source(root: Path, onnx_file: str, variant: str, manifest: Manifest | None = None) -> Iterator[Path]:
    """The ONNX file TensorRT parses for a graph: the package's file (``variant="portable"``), or for the
    decoder its static-cache / plugin-attention variant, written next to it for the duration of the
    build (TensorRT's parser reads external weights relative to the model file) and removed afterwards."""
    if variant == "portable":
        yield root / onnx_file
        return
    tmp = root / f".{Path(onnx_file).stem}_{variant}.build-{os.getpid()}.onnx"
    try:
        if variant == "plugin":
            t = manifest.text
            write_plugin_decoder(root / onnx_file, tmp, t.num_heads, t.num_kv_heads, t.head_dim, _plugin_config(manifest))
        else:
            write_static_decoder(root / onnx_file, tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def build_engines(
    package_dir: str | Path,
    target: str = "auto",
    max_batch: int | None = None,
    max_context: int | None = None,
    max_images: int | None = None,
    workspace_gb: float | None = None,
    timing_cache: str | Path | None = None,
    plugins: Plugins = "auto",
    on_stage: Callable[[str], None] | None = None,
    *,
    device_index: int = 0,
    dry_run: bool = False,
    trt_version: str | None = None,
    kv_cache: str = "in-place",
) -> BuildResult:
    """Build vision/embed/decoder engines into ``package_dir/engines`` (see the module docstring).

    ``timing_cache``: a file to read and update (default ``engines/timing.cache`` of the package, kept
    across rebuilds). ``dry_run``: plan only (no TensorRT needed; ``trt_version`` defaults to what the
    target ships). ``kv_cache``: "in-place" (the static-cache decoder, default) or "ping-pong" (the
    portable graph, as engines built before). Raises :class:`EngineBuildError` (cannot build / does not fit) or
    :class:`~llava_edge.runtime.trt_backend.TensorRTUnavailable` (no tensorrt, cuda-python or GPU).
    """
    t0 = time.perf_counter()
    stage = on_stage or (lambda msg: None)
    root = Path(package_dir).resolve()
    stage("read package")
    manifest = load_manifest(root)
    if dry_run:
        if target == "auto" and trt_version is None:
            raise EngineBuildError("a dry run needs --target (or a TensorRT version) since there is no GPU to ask")
        version = trt_version or DRY_RUN_TRT.get(target, "10.15")
        plan = plan_build(root, version, target if target != "auto" else "datacenter", max_batch, max_context,
                          max_images, workspace_gb, plugins, manifest=manifest, kv_cache=kv_cache)
        stage("plan\n" + plan.describe())
        return BuildResult(root, plan, None, None, time.perf_counter() - t0, built=False)

    trt = import_tensorrt()
    gpu = gpu_info(device_index)
    stage(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}, "
          f"{gpu.total_memory / GiB:.1f} GiB)")
    plan = plan_build(root, trt.__version__, target, max_batch, max_context, max_images, workspace_gb, plugins,
                      gpu.name, gpu.total_memory, gpu.compute_capability, manifest=manifest, kv_cache=kv_cache)
    stage("plan\n" + plan.describe())
    if plan.register_plugins:
        from ..kernels.trt_plugins import register_plugins

        stage("register llava_edge plugins")
        register_plugins(cc=int(gpu.compute_capability.replace(".", "")))

    engines_dir = root / ENGINES_DIR
    cache_path = Path(timing_cache) if timing_cache else engines_dir / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else None
    staging = Path(tempfile.mkdtemp(prefix=f".{ENGINES_DIR}.partial-", dir=root))
    try:
        with open(staging / BUILD_LOG, "w") as log_file:
            log_file.write(plan.describe() + "\n")
            logger = _make_logger(trt, log_file)
            files: dict[str, EngineFile] = {}
            for name in ENGINE_GRAPHS:
                graph = manifest.graphs[name]
                stage(f"build {name} engine ({plan.precision[name]})")
                log_file.write(f"=== {name}: {graph.file}\n")
                t_graph = time.perf_counter()
                variant = plan.decoder_graph if name == "decoder" else "portable"
                with _engine_source(root, graph.file, variant, manifest) as src:
                    data, cache_bytes = _build_one(trt, logger, src, plan.profiles[name], plan.limits.workspace_gb,
                                                   cache_bytes, stage, fp32=manifest.dtype == "float32",
                                                   aliased_plugin_io=variant == "plugin")
                rel = f"{ENGINES_DIR}/{name}.plan"
                (staging / f"{name}.plan").write_bytes(data)
                files[name] = EngineFile(file=rel, onnx_file=graph.file, onnx_size_bytes=graph.size_bytes,
                                         size_bytes=len(data), precision=plan.precision[name],
                                         profiles=[p.as_dict() for p in plan.profiles[name]])
                msg = f"{name}: {len(data) / GiB:.2f} GiB in {time.perf_counter() - t_graph:.1f} s"
                log_file.write(msg + "\n")
                stage(msg)
        (staging / TIMING_CACHE).write_bytes(cache_bytes or b"")
        if timing_cache:
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            tmp.write_bytes(cache_bytes or b"")
            tmp.replace(cache_path)
        record = EngineRecord(
            format_version=RECORD_FORMAT, tensorrt_version=trt.__version__, gpu_name=gpu.name,
            compute_capability=gpu.compute_capability, target=plan.target.name,
            limits={"max_batch": plan.limits.max_batch, "max_context": plan.limits.max_context,
                    "max_images": plan.limits.max_images, "max_prompt": plan.limits.max_prompt,
                    "workspace_gb": plan.limits.workspace_gb},
            attention=plan.attention, plugins=sorted(plan.checks["decoder"].plugins), strongly_typed=True,
            kv_cache=plan.kv_cache, engines=files, memory=plan.memory.as_dict(),
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), llava_edge_version=__version__,
        )
        (staging / RECORD_NAME).write_text(record.to_json())  # last: its presence means "complete"
        replace_dir(staging, engines_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stage(f"engines written to {engines_dir}")
    return BuildResult(root, plan, record, engines_dir / BUILD_LOG, time.perf_counter() - t0, built=True)


def result_summary(result: BuildResult) -> dict[str, Any]:
    """A JSON-able summary for the CLI (``llava-edge build --json``)."""
    p = result.plan
    return {"package": str(result.package_dir), "built": result.built, "target": p.target.name,
            "tensorrt": ".".join(map(str, p.trt_version)), "limits": p.limits.__dict__, "attention": p.attention,
            "kv_cache": p.kv_cache, "decoder_graph": p.decoder_graph,
            "precision": p.precision, "memory": p.memory.as_dict(), "notes": p.notes,
            "seconds": round(result.seconds, 1), "log": str(result.log_path) if result.log_path else None}
