"""The quality report: numbers that say whether a quantized package is fit to ship.

* per decoder layer: relative error of the layer's update on held-out calibration inputs with the
  method's weights and with RTN's (same bits and groups); their ratio is GPTQ's gain;
* end to end, in onnxruntime, fp package vs quantized package, teacher-forced on held-out
  conversations (image included): max |logit error|, relative RMS error, mean/max KL(fp || quant)
  of the next-token distributions and top-1 (greedy) token agreement;
* sizes: decoder bytes on disk, and packed-weights-plus-scales over fp16 weights for the
  quantized Linears alone (~0.25 + 1/g at int4).

The report is JSON (``quantization_report.json``) inside the package, summarised in the manifest
and printed as a table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .capture import EncodedSample
from .sequential import LayerError

REPORT_NAME = "quantization_report.json"


@dataclass
class LogitsComparison:
    n_prompts: int
    n_tokens: int
    max_abs_error: float
    rel_rms_error: float  # ||quant - fp|| / ||fp|| over all logits
    mean_kl: float  # KL(fp || quant) per token, nats
    max_kl: float
    top1_agreement: float  # fraction of positions where argmax agrees (teacher-forced greedy)


@dataclass
class QualityReport:
    config: dict[str, Any]
    layer_errors: list[dict[str, Any]] = field(default_factory=list)
    logits: LogitsComparison | None = None
    sizes: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def layer_rows(errors: Sequence[LayerError]) -> list[dict[str, Any]]:
        return [{"layer": e.layer, "method": e.gptq, "rtn": e.rtn, "ratio": e.ratio} for e in errors]

    def mean_ratio(self) -> float | None:
        """Geometric mean over layers of method error / RTN error (None without GPTQ errors)."""
        ratios = [r["ratio"] for r in self.layer_errors if r.get("ratio")]
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gptq_over_rtn_layer_error": self.mean_ratio()}
        if self.layer_errors:
            out["mean_layer_error"] = float(np.mean([r["method"] if r["method"] is not None else r["rtn"]
                                                     for r in self.layer_errors]))
            out["mean_layer_error_rtn"] = float(np.mean([r["rtn"] for r in self.layer_errors]))
        if self.logits is not None:
            out.update({f"logits_{k}": v for k, v in asdict(self.logits).items()})
        out.update({k: v for k, v in self.sizes.items() if k.endswith("ratio")})
        out.update(self.memory)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    def write(self, package_dir: Path) -> Path:
        path = Path(package_dir) / REPORT_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def print(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        if self.layer_errors:
            t = Table(title="Per-layer relative error of the layer update (held-out inputs)")
            with_method = any(r["method"] is not None for r in self.layer_errors)
            cols = (["layer", str(self.config.get("method", "method")), "rtn", "ratio"] if with_method
                    else ["layer", "rtn"])
            for col in cols:
                t.add_column(col, justify="right")
            for r in self.layer_errors:
                fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
                row = [str(r["layer"]), fmt(r["method"]), fmt(r["rtn"]), fmt(r["ratio"])]
                t.add_row(*(row if with_method else [row[0], row[2]]))
            console.print(t)
        s = Table(title="Quantization summary")
        s.add_column("metric")
        s.add_column("value", justify="right")
        for k, v in self.summary().items():
            s.add_row(k, "-" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v)))
        console.print(s)


# -------------------------------------------------------------------------------------------
# fp vs quantized package, in onnxruntime.


class PackageRunner:
    """Full-sequence logits of a package (vision -> embed -> merge -> decoder with empty cache),
    the same graph calls the runtime makes for a prefill, but returning every position's logits."""

    def __init__(self, package_dir: str | Path, threads: int | None = None):
        import onnxruntime as ort

        from ..package import load_manifest
        from ..runtime.ort_backend import session_options

        root = Path(package_dir)
        self.manifest = load_manifest(root)
        opts = session_options(threads)
        prov = ["CPUExecutionProvider"]
        g = self.manifest.graphs
        self.vision = ort.InferenceSession(str(root / g["vision"].file), opts, providers=prov)
        self.embed = ort.InferenceSession(str(root / g["embed"].file), opts, providers=prov)
        self.decoder = ort.InferenceSession(str(root / g["decoder"].file), opts, providers=prov)
        self.dtype = np.dtype(self.manifest.dtype)

    def logits(self, sample: EncodedSample) -> np.ndarray:
        t = self.manifest.text
        ids = sample.input_ids.numpy().astype(np.int64)
        embeds = self.embed.run(None, {"input_ids": ids})[0]
        if sample.pixel_values is not None and sample.image_sizes is not None:  # LLaVA-NeXT tiles
            from ..runtime import anyres

            feats = self.vision.run(None, {"pixel_values": sample.pixel_values[0].numpy().astype(self.dtype)})[0]
            size = tuple(int(x) for x in sample.image_sizes[0])
            embeds[ids == t.image_token_id] = anyres.pack_image_features(feats, size, self.manifest.vision)
        elif sample.pixel_values is not None:
            feats = self.vision.run(None, {"pixel_values": sample.pixel_values.numpy().astype(self.dtype)})[0]
            embeds[ids == t.image_token_id] = feats.reshape(-1, feats.shape[-1]).astype(embeds.dtype)
        n = ids.shape[1]
        feeds = {"inputs_embeds": embeds.astype(self.dtype), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), dtype=self.dtype)
        for inp in self.decoder.get_inputs()[3:]:
            feeds[inp.name] = empty
        return self.decoder.run(["logits"], feeds)[0][0].astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> LogitsComparison:
    kls, agree, max_abs, num, den, n_tok = [], 0, 0.0, 0.0, 0.0, 0
    for r, g in zip(ref, got):
        lr, lg = _log_softmax(r), _log_softmax(g)
        kls.append((np.exp(lr) * (lr - lg)).sum(-1))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        max_abs = max(max_abs, float(np.abs(r - g).max()))
        num += float(((r - g).astype(np.float64) ** 2).sum())
        den += float((r.astype(np.float64) ** 2).sum())
        n_tok += r.shape[0]
    kl = np.concatenate(kls) if kls else np.zeros(1)
    return LogitsComparison(
        n_prompts=len(ref), n_tokens=n_tok, max_abs_error=max_abs,
        rel_rms_error=math.sqrt(num / den) if den else 0.0,
        mean_kl=float(kl.mean()), max_kl=float(kl.max()), top1_agreement=agree / max(n_tok, 1),
    )


def compare_packages(fp_dir: str | Path, quant_dir: str | Path, samples: Sequence[EncodedSample],
                     threads: int | None = None) -> LogitsComparison:
    fp, q = PackageRunner(fp_dir, threads), PackageRunner(quant_dir, threads)
    return compare_logits([fp.logits(s) for s in samples], [q.logits(s) for s in samples])
