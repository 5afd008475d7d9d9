"""Target presets for TensorRT builds, the memory-budget arithmetic, and optimization-profile shapes.

Everything here is pure Python (no tensorrt, no onnx, no torch) so that it is tested on CPU and can be
used for a dry run ("would this fit on an Orin Nano?") on any machine.

Memory model (all bytes; one process holding the vision, embed and decoder engines):

    weights      decoder + vision + embed engine weights (≈ the ONNX files: fp16, or int4 + fp16 scales)
    kv_cache     kv_buffers * 2 (k and v) * layers * kv_heads * head_dim * context * batch * bytes
    kv_staging   in-place standard-op graph only: the engine's new-k/v outputs for the longest prefill
                 chunk (the plugin-attention graph writes the cache itself: no staging)
    activations  TensorRT context memory for the largest profile shape (prefill), estimated below
    workspace    the builder's workspace pool limit (tactic scratch, part of context memory)
    overhead     CUDA context + TensorRT runtime + Python/numpy/tokenizers: a per-target estimate

``kv_layout`` is the engine record's ``kv_cache`` (``contract.KV_LAYOUTS``): in-place keeps one cache
buffer plus a staging buffer for one prefill chunk of new k/v (prefill in chunks of at most
``STATIC_PREFILL_CHUNK``); ping-pong keeps two buffers (prefill in one piece). See docs/architecture.md.

On Jetson the CPU and GPU share the same DRAM, so ``usable_gb`` is what is realistically left for us
after the OS (headless) — not the marketing size. The numbers for ``runtime_overhead_gb`` and
``usable_gb`` are estimates from NVIDIA's published module memory sizes and typical headless Ubuntu
footprints; they were NOT measured on a device in this repository (no Jetson here). Replace them with
``tegrastats`` readings when you have one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..anyres_grid import max_image_tokens, max_tiles
from ..contract import KV_INPLACE, KV_LAYOUTS, KV_PINGPONG
from ..errors import UsageError

GiB = 1 << 30
MiB = 1 << 20
GB = 10**9
# Longest prefill chunk of the static-cache decoder (its prefill profile's max T). Bounds the new-k/v
# staging (0.5 MiB per token for a 7B in fp16) and the prefill attention scores [B, heads, T, ctx+T];
# 256 tokens: an image's 576 tokens take 3 chunks.
STATIC_PREFILL_CHUNK = 256

__all__ = [
    "TargetPreset", "PRESETS", "STATIC_PREFILL_CHUNK", "prefill_tokens_per_pass", "detect_target", "ModelDims",
    "LLAVA_15_7B", "weight_bytes_from_dims",
    "MemoryBudget", "estimate_memory", "max_context_that_fits", "BuildLimits", "resolve_limits",
    "Profile", "profile_shapes", "plugin_decoder_profiles", "orin_summary",
]


# ------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class TargetPreset:
    """A deployment target: its memory, what TensorRT it ships with, and default engine limits.

    Orin facts: every Orin module is compute capability 8.7 (sm_87) and has no FP8; JetPack 6 ships
    TensorRT 10.3, JetPack 7 ships TensorRT 11.x (11.4 supports Orin only on JetPack >= 7.2.2)
    (NVIDIA's Jetson module data sheets and JetPack release notes; docs/jetson.md).
    """

    name: str
    description: str
    memory_gb: float  # physical memory (shared CPU/GPU on Jetson)
    usable_gb: float  # realistically free for the model process
    unified_memory: bool
    compute_capability: str | None  # "8.7"; None = whatever GPU the build runs on
    fp8: bool
    jetpack_trt: dict[str, str] = field(default_factory=dict)  # JetPack -> TensorRT version it ships
    max_batch: int = 1
    max_context: int = 2048
    max_images: int = 1
    prompt_text_tokens: int = 512  # text tokens of the longest prompt, image tokens come on top
    workspace_gb: float = 1.0
    runtime_overhead_gb: float = 0.6


_JETPACK = {"6.x": "10.3", "7.x": "11.x"}

PRESETS: dict[str, TargetPreset] = {
    "orin-agx": TargetPreset(
        "orin-agx", "Jetson AGX Orin 64 GB (the 32 GB module: use --max-context/--max-batch to halve)",
        memory_gb=64, usable_gb=56, unified_memory=True, compute_capability="8.7", fp8=False,
        jetpack_trt=_JETPACK, max_batch=4, max_context=4096, max_images=2, workspace_gb=4.0,
    ),
    "orin-nx": TargetPreset(
        "orin-nx", "Jetson Orin NX 16 GB (8 GB module: use the orin-nano budget)",
        memory_gb=16, usable_gb=13, unified_memory=True, compute_capability="8.7", fp8=False,
        jetpack_trt=_JETPACK, max_batch=1, max_context=2048, max_images=1, workspace_gb=1.0,
    ),
    "orin-nano": TargetPreset(
        "orin-nano", "Jetson Orin Nano 8 GB (Super or not: same memory)",
        memory_gb=8, usable_gb=6.0, unified_memory=True, compute_capability="8.7", fp8=False,
        jetpack_trt=_JETPACK, max_batch=1, max_context=1024, max_images=1, prompt_text_tokens=256,
        workspace_gb=0.25, runtime_overhead_gb=0.6,
    ),
    "datacenter": TargetPreset(
        "datacenter", "discrete GPU (memory read from the device at build time; 80 GB assumed otherwise)",
        memory_gb=80, usable_gb=72, unified_memory=False, compute_capability=None, fp8=True,
        max_batch=8, max_context=4096, max_images=2, workspace_gb=8.0, runtime_overhead_gb=1.0,
    ),
}


def detect_target(gpu_name: str, total_memory_bytes: int | None = None) -> TargetPreset:
    """Pick a preset from the GPU TensorRT sees (``--target auto``).

    Jetson iGPUs report names like "Orin" (cudaGetDeviceProperties.name) and the module is told apart
    by its memory size. A discrete GPU gets "datacenter" with its real memory (90% usable).
    """
    name = gpu_name.lower()
    if "orin" in name or "tegra" in name:
        gb = (total_memory_bytes or 0) / GiB
        if gb and gb <= 8.5:
            return PRESETS["orin-nano"]
        if gb and gb <= 17:
            return PRESETS["orin-nx"]
        return PRESETS["orin-agx"]
    preset = PRESETS["datacenter"]
    if total_memory_bytes:
        gb = total_memory_bytes / GiB
        preset = replace(preset, memory_gb=round(gb, 1), usable_gb=round(gb * 0.9, 1),
                         description=f"{gpu_name} ({gb:.0f} GiB)")
    return preset


# ------------------------------------------------------------------------------------- model dims
@dataclass(frozen=True)
class ModelDims:
    """What the memory arithmetic needs to know about a model (from a manifest or a spec sheet)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_image_tokens: int
    vision_params: int  # vision tower (layers actually used) + projector

    @staticmethod
    def from_manifest(manifest: Any, intermediate_size: int | None = None) -> "ModelDims":
        t, v = manifest.text, manifest.vision
        return ModelDims(
            num_layers=t.num_layers, hidden_size=t.hidden_size, num_heads=t.num_heads,
            num_kv_heads=t.num_kv_heads, head_dim=t.head_dim,
            intermediate_size=intermediate_size or 4 * t.hidden_size, vocab_size=t.vocab_size,
            num_image_tokens=max_image_tokens(v), vision_params=0,
        )


def _clip_l_336_params() -> int:
    """CLIP ViT-L/14-336 layers 0..22 (LLaVA reads layer -2, the exporter drops the last one) + the
    LLaVA-1.5 two-layer MLP projector 1024 -> 4096 -> 4096."""
    h, i, layers = 1024, 4096, 23
    per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h  # qkvo, fc1, fc2, 2 layer norms
    embeddings = 3 * 14 * 14 * h + 577 * h + h + 4 * h  # patch conv, positions, class, pre-norm
    projector = (h * 4096 + 4096) + (4096 * 4096 + 4096)
    return layers * per_layer + embeddings + projector


# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config: Vicuna-7B text model, vocab 32064 incl. <image>/<pad>).
LLAVA_15_7B = ModelDims(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                        intermediate_size=11008, vocab_size=32064, num_image_tokens=576,
                        vision_params=_clip_l_336_params())


def weight_bytes_from_dims(dims: ModelDims, weight_bits: int = 16, group_size: int = 128,
                           lm_head_bits: int = 16) -> dict[str, int]:
    """Engine weight bytes per graph from the architecture (for packages not exported yet).

    Quantized linears cost bits/8 per weight plus one fp16 scale per group (symmetric: no zero points,
    the only INT4 form TensorRT takes). lm_head, embeddings, norms and the vision tower stay fp16
    (docs/quantization.md).
    """
    h, kv = dims.hidden_size, dims.num_kv_heads * dims.head_dim
    q = dims.num_heads * dims.head_dim
    linear = dims.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * dims.intermediate_size)
    if weight_bits >= 16:
        linear_bytes = linear * 2
    else:
        linear_bytes = linear * weight_bits // 8 + (linear // group_size) * 2
    head = dims.vocab_size * h
    head_bytes = head * 2 if lm_head_bits >= 16 else head * lm_head_bits // 8 + head // group_size * 2
    norms = (2 * dims.num_layers + 1) * h * 2
    return {
        "decoder": linear_bytes + head_bytes + norms,
        "embed": dims.vocab_size * h * 2,
        "vision": dims.vision_params * 2,
    }


