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
from ..package import (FORMAT_VERSION, TOKENIZER_NAME, Manifest, TextConfig, check_output_dir, graph_size,
                       staged_package, write_manifest)
from . import verify, vision_int8
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
        max_context=ck.max_context or tc.max_position_embeddings, bos_token_id=ck.bos_token_id, eos_token_ids=ck.eos_token_ids,
        pad_token_id=ck.pad_token_id, image_token=ck.image_token, image_token_id=ck.image_token_id,
        chat_template=ck.chat_template,
    )


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
) -> ExportResult:
    """Load the checkpoint, export vision/embed and the target's decoder, verify each, write the package.

    target "portable": the portable decoder, each graph checked against its torch module and the split
    pipeline against transformers. "cpu" / "cpu-int4": only the fast decoder (fp32 / int4 round-to-
    nearest), checked through the runtime's fast backend against transformers on an image prompt
    (prefill and decode paths, see verify.fast_decoder_logits); for int4 two float twins are built in a
    scratch directory (see _check_fast_decoders). Torch's side of every check runs first, then the torch
    model is freed and onnxruntime loads the graphs, so no graph is held beside the model. The package
    appears at out_dir only once everything succeeded (staged directory + rename).

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
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; use {', '.join(TARGETS)}")
    embed, lm_head = (_part_format(part, value, target) for part, value in (("embed", embed), ("lm_head", lm_head)))
    if embed == "int8" and target == "portable":
        raise ExportError("--embed int8 is for --target cpu or cpu-int4: the portable package table is shared by "
                          "every backend, quantize and build, and stays float")
    if lm_head == "int8" and target == "cpu":
        raise ExportError("--lm-head int8 goes with the int4 decoder (--target cpu-int4); the cpu target is float")
    if lm_head == "int8" and target == "portable":
        raise ExportError("an int8 lm_head lives in the fast decoder: use --target cpu or cpu-int4 (or quantize "
                          "--quantize-lm-head for the portable decoder)")
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
    torch_dtype = DTYPES[dtype]
    stage = on_stage or (lambda name: None)
    inputs = [p for p in (checkpoint_dir, vision_tower) if p is not None]
    check_output_dir(out_dir, overwrite, protect=inputs)  # before minutes of work, not after

    stage("load checkpoint")
    # fp16 export keeps an fp32 reference for verification when both fit in memory; otherwise (a 7B
    # on a 24 GB machine) it loads fp16 once and verifies against transformers in fp16. The cpu targets
    # load no decoder (lazy_decoder), so their fp32 reference always fits.
    lazy = target != "portable"
    fp32_reference = lazy or torch_dtype == torch.float32 or _fits_in_memory(6 * weights_bytes(checkpoint_dir))
    ck = load_checkpoint(checkpoint_dir, vision_tower=vision_tower,
                         dtype=torch.float32 if fp32_reference else torch_dtype, lazy_decoder=lazy)
    if chat_template:
        ck.chat_template = chat_template
        ck.chat_template_source = "--template"
    model = ck.model if ck.model.dtype == torch_dtype else copy.deepcopy(ck.model).to(torch_dtype)

    errors: dict[str, float] = {}
    with staged_package(out_dir, overwrite=overwrite, protect=inputs) as tmp:
        ck.tokenizer.save(str(tmp / TOKENIZER_NAME))
        # Phase 1, torch: export every graph and compute torch's outputs for each check. Phase 2,
        # onnxruntime: the torch model is freed first, so no graph is ever loaded beside it.
        graphs = {}
        pending = []  # (graph name, spec, inputs, torch's outputs)
        steps = [("vision", lambda: export_vision(model, ck.vision, tmp, torch_dtype, opset)),
                 ("embed", lambda: export_embed(model, tmp, opset, int8=embed == "int8"))]
        if target == "portable":
            steps.append(("decoder", lambda: export_decoder(model, tmp, torch_dtype, opset)))
        for name, fn in steps:
            stage(f"export {name}")
            exported = fn()
            if not (name == "embed" and embed == "int8"):  # the checker does not know onnxruntime's contrib ops
                onnx.checker.check_model(str(tmp / exported.spec.file))
            x = verify.random_inputs(name, exported)
            pending.append((name, exported.spec, x, verify.torch_outputs(exported, x)))
            graphs[name] = exported.spec
            del exported

        manifest = Manifest(
            format_version=FORMAT_VERSION,
            source={"path": str(ck.path), "layout": ck.layout, "projector": ck.projector,
                    "architecture": type(ck.model).__name__ if ck.layout == "llava-hf" else "LlavaLlamaForCausalLM"},
            dtype="float32" if torch_dtype == torch.float32 else "float16",
            text=_text_config(ck),
            vision=ck.vision,
            graphs=graphs,
            versions=_versions(),
            extra={"opset": opset, "target": target, "verification": errors, "embed": embed, "lm_head": lm_head,
                   "reference_dtype": str(ck.model.dtype).replace("torch.", ""),
                   "chat_template_source": ck.chat_template_source,
                   **({"context_cap": ck.context_cap} if ck.context_cap else {})},
            family=dict(ck.family),
        )
        quant = "int4-rtn" if target == "cpu-int4" else None
        scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=tmp))
        try:
            checks, reference = None, ck.model
            if lazy:
                layers = _layers_to_check(ck, check_layers)
                checks = _build_fast_decoders(ck, torch_dtype, manifest, tmp, scratch, quant, layers,
                                              8 if lm_head == "int8" else None, int4_block, stage)
                stage(f"transformers on the check prompt ({layers} of {manifest.text.num_layers} layers)")
                reference = reference_model(ck, layers)
            else:
                stage("verify against transformers")
            ref = verify.image_prompt_reference(reference, ck.tokenizer, ck.image_token_id, ck.vision.num_image_tokens,
                                                tmp, ck.vision.image_size, vision=ck.vision)
            # torch's part is done: free the models before the graphs load
            model = ck.model = reference = steps = None
            gc.collect()

            for name, spec, x, want in pending:
                stage(f"verify {name}")
                if name == "embed" and embed == "int8":
                    errors["embed_int8_relative"] = err = verify.onnx_error(tmp, spec, x, want, relative=True)
                    if not err <= INT8_EMBED_TOLERANCE:
                        raise ExportError(f"the int8 embedding rows are {err:.3g} (relative) from the float table's "
                                          f"(> {INT8_EMBED_TOLERANCE}); the int8 embed graph is broken")
                    continue
                err = spec.max_abs_error = errors[name] = verify.onnx_error(tmp, spec, x, want)
                if not err <= TOLERANCE[torch_dtype]:
                    raise ExportError(f"{name}.onnx differs from PyTorch by {err:.3g} (> {TOLERANCE[torch_dtype]:.0e})")
            if vision_quant != "fp32":
                stage(f"{vision_quant} vision")
                q = vision_int8.quantize_checked(tmp, *pending[0][1:], vision_quant)
                errors["vision_int8_relative"] = q.relative_error
                manifest.extra["vision_quant"] = {"option": vision_quant, **q.to_dict()}
            del pending
            if target == "portable":
                errors["pipeline_logits"] = verify.portable_logits_error(tmp, ref)
                if not errors["pipeline_logits"] <= TOLERANCE[torch_dtype] * 10:
                    raise ExportError(
                        f"split graphs differ from transformers' LlavaForConditionalGeneration by "
                        f"{errors['pipeline_logits']:.3g} in logits"
                    )
            else:
                _check_fast_decoders(manifest, tmp, checks, ref, TOLERANCE[torch_dtype] * 10, errors, stage)
        finally:
            for name in list(manifest.graphs):
                if manifest.graphs[name].file.startswith(scratch.name + "/"):
                    del manifest.graphs[name]
            shutil.rmtree(scratch, ignore_errors=True)
        write_manifest(tmp, manifest)
    return ExportResult(Path(out_dir), manifest, errors)


TWIN = "decoder_fast_int4_twin"


def _part_format(part: str, value: str, target: str) -> str:
    if value not in ("auto", "float", "int8"):
        raise ExportError(f"--{part.replace('_', '-')} {value!r}: use auto, float or int8")
    return ("int8" if target == "cpu-int4" else "float") if value == "auto" else value


@dataclass
class FastChecks:
    """The graphs a cpu target's check runs (names in manifest.graphs). float_graph: checked against
    transformers; twin / int4 (int4 target): the int4 graph against its float twin. layers < num_layers:
    these are built from the first `layers` layers in the scratch directory, and `shipped` (the whole
    decoder) must hold their weights byte for byte and give finite logits (see _check_fast_decoders)."""

    shipped: str
    float_graph: str
    twin: str | None
    int4: str | None
    layers: int
    num_layers: int


def _layers_to_check(ck: LoadedCheckpoint, wanted: int | None) -> int:
    """Decoder layers the cpu targets' check holds in torch: all when the fp32 model fits (twice over:
    the transformers forward and the model), else 2; `wanted` overrides (capped at the model's)."""
    n = ck.model.config.text_config.num_hidden_layers
    if wanted is not None:
        return min(wanted, n)
    return n if _fits_in_memory(2 * DecoderWeights(ck, torch.float32).nbytes(4)) else min(2, n)


def _build_fast_decoders(ck: LoadedCheckpoint, dtype: torch.dtype, manifest: Manifest, tmp: Path, scratch: Path,
                         quant: str | None, layers: int, head_bits: int | None, int4_block: int,
                         stage: Callable[[str], None]) -> FastChecks:
    """The target's fast decoder into the package, written from the checkpoint a tensor at a time, and
    the graphs its check needs into `scratch` (all in manifest.graphs)."""
    from .fast_decoder import INT4_DEQUANTIZED, FastDecoderConfig, build_fast_decoder

    n = manifest.text.num_layers
    shipped = "decoder_fast_int4" if quant else "decoder_fast"
    suffix = "" if layers == n else "_head"
    checks = FastChecks(shipped, "decoder_fast" + suffix, TWIN + suffix if quant else None,
                        shipped + suffix if quant else None, layers, n)
    head = LazyLlava(ck, dtype, layers)
    for name, graph_quant in ((checks.float_graph, None), (checks.twin, INT4_DEQUANTIZED), (checks.int4, quant)):
        if name is None or name == shipped:
            continue
        stage(f"export {name} (for the check)")
        # the float graph checks the wiring against transformers (float lm_head); twin and int4 carry the
        # shipped graph's lm_head, so the int4 check isolates the int4 layers and its weights match byte for byte
        spec = build_fast_decoder(head, scratch / f"{name}.onnx", FastDecoderConfig(
            name, manifest.dtype, graph_quant, lm_head_bits=head_bits if graph_quant else None,
            block_size=int4_block))
        spec.file = f"{scratch.name}/{spec.file}"
        manifest.graphs[name] = spec
    cfg = FastDecoderConfig(name=shipped, dtype=manifest.dtype, quant=quant, lm_head_bits=head_bits,
                            block_size=int4_block)
    stage(f"export {cfg.name}")
    manifest.graphs[cfg.name] = build_fast_decoder(LazyLlava(ck, dtype), tmp / f"{cfg.name}.onnx", cfg)
    manifest.extra["fast_decoders"] = {cfg.name: asdict(cfg)}
    return checks


def _check_fast_decoders(manifest: Manifest, tmp: Path, checks: FastChecks, ref: verify.PromptReference,
                         bound: float, errors: dict[str, float], stage: Callable[[str], None]) -> None:
    """float: the fast decoder's logits against transformers', within `bound`. int4: the float fast
    graph is held to `bound` (the wiring all three graphs share), and the int4 graph must be within
    INT4_RELATIVE_TOLERANCE of its twin whose MatMul weights are the int4 values times their scales
    (what MatMulNBits' int8 activations cost), which a wrong packing, scale or block layout is far above.

    With fewer layers checked than the model has (`ref` is then transformers truncated to those layers):
    the shipped graph must hold every weight of the checked graph of its kind byte for byte (same
    names: its first layers, final norm, lm_head, rotary tables) and give finite logits on the check
    prompt; its later layers are written by the same code from other tensors, and are not compared."""
    got = {}
    for name in (checks.float_graph, checks.twin, checks.int4):
        if name is not None:
            stage(f"verify {name} against transformers")
            got[name], want = verify.fast_decoder_logits(manifest, tmp, name, ref)
    errors["decoder_fast_logits"] = err = float(np.abs(got[checks.float_graph] - want).max())
    if not err <= bound:
        raise ExportError(f"the fast decoder differs from transformers by {err:.3g} in logits (> {bound:.0e})")
    if checks.int4:
        errors["decoder_fast_int4_vs_twin"] = rel = verify.max_relative_error(got[checks.int4], got[checks.twin])
        errors["decoder_fast_int4_vs_transformers"] = verify.max_relative_error(got[checks.int4], want)
        if not rel <= INT4_RELATIVE_TOLERANCE:
            raise ExportError(f"the int4 fast decoder's logits are {rel:.3g} (relative) from its float twin's "
                              f"(> {INT4_RELATIVE_TOLERANCE}); the int4 graph is broken")
    scope = {"layers_checked": checks.layers, "num_layers": checks.num_layers}
    if checks.layers < checks.num_layers:
        head = checks.int4 or checks.float_graph
        stage(f"verify {checks.shipped} holds {head}'s weights")
        differ = verify.weights_not_in(tmp, manifest.graphs[head], manifest.graphs[checks.shipped])
        if differ:
            raise ExportError(f"{checks.shipped} does not hold the checked graph's weights: {', '.join(differ[:5])}")
        size = graph_size(tmp, manifest.graphs[checks.shipped])
        if _fits_in_memory(2 * size):
            stage(f"run {checks.shipped} on the check prompt")
            logits, _ = verify.fast_decoder_logits(manifest, tmp, checks.shipped, ref)
            if not np.isfinite(logits).all():
                raise ExportError(f"{checks.shipped} gives non-finite logits on the check prompt")
            scope["full_graph"] = "finite logits on the check prompt (prefill + 3 decode steps)"
        else:
            scope["full_graph"] = f"not run: {size / 2**30:.1f} GiB does not fit in memory"
        scope["method"] = (f"graphs of the first {checks.layers} layers (+ final norm, lm_head) checked against "
                           f"transformers truncated to them; {checks.shipped} holds their weights byte for byte")
    manifest.extra["verification_scope"] = scope
