"""Time to first token of a second question about the same image, with and without prefix reuse.

  python -m llava_edge.benchmarks.prefix_reuse PKG [--backend ort-fast] [--repeat 3] [--threads 2] [--md OUT]

Each repeat starts from an empty prefix cache: question 1 pays vision + full prefill; question 2
(other words, same image) reuses the system/image prefix. TTFT = vision_ms + prefill_ms as the
pipeline records them (first logits ready).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime.pipeline import Pipeline
from ..runtime.prefix_cache import PrefixCache

QUESTIONS = ("What is in the picture?", "How many red shapes are on the left side?")


def measure_prefix_reuse(package: str | Path, backend: str = "ort", repeat: int = 3, threads: int | None = None,
                         new_tokens: int = 4) -> dict:
    pipe = Pipeline.from_package(package, backend=backend, threads=threads)
    size = pipe.manifest.vision.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    cold, warm, same = [], [], []
    pipe.generate(image, QUESTIONS[0], max_new_tokens=1)  # warm-up (sessions, allocator)
    for _ in range(repeat):
        pipe.prefix_cache = PrefixCache(2)
        a = pipe.generate(image, QUESTIONS[0], max_new_tokens=new_tokens)
        b = pipe.generate(image, QUESTIONS[1], max_new_tokens=new_tokens)
        pipe.prefix_cache = None
        c = pipe.generate(image, QUESTIONS[1], max_new_tokens=new_tokens)
        cold.append(a.timings.vision_ms + a.timings.prefill_ms)
        warm.append(b.timings.vision_ms + b.timings.prefill_ms)
        same.append(b.token_ids == c.token_ids)
    return {
        "package": str(package), "backend": backend, "threads": threads, "repeat": repeat,
        "prompt_tokens": b.prompt_tokens, "image_tokens": pipe.manifest.vision.num_image_tokens,
        "ttft_first_question_ms": statistics.median(cold), "ttft_second_question_ms": statistics.median(warm),
        "speedup": statistics.median(cold) / statistics.median(warm), "same_tokens_as_cold": all(same),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_edge.benchmarks.prefix_reuse")
    p.add_argument("package")
    p.add_argument("--backend", default="ort")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    r = measure_prefix_reuse(a.package, a.backend, a.repeat, a.threads)
    print(json.dumps(r, indent=2))
    if a.md:
        cmd = "python -m llava_edge.benchmarks.prefix_reuse " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(a.md).write_text(
            f"# Prefix reuse: second question about the same image\n\n`{cmd}`\n\n"
            f"| backend | prompt tokens (image) | TTFT 1st question | TTFT 2nd question | speed-up | same tokens |\n"
            f"|---|---|---|---|---|---|\n| {r['backend']} | {r['prompt_tokens']} ({r['image_tokens']}) | "
            f"{r['ttft_first_question_ms']:.1f} ms | {r['ttft_second_question_ms']:.1f} ms | x{r['speedup']:.1f} | "
            f"{r['same_tokens_as_cold']} |\n\nMedians of {r['repeat']} repeats, {r['threads']} threads, shared 2-core "
            "CPU machine (other jobs running).\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
