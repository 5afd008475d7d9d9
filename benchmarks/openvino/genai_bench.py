"""OpenVINO GenAI's VLMPipeline on an exported IR: TTFT with the image, TTFT text only, decode tok/s.

The workload of `llava-edge bench` and the llama.cpp sitting: one 336 px image + a question, greedy, 128
forced new tokens, 2 threads; medians of RUNS after one warm-up. Each run asks a different question (a
rotation of the same words), because the pipeline keeps the previous prompt's KV and would otherwise answer
a repeated prompt without prefilling it. PRECISION f32 asks for fp32 math: on a CPU with bf16 (AVX-512 BF16
or AMX) OpenVINO otherwise runs the fp32 parts in bf16.

usage: python genai_bench.py IR_DIR IMAGE [RUNS] [f32|bf16|default]   (prints one JSON object)
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import openvino as ov
import openvino_genai as og
from PIL import Image

WORDS = "describe the picture in detail and list every object you can see with its colour".split()


def main(ir: str, image_path: str, runs: int, precision: str) -> dict:
    props: dict = {"INFERENCE_NUM_THREADS": 2}
    if precision != "default":
        props["INFERENCE_PRECISION_HINT"] = precision
    t = time.perf_counter()
    pipe = og.VLMPipeline(ir, "CPU", **props)
    out: dict = {"precision": precision, "load_s": round(time.perf_counter() - t, 2)}
    image = ov.Tensor(np.array(Image.open(image_path).convert("RGB"))[None])
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = cfg.min_new_tokens = 128
    cfg.do_sample = False
    rows: dict[str, list[float]] = {k: [] for k in ("ttft_image_s", "tpot_image_ms", "ttft_text_s", "tpot_text_ms")}
    for i in range(runs + 1):  # run 0 warms up
        question = " ".join(WORDS[i:] + WORDS[:i])
        for kind, kwargs in (("image", {"images": [image]}), ("text", {})):
            m = pipe.generate(question if kind == "image" else "text only: " + question, generation_config=cfg,
                              **kwargs).perf_metrics
            if i:
                rows[f"ttft_{kind}_s"].append(m.get_ttft().mean / 1000)
                rows[f"tpot_{kind}_ms"].append(m.get_tpot().mean)
    out["runs"] = rows
    for k, v in rows.items():
        out[k] = round(statistics.median(v), 3)
    out["decode_tok_s_image"] = round(1000 / out["tpot_image_ms"], 2)
    out["decode_tok_s_text"] = round(1000 / out["tpot_text_ms"], 2)
    return out


if __name__ == "__main__":
    a = sys.argv
    print(json.dumps(main(a[1], a[2], int(a[3]) if len(a) > 3 else 3, a[4] if len(a) > 4 else "f32"), indent=1))
