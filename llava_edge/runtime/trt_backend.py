"""TensorRT backend behind the same protocol as the onnxruntime one (``runtime/backend.py``).

This is the only runtime module that imports ``tensorrt`` and ``cuda-python``, and it imports them
lazily: importing this module (for the engine record and its checks) works without either, and a
missing one becomes a one-line :class:`TensorRTUnavailable` error instead of an ImportError traceback.

What it does
* Loads ``engines/{vision,embed,decoder}.plan`` after checking the engine record (engines are tied
  to the exact TensorRT version and GPU they were built for, so a mismatch is refused with a message
  saying what to rebuild), from an ``mmap`` of the file (no second copy of the weights in process
  memory while deserialising: on Jetson that memory is the GPU's).
* Allocates every device and pinned host buffer once, at construction, sized from the engines'
  optimization-profile maxima; ``step`` allocates nothing.
* KV cache (``trt_kv``), by the record's ``kv_cache``:
  - ``"in-place"`` (what ``llava-edge build`` makes on TensorRT < 10.9 or with ``--plugins off``): the decoder engine is the static-cache graph
    (``export/static_decoder.py``); one buffer per layer k/v at [max_batch, kvH, max_ctx, D] is bound
    whole as ``past`` every step and the step's new k/v are copied into it at the current length
    (``cudaMemcpy2DAsync``, a few KB per layer per token). The cache is never copied or reallocated.
  - ``"ping-pong"`` (engines built before): the portable graph, two slabs swapped every step, twice
    the cache memory.
  - record ``attention == "plugin"`` (``--plugins auto|on`` on TensorRT >= 10.9; ``trt_plugin_kv``):
    the plugin-attention graph (``export/plugin_decoder.py``); one buffer per layer k/v bound as both
    the past input and the aliased present output (the plugin writes new k/v itself: no scatter), inputs
    ``prompt_lens`` / ``start_pos`` instead of mask/positions, rows right-padded with per-row lengths
    (left-padded prompts are converted at prefill), logits read at each row's last real token.
* Profiles: 0 = prefill (T >= 1 new tokens), 1 = decode (T = 1). In-place: the prefill profile takes
  any cache length, so a prompt longer than the profile's T and tokens added to a non-empty cache
  (chat turns, prefix reuse) go through it in chunks. Ping-pong: prefill only on an empty cache,
  other T > 1 steps one token at a time through the decode profile.
* CUDA graphs (in-place and plugin engines, ``cuda_graphs=True`` by default; ``trt_cuda_graph``): the decode step
  (T = 1, past fixed at max_ctx, fixed buffers) is captured once per batch size and replayed; the
  input copies and the KV scatter stay outside the graph. Capture failure logs the reason and falls
  back to plain ``execute_async_v3``. Not possible with the ping-pong graph (a new shape every step).
* One CUDA stream; host<->device copies from pinned buffers with cudaMemcpyAsync; only the last
  position's logits come back (cudaMemcpy2DAsync over the [B, T, V] output).

NOT run against a real TensorRT or GPU in this repository (none is available, see
shared/ARCHITECTURE.md): the logic is tested against a fake tensorrt/cuda-python that runs the graphs
in onnxruntime, and plugin graphs in ``onnx.reference`` with our kernels (tests/trt/test_trt_backend_fake.py,
test_trt_plugin_backend_fake.py).

API references: TensorRT Python API ``IExecutionContext.set_input_shape / set_tensor_address /
execute_async_v3 / set_optimization_profile_async``, ``ICudaEngine.get_tensor_profile_shape``
(docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html);
cuda-python ``cudart.cudaMalloc / cudaMallocHost / cudaMemcpyAsync / cudaMemcpy2DAsync`` as in the
TensorRT samples that replaced pycuda with cuda-python (NVIDIA/TensorRT CHANGELOG 10.14).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..package import Manifest
from .ort_backend import BackendError
from .trt_cuda_graph import CudaGraphRunner
from .trt_record import (  # noqa: F401 - re-exported: the builder and callers import them from here
    ALLOW_GPU_MISMATCH_ENV, ENGINE_GRAPHS, ENGINES_DIR, RECORD_FORMAT, RECORD_NAME, EngineFile, EngineMismatchError,
    EngineRecord, check_engine_record,
)
from .trt_kv import KV_INPLACE, KV_PINGPONG, InPlaceKV, KVDims, PingPongKV, TrtKVCache
from .trt_plugin_kv import KV_PLUGIN, PluginDecoderSteps, PluginKV
from .trt_memory import DeviceBuffer, PinnedBuffer, ck as _ck

PREFILL_PROFILE, DECODE_PROFILE = 0, 1
CUDA_GRAPHS_ENV = "LLAVA_EDGE_TRT_CUDA_GRAPHS"  # "0": run decode steps without CUDA graphs

__all__ = ["EngineFile", "EngineRecord", "EngineMismatchError", "TensorRTUnavailable", "GpuInfo",
           "check_engine_record", "import_tensorrt", "import_cudart", "gpu_info", "TrtBackend", "TrtKVCache"]


# Whether this backend binds plugin-attention decoder engines (export/plugin_decoder.py: caches as
# input + aliased output, right-padded rows with prompt_lens/start_pos): yes, with trt_plugin_kv. The
# builder reads it: `llava-edge build --plugins auto` picks the plugin graph on TensorRT >= 10.9 only
# when this is True (tested on CPU against a fake TensorRT only, see trt_plugin_kv).
PLUGIN_ENGINES_RUNNABLE = True


class TensorRTUnavailable(BackendError):
    """tensorrt / cuda-python is not installed, or no CUDA GPU is visible."""


# ------------------------------------------------------------------------------ tensorrt / cuda-python
def import_tensorrt():
    """``tensorrt`` or a clear error (it is an optional extra; JetPack ships it system-wide)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed: on Jetson use the JetPack one (python3-libnvinfer; create the venv with "
            "--system-site-packages), elsewhere `pip install 'llava-edge[tensorrt]'`; or use --backend ort "
            f"({e})") from e
    if not hasattr(trt, "__version__"):  # a bare directory named tensorrt on sys.path (namespace package)
        raise TensorRTUnavailable(
            f"`import tensorrt` found {list(getattr(trt, '__path__', []))}, which is not NVIDIA TensorRT; install "
            "TensorRT (or remove that directory from the path), or use --backend ort")
    return trt


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as e:
            raise TensorRTUnavailable(
                "cuda-python is not installed (`pip install 'cuda-python>=12'`, matching the CUDA of your "
                f"TensorRT); the TensorRT backend needs it for device memory and streams ({e})") from e
    return cudart


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    total_memory: int


