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
    from .guard import guarded_protocol

    load_manifest(config.package)  # a missing or broken package is a one-line error, before the socket opens
    config.validate()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _raise_fd_limit(config.max_connections + 64)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level, access_log=True,
                http=guarded_protocol(config.header_timeout, config.max_connections),
                timeout_graceful_shutdown=config.shutdown_timeout)  # type: ignore[arg-type]


def _raise_fd_limit(wanted: int) -> None:
    """Room for --max-connections sockets plus the model's files, within the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY
                                                        else wanted, hard))
    except (ImportError, ValueError, OSError):
        pass
