"""Start the server: check what can be checked up front, then hand the app to uvicorn."""

from __future__ import annotations

import logging
import re

from ..errors import UsageError
from .app import ServeConfig, create_app

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str, what: str) -> int:
    """'10MB', '40M', '512KiB', '2000000' -> an integer count (decimal units unless 'i' is given)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?\s*", text)
    if not m:
        raise UsageError(f"{what}: cannot read {text!r} as a size (e.g. 10MB, 40M, 2000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def serve(config: ServeConfig, log_level: str = "info") -> None:
    import uvicorn

    from ..package import load_manifest

    load_manifest(config.package)  # a missing or broken package is a one-line error, before the socket opens
    if min(config.max_slots, config.queue_size, config.max_tokens, config.prefill_chunk) < 1:
        raise UsageError("--max-slots, --queue-size, --max-tokens and --prefill-chunk must be >= 1")
    if config.max_images_per_request < 0:
        raise UsageError("--max-images-per-request must be >= 0")
    if config.media_dir is not None and not config.media_dir.is_dir():
        raise UsageError(f"--media-dir {config.media_dir} is not a directory")
    if config.backend not in ("auto", "ort", "ort-fast", "ort-fast-int4", "tensorrt"):
        raise UsageError(f"unknown backend {config.backend!r}; use auto, ort, ort-fast, ort-fast-int4 or tensorrt")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level, access_log=True)
