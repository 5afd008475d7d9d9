"""`llava-edge export`: checkpoint directory -> verified model package."""

from __future__ import annotations

import copy
import gc
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ..errors import LlavaEdgeError
from .. import __version__
from ..package import (FORMAT_VERSION, TOKENIZER_NAME, GraphSpec, Manifest, TextConfig, check_output_dir,
                       graph_size, staged_package, write_manifest)
from . import fast_decoder, verify, vision_int8
from .checkpoint import LoadedCheckpoint, load_checkpoint, weights_bytes
from .embed_int8 import RELATIVE_TOLERANCE
from .lazy import DecoderWeights, LazyLlava, reference_model
from .onnx_export import export_decoder, export_embed, export_vision

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
# Max |ONNX - torch| accepted on random inputs, per graph dtype. fp32 graphs match to ~1e-6 on tiny
# models; the bound leaves room for the accumulation order of large hidden sizes.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2}
# Deployment targets: which decoder graph the package carries. "portable" (past in, present out) runs on
# every backend and is what quantize and build start from; "cpu" / "cpu-int4" carry only the fast
# decoder of ort-fast / ort-fast-int4, so a CPU deployment ships (and maps) one decoder, not three.
TARGETS = {"portable": "decoder", "cpu": "decoder_fast", "cpu-int4": "decoder_fast_int4"}
# An int4 (round-to-nearest) decoder cannot match torch to float tolerance. It is checked against its
# float twin (MatMul weights = the int4 values times their scales): max over positions of
# ||int4 - twin|| / ||twin|| on the check prompt, which is what MatMulNBits' int8 activations cost
# (0.015-0.025 on the tiny and edge-1b shapes); a wrong packing or scale is far above (swapped nibbles: 1.37).
INT4_RELATIVE_TOLERANCE = 0.1
# MatMulNBits block sizes offered for the int4 fast decoder (a K that the block does not divide uses 32).
# Bigger blocks are faster on CPU (fewer scales per weight; docs/cpu.md) and coarser.
INT4_BLOCKS = (32, 64, 128, 256)
INT8_EMBED_TOLERANCE = RELATIVE_TOLERANCE  # rows of the int8 table against the float table (embed_int8.py)


class ExportError(LlavaEdgeError):
    pass


@dataclass
class ExportResult:
    package_dir: Path
    manifest: Manifest
    errors: dict[str, float]


def _fits_in_memory(nbytes: int) -> bool:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return nbytes < 0.7 * total


def _versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    return {
        "llava_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
    }


def _text_config(ck: LoadedCheckpoint) -> TextConfig:
    tc = ck.model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return TextConfig(
        hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers, num_heads=tc.num_attention_heads,
        num_kv_heads=tc.num_key_value_heads, head_dim=head_dim, vocab_size=ck.model.lm_head.out_features,
        max_context=ck.max_context or tc.max_position_embeddings, bos_token_id=ck.bos_token_id,
        eos_token_ids=ck.eos_token_ids,
        pad_token_id=ck.pad_token_id, image_token=ck.image_token, image_token_id=ck.image_token_id,
        chat_template=ck.chat_template,
    )


@dataclass
class ExportOptions:
    """export_package's arguments, checked and resolved ("auto" decided) before any work."""

    dtype: torch.dtype
    opset: int
    target: str
    embed: str  # "float" / "int8": the package's embedding table
    lm_head: str  # "float" / "int8": recorded as extra.lm_head (the portable decoder's is always float)
    vision_quant: str  # "fp32", "int8", "int8-blocked"
    int4_block: int
    check_layers: int | None
    fast: list[fast_decoder.FastDecoderConfig]  # the fast decoders the package ships

    @property
    def lazy(self) -> bool:
        """The cpu targets never hold the decoder (export/lazy.py)."""
        return self.target != "portable"

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]


