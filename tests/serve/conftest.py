"""A package of the shipped trained tiny LLaVA with the fast decoder, and real server processes on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llava_edge.benchmarks.serve_load import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def served_package(tmp_path_factory) -> Path:
    from llava_edge.demo import ASSET
    from llava_edge.export.exporter import export_package
    from llava_edge.export.fast_decoder import export_fast_decoder

    pkg = tmp_path_factory.mktemp("served") / "tiny-llava"
    export_package(ASSET, pkg)
    export_fast_decoder(ASSET, pkg)
    return pkg


class Server(ServerProcess):
    """``llava-edge serve`` in a subprocess running the worktree's code, stopped on close."""

    def __init__(self, package: Path, *args: str, debug: bool = False, log: Path | None = None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if debug:
            env["LLAVA_EDGE_SERVE_DEBUG"] = "1"
        super().__init__(package, ["--threads", "1", *args], env=env, log=log, timeout_s=90)

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture(scope="session")
def server(served_package, tmp_path_factory):
    """The default configuration, one process for every module that asks (each start costs ~2 s): tests
    compare metrics before and after their own requests, never absolute counts, and leave no state."""
    media = tmp_path_factory.mktemp("media")
    srv = Server(served_package, "--max-slots", "4", "--api-key", API_KEY, "--max-images-per-request", "2",
                 "--max-image-bytes", "200KB", "--max-image-pixels", "1M", "--max-tokens", "200",
                 "--media-dir", str(media), log=tmp_path_factory.mktemp("log") / "server.log")
    srv.media = media
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