# ---------------------------------------------------------------------------------- memory budget
@dataclass
class MemoryBudget:
    """A breakdown in bytes and the verdict against a preset's usable memory."""

    target: str
    usable_bytes: int
    weights: dict[str, int]
    kv_cache: int
    activations: int
    workspace: int
    overhead: int
    context: int
    batch: int
    kv_layout: str
    kv_staging: int = 0

    @property
    def kv_buffers(self) -> int:
        return 1 if self.kv_layout == KV_INPLACE else 2

    @property
    def total(self) -> int:
        return (sum(self.weights.values()) + self.kv_cache + self.kv_staging + self.activations + self.workspace
                + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable_bytes

    @property
    def headroom(self) -> int:
        return self.usable_bytes - self.total

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(kv_buffers=self.kv_buffers, total=self.total, fits=self.fits, headroom=self.headroom)
        return d

    def describe(self) -> str:
        w = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.weights.items())
        staging = f"new-k/v staging {self.kv_staging / GiB:.2f} + " if self.kv_staging else ""
        return (f"{self.target}: weights ({w}) GiB + KV cache {self.kv_cache / GiB:.2f} GiB "
                f"(context {self.context} x batch {self.batch}, {self.kv_layout}: {self.kv_buffers} buffer(s)) + "
                f"{staging}activations "
                f"{self.activations / GiB:.2f} + workspace {self.workspace / GiB:.2f} + runtime "
                f"{self.overhead / GiB:.2f} = {self.total / GiB:.2f} GiB of {self.usable_bytes / GiB:.2f} GiB "
                f"usable -> {'fits' if self.fits else 'does NOT fit'}")