def export_package(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    opset: int = 17,
    overwrite: bool = False,
    vision_tower: str | Path | None = None,
    chat_template: str | None = None,
    on_stage: Callable[[str], None] | None = None,
    target: str = "portable",
    embed: str = "auto",
    lm_head: str = "auto",
    check_layers: int | None = None,
    int4_block: int = 128,
    vision_quant: str = "auto",
    fast: bool = False,
    fast_int4: bool = False,
) -> ExportResult:
    """Load the checkpoint once, export vision/embed and the target's decoders, verify each, write the package.

    target "portable": the portable decoder, each graph checked against its torch module and the split
    pipeline against transformers; `fast` / `fast_int4` add decoder_fast / decoder_fast_int4 (lm_head
    "int8" puts an 8-bit lm_head in both, "auto" in the int4 one), written from the same loaded model and
    checked like the cpu targets' (see _check_fast_decoders). "cpu" / "cpu-int4": only the fast decoder
    (fp32 / int4 round-to-nearest), checked through the runtime's fast backend against transformers on an
    image prompt (prefill and decode paths, see verify.fast_decoder_logits); for int4 two float twins are
    built in a scratch directory. Torch's side of every check runs first, then the torch model is freed
    and onnxruntime loads the graphs, so no graph is held beside the model. Every graph is written in the
    staging directory and the package appears at out_dir only once all of them passed (rename).

    embed / lm_head: "float", "int8" (embedding table as GatherBlockQuantized, lm_head as 8-bit
    MatMulNBits in the fast decoder) or "auto" (int8 for cpu-int4, whose decoder is int4 anyway; float
    otherwise). The portable decoder keeps a float lm_head (quantize owns its numerics).

    The cpu targets never hold the decoder: only the vision tower, projector and embedding table are
    loaded into torch, and the fast decoder is written from the checkpoint a tensor at a time
    (export/lazy.py). Their check runs on the first `check_layers` decoder layers (default: all of them
    when the fp32 model fits in memory, else 2; see _check_fast_decoders).

    vision_quant: "fp32", "int8" / "int8-blocked" (the verified fp32 vision graph rewritten with int8
    MatMuls and held to a relative bound, export/vision_int8.py) or "auto" (int8 for cpu-int4 in fp32).
    """
    opts = resolve_options(dtype, opset, target, embed, lm_head, check_layers, int4_block, vision_quant,
                           fast, fast_int4)
    stage = on_stage or (lambda name: None)
    inputs = [p for p in (checkpoint_dir, vision_tower) if p is not None]
    check_output_dir(out_dir, overwrite, protect=inputs)  # before minutes of work, not after
    ck = _load(checkpoint_dir, vision_tower, chat_template, opts, stage)
    errors: dict[str, float] = {}
    with staged_package(out_dir, overwrite=overwrite, protect=inputs) as tmp:
        ck.tokenizer.save(str(tmp / TOKENIZER_NAME))
        manifest = _export_and_verify(ck, opts, tmp, errors, stage)
        write_manifest(tmp, manifest)
    return ExportResult(Path(out_dir), manifest, errors)


