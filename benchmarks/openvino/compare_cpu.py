"""The three-column CPU table of sitting.sh's OUT_DIR: llava-edge, llama.cpp Q4_0, OpenVINO GenAI int4.

usage: python compare_cpu.py OUT_DIR   (markdown on stdout; decode in tok/s, higher is better; times and memory
lower is better; the last column is llava-edge / the better peer)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}


def peak_mb(err: Path) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err.read_text()) if err.is_file() else None
    return int(m.group(1)) / 1024 if m else None


def main(out: Path) -> str:
    ours = {k: (load(out / f"ours-int4-{k}.json").get("results") or [{}])[0] for k in ("text", "image")}
    lc = load(out / "llamacpp-q4_0.json")
    ov = {p: load(out / f"ov-genai-{p}.json") for p in ("f32", "default")}
    rows = [  # label, llava-edge, llama.cpp, OpenVINO f32, OpenVINO default, higher is better
        ("decode, text prompt (tok/s)", ours["text"].get("decode_tokens_per_s"), lc.get("text", {}).get("decode_tok_s"),
         ov["f32"].get("decode_tok_s_text"), ov["default"].get("decode_tok_s_text"), True),
        ("decode, image prompt (tok/s)", ours["image"].get("decode_tokens_per_s"),
         lc.get("image", {}).get("decode_tok_s"), ov["f32"].get("decode_tok_s_image"),
         ov["default"].get("decode_tok_s_image"), True),
        ("time to first token with the image (s)", (ours["image"].get("ttft_ms") or 0) / 1e3 or None,
         lc.get("image", {}).get("ttft_s"), ov["f32"].get("ttft_image_s"), ov["default"].get("ttft_image_s"), False),
        ("time to first token, text (s)", (ours["text"].get("ttft_ms") or 0) / 1e3 or None,
         lc.get("text", {}).get("ttft_s"), ov["f32"].get("ttft_text_s"), ov["default"].get("ttft_text_s"), False),
        ("peak RSS (MB)", peak_mb(out / "rss-int4.err"), lc.get("peak_rss_mb"), peak_mb(out / "ov-genai-f32.err"),
         peak_mb(out / "ov-genai-default.err"), False),
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if v < 20 else f"{v:.0f}"  # noqa: E731
    lines = ["| int4, 2 threads | llava-edge | llama.cpp Q4_0 | OpenVINO GenAI (f32) | OpenVINO GenAI (default) "
             "| llava-edge / best peer |", "|---|---|---|---|---|---|"]
    for label, mine, *peers, higher in rows:
        known = [p for p in peers if p]
        best = (max if higher else min)(known) if known else None
        ratio = f"{mine / best:.2f}" if mine and best else "-"
        lines.append(f"| {label} | {fmt(mine)} | " + " | ".join(fmt(p) for p in peers) + f" | {ratio} |")
    same = load(out / "same-graph.json")
    if same:
        lines.append("\nThe same package graphs, onnxruntime / OpenVINO f32 / OpenVINO bf16 (s): " + "; ".join(
            f"{k} {same.get(f'{k}_ort_s', same.get(f'{k}_ort_copying_s'))} / {same.get(f'{k}_ov_f32_s')} / "
            f"{same.get(f'{k}_ov_bf16_s')}" for k in ("vision", "prefill640", "decode1")))
        lines.append("Prefill logits against exact int4-weight arithmetic (max |diff| / max |logit|): onnxruntime "
                     f"{same.get('prefill_ort_vs_exact')}, OpenVINO f32 {same.get('prefill_ov_f32_vs_exact')}, "
                     f"bf16 {same.get('prefill_ov_bf16_vs_exact')}")
    when = (out / "when.txt").read_text().strip().replace("\n", "; ") if (out / "when.txt").is_file() else ""
    return "\n".join(lines) + f"\n\n{when}"


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