def kv_cache_bytes(dims: ModelDims, context: int, batch: int, bytes_per_elem: int = 2, kv_buffers: int = 1) -> int:
    """2 (k and v) * layers * kv_heads * head_dim * context * batch * bytes, times the buffer count."""
    return kv_buffers * 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * context * batch * bytes_per_elem


def activation_bytes(dims: ModelDims, batch: int, prefill_tokens: int, context: int, bytes_per_elem: int = 2,
                     static_cache: bool = False, fused_attention: bool = False) -> int:
    """Peak TensorRT context memory of the decoder, dominated by prefill at the profile max:
    attention scores + probabilities [B, heads, T, total], the MLP intermediates [B, T, 3*I], a few
    hidden-size tensors, and logits for every prompt position [B, T, V] (the graph computes them all).
    The static-cache graph also materialises one layer's concat(cache, new) k and v [B, kvH, ctx+T, D].
    The plugin-attention graph (``fused_attention``) has neither: the flash kernel keeps scores in
    registers and reads the cache in place.
    A 1.5x factor covers TensorRT's own layout/tactic copies; an estimate, not a measurement."""
    t, total = prefill_tokens, context
    scores = 0 if fused_attention else 2 * batch * dims.num_heads * t * total * bytes_per_elem
    mlp = 3 * batch * t * dims.intermediate_size * bytes_per_elem
    hidden = 6 * batch * t * dims.hidden_size * bytes_per_elem
    logits = batch * t * dims.vocab_size * bytes_per_elem
    concat = (2 * batch * dims.num_kv_heads * (total + t) * dims.head_dim * bytes_per_elem
              if static_cache and not fused_attention else 0)
    return int(1.5 * (scores + mlp + hidden + logits + concat))