def resolve_options(dtype: str, opset: int, target: str, embed: str, lm_head: str, check_layers: int | None,
                    int4_block: int, vision_quant: str, fast: bool = False, fast_int4: bool = False) -> ExportOptions:
    """Every option checked (ExportError) and every "auto" decided, before any work."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; use {', '.join(TARGETS)}")
    if target != "portable" and (fast or fast_int4):
        raise ExportError(f"--target {target} holds one decoder; --fast and --fast-int4 add to a portable package "
                          "(--target portable)")
    fast_head = lm_head  # the portable target's fast decoders: "auto" is int8 in the int4 one only
    embed, lm_head = (_part_format(part, value, target) for part, value in (("embed", embed), ("lm_head", lm_head)))
    if embed == "int8" and target == "portable":
        raise ExportError("--embed int8 is for --target cpu or cpu-int4: the portable package table is shared by "
                          "every backend, quantize and build, and stays float")
    if lm_head == "int8" and target == "cpu":
        raise ExportError("--lm-head int8 goes with the int4 decoder (--target cpu-int4); the cpu target is float")
    if lm_head == "int8" and target == "portable" and not (fast or fast_int4):
        raise ExportError("an int8 lm_head lives in the fast decoder: use --target cpu or cpu-int4, add --fast/"
                          "--fast-int4 (or quantize --quantize-lm-head for the portable decoder)")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use fp32 or fp16")
    if vision_quant not in ("auto", *vision_int8.options()) or (vision_quant.startswith("int8") and dtype != "fp32"):
        raise ExportError(f"--vision {vision_quant!r}: use auto, fp32, int8 or int8-blocked (int8 needs --dtype fp32)")
    if vision_quant == "auto":
        vision_quant = "int8" if target == "cpu-int4" and dtype == "fp32" else "fp32"
    if opset < 17:
        raise ExportError("opset must be >= 17 (LayerNormalization and friends)")
    if int4_block not in INT4_BLOCKS:
        raise ExportError(f"int4 block {int4_block}: use one of {', '.join(map(str, INT4_BLOCKS))}")
    if check_layers is not None and (target == "portable" or check_layers < 1):
        raise ExportError("--check-layers N (N >= 1) is for --target cpu or cpu-int4")
    graph_dtype = "float32" if DTYPES[dtype] == torch.float32 else "float16"

    def cfg(name: str, quant: str | None, int8_head: bool) -> fast_decoder.FastDecoderConfig:
        return fast_decoder.FastDecoderConfig(name=name, dtype=graph_dtype, quant=quant,
                                              lm_head_bits=8 if int8_head else None, block_size=int4_block)

    if target == "portable":
        shipped = ([cfg("decoder_fast", None, fast_head == "int8")] if fast else []) + \
                  ([cfg("decoder_fast_int4", "int4-rtn", fast_head in ("int8", "auto"))] if fast_int4 else [])
        lm_head = "float"
    else:
        shipped = [cfg(TARGETS[target], "int4-rtn" if target == "cpu-int4" else None, lm_head == "int8")]
    return ExportOptions(DTYPES[dtype], opset, target, embed, lm_head, vision_quant, int4_block, check_layers, shipped)


def _load(checkpoint_dir: str | Path, vision_tower: str | Path | None, chat_template: str | None,
          opts: ExportOptions, stage: Callable[[str], None]) -> LoadedCheckpoint:
    """The checkpoint, loaded once for every graph. fp16 export keeps an fp32 reference for verification
    when both fit in memory; otherwise (a 7B on a 24 GB machine) it loads fp16 once and verifies against
    transformers in fp16. The cpu targets load no decoder (lazy_decoder), so their fp32 reference always fits."""
    stage("load checkpoint")
    fp32_reference = (opts.lazy or opts.dtype == torch.float32
                      or _fits_in_memory(6 * weights_bytes(checkpoint_dir)))
    ck = load_checkpoint(checkpoint_dir, vision_tower=vision_tower,
                         dtype=torch.float32 if fp32_reference else opts.dtype, lazy_decoder=opts.lazy)
    if chat_template:
        ck.chat_template = chat_template
        ck.chat_template_source = "--template"
    return ck


@dataclass
class _Pending:
    """A traced graph awaiting its onnxruntime check: torch's outputs on `inputs`, computed while torch held
    the model."""

    name: str
    spec: GraphSpec
    inputs: tuple
    want: tuple


def _export_and_verify(ck: LoadedCheckpoint, opts: ExportOptions, tmp: Path, errors: dict[str, float],
                       stage: Callable[[str], None]) -> Manifest:
    """Phase 1, torch: export every graph and compute torch's outputs for each check. Phase 2,
    onnxruntime: the torch model is freed first, so no graph is ever loaded beside it. Check graphs live
    in a scratch directory inside `tmp`, removed (and dropped from the manifest) before it is written."""
    model = ck.model if ck.model.dtype == opts.dtype else copy.deepcopy(ck.model).to(opts.dtype)
    pending = _export_traced(model, ck, opts, tmp, stage)
    manifest = _new_manifest(ck, opts, {p.name: p.spec for p in pending}, errors)
    del model
    scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=tmp))
    try:
        checks = _build_fast_decoders(ck, opts, manifest, tmp, scratch, stage) if opts.fast else None
        ref = _reference(ck, checks, manifest, tmp, stage)
        ck.model = None  # torch's part is done: free the models before the graphs load
        gc.collect()
        _verify_traced(tmp, pending, opts, errors, stage)
        if opts.vision_quant != "fp32":
            _quantize_vision(tmp, pending[0], opts, manifest, errors, stage)
        del pending
        if opts.target == "portable":
            _check_portable(tmp, ref, opts, errors)
        if checks:
            _check_fast_decoders(manifest, tmp, checks, ref, opts.tolerance * 10, errors, stage)
    finally:
        for name in list(manifest.graphs):
            if manifest.graphs[name].file.startswith(scratch.name + "/"):
                del manifest.graphs[name]
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _export_traced(model: torch.nn.Module, ck: LoadedCheckpoint, opts: ExportOptions, tmp: Path,
                   stage: Callable[[str], None]) -> list[_Pending]:
    """vision, embed and (portable) the portable decoder, each with torch's outputs on random inputs."""
    int8_embed = opts.embed == "int8"
    steps = [("vision", lambda: export_vision(model, ck.vision, tmp, opts.dtype, opts.opset)),
             ("embed", lambda: export_embed(model, tmp, opts.opset, int8=int8_embed))]
    if opts.target == "portable":
        steps.append(("decoder", lambda: export_decoder(model, tmp, opts.dtype, opts.opset)))
    pending = []
    for name, fn in steps:
        stage(f"export {name}")
        exported = fn()
        if not (name == "embed" and int8_embed):  # the checker does not know onnxruntime's contrib ops
            onnx.checker.check_model(str(tmp / exported.spec.file))
        x = verify.random_inputs(name, exported)
        pending.append(_Pending(name, exported.spec, x, verify.torch_outputs(exported, x)))
        del exported
    return pending


