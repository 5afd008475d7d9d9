"""The one table of backend names and the one opener that run, chat, bench and eval go through.

A backend name says which graphs run on which engine; where they run (``cpu``/``cuda``) is the separate
``device`` option, one of the backend's ``devices`` (None: its first). See docs/architecture.md for what
each backend needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UsageError
from ..package import Manifest
from .backend import Backend, BackendError

__all__ = ["BackendSpec", "DeviceError", "BACKENDS", "ALIASES", "DECODER_GRAPHS", "resolve", "resolve_auto",
           "require_graphs", "open_backend"]


class DeviceError(BackendError, UsageError):
    """A backend asked to run on a device it does not run on (``BackendSpec.devices``)."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    devices: tuple[str, ...]  # where it runs, the default first; any other device is refused (resolve)
    about: str


BACKENDS: dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec("ort", ("cpu", "cuda"), "onnxruntime, the portable decoder graph (past in, present out)"),
    # GroupQueryAttention's shared past/present buffer is bound as CPU memory (fast_backend.py)
    BackendSpec("ort-fast", ("cpu",), "onnxruntime, GroupQueryAttention decoder, in-place KV cache"),
    BackendSpec("ort-fast-int4", ("cpu",), "ort-fast with the int4 (MatMulNBits) fast decoder"),
    # OpenVINO prefills long prompt chunks of the same graph into the same cache (ov_prefill.py): a faster
    # first token for one more copy of the decoder in memory, so chosen by name, never by auto
    BackendSpec("ort-fast-ov", ("cpu",), "ort-fast, prompt prefill on OpenVINO (the openvino extra)"),
    BackendSpec("ort-fast-int4-ov", ("cpu",), "ort-fast-int4, prompt prefill on OpenVINO (the openvino extra)"),
    BackendSpec("tensorrt", ("cuda",), "TensorRT engines from `llava-edge build` (the GPU they were built for)"),
)}
# earlier bench names: a name that carries its device
ALIASES: dict[str, tuple[str, str]] = {"ort-cpu": ("ort", "cpu"), "ort-cuda": ("ort", "cuda")}


def resolve(name: str, device: str | None = None) -> tuple[str, str]:
    """``(backend, device)`` for a table name or alias (device None: the backend's first); unknown names
    are a :class:`BackendError`, a device the backend does not list a :class:`DeviceError`."""
    if name in ALIASES:
        return ALIASES[name]
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; use {', '.join(BACKENDS)}")
    devices = BACKENDS[name].devices
    if device is None:
        return name, devices[0]
    if device not in devices:
        others = [n for n, s in BACKENDS.items() if device in s.devices]
        raise DeviceError(f"backend {name} runs on {' or '.join(devices)}, not {device!r}"
                          + (f" (on {device}: {', '.join(others)})" if others else ""))
    return name, device


# The decoder graph each onnxruntime backend runs, and the `export` flag that adds it to a package.
DECODER_GRAPHS: dict[str, tuple[str, str]] = {
    "ort": ("decoder", ""), "ort-fast": ("decoder_fast", " --fast"),
    "ort-fast-int4": ("decoder_fast_int4", " --fast-int4"),
    "ort-fast-ov": ("decoder_fast", " --fast"), "ort-fast-int4-ov": ("decoder_fast_int4", " --fast-int4"),
}


def resolve_auto(package_dir: str | os.PathLike, manifest: Manifest, device: str | None = None) -> str:
    """What ``auto`` means for a package: TensorRT engines when the package has them and TensorRT
    imports, else the fastest onnxruntime decoder the package carries (int4 fast, fast, portable; the
    fast ones run on CPU only, so on cuda the portable one comes first)."""
    from pathlib import Path

    if (Path(package_dir) / "engines").is_dir() and device in (None, "cuda"):
        try:
            import tensorrt  # noqa: F401

            return "tensorrt"
        except ImportError:
            pass
    order = ["ort-fast-int4", "ort-fast", "ort"]
    if device not in (None, "cpu"):
        order = ["ort", "ort-fast-int4", "ort-fast"]
    for backend in order:
        if DECODER_GRAPHS[backend][0] in manifest.graphs:
            return backend
    return "ort"


def require_graphs(name: str, package_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Refuse, in one line with the command that adds it, an onnxruntime backend whose graphs the
    package lacks (a `--target cpu-int4` package has no portable decoder, a plain one no fast decoder)."""
    if name not in DECODER_GRAPHS:
        return
    graph, flag = DECODER_GRAPHS[name]
    missing = [g for g in ("vision", "embed", graph) if g not in manifest.graphs]
    if not missing:
        return
    decoders = [g for g in manifest.graphs if g.startswith("decoder")]
    source = manifest.source.get("path") or "CHECKPOINT"
    raise BackendError(f"package {package_dir} has no '{missing[0]}' graph for --backend {name} (its decoders: "
                       f"{', '.join(decoders) or 'none'}; --backend auto picks one it has); add it with "
                       f"`llava-edge export {source} -o {package_dir}{flag} --overwrite`")


def open_backend(name: str, package_dir: str | os.PathLike, manifest: Manifest, device: str | None = None,
                 threads: int | None = None) -> Backend:
    """Open ``package_dir``'s graphs (or engines) on the named backend (``auto``: see resolve_auto)."""
    if name == "auto":
        name = resolve_auto(package_dir, manifest, device)
    name, device = resolve(name, device)
    require_graphs(name, package_dir, manifest)
    if name == "ort":
        from .ort_backend import OrtBackend

        return OrtBackend(package_dir, manifest, device=device, threads=threads)
    if name in ("ort-fast", "ort-fast-int4", "ort-fast-ov", "ort-fast-int4-ov"):
        from .fast_backend import FastOrtBackend
        from .ov_prefill import PrefillEngine

        prefill = PrefillEngine.OPENVINO if name.endswith("-ov") else PrefillEngine.ONNXRUNTIME
        return FastOrtBackend(package_dir, manifest, threads=threads, device=device,
                              decoder=DECODER_GRAPHS[name][0], prefill=prefill)
    from .trt_backend import TrtBackend  # "tensorrt": the GPU the engines were built for

    return TrtBackend(package_dir, manifest)
