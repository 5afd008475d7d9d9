"""Start the server: check what can be checked up front, then hand the app to uvicorn."""

from __future__ import annotations

import logging

from ..runtime.sizes import parse_size  # noqa: F401 - where it was: `from llava_edge.serve.server import parse_size`
from .app import ServeConfig, create_app


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
