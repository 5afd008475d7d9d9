"""`python -m llava_edge.benchmarks`: the harness without the typer CLI (until `llava-edge bench` wraps it).

  python -m llava_edge.benchmarks PKG --backend ort-cpu,ort-fast --baseline transformers --checkpoint CK
         --batch 1 --prompt-len 64 --new-tokens 128 --repeat 3 --threads 2 -o out.json --plot out.png --md out.md
  python -m llava_edge.benchmarks --build-arch edge-1b CK_DIR      # random-weight checkpoint of a named shape
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m llava_edge.benchmarks")
    p.add_argument("package", nargs="?")
    p.add_argument("--build-arch", nargs=2, metavar=("ARCH", "OUT_DIR"))
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--batch", default="1")
    p.add_argument("--prompt-len", default="64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--baseline", default=None)
    p.add_argument("--baseline-attn", default="sdpa")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-image", action="store_true")
    p.add_argument("-o", "--out-json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--md", default=None, help="also write a markdown note with the command")
    a = p.parse_args(argv)
    if a.build_arch:
        from .arch import build_random_checkpoint

        print(build_random_checkpoint(a.build_arch[0], a.build_arch[1]))
        return 0
    if not a.package:
        p.error("PACKAGE is required")
    from .harness import run_benchmark
    from .report import markdown

    report = run_benchmark(
        a.package, backend=a.backend, batch=[int(x) for x in a.batch.split(",")],
        prompt_len=[int(x) for x in a.prompt_len.split(",")], new_tokens=a.new_tokens, baseline=a.baseline,
        checkpoint=a.checkpoint, repeat=a.repeat, warmup=a.warmup, threads=a.threads, with_image=not a.no_image,
        baseline_attn=a.baseline_attn, out_json=a.out_json, plot=a.plot, on_progress=lambda s: print(s, flush=True),
    )
    if a.md:
        cmd = "python -m llava_edge.benchmarks " + " ".join(shlex.quote(x) for x in argv)
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(markdown(report, cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
