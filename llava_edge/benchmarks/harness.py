"""`llava-edge bench`: latency, throughput and memory of a package, against transformers in the same run.

Method (why the numbers can be trusted on a noisy machine):
- every engine runs the same token ids and pixels; warm-up runs are excluded;
- repeats are interleaved across engines (ours, transformers, ours, ...) so that load changes on a
  shared machine hit all of them alike, and ratios are taken between medians of the same run;
- both sides produce exactly `new_tokens` tokens (eos is ignored by ours and suppressed in transformers
  with min_new_tokens), so tokens/s compare equal work;
- our side runs the real `Pipeline` loop; a timing proxy around the backend splits each token's time
  into engine time and runtime overhead (Python, sampling, detokenizing).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import LlavaEdgeError
from ..package import TOKENIZER_NAME, Manifest, load_manifest
from ..errors import BackendError
from ..runtime.backends import DECODER_GRAPHS, resolve, resolve_auto
from ..runtime.ragged import left_pad
from .measure import PeakRSS, TimedBackend, machine_info, median, percentiles, versions

class BenchmarkError(LlavaEdgeError):
    pass


@dataclass
class Sample:
    """One measured generation (one engine, one configuration, one repeat)."""

    vision_ms: float
    ttft_ms: float
    token_ms: list[float]  # latency of each generated token after the first
    overhead_ms: list[float]  # per token: time outside the inference engine (ours only)
    tokens: int
    token_ids: list[list[int]]


@dataclass
class EngineResult:
    """Medians over repeats for one engine at one (batch, prompt_len)."""

    engine: str
    batch: int
    prompt_tokens: int  # text + image tokens of one request
    new_tokens: int
    repeats: int
    vision_ms: float
    ttft_ms: float
    token_latency_ms: dict[str, float]  # p50/p90/p99 over all tokens of all repeats
    decode_tokens_per_s: float  # per sequence
    throughput_tokens_per_s: float  # over the batch
    overhead_ms_per_token: float | None  # runtime time outside the engine (None for transformers)
    overhead_fraction: float | None  # of the per-token latency
    peak_rss_bytes: int
    rss_increase_bytes: int  # peak during this engine's load + runs minus RSS before loading it
    samples: list[dict[str, float]] = field(default_factory=list)


@dataclass
class BenchmarkReport:
    package_dir: str
    package_bytes: int
    arch: dict[str, Any]
    config: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, str]
    results: list[EngineResult]
    ratios: list[dict[str, Any]]
    outputs_identical: dict[str, bool]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- engines ------------------------------------------------------------------------------------

class _OursEngine:
    """A Pipeline over one backend, wrapped in the timing proxy; eos ignored so every run is full length."""

    def __init__(self, name: str, package_dir: Path, device: str, threads: int | None, prune: Any = None):
        from tokenizers import Tokenizer

        from ..runtime.backends import open_backend
        from ..runtime.pipeline import Pipeline

        self.name = name
        manifest = load_manifest(package_dir)
        manifest.text.eos_token_ids = []  # benchmark only: fixed-length runs
        tokenizer = Tokenizer.from_file(str(package_dir / TOKENIZER_NAME))
        self.backend = TimedBackend(open_backend(name, package_dir, manifest, device, threads))
        # prefix_cache=0: every repeat measures a cold prompt (vision + full prefill), as transformers does
        self.pipe = Pipeline(package_dir, manifest, self.backend, tokenizer, prefix_cache=0, prune=prune)

    def run(self, requests: list, new_tokens: int) -> Sample:
        from ..runtime.pipeline import drain

        self.backend.reset()
        t0 = time.perf_counter()
        results = drain(self.pipe.run(requests, max_new_tokens=new_tokens))
        t_end = time.perf_counter()
        self.backend.finish(t_end)
        log = self.backend.log
        times = log.token_times
        token_ms = [(b - a) * 1000 for a, b in zip(times, times[1:])]
        overhead = [max(0.0, iv - busy * 1000) for iv, busy in zip(token_ms, log.busy_after_prefill)]
        return Sample(vision_ms=results[0].timings.vision_ms, ttft_ms=(times[0] - t0) * 1000,
                      token_ms=token_ms, overhead_ms=overhead, tokens=len(results[0].token_ids),
                      token_ids=[r.token_ids for r in results])


class _TransformersEngine:
    """HF LlavaForConditionalGeneration.generate on the same ids and pixels, timed with a streamer."""

    name = "transformers"

    def __init__(self, checkpoint: Path, threads: int | None, attn_implementation: str = "sdpa"):
        import torch

        from ..export.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.model = load_checkpoint(checkpoint).model
        self.model.set_attn_implementation(attn_implementation)
        self.attn_implementation = attn_implementation

    def run(self, ids: np.ndarray, mask: np.ndarray, pixels: np.ndarray | None, new_tokens: int, pad: int,
            vision_kwargs: dict[str, Any]) -> Sample:
        import torch
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class _Stamp(BaseStreamer):
            def put(self, value: Any) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        px = torch.from_numpy(pixels) if pixels is not None else None
        with torch.inference_mode():
            vision_ms = 0.0
            if px is not None:
                t0 = time.perf_counter()
                self.model.model.get_image_features(pixel_values=px, **vision_kwargs)
                vision_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            # a text-only prompt passes no pixel_values at all: transformers' LLaVA would encode None
            images = {"pixel_values": px} if px is not None else {}
            out = self.model.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False, **images,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
                                      streamer=_Stamp())
        stamps = stamps[1:]  # the first put is the prompt
        token_ms = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
        return Sample(vision_ms=vision_ms, ttft_ms=(stamps[0] - t0) * 1000, token_ms=token_ms, overhead_ms=[],
                      tokens=len(stamps), token_ids=out[:, ids.shape[1]:].tolist())


# -- workload -------------------------------------------------------------------------------------

def bench_image(size: int = 400):
    """A deterministic photo-like image (smooth gradients + noise): preprocessing does real work."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:int(size * 0.75)]
    base = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.float32)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


