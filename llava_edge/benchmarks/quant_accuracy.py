"""Held-out accuracy of the shipped tiny LLaVA for every export / quantize option that changes numerics.

    python -m llava_edge.benchmarks.quant_accuracy -o benchmarks/results/accuracy_tiny.md [--n 300]

Each variant of the checkpoint (llava_edge/assets/tiny_llava by default) is exported or quantized into a
scratch directory and scored with the same held-out questions as ``llava-edge eval`` (exact match, greedy,
8 new tokens). Speed options move accuracy by a point or less, which is the size of the binomial error of
one accuracy at n=300, so every row is also compared with the fp32 row question by question: the paired
error of that delta (``sqrt(b + c - (b - c)^2 / N) / N`` with b, c the questions only one of the two got
right) is several times smaller and says which differences are real. Rows are either true int4 kernels
(MatMulNBits, as shipped) or float "twins" whose MatMul weights are the int4 values times their scales:
a twin measures the weight rounding alone (no int8-activation error), and is the only way to score a
per-channel (group = K) int4 weight when K is not a power of two (MatMulNBits needs power-of-two blocks).
Writes a markdown report and, next to it, the same numbers as JSON (per question: right or wrong for every
row, fp32's answers, and each row's answers where they differ from fp32's).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llava_edge.synthetic import data as D
from llava_edge.synthetic.evaluate import evaluate, normalize, package_answerer

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "tiny_llava"
KERNEL, TWIN, FLOAT = "int4 kernel", "float twin", "float"


@dataclass
class Variant:
    """One row: how its package is made (``build(bench, out_dir)``), which backend scores it, and what
    in it differs numerically from the fp32 fast decoder."""

    name: str
    changes: str
    graph: str  # KERNEL, TWIN or FLOAT
    backend: str
    build: Callable[["Bench", Path], None]


@dataclass
class Scored:
    variant: Variant
    per_type: dict[str, dict[str, float]]
    answers: list[str]
    correct: list[bool]
    decoder_bytes: int
    package_bytes: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def binomial_se(p: float, n: int) -> float:
    """Standard error of one accuracy p measured on n questions."""
    return math.sqrt(p * (1 - p) / n)


def paired_delta(base: list[bool], other: list[bool]) -> tuple[float, float]:
    """(other - base accuracy, its standard error) on the same questions (McNemar's pairing): only the
    questions where exactly one of the two is right move the delta, so it is resolved far below the
    binomial error of either accuracy."""
    n = len(base)
    if n != len(other) or n == 0:
        raise ValueError("paired_delta needs two equally long, non-empty answer lists")
    b = sum(x and not y for x, y in zip(base, other))
    c = sum(y and not x for x, y in zip(base, other))
    return (c - b) / n, math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n


class Bench:
    """Builds variants of one checkpoint into `work`, sharing the float base packages and the loaded model."""

    def __init__(self, checkpoint: Path, work: Path):
        self.checkpoint, self.work = Path(checkpoint), Path(work)
        self._loaded = None

    @property
    def loaded(self):
        if self._loaded is None:
            from llava_edge.export.checkpoint import load_checkpoint

            self._loaded = load_checkpoint(self.checkpoint)
        return self._loaded

    def base(self, target: str) -> Path:
        """The float package of a target, exported once: "cpu" (fp32 fast decoder) or "portable" (+ the
        float fast decoder, which quantize rewrites to MatMulNBits)."""
        out = self.work / f"base-{target}"
        if not out.exists():
            from llava_edge.export.exporter import export_package
            from llava_edge.export.fast_decoder import export_fast_decoder

            export_package(self.checkpoint, out, target=target)
            if target == "portable":
                export_fast_decoder(self.loaded, out)
        return out


def export_cli(target: str, **options: str) -> Callable[[Bench, Path], None]:
    """``llava-edge export --target TARGET [--embed ..] [--lm-head ..] [--vision ..]``; the vision tower stays
    fp32 unless asked, so a row changes the decoder side only (the defaults row asks for auto)."""
    def build(bench: Bench, out: Path) -> None:
        from llava_edge.export.exporter import export_package

        export_package(bench.checkpoint, out, target=target, **{"vision_quant": "fp32", **options})
    return build


def fast_graph(name: str = "decoder_fast_int4", **cfg: Any) -> Callable[[Bench, Path], None]:
    """The fp32 cpu package with one more fast decoder from ``export_fast_decoder(**cfg)`` (float embed)."""
    def build(bench: Bench, out: Path) -> None:
        from llava_edge.export.fast_decoder import export_fast_decoder

        shutil.copytree(bench.base("cpu"), out)
        export_fast_decoder(bench.loaded, out, name=name, **cfg)
    return build


def quantized(method: str, group_size: int) -> Callable[[Bench, Path], None]:
    """``llava-edge quantize BASE --checkpoint CK --method M --group-size G`` (synthetic calibration)."""
    def build(bench: Bench, out: Path) -> None:
        from llava_edge.quantize.options import QuantizeOptions
        from llava_edge.quantize.quantize import quantize_package

        options = QuantizeOptions(method=method, group_size=group_size, threads=1)
        quantize_package(bench.base("portable"), bench.checkpoint, out, options, progress=False, print_report=False)
    return build


def variants() -> list[Variant]:
    from llava_edge.export.fast_decoder import INT4_DEQUANTIZED, INT4_PER_CHANNEL_DEQUANTIZED

    int4, twin = "ort-fast-int4", "ort-fast"
    base = "int4 RTN g128, int8 activations"
    return [
        Variant("fp32", "none (reference)", FLOAT, "ort-fast", lambda b, out: shutil.copytree(b.base("cpu"), out)),
        Variant("cpu-int4 (defaults)", f"{base}; int8 lm_head; int8 embed; int8 vision", KERNEL, int4,
                export_cli("cpu-int4", vision_quant="auto")),
        Variant("cpu-int4 --vision fp32", f"{base}; int8 lm_head; int8 embed", KERNEL, int4, export_cli("cpu-int4")),
        Variant("cpu-int4 --embed float", f"{base}; int8 lm_head", KERNEL, int4, export_cli("cpu-int4", embed="float")),
        Variant("cpu-int4 --lm-head float", f"{base}; int8 embed", KERNEL, int4,
                export_cli("cpu-int4", lm_head="float")),
        Variant("cpu-int4 --embed float --lm-head float", base, KERNEL, int4,
                export_cli("cpu-int4", embed="float", lm_head="float")),
        Variant("int4 g128 unfused", f"{base}; q/k/v and gate/up as separate MatMulNBits (fuse=False)", KERNEL, int4,
                fast_graph(quant="int4-rtn", fuse=False)),
        Variant("int4 g128 + int4 lm_head", f"{base}; int4 lm_head", KERNEL, int4,
                fast_graph(quant="int4-rtn", quantize_lm_head=True)),
        Variant("int4 g64", "int4 RTN g64, int8 activations", KERNEL, int4,
                fast_graph(quant="int4-rtn", block_size=64)),
        Variant("int4 g32", "int4 RTN g32, int8 activations", KERNEL, int4,
                fast_graph(quant="int4-rtn", block_size=32)),
        Variant("int4 g128 accuracy_level 0", "int4 RTN g128, float activations", KERNEL, int4,
                fast_graph(quant="int4-rtn", accuracy_level=0)),
        Variant("RTN g128 twin", "int4 RTN g128 weights only", TWIN, twin,
                fast_graph("decoder_fast", quant=INT4_DEQUANTIZED)),
        Variant("RTN per-channel twin", "int4 RTN, one scale per output channel (group = K)", TWIN, twin,
                fast_graph("decoder_fast", quant=INT4_PER_CHANNEL_DEQUANTIZED)),
        Variant("quantize RTN g128", "int4 RTN g128 (quantize's scale rule), float activations", KERNEL, twin,
                quantized("rtn", 128)),
        Variant("quantize GPTQ g128", "int4 GPTQ g128 act-order, float activations", KERNEL, twin,
                quantized("gptq", 128)),
        Variant("quantize RTN g32", "int4 RTN g32 (quantize's scale rule), float activations", KERNEL, twin,
                quantized("rtn", 32)),
        Variant("quantize GPTQ g32", "int4 GPTQ g32 act-order, float activations", KERNEL, twin,
                quantized("gptq", 32)),
    ]


def _graph_bytes(pkg: Path, backend: str) -> tuple[int, int]:
    from llava_edge.package import load_manifest

    """(bytes of the decoder graph the backend runs, bytes of the package without the decoders it does not
    run): the scratch packages carry extra decoders (the float base, quantize's portable one)."""
    manifest = load_manifest(pkg)
    used = "decoder_fast_int4" if backend == "ort-fast-int4" else "decoder_fast"
    size = lambda spec: sum((pkg / f).stat().st_size for f in [spec.file, *spec.external_data])  # noqa: E731
    unused = sum(size(g) for name, g in manifest.graphs.items() if name.startswith("decoder") and name != used)
    total = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    return size(manifest.graphs[used]), total - unused


def score(variant: Variant, pkg: Path, n: int, threads: int | None) -> Scored:
    """Answers of `pkg` on held-out scenes 0..n through `evaluate` (the numbers `llava-edge eval` prints),
    recording each answer so rows can be compared question by question."""
    t0 = time.perf_counter()
    answer = package_answerer(pkg, backend=variant.backend, threads=threads)
    answers: list[str] = []

    def record(image, question: str) -> str:
        answers.append(answer(image, question))
        return answers[-1]

    per_type = evaluate(record, n=n, with_blind=False)
    refs = [t.answer for s in D.generate(D.HELDOUT_SEED, n) for t in s.turns]
    correct = [normalize(a) == normalize(r) for a, r in zip(answers, refs, strict=True)]
    scored = Scored(variant, per_type, answers, correct, *_graph_bytes(pkg, variant.backend),
                    seconds=time.perf_counter() - t0)
    qreport = pkg / "quantization_report.json"  # quantize's teacher-forced comparison with the float package
    if qreport.is_file():
        scored.extra["quantize_report_logits"] = json.loads(qreport.read_text()).get("logits")
    return scored


def _shown(path: Path) -> str:
    """The checkpoint as the report names it: relative to the repository for the shipped one."""
    try:
        return str(Path(path).resolve().relative_to(SHIPPED.parents[2]))
    except ValueError:
        return Path(path).name


def report(rows: list[Scored], n: int, checkpoint: Path) -> tuple[str, dict]:
    """The markdown tables and the JSON document of a finished run (rows[0] is the fp32 reference)."""
    ref = rows[0]
    qn = len(ref.correct)
    mb = lambda b: f"{b / 1e6:.2f}"  # noqa: E731
    lines = [f"Held-out accuracy of {checkpoint.name} ({n} scenes, {qn} questions, exact match, greedy). "
             f"Binomial SE of one accuracy: +-{100 * binomial_se(ref.accuracy, qn):.1f} points; "
             "the delta column's +- is the paired SE against fp32 (same questions). Deployed MB: the package "
             "without the decoder graphs its backend does not load.", "",
             "| variant | what changes numerics (vs fp32) | graph | backend | accuracy % | delta vs fp32 (points) "
             "| answers changed | decoder MB | deployed MB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    doc = {"checkpoint": _shown(checkpoint), "n_scenes": n, "n_questions": qn, "rows": []}
    for r in rows:
        d, se = paired_delta(ref.correct, r.correct)
        changed = sum(a != b for a, b in zip(ref.answers, r.answers)) / qn
        lines.append(f"| {r.variant.name} | {r.variant.changes} | {r.variant.graph} | {r.variant.backend} | "
                     f"{100 * r.accuracy:.1f} +- {100 * binomial_se(r.accuracy, qn):.1f} | "
                     f"{100 * d:+.2f} +- {100 * se:.2f} | {100 * changed:.1f}% | {mb(r.decoder_bytes)} | "
                     f"{mb(r.package_bytes)} |")
        doc["rows"].append({"variant": r.variant.name, "changes": r.variant.changes, "graph": r.variant.graph,
                            "backend": r.variant.backend, "accuracy": r.accuracy,
                            "binomial_se": binomial_se(r.accuracy, qn), "delta_vs_fp32": d, "delta_paired_se": se,
                            "answers_changed_vs_fp32": changed, "decoder_bytes": r.decoder_bytes,
                            "package_bytes": r.package_bytes, "seconds": round(r.seconds, 1),
                            "per_type": r.per_type, "correct": "".join("01"[c] for c in r.correct),
                            "answers_unlike_fp32": {i: a for i, (a, f) in enumerate(zip(r.answers, ref.answers))
                                                    if a != f} if r is not ref else r.answers, **r.extra})
    types = list(ref.per_type)
    lines += ["", "Per question type (accuracy %, n per type in the header):", "",
              "| variant | " + " | ".join(f"{t} ({int(ref.per_type[t]['n'])})" for t in types) + " |",
              "|---|" + "---:|" * len(types)]
    for r in rows:
        lines.append(f"| {r.variant.name} | " + " | ".join(f"{100 * r.per_type[t]['accuracy']:.1f}" for t in types)
                     + " |")
    teacher = [r for r in rows if r.extra.get("quantize_report_logits")]
    if teacher:
        lines += ["", "Teacher-forced against the float package (quantize's report: its held-out calibration "
                  "prompts, every position, fp32 logits as reference):", "",
                  "| variant | tokens | logits rel. RMS | mean KL (nats) | max KL | top-1 agreement |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in teacher:
            t = r.extra["quantize_report_logits"]
            lines.append(f"| {r.variant.name} | {t['n_tokens']} | {t['rel_rms_error']:.4f} | {t['mean_kl']:.4f} | "
                         f"{t['max_kl']:.3f} | {100 * t['top1_agreement']:.1f}% |")
    return "\n".join(lines) + "\n", doc


def same_answers(rows: list[Scored], a: str, b: str) -> str | None:
    """'a and b: identical greedy answers on all N questions' (or how many differ), when both were run."""
    by = {r.variant.name: r for r in rows}
    if a not in by or b not in by:
        return None
    diff = sum(x != y for x, y in zip(by[a].answers, by[b].answers))
    what = "identical greedy answers on all" if diff == 0 else f"{diff} different answers out of"
    return f"{a} / {b}: {what} {len(by[a].answers)} questions"


def run(checkpoint: Path, n: int, work: Path, only: list[str] | None = None, threads: int | None = 1,
        log: Callable[[str], None] = print) -> tuple[str, dict]:
    bench = Bench(checkpoint, work)
    chosen = [v for v in variants() if only is None or v.name == "fp32" or v.name in only]
    rows = []
    for v in chosen:
        pkg = work / re.sub(r"[^a-z0-9]+", "-", v.name.lower()).strip("-")  # a kept --work is a cache by name
        t0 = time.perf_counter()
        if not pkg.exists():
            v.build(bench, pkg)
        built = time.perf_counter() - t0
        rows.append(score(v, pkg, n, threads))
        rows[-1].extra["build_seconds"] = round(built, 1)
        log(f"{v.name}: {100 * rows[-1].accuracy:.2f}% (build {built:.0f} s, eval {rows[-1].seconds:.0f} s)")
    md, doc = report(rows, n, checkpoint)
    checks = [c for c in (same_answers(rows, "int4 g128 unfused", "cpu-int4 --embed float --lm-head float"),
                          same_answers(rows, "int4 g128 accuracy_level 0", "RTN g128 twin")) if c]
    if checks:
        md += "\nSame numerics, checked: " + "; ".join(checks) + ".\n"
        doc["checks"] = checks
    return md, doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="markdown report; the JSON goes next to it")
    ap.add_argument("--checkpoint", type=Path, default=SHIPPED)
    ap.add_argument("--n", type=int, default=300, help="held-out scenes (5-9 questions each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (kept; default: a temporary one)")
    ap.add_argument("--only", default=None, help="comma list of variant names (fp32 always runs)")
    a = ap.parse_args(argv)
    only = a.only.split(",") if a.only else None
    names = [v.name for v in variants()]
    if only and set(only) - set(names):
        ap.error(f"unknown variant(s) {sorted(set(only) - set(names))}; use {', '.join(names)}")
    t0 = time.perf_counter()
    if a.work is None:
        with tempfile.TemporaryDirectory(prefix="quant-accuracy-") as tmp:
            md, doc = run(a.checkpoint, a.n, Path(tmp), only, a.threads)
    else:
        a.work.mkdir(parents=True, exist_ok=True)
        md, doc = run(a.checkpoint, a.n, a.work, only, a.threads)
    args = list(argv if argv is not None else sys.argv[1:])
    if "--work" in args:  # a scratch path: not part of the result
        del args[args.index("--work"):args.index("--work") + 2]
    cmd = "python -m llava_edge.benchmarks.quant_accuracy " + shlex.join(args)
    md = f"`{cmd}` ({time.perf_counter() - t0:.0f} s)\n\n" + md
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    print(md)


if __name__ == "__main__":
    main()
