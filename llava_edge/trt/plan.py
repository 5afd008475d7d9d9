"""Planning a TensorRT build (`llava-edge build --dry-run` and the first step of every build): pure,
no TensorRT. Resolves the target preset and limits, checks every graph against the ONNX ops of the
TensorRT version (``ops``), picks the decoder graph and attention path (``contract.attention_impl_for``),
sizes the optimization profiles (``presets``) and checks the memory budget, so that everything that would
fail later fails here, on any machine. ``builder`` runs the plan. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..errors import LlavaEdgeError
from ..contract import (AOT_MIN, ENGINE_GRAPHS, KV_INPLACE, KV_LAYOUTS, KV_PINGPONG, ONNX_DOMAIN, AttentionImpl,
                        attention_impl_for, parse_trt_version)
from ..package import Manifest, load_manifest, require_portable_decoder
from . import ops
from .plugin_decoder import PluginDecoderConfig, PluginDecoderError, make_plugin_decoder
from .static_decoder import StaticDecoderError, make_static_decoder
from .presets import (
    PRESETS, BuildLimits, MemoryBudget, ModelDims, Profile, TargetPreset, detect_target, estimate_memory,
    max_context_that_fits, plugin_decoder_profiles, prefill_tokens_per_pass, profile_shapes, resolve_limits,
)

Plugins = Literal["auto", "on", "off"]

__all__ = ["EngineBuildError", "BuildPlan", "Plugins", "plan_build", "plugin_config"]


class EngineBuildError(LlavaEdgeError):
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
    checks: dict[str, ops.GraphCheck]
    memory: MemoryBudget
    precision: dict[str, str]
    kv_cache: str = KV_INPLACE  # "in-place" (static-cache decoder graph) | "ping-pong" (portable graph)
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
               manifest: Manifest | None = None, kv_cache: str = KV_INPLACE) -> BuildPlan:
    """Everything about a build that does not need TensorRT; raises :class:`EngineBuildError` early
    for what would fail (or not fit) later. ``kv_cache="in-place"`` checks (and sizes for) the
    static-cache decoder derived from the package's decoder, in memory."""
    import onnx

    root = Path(package_dir)
    manifest = manifest or load_manifest(root)
    require_portable_decoder(root, manifest, "build")
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
    # is asked for (--plugins on or auto), else
    # the static-cache standard-op one (10.3, --plugins off, or a model the kernels cannot take)
    aot = version >= AOT_MIN
    if plugins == "on" and not aot:
        raise EngineBuildError(f"--plugins on needs TensorRT >= {AOT_MIN[0]}.{AOT_MIN[1]} (AOT Python plugins); "
                               f"this is {'.'.join(map(str, version))} (JetPack 6 = 10.3): use --plugins auto/off")
    if plugins == "on" and kv_cache != KV_INPLACE:
        raise EngineBuildError("--plugins on builds the plugin-attention decoder, which keeps one in-place cache; "
                               "it cannot be combined with --kv-cache ping-pong")
    want_plugin = kv_cache == KV_INPLACE and aot and plugins in ("on", "auto")
    missing = _missing_kernel_modules() if want_plugin and plugins == "auto" else []
    if missing:  # auto must not turn a working runtime-only install into a failing build
        want_plugin = False
        notes.append(f"plugin attention needs {', '.join(missing)} at build time (AOT-compiling the kernels: "
                     "pip install 'llava-edge[kernels]'); not installed, so standard ops are used")
    decoder_graph = "portable" if kv_cache == KV_PINGPONG else "static"

    # graphs against the parser of this TensorRT
    checks: dict[str, ops.GraphCheck] = {}
    decoder_model = None
    for name in ENGINE_GRAPHS:
        graph = manifest.graphs[name]
        model = onnx.load(str(root / graph.file), load_external_data=False)
        if name == "decoder":
            decoder_model = model
            if want_plugin:
                try:
                    model = make_plugin_decoder(model, manifest.text.num_heads, manifest.text.num_kv_heads,
                                                manifest.text.head_dim, plugin_config(manifest))
                    decoder_graph = "plugin"
                except PluginDecoderError as e:
                    if plugins == "on":
                        raise EngineBuildError(f"--plugins on: cannot make the plugin-attention decoder: {e}") from e
                    notes.append(f"plugin attention not possible for this decoder ({e}); standard ops used")
            if decoder_graph == "static":
                model = _static_decoder(model)
        allowed = plugins != "off" and aot
        checks[name] = ops.check_model(model, name, version, fp8=preset.fp8, plugins_allowed=allowed)
    bad = [c.describe() for c in checks.values() if not c.ok]
    if "vision" in checks and not checks["vision"].ok and manifest.extra.get("vision_quant"):
        bad.append("the int8 vision tower (export --vision int8) is for onnxruntime on a CPU: export the package "
                   "with --vision fp32 for TensorRT")
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
    if plugins == "on" and attention != "plugin":
        notes.append("--plugins on: plugins are registered but the decoder graph contains no plugin nodes")

    # limits, profiles, memory
    t = manifest.text
    inter = _intermediate_size(decoder_model, t.hidden_size) if decoder_model is not None else None
    dims = ModelDims.from_manifest(manifest, inter)
    weights = {n: manifest.graphs[n].size_bytes for n in ENGINE_GRAPHS}
    elt = 4 if manifest.dtype == "float32" else 2
    try:
        limits = resolve_limits(preset, t.max_context, dims.num_image_tokens, max_batch, max_context,
                                max_images, workspace_gb)
    except ValueError as e:
        raise EngineBuildError(str(e)) from e

    fused = decoder_graph == "plugin"  # the plugin writes the cache itself and keeps scores in registers

    def budget(lim: BuildLimits) -> MemoryBudget:
        return estimate_memory(preset, dims, weights, lim.max_context, lim.max_batch, lim.max_prompt,
                               lim.workspace_gb, kv_layout=kv_cache, bytes_per_elem=elt, fused_attention=fused)

    memory = budget(limits)
    if not memory.fits:
        fit = max_context_that_fits(preset, dims, weights, limits.max_batch,
                                    prefill_tokens=(limits.max_images * dims.num_image_tokens
                                                    + preset.prompt_text_tokens),
                                    workspace_gb=limits.workspace_gb, kv_layout=kv_cache, bytes_per_elem=elt,
                                    fused_attention=fused)
        need = limits.max_images * dims.num_image_tokens + 64  # one prompt with its images + a short answer
        why = f"{memory.describe()}.\nLargest context that fits with the {kv_cache} KV cache: {fit} tokens"
        if kv_cache == KV_PINGPONG:
            inplace = max_context_that_fits(preset, dims, weights, limits.max_batch, workspace_gb=limits.workspace_gb,
                                            kv_layout=KV_INPLACE, bytes_per_elem=elt)
            why += f" (the in-place cache, the default, would allow {inplace})"
        why += "."
        if max_context is not None or fit < need:
            raise EngineBuildError(
                f"does not fit on {preset.name}: {why} A prompt with {limits.max_images} image(s) needs at least "
                f"{need}. Options: --max-context {fit if fit >= need else need}, --max-batch 1, smaller "
                "--workspace-gb, an int4 (--format qdq) decoder, or a bigger target")
        limits = resolve_limits(preset, t.max_context, dims.num_image_tokens, max_batch, fit,
                                max_images, workspace_gb)
        memory = budget(limits)
        notes.append(f"context reduced from {preset.max_context} to {fit} to fit {preset.name} "
                     f"({preset.usable_gb} GiB usable)")
    if kv_cache == KV_INPLACE and prefill_tokens_per_pass(limits.max_prompt) < limits.max_prompt:
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


def plugin_config(manifest: Manifest) -> PluginDecoderConfig:
    """Rotary tables cover the model's whole context (the engine's max context is never larger)."""
    return PluginDecoderConfig(kind="prefill", max_positions=manifest.text.max_context)


def _static_decoder(model):
    try:
        return make_static_decoder(model)
    except StaticDecoderError as e:
        raise EngineBuildError(f"cannot build the in-place KV decoder from this package's decoder: {e}") from e