def prefill_tokens_per_pass(prefill_tokens: int, kv_layout: str = KV_INPLACE) -> int:
    """Tokens one prefill pass of the engine takes: the whole prompt (ping-pong) or a chunk (in-place)."""
    if kv_layout not in KV_LAYOUTS:
        raise UsageError(f"kv_layout must be one of {KV_LAYOUTS}, not {kv_layout!r}")
    return min(prefill_tokens, STATIC_PREFILL_CHUNK) if kv_layout == KV_INPLACE else prefill_tokens


def estimate_memory(preset: TargetPreset, dims: ModelDims, weights: dict[str, int], context: int,
                    batch: int, prefill_tokens: int, workspace_gb: float | None = None,
                    kv_layout: str = KV_INPLACE, bytes_per_elem: int = 2,
                    fused_attention: bool = False) -> MemoryBudget:
    """The whole budget for one process serving ``batch`` sequences of up to ``context`` tokens whose
    longest prompt is ``prefill_tokens``. In-place: one cache buffer, prefill in chunks, staging for one
    chunk's new k/v; ping-pong: two cache buffers, one prefill pass. ``fused_attention`` (the in-place
    plugin-attention graph): no staging, no materialised scores or concatenated k/v."""
    ws = preset.workspace_gb if workspace_gb is None else workspace_gb
    per_pass = min(prefill_tokens_per_pass(prefill_tokens, kv_layout), context)
    inplace = kv_layout == KV_INPLACE
    if fused_attention and not inplace:
        raise UsageError("fused (plugin) attention keeps one in-place cache; it has no ping-pong layout")
    return MemoryBudget(
        target=preset.name,
        usable_bytes=int(preset.usable_gb * GiB),
        weights=dict(weights),
        kv_cache=kv_cache_bytes(dims, context, batch, bytes_per_elem, 1 if inplace else 2),
        activations=activation_bytes(dims, batch, per_pass, context, bytes_per_elem, static_cache=inplace,
                                     fused_attention=fused_attention),
        workspace=int(ws * GiB),
        overhead=int(preset.runtime_overhead_gb * GiB),
        context=context, batch=batch, kv_layout=kv_layout,
        kv_staging=kv_cache_bytes(dims, per_pass, batch, bytes_per_elem) if inplace and not fused_attention else 0,
    )


def max_context_that_fits(preset: TargetPreset, dims: ModelDims, weights: dict[str, int], batch: int = 1,
                          prefill_tokens: int | None = None, workspace_gb: float | None = None,
                          kv_layout: str = KV_INPLACE, bytes_per_elem: int = 2, multiple: int = 64,
                          fused_attention: bool = False) -> int:
    """Largest context (a multiple of ``multiple``) whose budget fits; 0 if not even ``multiple`` does.
    ``prefill_tokens`` defaults to one image + the preset's text budget, capped at the context."""
    pf = prefill_tokens if prefill_tokens is not None else dims.num_image_tokens + preset.prompt_text_tokens

    def fits(c: int) -> bool:
        return estimate_memory(preset, dims, weights, c, batch, min(pf, c), workspace_gb, kv_layout,
                               bytes_per_elem, fused_attention).fits

    lo, hi = 0, 1 << 20  # budgets grow monotonically with the context: bisect on multiples
    if not fits(multiple):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * multiple):
            lo = mid
        else:
            hi = mid
    return lo * multiple


