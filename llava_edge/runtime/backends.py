"""The one table of backend names and the one opener that run, chat, bench and eval go through.

A backend name says which graphs run on which engine; where they run (``cpu``/``cuda``) is the separate
``device`` option. See docs/architecture.md for what each backend needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..package import Manifest
from .backend import Backend, BackendError

__all__ = ["BackendSpec", "BACKENDS", "ALIASES", "resolve", "resolve_auto", "open_backend"]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    devices: tuple[str, ...]
    about: str


BACKENDS: dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec("ort", ("cpu", "cuda"), "onnxruntime, the portable decoder graph (past in, present out)"),
    BackendSpec("ort-fast", ("cpu", "cuda"), "onnxruntime, GroupQueryAttention decoder, in-place KV cache"),
    BackendSpec("ort-fast-int4", ("cpu", "cuda"), "ort-fast with the int4 (MatMulNBits) fast decoder"),
    BackendSpec("tensorrt", ("cuda",), "TensorRT engines from `llava-edge build`"),
)}
# earlier bench names: a name that carries its device
ALIASES: dict[str, tuple[str, str]] = {"ort-cpu": ("ort", "cpu"), "ort-cuda": ("ort", "cuda")}


def resolve(name: str, device: str = "cpu") -> tuple[str, str]:
    """``(backend, device)`` for a table name or alias; unknown names are a :class:`BackendError`."""
    if name in ALIASES:
        return ALIASES[name]
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; use {', '.join(BACKENDS)}")
    return name, device


def resolve_auto(package_dir: str | os.PathLike, manifest: Manifest) -> str:
    """What ``auto`` means for a package: TensorRT engines when the package has them and TensorRT
    imports, else the fastest onnxruntime decoder the package carries (int4 fast, fast, portable)."""
    from pathlib import Path

    if (Path(package_dir) / "engines").is_dir():
        try:
            import tensorrt  # noqa: F401

            return "tensorrt"
        except ImportError:
            pass
    for graph, backend in (("decoder_fast_int4", "ort-fast-int4"), ("decoder_fast", "ort-fast")):
        if graph in manifest.graphs:
            return backend
    return "ort"


def open_backend(name: str, package_dir: str | os.PathLike, manifest: Manifest, device: str = "cpu",
                 threads: int | None = None) -> Backend:
    """Open ``package_dir``'s graphs (or engines) on the named backend."""
    name, device = resolve(name, device)
    if name == "ort":
        from .ort_backend import OrtBackend

        return OrtBackend(package_dir, manifest, device=device, threads=threads)
    if name in ("ort-fast", "ort-fast-int4"):
        from .fast_backend import FastOrtBackend

        decoder = "decoder_fast" if name == "ort-fast" else "decoder_fast_int4"
        return FastOrtBackend(package_dir, manifest, threads=threads, device=device, decoder=decoder)
    from .trt_backend import TrtBackend  # "tensorrt": the GPU the engines were built for

    return TrtBackend(package_dir, manifest)
