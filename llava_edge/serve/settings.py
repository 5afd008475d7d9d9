"""The server's settings, defined once: ``ServeConfig``, and the checks on it.

Each option field carries its command-line metadata (help, flag, kind, bounds, whether Ray forwards it:
``option()``, llava_edge/options.py, shared with the other verbs' options); from that one definition come
``llava-edge serve``'s flags (cli.py), the Ray builder's argument table (``ray_app._SERVE_ARGS``), the dict
``serve --ray`` hands to Ray, and the range checks in ``validate_serve_config``. Adding a setting is one
field here.

Why one validation: the CLI and the Ray path build the same ServeConfig, and a check written in only one
of them is a hole in the other (a Ray replica once started with settings the CLI refused). Each failure
is one UsageError naming the flag, so the user sees one ``error:`` line and nothing starts.

This module imports nothing of the server stack (fastapi, uvicorn): the CLI reads it at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..options import Setting, check_fields, option, settings_of
from ..runtime.backends import BACKENDS
from ..runtime.preprocess import MAX_IMAGE_PIXELS
from ..runtime.prune import PRUNE_HELP, PruneSetting
from ..runtime.scheduler import PREFILL_BUDGET, SERVE_PREFILL_CHUNK

if TYPE_CHECKING:
    from .media import MediaLimits

API_KEY_ENV = "LLAVA_EDGE_API_KEY"
# every verb's --backend (cli.py)
BACKEND_HELP = ("auto (the fastest graph the package has: TensorRT engines, int4 fast, fast, portable decoder), ort, "
                "ort-fast, ort-fast-int4, tensorrt, or ort-fast-ov / ort-fast-int4-ov (long prompt chunks on OpenVINO: "
                "faster first token, a second decoder copy in memory; the openvino extra).")
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # what survives the header's strip and latin-1 decoding unchanged
_HOST = re.compile(r"\*|\.?[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]")
_ORIGIN = re.compile(r"\*|https?://[^/\s?#]+")


@dataclass
class ServeConfig:
    package: Path  # the CLI's PACKAGE argument; Ray's package=DIR[,DIR...]
    host: str = option("127.0.0.1", "Address to bind (127.0.0.1: this machine only).", ray=False)  # Ray: http_options
    port: int = option(8000, "TCP port.", lo=1, hi=65535, ray=False)
    backend: str = option("auto", BACKEND_HELP)
    max_slots: int = option(4, "Sequences decoded together (KV-cache slots).", lo=1, hi=1024)
    api_key: str | None = option(None, "Require 'Authorization: Bearer KEY' on /v1 routes.", envvar=API_KEY_ENV)
    max_image_bytes: int = option(10 * 10**6, "Largest accepted image file (10MB, 512KiB or a byte count).",
                                  kind="size", lo=1, unit="B")
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, "Largest accepted image, in pixels (40M or a count), read "
                                   "from its header before decoding.", kind="size", lo=1)  # the runtime's own limit
    max_images_per_request: int = option(4, "Images in one request.", lo=0, hi=64)
    max_tokens: int = option(512, "The server's cap on a request's max_tokens, and its value when a request "
                             "gives none (the API's name; not a generation length like --max-new-tokens).", lo=1)
    queue_size: int = option(64, "Requests waiting for a slot before new ones get 429.", lo=1)
    media_dir: Path | None = option(None, "Directory whose files requests may name as images.")
    threads: int | None = option(None, "onnxruntime intra-op threads (with --ray: default each replica's CPUs).",
                                 lo=1, hi=4096)
    prefill_chunk: int = option(SERVE_PREFILL_CHUNK, "Prompt tokens per prefill call (smaller: a step's prefill "
                                "fits its budget in finer steps, so running streams stall less; larger: fewer calls, "
                                "faster first tokens). Greedy answers are the same at any load for one chunk size.",
                                lo=1)
    prefill_budget: float = option(PREFILL_BUDGET, "Prefill time an engine step may add while streams decode, in "
                                   "decode calls (2: a running stream's token gap stays within ~3x its steady gap; "
                                   "0: one chunk per step). At least one chunk always runs.", lo=0)
    image_cache_mb: float = option(64.0, "Image features kept by content digest, in MB (0: off).", lo=0)
    prune: str = option("off", PRUNE_HELP + " The server's default; a request's 'prune' field overrides it.")
    ui: bool = option(True, "Serve the kiosk page (camera, upload, streamed answers) at /.")
    suggest: tuple[str, ...] = option((), "A suggested question on the kiosk page (repeatable; default: questions "
                                      "about the demo model's shapes).")
    model_name: str = ""  # not an option: the package directory's name (the built-in model: tiny-llava)
    # what a hostile or careless client may cost (serve/guard.py, docs/serving.md "Hardening")
    allowed_hosts: tuple[str, ...] = option((), "A Host name clients may use besides loopback names, IP addresses "
                                            "and this machine's name (repeatable; '.lan' for a suffix, '*' for any): "
                                            "protects against DNS rebinding.", flag="--allowed-host")
    allow_origins: tuple[str, ...] = option((), "A web page origin (http://kiosk.lan:8000) allowed to call the API "
                                            "besides the server's own page (repeatable; '*' for any).",
                                            flag="--allow-origin")
    max_prompt_bytes: int = option(256 * 10**3, "Largest prompt text of one request (images not counted); refused "
                                   "before it is parsed.", kind="size", lo=1, unit="B")
    header_timeout: float = option(10.0, "Seconds a client may take to send its request headers.", lo=0.1, hi=3600,
                                   ray=False)
    body_timeout: float = option(30.0, "Seconds a client may take to send its request body.", lo=0.1, hi=3600)
    max_connections: int = option(256, "Open connections; more are closed at once.", lo=1, ray=False)
    shutdown_timeout: float = option(10.0, "Seconds SIGTERM waits for running requests before cancelling them "
                                     "(with --ray: Ray's graceful shutdown applies).", lo=0, hi=3600, ray=False)
    limits: MediaLimits = field(init=False)

    def __post_init__(self) -> None:
        from .media import MediaLimits  # the server stack: not loaded by the CLI just to read the options

        self.package = Path(self.package)
        self.model_name = self.model_name or self.package.resolve().name
        self.allowed_hosts, self.allow_origins = tuple(self.allowed_hosts), tuple(self.allow_origins)
        self.suggest = tuple(self.suggest)
        self.limits = MediaLimits(self.max_image_bytes, self.max_image_pixels, self.max_images_per_request,
                                  Path(self.media_dir) if self.media_dir else None)

    def validate(self) -> None:
        """Every setting checked once, for the CLI and the Ray path alike: a bad one is a UsageError."""
        validate_serve_config(self)


@dataclass
class RayOptions:
    """How many replicas, with what resources: the deployment side of a package's serving (``serve --ray``,
    ``serve run llava_edge.serve.ray_app:app``). Its fields are options like ServeConfig's; the CLI shows
    them as ``--replicas`` ... and passes only those given."""

    replicas: int = option(1, "With --ray: fixed number of replicas (default 1).", lo=1)
    autoscale: tuple[int, int] | None = option(None, "With --ray: MIN,MAX replicas, scaled on ongoing requests "
                                               "(replaces --replicas).", kind="autoscale")
    cpus_per_replica: float = option(1.0, "With --ray: CPUs each replica reserves (also its threads).", lo=0)
    gpus_per_replica: float = option(0.0, "With --ray: GPUs each replica reserves (fractions allowed).", lo=0)
    target_ongoing_requests: float | None = option(None, "With --autoscale: ongoing requests per replica the "
                                                   "autoscaler aims at (default --max-slots).", lo=0.01)
    max_ongoing_requests: int | None = option(None, "With --ray: requests sent to one replica at once (default 2 x "
                                              "--max-slots).", lo=1)
    graceful_shutdown_timeout_s: float = option(30.0, "With --ray: seconds a stopping replica's streams get to "
                                                "finish.", lo=0)
    health_check_period_s: float = option(10.0, "With --ray: seconds between replica health checks.", lo=0.1)

    def __post_init__(self) -> None:
        if isinstance(self.autoscale, str):
            self.autoscale = parse_autoscale(self.autoscale)
        check_fields(self, ray_settings())

    def deployment_options(self, config: "ServeConfig") -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests or 2 * config.max_slots,
            # the rest wait in each Ray proxy, up to --queue-size per replica; past that Ray answers 503
            "max_queued_requests": config.queue_size * max(self.replicas, self.autoscale[1] if self.autoscale else 1),
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscale:
            lo, hi = self.autoscale
            opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": self.target_ongoing_requests or config.max_slots}
        else:
            opts["num_replicas"] = self.replicas
        return opts


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in str(text).split(","))
    except ValueError:
        raise UsageError(f"--autoscale {text!r}: give MIN,MAX replicas, e.g. 1,4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise UsageError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def serve_settings() -> tuple[Setting, ...]:
    """ServeConfig's option fields, in declaration order (the order of ``serve --help``)."""
    return settings_of(ServeConfig)


def ray_settings() -> tuple[Setting, ...]:
    """RayOptions' fields, in declaration order."""
    return settings_of(RayOptions)


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


def validate_serve_config(c: "ServeConfig") -> None:
    check_fields(c, serve_settings())
    check_api_key(c.api_key)
    names = ("auto", *BACKENDS)  # the one backend table (runtime/backends.py)
    if c.backend not in names:
        raise UsageError(f"unknown backend {c.backend!r}; use {', '.join(names[:-1])} or {names[-1]}")
    try:
        PruneSetting.parse(c.prune)
    except UsageError as e:
        raise UsageError(f"--prune: {e}") from None
    if c.media_dir is not None and not c.media_dir.is_dir():
        raise UsageError(f"--media-dir {c.media_dir} is not a directory")
    for h in c.allowed_hosts:
        if not _HOST.fullmatch(h):
            raise UsageError(f"--allowed-host {h!r}: give a host name (kiosk.lan), a domain suffix (.lan) or *")
    for o in c.allow_origins:
        if not _ORIGIN.fullmatch(o.rstrip("/")):
            raise UsageError(f"--allow-origin {o!r}: give an origin such as http://kiosk.lan:8000, or *")