def _new_manifest(ck: LoadedCheckpoint, opts: ExportOptions, graphs: dict[str, GraphSpec],
                  errors: dict[str, float]) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        source={"path": str(ck.path), "layout": ck.layout, "projector": ck.projector,
                "architecture": type(ck.model).__name__ if ck.layout == "llava-hf" else "LlavaLlamaForCausalLM"},
        dtype="float32" if opts.dtype == torch.float32 else "float16",
        text=_text_config(ck),
        vision=ck.vision,
        graphs=graphs,
        versions=_versions(),
        extra={"opset": opts.opset, "target": opts.target, "verification": errors, "embed": opts.embed,
               "lm_head": opts.lm_head, "reference_dtype": str(ck.model.dtype).replace("torch.", ""),
               "chat_template_source": ck.chat_template_source,
               **({"context_cap": ck.context_cap} if ck.context_cap else {})},
        family=dict(ck.family),
    )


def _reference(ck: LoadedCheckpoint, checks: FastChecks | None, manifest: Manifest, tmp: Path,
               stage: Callable[[str], None]) -> verify.PromptReference:
    """transformers on the check prompt: the loaded model, or (cpu targets) transformers truncated to the
    checked layers, read from the files."""
    reference = ck.model
    if ck.deferred:
        stage(f"transformers on the check prompt ({checks.layers} of {manifest.text.num_layers} layers)")
        reference = reference_model(ck, checks.layers)
    else:
        stage("verify against transformers")
    return verify.image_prompt_reference(reference, ck.tokenizer, ck.image_token_id, ck.vision.num_image_tokens,
                                         tmp, ck.vision.image_size, vision=ck.vision)


