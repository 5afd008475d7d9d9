"""Time to first token with an image at several pruning settings, interleaved in one process.

Why not one `llava-edge bench --prune X` per setting: on a shared machine the load moves between runs
minutes apart, and a ratio of two such runs mixes pruning with the load. Here every round runs every
setting once, in a rotated order, on one loaded pipeline (prefix cache off, a fresh random image per round
so nothing is reused), and records per sample: wall TTFT, the vision encoder's ms, the prefill ms, the
process CPU seconds (user+sys of all threads: less sensitive to other processes than wall time), the
decode tok/s, and the selection alone (``PruneSetting.select`` on the image's features). Medians per
setting; against the first setting, the median of the ratios within a round (``summarize``).

    python3 benchmarks/prune_speed.py PKG --threads 2 --rounds 5 --prompt-len 32 \
        --prune off --prune dart:0.5 --prune dart:0.75 -o prune_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from statistics import median

import numpy as np

from llava_edge.benchmarks.harness import make_request
from llava_edge.runtime.pipeline import Pipeline, drain
from llava_edge.runtime.preprocess import preprocess
from llava_edge.runtime.prune import PruneSetting, instruction_ids


def random_image(seed: int, size: int = 400):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:int(size * 0.75)]
    base = np.stack([(x + seed) % 256, y % 256, (x + y) % 256], -1).astype(np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def one(pipe: Pipeline, setting: PruneSetting, image, prompt_len: int, new_tokens: int) -> dict:
    """One sample under ``setting``: a one-token request (its wall time and the process's CPU seconds are
    the TTFT's: vision, selection, prefill, first token), then the same prompt with ``new_tokens`` for the
    decode rate (the engine's own stamps from the first token on), then the selection alone."""
    pipe.prune = setting
    req, ids = make_request(pipe, prompt_len, image)
    cpu0, t0 = os.times(), time.perf_counter()
    res = drain(pipe.run([req], max_new_tokens=1))[0]
    wall = (time.perf_counter() - t0) * 1000
    cpu1 = os.times()
    dec = drain(pipe.run([req], max_new_tokens=new_tokens))[0]
    select_ms = 0.0
    if setting.active:
        m, be = pipe.manifest, pipe.backend
        feats = be.encode_images(preprocess(image, m.vision)[None])[0]
        instr = be.embed(instruction_ids(ids, m.text.image_token_id)[None])[0] if setting.needs_instruction else None
        t1 = time.perf_counter()
        setting.select(feats, instr)
        select_ms = (time.perf_counter() - t1) * 1000
    return {"prompt_tokens": len(ids), "ttft_ms": wall, "vision_ms": res.timings.vision_ms,
            "prefill_ms": res.timings.prefill_ms, "select_ms": select_ms,
            "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "decode_tok_s": dec.timings.tokens_per_s, "new_tokens": len(dec.token_ids)}


def summarize(samples: dict[str, list[dict]], base: str) -> dict[str, dict[str, float]]:
    """Medians per setting, and each setting against ``base`` as the median over rounds of the ratio within
    a round (the two ran seconds apart, so a load change between rounds cancels): ``ttft_vs_first`` (wall)
    and ``cpu_vs_first`` (CPU seconds). ``ttft_min_ms``: the least disturbed sample."""
    rows = {}
    for name, ss in samples.items():
        row = {k: median(x[k] for x in ss) for k in ss[0]}
        row["ttft_min_ms"] = min(x["ttft_ms"] for x in ss)
        row["ttft_vs_first"] = median(x["ttft_ms"] / b["ttft_ms"] for x, b in zip(ss, samples[base]))
        row["cpu_vs_first"] = median(x["cpu_s"] / b["cpu_s"] for x, b in zip(ss, samples[base]))
        rows[name] = row
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16, help="generated per request (eos ignored)")
    ap.add_argument("--prune", action="append", default=None, help="METHOD:RATIO or off (repeatable)")
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args()
    settings = [PruneSetting.parse(s) for s in (a.prune or ["off", "dart:0.5", "dart:0.75"])]
    pipe = Pipeline.from_package(a.package, backend=a.backend, threads=a.threads, prefix_cache=0)
    pipe.manifest.text.eos_token_ids = []  # fixed-length runs, as `llava-edge bench`
    load = [os.getloadavg()]
    one(pipe, settings[0], random_image(10_000), a.prompt_len, a.new_tokens)  # warm-up
    samples: dict[str, list[dict]] = {str(s): [] for s in settings}
    for r in range(a.rounds):
        image = random_image(r)
        for k in range(len(settings)):
            s = settings[(r + k) % len(settings)]
            samples[str(s)].append(one(pipe, s, image, a.prompt_len, a.new_tokens))
        load.append(os.getloadavg())
        print(f"round {r + 1}/{a.rounds} load {load[-1][0]:.2f}", flush=True)
    rows = summarize(samples, str(settings[0]))
    for name, row in rows.items():
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), name, flush=True)
    if a.output:
        a.output.write_text(json.dumps({"package": str(a.package), "threads": a.threads, "rounds": a.rounds,
                                        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                                        "image_tokens": pipe.manifest.vision.num_image_tokens,
                                        "relative_to": str(settings[0]), "load_average": load,
                                        "medians": rows, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
