"""The checks on a ServeConfig, run before the socket opens (``serve``) or a replica starts (``--ray``).

Why one function: the CLI and the Ray path build the same ServeConfig, and a check written in only one
of them is a hole in the other (a Ray replica once started with settings the CLI refused). Each failure
is one UsageError naming the flag, so the user sees one ``error:`` line and nothing starts.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..runtime.backends import BACKENDS

if TYPE_CHECKING:
    from .app import ServeConfig

API_KEY_ENV = "LLAVA_EDGE_API_KEY"
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # what survives the header's strip and latin-1 decoding unchanged
_HOST = re.compile(r"\*|\.?[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]")
_ORIGIN = re.compile(r"\*|https?://[^/\s?#]+")


def check_api_key(key: str | None, source: str = "--api-key") -> None:
    """An empty key is an unset secret, not "no auth"; a key that a client's header can never carry
    (spaces at its ends, control or non-ASCII characters) would lock everyone out, so both are refused."""
    if key is None:
        return
    if not key.strip():
        raise UsageError(f"{source} is empty: an empty key would turn authentication off; give a key, or leave "
                         f"out --api-key and unset {API_KEY_ENV} to serve without one")
    if not _KEY_CHARS.fullmatch(key):
        raise UsageError(f"{source}: an API key must be printable ASCII without spaces (a client's "
                         "'Authorization: Bearer KEY' header cannot carry this one unchanged)")


def _at_least(value: float | None, flag: str, low: float, high: float = math.inf) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, not {value}")
    if not low <= value <= high:
        bound = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise UsageError(f"{flag} must be {bound}, not {value:g}")


def validate_serve_config(c: "ServeConfig") -> None:
    _at_least(c.port, "--port", 1, 65535)
    for flag, value in (("--max-slots", c.max_slots), ("--queue-size", c.queue_size), ("--max-tokens", c.max_tokens),
                        ("--prefill-chunk", c.prefill_chunk), ("--max-image-bytes", c.max_image_bytes),
                        ("--max-image-pixels", c.max_image_pixels), ("--max-prompt-bytes", c.max_prompt_bytes),
                        ("--max-connections", c.max_connections)):
        _at_least(value, flag, 1)
    _at_least(c.max_slots, "--max-slots", 1, 1024)
    _at_least(c.max_images_per_request, "--max-images-per-request", 0, 64)
    _at_least(c.threads, "--threads", 1, 4096)
    _at_least(c.image_cache_mb, "--image-cache-mb", 0)
    _at_least(c.header_timeout, "--header-timeout", 0.1, 3600)
    _at_least(c.body_timeout, "--body-timeout", 0.1, 3600)
    _at_least(c.shutdown_timeout, "--shutdown-timeout", 0, 3600)
    check_api_key(c.api_key)
    names = ("auto", *BACKENDS)  # the one backend table (runtime/backends.py)
    if c.backend not in names:
        raise UsageError(f"unknown backend {c.backend!r}; use {', '.join(names[:-1])} or {names[-1]}")
    if c.media_dir is not None and not c.media_dir.is_dir():
        raise UsageError(f"--media-dir {c.media_dir} is not a directory")
    for h in c.allowed_hosts:
        if not _HOST.fullmatch(h):
            raise UsageError(f"--allowed-host {h!r}: give a host name (kiosk.lan), a domain suffix (.lan) or *")
    for o in c.allow_origins:
        if not _ORIGIN.fullmatch(o.rstrip("/")):
            raise UsageError(f"--allow-origin {o!r}: give an origin such as http://kiosk.lan:8000, or *")