_FILLER = "please describe the picture and tell me about the colour of each shape on the left and right".split()


def make_request(pipe: Any, prompt_len: int, image: Any | None):
    """A one-turn Request whose text (template included) is as close to prompt_len tokens as the
    tokenizer allows; returns (request, token ids)."""
    from ..runtime.pipeline import Request

    n_img = pipe.prune.kept_count(pipe.manifest.vision.num_image_tokens) if image is not None else 0
    images = [image] if image is not None else []
    words: list[str] = []
    best = None
    for i in range(4 * prompt_len + 8):
        req = Request([(" ".join(words) or "hi", None)], images)
        ids = pipe.encode_request(req)
        text_len = len(ids) - n_img
        if best is None or abs(text_len - prompt_len) < abs(best[2] - prompt_len):
            best = (req, ids, text_len)
        if text_len >= prompt_len:
            break
        words.append(_FILLER[i % len(_FILLER)])
    return best[0], best[1]


def _summarize(engine: str, batch: int, prompt_tokens: int, new_tokens: int, samples: list[Sample],
               mem: PeakRSS, rss_before: int) -> EngineResult:
    all_tokens = [t for s in samples for t in s.token_ms]
    per_run_tps = [len(s.token_ms) / (sum(s.token_ms) / 1000) for s in samples if s.token_ms]
    tps = median(per_run_tps)
    overhead = [o for s in samples for o in s.overhead_ms]
    ov = median(overhead) if overhead else None
    p50 = median(all_tokens)
    return EngineResult(
        engine=engine, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=len(samples),
        vision_ms=median([s.vision_ms for s in samples]), ttft_ms=median([s.ttft_ms for s in samples]),
        token_latency_ms=percentiles(all_tokens), decode_tokens_per_s=tps, throughput_tokens_per_s=tps * batch,
        overhead_ms_per_token=ov, overhead_fraction=(ov / p50) if ov is not None and p50 > 0 else None,
        peak_rss_bytes=mem.peak, rss_increase_bytes=max(0, mem.peak - rss_before),
        samples=[{"vision_ms": s.vision_ms, "ttft_ms": s.ttft_ms, "decode_ms": sum(s.token_ms), "tokens": s.tokens}
                 for s in samples],
    )


