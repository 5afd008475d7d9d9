"""onnxruntime backend over the portable decoder graph (past in, present out)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..package import Manifest, PackageError
from .backend import BackendError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass
class PortableKVCache:
    """Past keys/values as the graph returned them. The portable graph concatenates, so each step
    allocates new present tensors; the in-place cache is the fast decoder's job."""

    past: list[np.ndarray]
    length: int = 0
    max_len: int = 0
    names: list[str] = field(default_factory=list)


# The embedding graph runs on one thread. Its work per call is a gather of a few rows, and a second
# intra-op pool would keep waking (and spinning) beside the decoder's threads every token. On two cores
# that cost the int4 decode 7-9% (edge-1b, 12 of 12 interleaved runs; docs/cpu.md).
EMBED_THREADS = 1


def session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None and threads < 1:
        raise BackendError(f"threads must be >= 1, not {threads}")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # Keep MatMulNBits numerics exact to the stored weights unless the package asks otherwise.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return opts


# What onnxruntime raises for a graph file it cannot load (bad protobuf, bad graph, missing data).
_LOAD_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, n) for n in
                     ("InvalidProtobuf", "InvalidGraph", "Fail", "NoSuchFile", "RuntimeException", "InvalidArgument",
                      "NotImplemented"))


def open_session(root: Path, manifest: Manifest, graph: str, opts: ort.SessionOptions,
                 providers: list[str]) -> ort.InferenceSession:
    """An InferenceSession for one graph of the package; a file onnxruntime cannot load (corrupt, or
    modified to the same size) becomes one PackageError naming it instead of a protobuf traceback."""
    path = root / manifest.graphs[graph].file
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except _LOAD_ERRORS as e:
        reason = " ".join(str(e).split())
        raise PackageError(f"cannot load {path.name} ({graph} graph) of {root}: the file is corrupt or was modified "
                           f"(check with `llava-edge inspect {root} --verify`, then export again); onnxruntime: "
                           f"{reason[:200]}") from None


class OrtBackend:
    name = "onnxruntime"
    supports_prefix_reuse = True
    takes_positions = True  # the portable graph computes rotary from position_ids

    def __init__(self, package_dir: str | os.PathLike, manifest: Manifest, device: str = "cpu",
                 threads: int | None = None):
        if device not in PROVIDERS:
            raise BackendError(f"unknown device {device!r}; use cpu or cuda")
        providers = PROVIDERS[device]
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError("onnxruntime has no CUDA provider here: install onnxruntime-gpu or use --device cpu")
        root = Path(package_dir)
        opts = session_options(threads)
        self.manifest = manifest
        self.vision = open_session(root, manifest, "vision", opts, providers)
        self.embedder = open_session(root, manifest, "embed", session_options(EMBED_THREADS), providers)
        self.decoder = open_session(root, manifest, "decoder", opts, providers)
        self.float_dtype = np.dtype(manifest.dtype)
        self.past_names = [i.name for i in self.decoder.get_inputs()[3:]]
        self.present_names = [o.name for o in self.decoder.get_outputs()[1:]]
        t = manifest.text
        self._kv_shape = (t.num_kv_heads, t.head_dim)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": pixel_values.astype(self.float_dtype, copy=False)})[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embedder.run(None, {"input_ids": input_ids.astype(np.int64, copy=False)})[0]

    def new_cache(self, batch: int, max_len: int) -> PortableKVCache:
        empty = np.zeros((batch, *self._kv_shape[:1], 0, self._kv_shape[1]), dtype=self.float_dtype)
        return PortableKVCache(past=[empty] * len(self.past_names), max_len=max_len, names=self.past_names)

    def step(self, cache: PortableKVCache, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        t = inputs_embeds.shape[1]
        if cache.length + t > cache.max_len:
            raise BackendError(f"KV cache full: {cache.length} + {t} > {cache.max_len}")
        feeds = {"inputs_embeds": inputs_embeds.astype(self.float_dtype, copy=False),
                 "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(cache.names, cache.past))
        outputs = self.decoder.run(None, feeds)
        cache.past = outputs[1:]
        cache.length += t
        return outputs[0][:, -1, :].astype(np.float32, copy=False)

    # -- prefix reuse ---------------------------------------------------------------------------
    def snapshot(self, cache: PortableKVCache) -> tuple[list[np.ndarray], int]:
        """Past arrays are never written in place by this backend, so a snapshot is references only."""
        return list(cache.past), cache.length

    def resume(self, state: tuple[list[np.ndarray], int], prefix_len: int, max_len: int) -> PortableKVCache:
        past, length = state
        if prefix_len > length:
            raise BackendError(f"prefix of {prefix_len} tokens is longer than the snapshot ({length})")
        sliced = [np.ascontiguousarray(p[:, :, :prefix_len]) for p in past]
        return PortableKVCache(past=sliced, length=prefix_len, max_len=max_len, names=self.past_names)
