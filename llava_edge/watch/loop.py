"""`watch`: the same question about every sampled frame of a source, one JSON line per frame.

Why skip unchanged frames: a robot's camera often looks at a still scene, and the vision encoder plus
prefill is most of an answer's cost. A frame whose mean absolute difference from the last *answered*
frame (RGB, 0-255 scale, at full resolution) is below ``threshold`` reuses that answer and says so
(``"reused": true``); comparing with the last answered frame rather than the previous one means slow
drift still adds up to a new answer. A frame of a different size always counts as changed; a
pixel-identical frame is always reused. At threshold 0 only identical frames are reused, so every line
equals ``Pipeline.generate`` on its frame.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from .sources import Frame

DEFAULT_THRESHOLD = 1.0  # mean |a - b| over RGB pixels, 0-255: below JPEG/sensor noise of a still scene


@dataclass
class WatchConfig:
    prompt: str
    threshold: float = DEFAULT_THRESHOLD
    max_new_tokens: int = 64
    json_schema: dict[str, Any] | None = None
    max_frames: int | None = None  # stop after this many sampled frames (a live source never ends)


def frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 RGB frames; inf when their sizes differ."""
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def watch(pipe: Any, frames: Iterable[Frame], cfg: WatchConfig) -> Iterator[dict[str, Any]]:
    """One record per sampled frame: time, answer, latency, whether the answer was reused, counters."""
    if cfg.json_schema is not None:  # an unusable schema or tokenizer fails before the first frame
        from ..runtime.constrain import Grammar

        Grammar(pipe.tokenizer, frozenset(pipe.manifest.text.eos_token_ids), cfg.json_schema)
    last_pixels: np.ndarray | None = None
    last: dict[str, Any] = {}
    encoded = reused = 0
    for i, frame in enumerate(frames):
        if cfg.max_frames is not None and i >= cfg.max_frames:
            break
        t0 = time.perf_counter()
        pixels = np.asarray(frame.image.convert("RGB"))
        diff = None if last_pixels is None else frame_difference(pixels, last_pixels)
        if diff is not None and (diff == 0 or diff < cfg.threshold):
            reused += 1
            rec = {**last, "reused": True}
        else:
            r = pipe.generate(frame.image, cfg.prompt, cfg.max_new_tokens, json_schema=cfg.json_schema)
            encoded += 1
            last_pixels = pixels
            last = {"answer": r.text, "finish_reason": r.finish_reason, "reused": False}
            if cfg.json_schema is not None:
                try:
                    last["json"] = json.loads(r.text)
                except ValueError:  # cut by max_new_tokens
                    last["json"] = None
            rec = dict(last)
        yield {"frame": i, "time": round(frame.time, 3), **rec,
               "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
               "difference": None if diff is None else (round(diff, 3) if np.isfinite(diff) else "size changed"),
               "encoded": encoded, "reused_total": reused}
