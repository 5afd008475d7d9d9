"""A package of the shipped trained tiny LLaVA with the fast decoder, and real server processes on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``llava-edge serve`` in a subprocess (the worktree's code), stopped on close."""

    def __init__(self, package: Path, *args: str, debug: bool = False, log: Path | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if debug:
            env["LLAVA_EDGE_SERVE_DEBUG"] = "1"
        self.log_path = log
        self._log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "llava_edge.cli", "serve", str(package), "--port",
                                      str(self.port), "--threads", "1", *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("server did not become healthy in 90 s")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture(scope="module")
def server(served_package, tmp_path_factory):
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