def _verify_traced(tmp: Path, pending: list[_Pending], opts: ExportOptions, errors: dict[str, float],
                   stage: Callable[[str], None]) -> None:
    """Each traced graph in onnxruntime against torch's outputs; the int8 embed graph's rows relative to
    the float table's."""
    for p in pending:
        stage(f"verify {p.name}")
        if p.name == "embed" and opts.embed == "int8":
            errors["embed_int8_relative"] = err = verify.onnx_error(tmp, p.spec, p.inputs, p.want, relative=True)
            if not err <= INT8_EMBED_TOLERANCE:
                raise ExportError(f"the int8 embedding rows are {err:.3g} (relative) from the float table's "
                                  f"(> {INT8_EMBED_TOLERANCE}); the int8 embed graph is broken")
            continue
        err = p.spec.max_abs_error = errors[p.name] = verify.onnx_error(tmp, p.spec, p.inputs, p.want)
        if not err <= opts.tolerance:
            raise ExportError(f"{p.name}.onnx differs from PyTorch by {err:.3g} (> {opts.tolerance:.0e})")


def _quantize_vision(tmp: Path, vision: _Pending, opts: ExportOptions, manifest: Manifest,
                     errors: dict[str, float], stage: Callable[[str], None]) -> None:
    """The verified fp32 vision graph rewritten with int8 MatMuls, held to its bound (vision_int8.py)."""
    stage(f"{opts.vision_quant} vision")
    q = vision_int8.quantize_checked(tmp, vision.spec, vision.inputs, vision.want, opts.vision_quant)
    errors["vision_int8_relative"] = q.relative_error
    manifest.extra["vision_quant"] = {"option": opts.vision_quant, **q.to_dict()}


def _check_portable(tmp: Path, ref: verify.PromptReference, opts: ExportOptions, errors: dict[str, float]) -> None:
    """The split pipeline (vision -> splice -> portable decoder) against transformers' logits."""
    errors["pipeline_logits"] = verify.portable_logits_error(tmp, ref)
    if not errors["pipeline_logits"] <= opts.tolerance * 10:
        raise ExportError(
            f"split graphs differ from transformers' LlavaForConditionalGeneration by "
            f"{errors['pipeline_logits']:.3g} in logits"
        )


TWIN = "decoder_fast_int4_twin"
# A shipped float fast decoder with an 8-bit lm_head (portable --fast --lm-head int8): max over positions of
# ||logits - float lm_head's|| / ||float lm_head's|| on the check prompt. MatMulNBits' 8-bit rows and int8
# activations cost about 1% (0.9% on the tiny GQA model in fp16); a wrong packing or scale is far above.
LM_HEAD_INT8_RELATIVE_TOLERANCE = 0.05


def _part_format(part: str, value: str, target: str) -> str:
    if value not in ("auto", "float", "int8"):
        raise ExportError(f"--{part.replace('_', '-')} {value!r}: use auto, float or int8")
    return ("int8" if target == "cpu-int4" else "float") if value == "auto" else value


@dataclass
class FastChecks:
    """The graphs the fast decoders' check runs (names in manifest.graphs). float_graph: float layers and
    lm_head, checked against transformers; head8: a shipped float graph with an 8-bit lm_head, held to
    float_graph; twin / int4 (an int4 graph shipped): the int4 graph against its float twin. layers <
    num_layers (cpu targets): these are built from the first `layers` layers in the scratch directory, and
    each `shipped` graph (the whole decoder) must hold their weights byte for byte and give finite logits
    (see _check_fast_decoders)."""

    shipped: list[str]
    float_graph: str
    head8: str | None
    twin: str | None
    int4: str | None
    layers: int
    num_layers: int


