"""`llava-edge build`: a model package -> TensorRT engines (vision, embed, decoder) inside the package.

The plan (``plan.plan_build``: pure, no TensorRT; target, limits, op checks, attention path,
profiles, memory) comes first, and is all a dry run returns. Then :func:`build_engines` runs it with the
``tensorrt`` Python API (no polygraphy: one fewer dependency on Jetson, and we need the progress
monitor and timing cache directly):
``Builder.create_network(1 << STRONGLY_TYPED)`` — TensorRT 11 requires strongly typed networks and
ignores the flag, 10.x accepts it ("NetworkDefinitionCreationFlag", TensorRT Python API docs
10.x and 11.0); precision therefore comes from the ONNX (fp16 package -> fp16 engine, INT4
DequantizeLinear -> INT4 weights) and no FP16 builder flag is set. ``OnnxParser.parse_from_file``
(reads external data next to the file), ``IBuilderConfig.set_memory_pool_limit(WORKSPACE)``,
``IOptimizationProfile.set_shape`` per profile, ``IBuilderConfig.create_timing_cache / set_timing_cache
/ get_timing_cache().serialize()`` for timing-cache reuse, ``IProgressMonitor`` (TensorRT >= 10.0)
for progress, an ``ILogger`` writing ``engines/build.log``.

The decoder engine is built from a variant of the package's decoder derived at build time (the plan's
``decoder_graph``: plugin-attention, static-cache or portable; ``plugin_decoder.py``,
``static_decoder.py``). Engines go to a staging directory and are renamed to ``engines/`` only when all
three built, with the engine record (``contract.py``) written last, so an interrupted build never leaves
engines that look valid. The TensorRT calls follow the documented API; the tests that run them skip
without TensorRT and a GPU. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import __version__
from ..package import Manifest, load_manifest, replace_dir
from .. import trt_env
from ..contract import ENGINE_GRAPHS, ENGINES_DIR, KV_INPLACE, RECORD_FORMAT, RECORD_NAME, EngineFile, EngineRecord
from .plugin_decoder import write_plugin_decoder
from .static_decoder import write_static_decoder
from .plan import BuildPlan, EngineBuildError, Plugins, plugin_config, plan_build
from .presets import GiB, Profile

BUILD_LOG = "build.log"
TIMING_CACHE = "timing.cache"
# TensorRT version a dry run assumes when none is given: what the target ships (JetPack 6 -> 10.3).
DRY_RUN_TRT = {"orin-agx": "10.3", "orin-nx": "10.3", "orin-nano": "10.3", "datacenter": "10.15"}

__all__ = ["EngineBuildError", "BuildPlan", "BuildResult", "plan_build", "build_engines"]


@dataclass
class BuildResult:
    package_dir: Path
    plan: BuildPlan
    record: EngineRecord | None  # None for a dry run
    log_path: Path | None
    seconds: float
    built: bool


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
        raise EngineBuildError(f"TensorRT failed to build {onnx_path.name}: "
                               f"{'; '.join(logger.errors[-3:]) or 'see build.log'}{_plugin_hint(aliased_plugin_io)}")
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
            write_plugin_decoder(root / onnx_file, tmp, t.num_heads, t.num_kv_heads, t.head_dim,
                                 plugin_config(manifest))
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
    kv_cache: str = KV_INPLACE,
) -> BuildResult:
    """Build vision/embed/decoder engines into ``package_dir/engines`` (see the module docstring).

    ``timing_cache``: a file to read and update (default ``engines/timing.cache`` of the package, kept
    across rebuilds). ``dry_run``: plan only (no TensorRT needed; ``trt_version`` defaults to what the
    target ships). ``kv_cache``: "in-place" (the static-cache decoder, default) or "ping-pong" (the
    portable graph, two cache buffers). Raises :class:`EngineBuildError` (cannot build / does not fit) or
    :class:`~llava_edge.trt_env.TensorRTUnavailable` (no tensorrt, cuda-python or GPU).
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

    trt = trt_env.import_tensorrt()
    gpu = trt_env.gpu_info(device_index)
    stage(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}, "
          f"{gpu.total_memory / GiB:.1f} GiB)")
    plan = plan_build(root, trt.__version__, target, max_batch, max_context, max_images, workspace_gb, plugins,
                      gpu.name, gpu.total_memory, gpu.compute_capability, manifest=manifest, kv_cache=kv_cache)
    stage("plan\n" + plan.describe())
    if plan.register_plugins:
        from .plugins import register_plugins

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