def gpu_info(device_index: int = 0) -> GpuInfo:
    """The GPU at ``device_index``, or :class:`TensorRTUnavailable` when there is none."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise TensorRTUnavailable("no CUDA GPU is visible (cudaGetDeviceCount: "
                                  f"{'error ' + str(err) if int(err) else '0 devices'}); the TensorRT backend needs one")
    if not 0 <= device_index < count:
        raise TensorRTUnavailable(f"GPU index {device_index} out of range: {count} device(s) visible")
    props = _ck(cudart.cudaGetDeviceProperties(device_index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\x00 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


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

    def __init__(self, package_dir: str | os.PathLike, manifest: Manifest, device_index: int = 0, *,
                 allow_gpu_mismatch: bool | None = None, cuda_graphs: bool | None = None):
        trt = import_tensorrt()
        self.cudart = cudart = import_cudart()
        gpu = gpu_info(device_index)
        _ck(cudart.cudaSetDevice(device_index))
        root = Path(package_dir)
        self.manifest = manifest
        self.record = EngineRecord.load(root)
        if allow_gpu_mismatch is None:
            allow_gpu_mismatch = os.environ.get(ALLOW_GPU_MISMATCH_ENV, "") not in ("", "0")
        self.warnings = check_engine_record(self.record, manifest, trt.__version__, gpu.name,
                                            gpu.compute_capability, root, allow_gpu_mismatch)
        if self.record.kv_cache not in (KV_INPLACE, KV_PINGPONG):
            raise EngineMismatchError(f"engine record has kv_cache {self.record.kv_cache!r}, which this llava-edge does "
                                      "not know; rebuild the engines with `llava-edge build`")
        plugin = self.record.attention == "plugin"  # the binding mode comes from the record
        if plugin and not PLUGIN_ENGINES_RUNNABLE:
            raise EngineMismatchError(
                "these engines use the llava_edge attention plugin (built with --plugins on), which this llava-edge's "
                "TensorRT backend cannot bind yet; rebuild with `llava-edge build --plugins off` (or auto)")
        if plugin and self.record.kv_cache != KV_INPLACE:
            raise EngineMismatchError(f"engine record has attention 'plugin' with kv_cache {self.record.kv_cache!r}; "
                                      "plugin engines keep one in-place cache: rebuild with `llava-edge build`")
        inplace = self.record.kv_cache == KV_INPLACE
        layout = KV_PLUGIN if plugin else self.record.kv_cache
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"
        self.float_dtype = np.dtype(manifest.dtype)
        self._logger = trt.Logger(trt.Logger.WARNING)
        # AOT plugin engines carry their kernels' PTX: nothing to register at run time (trt_plugins.py).
        self._runtime = trt.Runtime(self._logger)
        self._buffers: list[Any] = []
        self.stream = int(_ck(cudart.cudaStreamCreate()))
        self.engines = {n: _Engine(trt, self._runtime, root / self.record.engines[n].file, n) for n in ENGINE_GRAPHS}
        t = manifest.text
        self._vocab = t.vocab_size
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")]
        out = "new" if layout == KV_INPLACE else "present"
        self.kv_out_names = [f"{out}.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")]
        dec = self.engines["decoder"]
        missing = [n for n in self.past_names + self.kv_out_names if n not in dec.names]
        if missing:
            raise EngineMismatchError(f"the decoder engine has no tensor {missing[0]} although its record says kv_cache "
                                      f"{self.record.kv_cache!r} (attention {self.record.attention!r}); rebuild the "
                                      "engines with `llava-edge build`")

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
                cudart, self.stream, self._alloc)
        else:
            self.kv = PingPongKV(dims, self.past_names, self.kv_out_names, self._alloc)
        self._logits_dtype = dec.dtype["logits"]
        self.host["decoder", "logits"] = self._alloc(PinnedBuffer, self.max_batch * self._vocab * self._logits_dtype.itemsize)
        self._epoch = 0
        self.graphs = CudaGraphRunner(cudart, dec.context, self.stream, "decoder", enabled=cuda_graphs and inplace)
        if cuda_graphs and not inplace:
            self.graphs.disabled_reason = "ping-pong engines: the decode step has a new shape every step"
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
        _ck(self.cudart.cudaMemcpyAsync(self.dev[graph, name].ptr, self.host[graph, name].ptr, a.nbytes, kind, self.stream))
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
        _ck(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.dev[graph, out_name].ptr, host.nbytes, kind, self.stream))
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
        if self.kv.layout == KV_INPLACE:  # any T on any cache length: chunks of at most the prefill profile's T
            chunk = self.max_prompt if t > 1 else 1
            logits = None
            for s in range(0, t, chunk):
                e = min(t, s + chunk)
                logits = self._step(cache, inputs_embeds[:, s:e], attention_mask[:, : cache.length + e - s],
                                    position_ids[:, s:e])
            return logits
        if t > 1 and cache.length > 0:  # not in the prefill profile (past = 0): one token at a time
            logits = None
            for j in range(t):
                n = cache.length + 1
                logits = self._step(cache, inputs_embeds[:, j : j + 1], attention_mask[:, :n], position_ids[:, j : j + 1])
            return logits
        if t > self.max_prompt:
            raise BackendError(f"prompt of {t} tokens > the engines' max prompt {self.max_prompt}; rebuild with "
                               "larger --max-images/--max-context")
        return self._step(cache, inputs_embeds, attention_mask, position_ids)

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