def _layers_to_check(ck: LoadedCheckpoint, wanted: int | None) -> int:
    """Decoder layers the cpu targets' check holds in torch: all when the fp32 model fits (twice over:
    the transformers forward and the model), else 2; `wanted` overrides (capped at the model's). A
    loaded model (portable target): all of them."""
    n = ck.model.config.text_config.num_hidden_layers
    if not ck.deferred:
        return n
    if wanted is not None:
        return min(wanted, n)
    return n if _fits_in_memory(2 * DecoderWeights(ck, torch.float32).nbytes(4)) else min(2, n)


def _fast_plan(opts: ExportOptions, layers: int, n: int) -> tuple[FastChecks, list[fast_decoder.FastDecoderConfig]]:
    """Which graphs the check runs, and those of them that are not shipped (built in the scratch directory)."""
    suffix = "" if layers == n else "_head"
    float_cfg = next((c for c in opts.fast if c.quant is None), None)
    int4_cfg = next((c for c in opts.fast if c.quant is not None), None)
    head8 = float_cfg.name if float_cfg is not None and float_cfg.lm_head_bits else None
    if head8 and suffix:
        raise ExportError("an 8-bit lm_head on the float fast decoder is checked on the whole model only")
    checks = FastChecks([c.name for c in opts.fast], ("decoder_fast_float_head" if head8 else "decoder_fast") + suffix,
                        head8, TWIN + suffix if int4_cfg else None, int4_cfg.name + suffix if int4_cfg else None,
                        layers, n)
    dtype = opts.fast[0].dtype
    # the float graph checks the wiring against transformers (float lm_head); twin and int4 carry the
    # shipped graph's lm_head, so the int4 check isolates the int4 layers and its weights match byte for byte
    wanted = [(checks.float_graph, None, None)]
    if int4_cfg is not None:
        wanted += [(checks.twin, fast_decoder.INT4_DEQUANTIZED, int4_cfg.lm_head_bits),
                   (checks.int4, int4_cfg.quant, int4_cfg.lm_head_bits)]
    scratch = [fast_decoder.FastDecoderConfig(name, dtype, quant, lm_head_bits=bits, block_size=opts.int4_block)
               for name, quant, bits in wanted if name not in checks.shipped]
    return checks, scratch


def _build_fast_decoders(ck: LoadedCheckpoint, opts: ExportOptions, manifest: Manifest, tmp: Path, scratch: Path,
                         stage: Callable[[str], None]) -> FastChecks:
    """The package's fast decoders into `tmp` and the graphs their check needs into `scratch` (all in
    manifest.graphs), from the loaded model, or (cpu targets) from the checkpoint a tensor at a time."""
    n = manifest.text.num_layers
    checks, check_graphs = _fast_plan(opts, _layers_to_check(ck, opts.check_layers), n)
    if ck.deferred:
        head, whole = LazyLlava(ck, opts.dtype, checks.layers), (lambda: LazyLlava(ck, opts.dtype))
    else:
        head, whole = ck.model, (lambda: ck.model)
    for cfg in check_graphs:
        stage(f"export {cfg.name} (for the check)")
        spec = fast_decoder.build_fast_decoder(head, scratch / f"{cfg.name}.onnx", cfg)
        spec.file = f"{scratch.name}/{spec.file}"
        manifest.graphs[cfg.name] = spec
    for cfg in opts.fast:
        stage(f"export {cfg.name}")
        manifest.graphs[cfg.name] = fast_decoder.build_fast_decoder(whole(), tmp / f"{cfg.name}.onnx", cfg)
        manifest.extra.setdefault("fast_decoders", {})[cfg.name] = asdict(cfg)
    return checks


