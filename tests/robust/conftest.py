"""Fixtures for the bad-input tests: a package, copies to break, crafted images, a read-only place."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


def png_bytes(width: int, height: int, data: bytes | None = None) -> bytes:
    """A 1-bit greyscale PNG declaring width x height; `data` the raw (filtered) rows, default a few
    zero bytes (so the header is right and decoding fails or stops early)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(data if data is not None else b"\x00" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root -> sha256: to prove a directory survived byte for byte."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def pkg(tiny_models) -> Path:
    return tiny_models["llava-hf-v1.5"]["package"]


@pytest.fixture
def checkpoint(tiny_models, tmp_path) -> Path:
    """A private copy of a tiny checkpoint (tests try to destroy it)."""
    dst = tmp_path / "ck"
    shutil.copytree(tiny_models["llava-hf-v1.5"]["checkpoint"], dst)
    return dst


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def corrupt_pkg(pkg, tmp_path_factory) -> Path:
    """The package with decoder.onnx damaged in place, same size (so the size check passes)."""
    dst = tmp_path_factory.mktemp("corrupt") / "pkg"
    shutil.copytree(pkg, dst)
    data = bytearray((dst / "decoder.onnx").read_bytes())
    data[:64] = b"\xff" * 64
    (dst / "decoder.onnx").write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="session")
def readonly_dir(tmp_path_factory) -> Path:
    """A directory nothing can be created in: chmod 555, or, as root (who ignores modes), /proc."""
    if os.geteuid() != 0:
        d = tmp_path_factory.mktemp("ro")
        d.chmod(0o555)
    else:
        d = Path("/proc")
    try:
        with tempfile.TemporaryFile(dir=d):
            pytest.skip(f"{d} is writable here")
    except OSError:
        pass
    return d