# ---------------------------------------------------------------------------------- build limits
@dataclass(frozen=True)
class BuildLimits:
    """The engine limits actually used: preset defaults, overridden by the CLI, capped by the model."""

    max_batch: int
    max_context: int
    max_images: int
    max_prompt: int  # longest prefill: max_images * image tokens + text, <= max_context
    workspace_gb: float

    def __post_init__(self) -> None:
        for k in ("max_batch", "max_context", "max_prompt"):
            if getattr(self, k) < 1:
                raise UsageError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.max_images < 0:
            raise UsageError("max_images must be >= 0")
        if self.max_prompt > self.max_context:
            raise UsageError(f"max_prompt {self.max_prompt} > max_context {self.max_context}")


def resolve_limits(preset: TargetPreset, model_max_context: int, num_image_tokens: int,
                   max_batch: int | None = None, max_context: int | None = None, max_images: int | None = None,
                   workspace_gb: float | None = None) -> BuildLimits:
    """Apply CLI overrides to the preset and cap the context at what the model was trained for."""
    b = preset.max_batch if max_batch is None else max_batch
    k = preset.max_images if max_images is None else max_images
    c = min(preset.max_context if max_context is None else max_context, model_max_context)
    if c < 2:
        raise UsageError(f"max_context must be >= 2 (got {c})")
    prompt = min(c - 1, k * num_image_tokens + preset.prompt_text_tokens)  # leave room for one new token
    return BuildLimits(max_batch=b, max_context=c, max_images=k, max_prompt=max(1, prompt),
                       workspace_gb=preset.workspace_gb if workspace_gb is None else workspace_gb)


# ---------------------------------------------------------------------------- optimization profiles
@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def _decoder_profile(name: str, batch: tuple[int, int, int], seq: tuple[int, int, int],
                     past: tuple[int, int, int], total: tuple[int, int, int], hidden: int, kv_heads: int,
                     head_dim: int, past_names: list[str]) -> Profile:
    def three(f):
        return tuple(tuple(f(i)) for i in range(3))

    shapes = {
        "inputs_embeds": three(lambda i: (batch[i], seq[i], hidden)),
        "attention_mask": three(lambda i: (batch[i], total[i])),
        "position_ids": three(lambda i: (batch[i], seq[i])),
    }
    for n in past_names:
        shapes[n] = three(lambda i: (batch[i], kv_heads, past[i], head_dim))
    return Profile(name, shapes)