def _package_bytes(package_dir: Path, manifest: Manifest, engines: Sequence[str]) -> int:
    used = {"vision", "embed"}
    for e in engines:
        used.add(DECODER_GRAPHS.get(resolve(e)[0], ("decoder",))[0])
    total = (package_dir / TOKENIZER_NAME).stat().st_size
    for name, g in manifest.graphs.items():
        if name in used:
            total += sum((package_dir / f).stat().st_size for f in [g.file, *g.external_data])
    return total


# -- the entry point --------------------------------------------------------------------------------

def run_benchmark(
    package_dir: str | os.PathLike,
    backend: str | Sequence[str] = "auto",
    batch: Sequence[int] = (1,),
    prompt_len: Sequence[int] = (64,),
    new_tokens: int = 128,
    baseline: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    repeat: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    with_image: bool = True,
    baseline_attn: str = "sdpa",
    out_json: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    console: bool = True,
    on_progress: Callable[[str], None] | None = None,
    prune: str | None = None,
) -> BenchmarkReport:
    """Measure the package on one or more backends (names from ``runtime.backends``, comma list allowed:
    "ort,ort-fast"; ``device`` cpu|cuda) and, with baseline="transformers", HF generate on the checkpoint,
    interleaved in one run. ``prune`` (METHOD:RATIO, runtime/prune.py) prunes our engines' image tokens; the
    transformers baseline always reads every token.

    Returns the report; writes JSON (out_json) and a PNG (plot) when asked; prints a rich table.
    """
    package_dir = Path(package_dir)
    manifest = load_manifest(package_dir)
    engines = [b.strip() for b in (backend.split(",") if isinstance(backend, str) else backend) if b.strip()]
    if not engines:
        raise BenchmarkError("no backend given")
    engines = list(dict.fromkeys(resolve_auto(package_dir, manifest, device) if n == "auto" else n for n in engines))
    if baseline not in (None, "transformers"):
        raise BenchmarkError(f"unknown baseline {baseline!r}; the only baseline is 'transformers'")
    for name in engines:
        try:
            resolve(name, device)
        except BackendError as e:
            raise BenchmarkError(str(e)) from e
    if repeat < 1 or new_tokens < 2:
        raise BenchmarkError("repeat must be >= 1 and new_tokens >= 2 (per-token latency needs two tokens)")
    say = on_progress or (lambda s: None)
    image = bench_image() if with_image else None
    info = machine_info(threads)

    ours: dict[str, _OursEngine] = {}
    mems: dict[str, PeakRSS] = {}
    before: dict[str, int] = {}
    for name in engines:
        say(f"load {name}")
        mem = PeakRSS().__enter__()
        before[name] = mem.start
        try:
            ours[name] = _OursEngine(name, package_dir, device, threads, prune)
        except BackendError as e:  # unknown name, no TensorRT, no GPU: say which engine of the run
            raise BenchmarkError(f"backend {name}: {e}") from e
        finally:
            mem.__exit__()
        mems[name] = mem

    hf = None
    if baseline == "transformers":
        ckpt = Path(checkpoint or manifest.source.get("path", ""))
        if not ckpt.is_dir():
            raise BenchmarkError(f"baseline transformers needs the checkpoint directory (--checkpoint); "
                                 f"{ckpt} not found")
        say("load transformers")
        mem = PeakRSS().__enter__()
        before["transformers"] = mem.start
        hf = _TransformersEngine(ckpt, threads, baseline_attn)
        mem.__exit__()
        mems["transformers"] = mem

    first = next(iter(ours.values())).pipe
    vision_kwargs = {"vision_feature_layer": manifest.vision.vision_feature_layer,
                     "vision_feature_select_strategy": manifest.vision.select_strategy}
    results: list[EngineResult] = []
    ratios: list[dict[str, Any]] = []
    identical: dict[str, bool] = {}
    for b in batch:
        for plen in prompt_len:
            req, ids_one = make_request(first, plen, image)
            requests = [copy.deepcopy(req) for _ in range(b)]
            ids, mask = left_pad([ids_one] * b, manifest.text.pad_token_id)
            pixels = None
            if image is not None:
                from ..runtime.preprocess import preprocess

                pixels = np.stack([preprocess(image, manifest.vision)] * b)
            names = [*ours, *(["transformers"] if hf else [])]
            samples: dict[str, list[Sample]] = {n: [] for n in names}

            def once(n: str) -> Sample:
                if n == "transformers":
                    return hf.run(ids, mask, pixels, new_tokens, manifest.text.pad_token_id, vision_kwargs)
                return ours[n].run(requests, new_tokens)

            for n in names:
                for _ in range(warmup):
                    say(f"warm-up {n} batch={b} prompt={plen}")
                    once(n)
            for r in range(repeat):
                for n in names:  # interleaved: load drift hits every engine alike
                    say(f"run {n} batch={b} prompt={plen} repeat {r + 1}/{repeat}")
                    with mems[n]:
                        samples[n].append(once(n))
            key = f"batch={b},prompt={plen}"
            for n in names:
                results.append(_summarize(n, b, len(ids_one), new_tokens, samples[n], mems[n], before[n]))
            ref = samples[names[0]][-1].token_ids
            for n in names[1:]:
                identical[f"{key}:{names[0]}=={n}"] = samples[n][-1].token_ids == ref
            if hf:
                base = next(r for r in reversed(results) if r.engine == "transformers")
                for r in results[-len(names):-1]:
                    ratios.append({
                        "engine": r.engine, "vs": "transformers", "batch": b, "prompt_len": plen,
                        "decode_tokens_per_s_ratio": r.decode_tokens_per_s / base.decode_tokens_per_s,
                        "ttft_speedup": base.ttft_ms / r.ttft_ms,
                        "vision_speedup": (base.vision_ms / r.vision_ms) if r.vision_ms > 0 else None,
                    })
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    arch = {}
    ckpt_dir = Path(checkpoint or manifest.source.get("path", ""))
    if (ckpt_dir / "llava_edge_arch.json").is_file():
        arch = json.loads((ckpt_dir / "llava_edge_arch.json").read_text())["arch"]
    report = BenchmarkReport(
        package_dir=str(package_dir), package_bytes=_package_bytes(package_dir, manifest, engines), arch=arch,
        config={"backends": engines, "batch": list(batch), "prompt_len": list(prompt_len), "new_tokens": new_tokens,
                "baseline": baseline, "baseline_attn": baseline_attn if hf else None, "repeat": repeat,
                "warmup": warmup, "threads": threads, "with_image": with_image, "dtype": manifest.dtype,
                "prune": str(next(iter(ours.values())).pipe.prune)},
        machine=info, versions=versions(with_torch=hf is not None), results=results, ratios=ratios,
        outputs_identical=identical,
        notes=["eos ignored (ours) / suppressed via min_new_tokens (transformers): every run generates new_tokens",
               "repeats interleaved across engines; medians; per-token percentiles pooled over repeats",
               "peak_rss is the whole process (all engines loaded so far); rss_increase is this engine's share"],
    )
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(report.to_json())
    if plot:
        from .report import plot_report

        plot_report(report, plot)
    if console:
        from .report import print_report

        print_report(report)
    return report