def _check_fast_decoders(manifest: Manifest, tmp: Path, checks: FastChecks, ref: verify.PromptReference,
                         bound: float, errors: dict[str, float], stage: Callable[[str], None]) -> None:
    """The float fast graph's logits against transformers', within `bound` (the wiring every fast graph
    shares). An 8-bit lm_head on float layers: within LM_HEAD_INT8_RELATIVE_TOLERANCE of the float graph.
    int4: the int4 graph must be within INT4_RELATIVE_TOLERANCE of its twin whose MatMul weights are the
    int4 values times their scales (what MatMulNBits' int8 activations cost), which a wrong packing, scale
    or block layout is far above.

    With fewer layers checked than the model has (`ref` is then transformers truncated to those layers):
    the shipped graph must hold every weight of the checked graph of its kind byte for byte (same
    names: its first layers, final norm, lm_head, rotary tables) and give finite logits on the check
    prompt; its later layers are written by the same code from other tensors, and are not compared."""
    got = {}
    for name in (checks.float_graph, checks.head8, checks.twin, checks.int4):
        if name is not None:
            stage(f"verify {name} against transformers")
            got[name], want = verify.fast_decoder_logits(manifest, tmp, name, ref)
    errors["decoder_fast_logits"] = err = float(np.abs(got[checks.float_graph] - want).max())
    if not err <= bound:
        raise ExportError(f"the fast decoder differs from transformers by {err:.3g} in logits (> {bound:.0e})")
    if checks.head8:
        errors["decoder_fast_lm_head_int8_vs_float"] = rel = verify.max_relative_error(got[checks.head8],
                                                                                      got[checks.float_graph])
        if not rel <= LM_HEAD_INT8_RELATIVE_TOLERANCE:
            raise ExportError(f"the fast decoder with an 8-bit lm_head is {rel:.3g} (relative) from the float "
                              f"lm_head's logits (> {LM_HEAD_INT8_RELATIVE_TOLERANCE}); its lm_head is broken")
    if checks.int4:
        errors["decoder_fast_int4_vs_twin"] = rel = verify.max_relative_error(got[checks.int4], got[checks.twin])
        errors["decoder_fast_int4_vs_transformers"] = verify.max_relative_error(got[checks.int4], want)
        if not rel <= INT4_RELATIVE_TOLERANCE:
            raise ExportError(f"the int4 fast decoder's logits are {rel:.3g} (relative) from its float twin's "
                              f"(> {INT4_RELATIVE_TOLERANCE}); the int4 graph is broken")
    scope = {"layers_checked": checks.layers, "num_layers": checks.num_layers}
    if checks.layers < checks.num_layers:
        for shipped in checks.shipped:
            _check_shipped_holds(manifest, tmp, checks, shipped, ref, scope, stage)
    manifest.extra["verification_scope"] = scope


def _check_shipped_holds(manifest: Manifest, tmp: Path, checks: FastChecks, shipped: str,
                         ref: verify.PromptReference, scope: dict, stage: Callable[[str], None]) -> None:
    """A shipped graph larger than the checked one: it holds the checked graph's weights byte for byte
    and gives finite logits on the check prompt (when it fits in memory)."""
    head = checks.int4 if manifest.extra["fast_decoders"][shipped]["quant"] else checks.float_graph
    stage(f"verify {shipped} holds {head}'s weights")
    differ = verify.weights_not_in(tmp, manifest.graphs[head], manifest.graphs[shipped])
    if differ:
        raise ExportError(f"{shipped} does not hold the checked graph's weights: {', '.join(differ[:5])}")
    size = graph_size(tmp, manifest.graphs[shipped])
    if _fits_in_memory(2 * size):
        stage(f"run {shipped} on the check prompt")
        logits, _ = verify.fast_decoder_logits(manifest, tmp, shipped, ref)
        if not np.isfinite(logits).all():
            raise ExportError(f"{shipped} gives non-finite logits on the check prompt")
        scope["full_graph"] = "finite logits on the check prompt (prefill + 3 decode steps)"
    else:
        scope["full_graph"] = f"not run: {size / 2**30:.1f} GiB does not fit in memory"
    scope["method"] = (f"graphs of the first {checks.layers} layers (+ final norm, lm_head) checked against "
                       f"transformers truncated to them; {shipped} holds their weights byte for byte")