def profile_shapes(manifest: Any, limits: BuildLimits, kv_layout: str = KV_INPLACE) -> dict[str, list[Profile]]:
    """Profiles per graph. The decoder gets two, by ``kv_layout``:

    in-place (the static-cache graph: past is the whole cache, fixed at max_context):
    * ``prefill`` (profile 0): 1..chunk new tokens (``prefill_tokens_per_pass``), on any cache length
      (the mask says which slots are filled); longer prompts go through in chunks.
    * ``decode`` (profile 1): exactly 1 new token. Every shape is fixed but the batch, which is what
      lets the backend capture the decode step in a CUDA graph per batch size.

    ping-pong (the portable graph):
    * ``prefill`` (profile 0): 1..max_prompt new tokens on an empty cache (past = 0). Prefill on a
      non-empty cache is not in the profile — its attention scores [B,heads,T,past+T] at max sizes would
      dominate the engine's memory — so the backend feeds such tokens through ``decode`` one by one.
    * ``decode`` (profile 1): exactly 1 new token, past 0..max_context-1.

    ``opt`` is what TensorRT tunes tactics for: batch 1, one image + 64 text tokens for prefill (capped
    at the chunk), half the context for ping-pong decode.
    """
    t, v = manifest.text, manifest.vision
    b, c = limits.max_batch, limits.max_context
    p = prefill_tokens_per_pass(limits.max_prompt, kv_layout)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")]
    p_opt = max(1, min(p, v.num_image_tokens * min(1, limits.max_images) + 64))
    dims = (t.hidden_size, t.num_kv_heads, t.head_dim, past_names)
    if kv_layout == KV_INPLACE:
        prefill = _decoder_profile("prefill", (1, 1, b), (1, p_opt, p), (c, c, c), (c + 1, c + p_opt, c + p), *dims)
        decode = _decoder_profile("decode", (1, 1, b), (1, 1, 1), (c, c, c), (c + 1, c + 1, c + 1), *dims)
    else:
        prefill = _decoder_profile("prefill", (1, 1, b), (1, p_opt, p), (0, 0, 0), (1, p_opt, p), *dims)
        d_opt = max(0, min(c - 1, c // 2))
        decode = _decoder_profile("decode", (1, 1, b), (1, 1, 1), (0, d_opt, c - 1), (1, d_opt + 1, c), *dims)
    s = v.image_size
    n_img = max(1, b * limits.max_images * max_tiles(v))  # LLaVA-NeXT: every tile is an input
    vision = Profile("vision", {"pixel_values": ((1, 3, s, s), (1, 3, s, s), (n_img, 3, s, s))})
    e_opt = max(1, min(limits.max_prompt, v.num_image_tokens * min(1, limits.max_images) + 64))
    embed = Profile("embed", {"input_ids": ((1, 1), (1, e_opt), (b, limits.max_prompt))})  # whole prompts
    return {"vision": [vision], "embed": [embed], "decoder": [prefill, decode]}


def plugin_decoder_profiles(manifest: Any, limits: BuildLimits) -> list[Profile]:
    """Profiles of the plugin-attention decoder (``trt/plugin_decoder.py``, prefill kind): the same
    two as the in-place static graph (0 = prefill chunks of 1..chunk tokens, 1 = one token), with the
    lengths ``prompt_lens`` / ``start_pos`` [B] instead of the mask and positions; the cache is fixed at
    max_context."""
    t, v = manifest.text, manifest.vision
    b, c = limits.max_batch, limits.max_context
    p = prefill_tokens_per_pass(limits.max_prompt)
    p_opt = max(1, min(p, v.num_image_tokens * min(1, limits.max_images) + 64))
    past_names = [f"past_key_values.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")]

    def profile(name: str, seq: tuple[int, int, int]) -> Profile:
        batch = (1, 1, b)
        shapes = {"inputs_embeds": tuple((batch[i], seq[i], t.hidden_size) for i in range(3)),
                  "prompt_lens": tuple((batch[i],) for i in range(3)),
                  "start_pos": tuple((batch[i],) for i in range(3))}
        for n in past_names:
            shapes[n] = tuple((batch[i], t.num_kv_heads, c, t.head_dim) for i in range(3))
        return Profile(name, shapes)

    return [profile("prefill", (1, p_opt, p)), profile("decode", (1, 1, 1))]


def orin_summary(dims: ModelDims = LLAVA_15_7B, weight_bits: int = 4) -> list[dict[str, Any]]:
    """For the docs and the build log: per Orin preset, the max context for batch 1 with the in-place
    cache (what ``llava-edge build`` makes) and with the older ping-pong one, and the budget at the
    preset's default context."""
    weights = weight_bytes_from_dims(dims, weight_bits)
    rows = []
    for name in ("orin-nano", "orin-nx", "orin-agx"):
        p = PRESETS[name]
        rows.append({
            "target": name, "usable_gb": p.usable_gb,
            "weights_gib": round(sum(weights.values()) / GiB, 2),
            "max_context_pingpong": max_context_that_fits(p, dims, weights, 1, kv_layout=KV_PINGPONG),
            "max_context_inplace": max_context_that_fits(p, dims, weights, 1, kv_layout=KV_INPLACE),
            "default_context": p.max_context,
            "budget_default": estimate_memory(p, dims, weights, p.max_context, 1,
                                              dims.num_image_tokens + p.prompt_text_tokens).describe(),
        })
    return rows

