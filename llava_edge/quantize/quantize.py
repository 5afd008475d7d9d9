"""`llava-edge quantize`: fp model package (+ its checkpoint) -> int4/int8 model package.

The new package is the old one with ``decoder.onnx`` replaced (vision, embed and tokenizer are
copied), so run/chat/inspect/bench use it unchanged; ``manifest.quantization`` records how it was
made and the quality report's summary. The output appears only when everything succeeded
(staged directory + rename), so an interrupted run leaves nothing that loads as a package.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import LlavaEdgeError
from ..package import (TOKENIZER_NAME, Manifest, check_output_dir, load_manifest, require_portable_decoder,
                       staged_package, write_manifest)
from .capture import capture_layer_inputs, encode_samples, find_decoder
from .data import load_calibration
from .gptq import GPTQConfig
from .onnx_writer import write_quantized_decoder
from ..packing import QuantizedLinear
from .options import QuantFormat, QuantizeOptions
from .report import REPORT_NAME, QualityReport, compare_packages
from .sequential import QuantizeLayersConfig, quantize_layers


class QuantizeError(LlavaEdgeError):
    pass


@dataclass
class QuantizeResult:
    package_dir: Path
    manifest: Manifest
    report: QualityReport
    skipped: dict[str, str] = field(default_factory=dict)
    quantized: dict[str, QuantizedLinear] = field(default_factory=dict)  # what was written, for checks


def _check_inputs(checkpoint_dir: Any, o: QuantizeOptions) -> None:
    """What the options alone cannot tell (they are checked when built): the float weights are given."""
    if o.from_gptq is None and checkpoint_dir is None:
        raise QuantizeError("--checkpoint is required (the float weights to quantize), unless --from-gptq is given")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _check_model_matches(manifest: Manifest, model: torch.nn.Module) -> None:
    layers = find_decoder(model).layers
    t = manifest.text
    if len(layers) != t.num_layers or layers[0].self_attn.q_proj.in_features != t.hidden_size:
        raise QuantizeError(
            f"checkpoint has {len(layers)} layers of width {layers[0].self_attn.q_proj.in_features}, "
            f"the package {t.num_layers} of width {t.hidden_size}: not the checkpoint this package was exported from"
        )


def _weight_sizes(quantized: dict[str, QuantizedLinear]) -> dict[str, Any]:
    params = sum(q.shape[0] * q.shape[1] for q in quantized.values())
    packed = sum(q.pack().nbytes for q in quantized.values())
    scales = sum(q.scales.numel() * 2 for q in quantized.values())  # as fp16
    return {"quantized_params": params, "packed_weight_bytes": packed, "scale_bytes_fp16": scales,
            "linear_vs_fp16_ratio": (packed + scales) / (2 * params) if params else None}


def quantize_package(
    package_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    overwrite: bool = False,
    progress: bool = True,
    print_report: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize the decoder of the package at ``package_dir`` and write a new package.

    ``checkpoint_dir``: the float checkpoint the package was exported from (GPTQ needs torch
    weights and the full LLaVA forward for calibration); unused with ``options.from_gptq``, which
    imports that GPTQ checkpoint instead of running the algorithm. ``out_dir`` defaults to
    ``options.default_output(package_dir)``. ``options``: how (QuantizeOptions, the CLI's flags,
    checked when built). Returns the new package's manifest and the quality report (also written
    to ``quantization_report.json`` in it).
    """
    _check_inputs(checkpoint_dir, options)
    with _torch_threads(options.torch_threads):
        return _quantize(Path(package_dir), checkpoint_dir, out_dir, options, overwrite, progress, print_report,
                         on_stage)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's thread count for the calibration and GPTQ work, then the caller's again (it is process-wide)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize(src: Path, checkpoint_dir: str | Path | None, out_dir: str | Path | None, o: QuantizeOptions,
              overwrite: bool, progress: bool, print_report: bool,
              on_stage: Callable[[str], None] | None) -> QuantizeResult:
    stage = on_stage or (lambda s: None)
    manifest = load_manifest(src)
    require_portable_decoder(src, manifest, "quantize")
    if manifest.quantization:
        raise QuantizeError(f"{src} is already quantized ({manifest.quantization.get('method')}); "
                            "quantize the float package instead")
    from_gptq, holdout = o.from_gptq, o.holdout
    bits, group_size, act_order = o.bits, o.group_size, o.act_order  # an imported checkpoint's replace them
    out = Path(out_dir) if out_dir is not None else o.default_output(src)
    inputs = [p for p in (src, checkpoint_dir, from_gptq) if p is not None]
    check_output_dir(out, overwrite, protect=inputs)  # before calibration, not after
    dev = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    stage("calibration data")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(src / TOKENIZER_NAME))
    n_wanted = (0 if from_gptq is not None else o.samples) + holdout
    convs = load_calibration(o.calib, n_wanted, o.seed, o.calib_images) if n_wanted else []
    encoded = encode_samples(convs, tokenizer, manifest.text, manifest.vision, max_seq_len=o.max_seq_len)
    n_cal = len(encoded) - holdout if from_gptq is None else 0
    if from_gptq is None and n_cal < 1:
        raise QuantizeError(f"calibration data gave {len(encoded)} samples; need more than holdout={holdout}")
    calib_enc, holdout_enc = encoded[:n_cal], encoded[n_cal:]

    layer_errors: list = []
    damps: dict[str, float] = {}
    skipped: dict[str, str] = {}
    notes: list[str] = []
    rss_before = _rss_mb()
    if from_gptq is not None:
        from .gptq_import import import_gptq_checkpoint

        stage("import GPTQ checkpoint")
        imported = import_gptq_checkpoint(from_gptq, include_lm_head=o.quantize_lm_head)
        quantized = imported.quantized
        bits, group_size, act_order = imported.bits, imported.group_size, imported.desc_act
        notes = imported.notes
    else:
        from ..export.checkpoint import load_checkpoint

        stage("load checkpoint")
        ck = load_checkpoint(checkpoint_dir)
        model = ck.model.eval()
        _check_model_matches(manifest, model)
        rss_before = _rss_mb()
        stage("capture calibration activations")
        t0 = time.perf_counter()
        if dev != "cpu":
            _move_except_layers(model, dev)
        captured = capture_layer_inputs(model, calib_enc + holdout_enc, dev, progress)
        timings["capture"] = time.perf_counter() - t0
        method = o.method.value
        stage(f"{method} layer by layer")
        t0 = time.perf_counter()
        scale_dtype = torch.float16 if manifest.dtype == "float16" else torch.float32
        gcfg = GPTQConfig(bits=bits, group_size=group_size, act_order=act_order, damp=o.damp, blocksize=o.blocksize,
                          scale_dtype=scale_dtype)
        res = quantize_layers(model, captured[:n_cal], captured[n_cal:],
                              QuantizeLayersConfig(method, gcfg, dev, o.quantize_lm_head, progress))
        timings["quantize"] = time.perf_counter() - t0
        quantized, layer_errors, damps, skipped = res.quantized, res.layer_errors, res.damps, res.skipped
        del model, ck, captured, res
        gc.collect()
    rss_peak = _peak_rss_mb()

    stage("write package")
    with staged_package(out, overwrite=overwrite, protect=inputs) as tmp:
        dec = manifest.graphs["decoder"]
        decoder_files = {dec.file, *dec.external_data}
        # The fast decoder (GroupQueryAttention, onnxruntime only) names its weights like the portable
        # one, so the same quantized weights go into it, always as MatMulNBits.
        fast = manifest.graphs.get("decoder_fast")
        fast_files = {fast.file, *fast.external_data} if fast else set()
        for f in src.iterdir():
            if f.name in decoder_files | fast_files or f.name == REPORT_NAME:
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        t0 = time.perf_counter()
        written = write_quantized_decoder(src / dec.file, tmp / dec.file, quantized, o.format.value)
        new = Manifest.from_dict(asdict(manifest))
        for rel in decoder_files | fast_files:  # rewritten: hashed again by write_manifest
            new.digests.pop(rel, None)
        if fast is not None:
            stage("write quantized fast decoder")
            written_fast = write_quantized_decoder(src / fast.file, tmp / fast.file, quantized,
                                                   QuantFormat.MATMULNBITS.value, check=False)
            new.graphs["decoder_fast"].external_data = written_fast.external_data
            new.graphs["decoder_fast"].max_abs_error = None
        timings["write"] = time.perf_counter() - t0
        new.graphs["decoder"].external_data = written.external_data
        new.graphs["decoder"].max_abs_error = None  # measured vs torch fp; see the report instead
        new.quantization = {
            "method": o.label, "bits": bits, "group_size": group_size, "act_order": act_order,
            "format": o.format.value, "samples": n_cal, "holdout": len(holdout_enc),
            "calibration": str(o.calib or "synthetic"), "damp": o.damp,
            "damp_max_used": max(damps.values()) if damps else None,
            "lm_head": "lm_head" in quantized, "quantized_linears": len(quantized), "skipped": skipped,
            "notes": notes,
        }
        write_manifest(tmp, new)

        report = QualityReport(
            config={k: v for k, v in new.quantization.items() if k not in ("skipped", "notes")},
            layer_errors=QualityReport.layer_rows(layer_errors),
        )
        fp_size = sum((src / f).stat().st_size for f in decoder_files)
        q_size = sum((tmp / f).stat().st_size for f in [dec.file, *written.external_data])
        report.sizes = {"decoder_fp_bytes": fp_size, "decoder_quant_bytes": q_size,
                        "decoder_size_ratio": q_size / fp_size, **_weight_sizes(quantized)}
        report.memory = {"peak_rss_mb": round(rss_peak, 1), "rss_with_model_loaded_mb": round(rss_before, 1)}
        if holdout_enc:
            stage("compare logits with the float package")
            t0 = time.perf_counter()
            report.logits = compare_packages(src, tmp, holdout_enc, o.threads)
            timings["report"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        report.timings_s = {k: round(v, 2) for k, v in timings.items()}
        report.write(tmp)
        new.quantization["report"] = report.summary()
        write_manifest(tmp, new)
    if print_report:
        report.print()
    return QuantizeResult(out, load_manifest(out), report, skipped, quantized)


def _move_except_layers(model: torch.nn.Module, device: str) -> None:
    """Put everything but the decoder layers on ``device`` (vision tower, projector, embeddings,
    final norm): the layers then visit the device one at a time in :func:`quantize_layers`."""
    layer_params = {id(p) for p in find_decoder(model).layers.parameters()}
    layer_buffers = {id(b) for b in find_decoder(model).layers.buffers()}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in layer_params:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and id(b) not in layer_buffers:
                module._buffers[name] = b.to(device)
