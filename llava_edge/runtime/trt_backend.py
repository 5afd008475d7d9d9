"""TensorRT backend behind the same protocol as the onnxruntime one (``runtime/backend.py``).

The only runtime module that drives ``tensorrt`` and ``cuda-python`` (found lazily by ``trt_env``). It
checks the engine record (``contract.py``), loads the three engines from an ``mmap``, allocates every
device and pinned buffer once, and hands the decoder's cache to the KV layout the record names
(``kv_inplace``, ``kv_pingpong``, ``kv_plugin``); decode steps replay CUDA graphs where the layout allows
(``trt_cuda_graph``). No snapshot/resume: it keeps one device cache, so ``supports_prefix_reuse`` is
False. Tested on CPU against a fake TensorRT (tests/fakes/fake_tensorrt.py). See docs/architecture.md.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import trt_env
from ..contract import (
    ALLOW_GPU_MISMATCH_ENV, DECODE_PROFILE, ENGINE_GRAPHS, KV_INPLACE, KV_LAYOUTS, KV_PLUGIN, PREFILL_PROFILE,
    EngineMismatchError, EngineRecord, check_engine_record, kv_out_names, past_names,
)
from ..package import Manifest
from .backend import BackendError
from .kv_inplace import InPlaceKV
from .kv_pingpong import PingPongKV
from .kv_plugin import PluginDecoderSteps, PluginKV
from .trt_cuda_graph import CudaGraphRunner
from .trt_kv import KVDims, TrtKVCache
from .trt_memory import DeviceBuffer, PinnedBuffer, ck as _ck

CUDA_GRAPHS_ENV = "LLAVA_EDGE_TRT_CUDA_GRAPHS"  # "0": run decode steps without CUDA graphs

__all__ = ["TrtBackend", "TrtKVCache", "CUDA_GRAPHS_ENV"]


class _Engine:
    """One deserialised engine, its context and its tensors' dtypes and profile maxima."""

    def __init__(self, trt, runtime, path: Path, name: str):
        self.name = name
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            self.engine = runtime.deserialize_cuda_engine(memoryview(mm))
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {path} (see the messages above); rebuild it")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.names}
        self.num_profiles = self.engine.num_optimization_profiles
        self.profile = 0
        self.max_bytes = self._max_bytes()

    def profile_max(self, name: str, profile: int) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def _max_bytes(self) -> dict[str, int]:
        """Largest byte size of every I/O tensor over all profiles (outputs: inferred at max inputs)."""
        out: dict[str, int] = {}
        for p in range(self.num_profiles):
            self.context.set_optimization_profile_async(p, 0)
            for n in self.inputs:
                shape = self.profile_max(n, p)
                self.context.set_input_shape(n, shape)
                out[n] = max(out.get(n, 0), int(np.prod(shape)) * self.dtype[n].itemsize)
            for n in self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                out[n] = max(out.get(n, 0), int(np.prod(shape)) * self.dtype[n].itemsize)
        self.context.set_optimization_profile_async(0, 0)
        self.profile = 0
        return out

    def use_profile(self, p: int, stream: int) -> None:
        if p != self.profile:
            if p >= self.num_profiles:
                raise BackendError(f"{self.name} engine has no optimization profile {p}; rebuild the engines")
            self.context.set_optimization_profile_async(p, stream)
            self.profile = p


class TrtBackend:
    """TensorRT engines of a package, driven through the :class:`~llava_edge.runtime.backend.Backend`
    protocol. ``TrtBackend(package_dir, manifest, device_index=0, cuda_graphs=None)``; ``cuda_graphs``
    (default: on unless the environment says LLAVA_EDGE_TRT_CUDA_GRAPHS=0) only applies to in-place
    engines (see the module docstring)."""

    name = "tensorrt"
    supports_prefix_reuse = False  # one device cache per backend; no snapshot/resume yet

    def __init__(self, package_dir: str | os.PathLike, manifest: Manifest, device_index: int = 0, *,
                 allow_gpu_mismatch: bool | None = None, cuda_graphs: bool | None = None):
        trt = trt_env.import_tensorrt()
        self.cudart = cudart = trt_env.import_cudart()
        gpu = trt_env.gpu_info(device_index)
        _ck(cudart.cudaSetDevice(device_index))
        root = Path(package_dir)
        self.manifest = manifest
        self.record = EngineRecord.load(root)
        if allow_gpu_mismatch is None:
            allow_gpu_mismatch = os.environ.get(ALLOW_GPU_MISMATCH_ENV, "") not in ("", "0")
        self.warnings = check_engine_record(self.record, manifest, trt.__version__, gpu.name,
                                            gpu.compute_capability, root, allow_gpu_mismatch)
        if self.record.kv_cache not in KV_LAYOUTS:
            raise EngineMismatchError(f"engine record has kv_cache {self.record.kv_cache!r}, which this llava-edge "
                                      "does not know; rebuild the engines with `llava-edge build`")
        plugin = self.record.attention == KV_PLUGIN  # the binding mode comes from the record
        if plugin and self.record.kv_cache != KV_INPLACE:
            raise EngineMismatchError(f"engine record has attention 'plugin' with kv_cache {self.record.kv_cache!r}; "
                                      "plugin engines keep one in-place cache: rebuild with `llava-edge build`")
        inplace = self.record.kv_cache == KV_INPLACE
        layout = KV_PLUGIN if plugin else self.record.kv_cache
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"
        self.float_dtype = np.dtype(manifest.dtype)
        self._logger = trt.Logger(trt.Logger.WARNING)
        # AOT plugin engines carry their kernels' PTX: nothing to register at run time (trt/plugins.py).
        self._runtime = trt.Runtime(self._logger)
        self._buffers: list[Any] = []
        self.stream = int(_ck(cudart.cudaStreamCreate()))
        self.engines = {n: _Engine(trt, self._runtime, root / self.record.engines[n].file, n) for n in ENGINE_GRAPHS}
        t = manifest.text
        self._vocab = t.vocab_size
        self.past_names = past_names(t.num_layers)
        self.kv_out_names = kv_out_names(t.num_layers, layout)
        dec = self.engines["decoder"]
        missing = [n for n in self.past_names + self.kv_out_names if n not in dec.names]
        if missing:
            raise EngineMismatchError(f"the decoder engine has no tensor {missing[0]} although its record says "
                                      f"kv_cache {self.record.kv_cache!r} (attention {self.record.attention!r}); "
                                      "rebuild the engines with `llava-edge build`")

        # every buffer, once: device I/O of vision/embed/decoder (but the cache), pinned host staging
        self.dev: dict[tuple[str, str], DeviceBuffer] = {}
        self.host: dict[tuple[str, str], PinnedBuffer] = {}
        for g, eng in self.engines.items():
            for n in eng.names:
                if g == "decoder" and (n in self.past_names or (n in self.kv_out_names and layout != KV_INPLACE)):
                    continue  # the cache buffers (ping-pong slabs, plugin: bound as past and present)
                self.dev[g, n] = self._alloc(DeviceBuffer, eng.max_bytes[n])
                if g == "decoder" and (n == "logits" or n in self.kv_out_names):
                    continue  # logits: only [B, V] comes back (sized below); new k/v stay on the device
                self.host[g, n] = self._alloc(PinnedBuffer, eng.max_bytes[n])
        self.max_batch = dec.profile_max("inputs_embeds", DECODE_PROFILE)[0]
        self.max_prompt = dec.profile_max("inputs_embeds", PREFILL_PROFILE)[1]
        if inplace:
            self.max_context = dec.profile_max(self.past_names[0], DECODE_PROFILE)[2]
        else:
            self.max_context = dec.profile_max("attention_mask", DECODE_PROFILE)[1]
        dims = KVDims(t.num_layers, t.num_kv_heads, t.head_dim, dec.dtype[self.kv_out_names[0]], self.max_batch,
                      self.max_context)
        if layout == KV_PLUGIN:
            self.kv: InPlaceKV | PingPongKV | PluginKV = PluginKV(dims, self.past_names, self.kv_out_names,
                                                                  self._alloc)
        elif inplace:
            self.kv = InPlaceKV(
                dims, self.past_names, self.kv_out_names, [self.dev["decoder", n] for n in self.kv_out_names],
                cudart, self.stream, self._alloc, self.max_prompt)
        else:
            self.kv = PingPongKV(dims, self.past_names, self.kv_out_names, self._alloc, self.max_prompt)
        self._logits_dtype = dec.dtype["logits"]
        self.host["decoder", "logits"] = self._alloc(PinnedBuffer,
                                                     self.max_batch * self._vocab * self._logits_dtype.itemsize)
        self._epoch = 0
        self.graphs = CudaGraphRunner(cudart, dec.context, self.stream, "decoder", enabled=cuda_graphs and inplace)
        if cuda_graphs and not inplace:
            self.graphs.disabled_reason = "ping-pong engines: the decode step has a new shape every step"
        # in-place and ping-pong engines are the portable graph (rotary from position_ids); the plugin's
        # attention kernel rotates by start_pos + j, i.e. by cache slot: pruned prompts are renumbered there
        self.takes_positions = layout != KV_PLUGIN
        self._plugin_steps = None
        if layout == KV_PLUGIN:
            self._plugin_steps = PluginDecoderSteps(
                dec, lambda name, a: self._h2d("decoder", name, a), self.kv, self.graphs, cudart, self.stream,
                self.dev["decoder", "logits"], self.host["decoder", "logits"], self._logits_dtype, self._vocab,
                self.max_prompt)

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps run from captured CUDA graphs (False after a capture failure)."""
        return self.graphs.enabled

    # -- memory --------------------------------------------------------------------------------------
    def _alloc(self, kind, nbytes: int, **kw):
        buf = kind(self.cudart, nbytes, **kw)
        self._buffers.append(buf)
        return buf

    def close(self) -> None:
        """Free device and pinned memory now (Jetson: it is the system's RAM). Captured graphs go first:
        they point at the buffers."""
        if getattr(self, "graphs", None) is not None:
            self.graphs.close()
        for b in getattr(self, "_buffers", []):
            b.free()
        self._buffers = []
        if getattr(self, "stream", 0):
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = 0
        self.engines = {}

    def __del__(self) -> None:  # best effort; call close() to be deterministic
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- helpers -------------------------------------------------------------------------------------
    def _h2d(self, graph: str, name: str, array: np.ndarray) -> tuple[int, ...]:
        eng = self.engines[graph]
        a = np.ascontiguousarray(array, dtype=eng.dtype[name])
        if a.nbytes > eng.max_bytes[name]:
            raise BackendError(f"{graph} input {name} of shape {a.shape} exceeds the engine's profile maximum; "
                               "rebuild with larger --max-batch/--max-context/--max-images")
        staged = self.host[graph, name].view(a.dtype, a.shape)
        staged[...] = a
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _ck(self.cudart.cudaMemcpyAsync(self.dev[graph, name].ptr, self.host[graph, name].ptr, a.nbytes, kind,
                                        self.stream))
        eng.context.set_input_shape(name, a.shape)
        eng.context.set_tensor_address(name, self.dev[graph, name].ptr)
        return a.shape

    def _execute(self, graph: str) -> None:
        if not self.engines[graph].context.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run the {graph} engine (see the TensorRT log above)")

    def _run_single(self, graph: str, in_name: str, out_name: str, array: np.ndarray) -> np.ndarray:
        eng = self.engines[graph]
        eng.use_profile(0, self.stream)
        self._h2d(graph, in_name, array)
        eng.context.set_tensor_address(out_name, self.dev[graph, out_name].ptr)
        shape = tuple(eng.context.get_tensor_shape(out_name))
        self._execute(graph)
        host = self.host[graph, out_name].view(eng.dtype[out_name], shape)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ck(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.dev[graph, out_name].ptr, host.nbytes, kind,
                                        self.stream))
        _ck(self.cudart.cudaStreamSynchronize(self.stream))
        return host.copy()  # the pinned buffer is reused by the next call

    # -- protocol ------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run_single("vision", "pixel_values", "image_features", pixel_values)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run_single("embed", "input_ids", "inputs_embeds", input_ids.astype(np.int64, copy=False))

    def new_cache(self, batch: int, max_len: int) -> TrtKVCache:
        """No allocation: the cache exists since construction. Invalidates earlier caches (one device
        cache per backend; the pipeline uses one at a time)."""
        if batch > self.max_batch:
            raise BackendError(f"batch {batch} > the engines' max batch {self.max_batch}; rebuild with --max-batch")
        if max_len > self.max_context:
            raise BackendError(f"{max_len} tokens > the engines' max context {self.max_context}; "
                               "rebuild with a larger --max-context or shorten the prompt/max_new_tokens")
        self._epoch += 1
        cache = TrtKVCache(batch=batch, max_len=max_len, epoch=self._epoch)
        if self.kv.layout == KV_PLUGIN:
            cache.lengths = np.zeros(batch, np.int32)
            cache.logits = np.zeros((batch, self._vocab), np.float32)
        return cache

    def step(self, cache: TrtKVCache, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        if cache.epoch != self._epoch:
            raise BackendError("this KV cache was superseded by a newer new_cache() (the TensorRT backend keeps one "
                               "device cache)")
        b, t = inputs_embeds.shape[:2]
        if b != cache.batch:
            raise BackendError(f"batch {b} does not match the cache's batch {cache.batch}")
        if cache.length + t > cache.max_len:
            raise BackendError(f"KV cache full: {cache.length} + {t} > {cache.max_len}")
        if attention_mask.shape != (b, cache.length + t):
            raise BackendError(f"attention_mask shape {attention_mask.shape} != {(b, cache.length + t)}")
        if self._plugin_steps is not None:  # right-padded ragged rows, prompt_lens/start_pos, aliased caches
            return self._plugin_steps.step(cache, inputs_embeds, attention_mask, position_ids)
        return self.kv.step(self._step, cache, inputs_embeds, attention_mask, position_ids)

    def _step(self, cache: TrtKVCache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        dec = self.engines["decoder"]
        ctx = dec.context
        b, t = embeds.shape[:2]
        dec.use_profile(PREFILL_PROFILE if t > 1 else DECODE_PROFILE, self.stream)
        self._h2d("decoder", "inputs_embeds", embeds)
        self._h2d("decoder", "attention_mask", self.kv.decoder_mask(mask, cache.length, t))
        self._h2d("decoder", "position_ids", positions)
        self.kv.bind(ctx, cache, b)
        ctx.set_tensor_address("logits", self.dev["decoder", "logits"].ptr)
        if t == 1:
            self.graphs.run(key=b)  # in-place: same shapes and addresses every decode step of batch b
        else:
            self.graphs.execute()
        self.kv.commit(cache, b, t)
        # last position of each row: rows are T*V apart on the device, V apart on the host
        itemsize = self._logits_dtype.itemsize
        row = self._vocab * itemsize
        host = self.host["decoder", "logits"].view(self._logits_dtype, (b, self._vocab))
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ck(self.cudart.cudaMemcpy2DAsync(host.ctypes.data, row, self.dev["decoder", "logits"].ptr + (t - 1) * row,
                                          t * row, row, b, kind, self.stream))
        _ck(self.cudart.cudaStreamSynchronize(self.stream))
        cache.length += t
        return host.astype(np.float32)  # a copy: the pinned buffer is reused
