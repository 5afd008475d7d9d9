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
* KV cache: the engine is the portable decoder graph (past in, present = concat(past, new) out). Two
  device slabs hold all layers' k/v at max batch x max context; each step reads ``past`` from one slab
  and TensorRT writes ``present`` into the other, then they swap ("ping-pong"). A tensor of shape
  [B, kvH, n, D] is contiguous, so the present written at length n+t is exactly next step's past: no
  copy, no reallocation, at the price of twice the cache memory. The in-place graph (attention plugin /
  TensorRT KV-cache layer, see ``kernels/trt_plugins.attention_impl_for``) is the later optimisation.
* Profiles: 0 = prefill (T >= 1 new tokens on an empty cache), 1 = decode (T = 1). Tokens added to a
  non-empty cache with T > 1 go through the decode profile one at a time (correct, slower).
* One CUDA stream; host<->device copies from pinned buffers with cudaMemcpyAsync; only the last
  position's logits come back (cudaMemcpy2DAsync over the [B, T, V] output).

Not done (and not claimed): CUDA graph capture of the decode step. TensorRT needs fixed shapes and
addresses for a captured graph (NVIDIA TensorRT developer guide, "CUDA Graphs": capture
``execute_async_v3`` after the shapes are set; re-capture when they change), but with the portable
graph the past length grows every step and the slabs alternate, so each step has a new shape. It
becomes possible with the in-place cache (fixed [B, kvH, max, D] buffers + a seq-len input), per batch
size. TODO(trt): capture per batch bucket once the in-place decoder exists.

API references: TensorRT Python API ``IExecutionContext.set_input_shape / set_tensor_address /
execute_async_v3 / set_optimization_profile_async``, ``ICudaEngine.get_tensor_profile_shape``
(docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html);
cuda-python ``cudart.cudaMalloc / cudaMallocHost / cudaMemcpyAsync / cudaMemcpy2DAsync`` as in the
TensorRT samples that replaced pycuda with cuda-python (NVIDIA/TensorRT CHANGELOG 10.14).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..package import Manifest
from .ort_backend import BackendError

ENGINES_DIR = "engines"
RECORD_NAME = "engines.json"
RECORD_FORMAT = 1
ENGINE_GRAPHS = ("vision", "embed", "decoder")
PREFILL_PROFILE, DECODE_PROFILE = 0, 1
ALLOW_GPU_MISMATCH_ENV = "LLAVA_EDGE_TRT_ALLOW_GPU_MISMATCH"

__all__ = ["EngineFile", "EngineRecord", "EngineMismatchError", "TensorRTUnavailable", "GpuInfo",
           "check_engine_record", "import_tensorrt", "import_cudart", "gpu_info", "TrtBackend", "TrtKVCache"]


class TensorRTUnavailable(BackendError):
    """tensorrt / cuda-python is not installed, or no CUDA GPU is visible."""


class EngineMismatchError(BackendError):
    """The package's engines were built for another TensorRT, GPU or package contents."""


# ------------------------------------------------------------------------------------ engine record
@dataclass
class EngineFile:
    file: str  # relative to the package
    onnx_file: str
    onnx_size_bytes: int  # the graph's size in the manifest at build time (detects re-export / re-quantize)
    size_bytes: int
    precision: str  # "float16", "float32", "int4+float16"
    profiles: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EngineRecord:
    """What the engines were built with and for. Written last by the builder (engines/engines.json)."""

    format_version: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    target: str
    limits: dict[str, Any]  # max_batch, max_context, max_images, max_prompt, workspace_gb
    attention: str  # "standard" | "plugin" | "trt-attention"
    plugins: list[str]
    strongly_typed: bool
    kv_cache: str  # "ping-pong" (portable graph) | "in-place"
    engines: dict[str, EngineFile]
    memory: dict[str, Any] = field(default_factory=dict)
    built_at: str = ""
    llava_edge_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EngineRecord":
        if d.get("format_version") != RECORD_FORMAT:
            raise EngineMismatchError(f"engine record format {d.get('format_version')!r} is not {RECORD_FORMAT}; "
                                      "rebuild the engines with this llava-edge (llava-edge build)")
        d = dict(d)
        d["engines"] = {k: EngineFile(**v) for k, v in d["engines"].items()}
        try:
            return EngineRecord(**d)
        except TypeError as e:
            raise EngineMismatchError(f"engine record is malformed: {e}") from e

    @staticmethod
    def load(package_dir: str | os.PathLike) -> "EngineRecord":
        path = Path(package_dir) / ENGINES_DIR / RECORD_NAME
        if not path.is_file():
            raise EngineMismatchError(f"{package_dir} has no TensorRT engines ({ENGINES_DIR}/{RECORD_NAME} missing): "
                                      f"run `llava-edge build {package_dir}` on the target device first")
        try:
            return EngineRecord.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError) as e:
            raise EngineMismatchError(f"{path} is not a valid engine record: {e}") from e


def _version_tuple(v: str) -> tuple[int, ...]:
    from ..kernels.trt_plugins import parse_trt_version

    return parse_trt_version(v)


def check_engine_record(record: EngineRecord, manifest: Manifest, tensorrt_version: str, gpu_name: str,
                        compute_capability: str, package_dir: str | os.PathLike | None = None,
                        allow_gpu_mismatch: bool = False) -> list[str]:
    """Refuse engines that cannot (or should not) run here; return warnings for the tolerable cases.

    * TensorRT version: a plan is only valid for the exact TensorRT release that built it (we build
      without the version-compatible flag, which costs performance and excludes plugins' fast paths).
    * Compute capability: the plan holds kernels for one SM architecture.
    * GPU name: same architecture but another model (e.g. built on AGX Orin, run on Orin Nano) loads,
      but tactics were timed on different hardware. Refused unless ``allow_gpu_mismatch`` (or the
      environment variable LLAVA_EDGE_TRT_ALLOW_GPU_MISMATCH=1): building a 7B on an 8 GB Nano may not
      fit, and building on a bigger Orin with the same JetPack is the documented way round.
    * Package contents: each graph must still have the size it had when its engine was built.
    """
    rebuild = "rebuild them here with `llava-edge build PKG`"
    if _version_tuple(record.tensorrt_version) != _version_tuple(tensorrt_version):
        raise EngineMismatchError(
            f"engines were built with TensorRT {record.tensorrt_version} but this is TensorRT {tensorrt_version}; "
            f"TensorRT plans only load in the release that built them: {rebuild}")
    if record.compute_capability != compute_capability:
        raise EngineMismatchError(
            f"engines were built for compute capability {record.compute_capability} ({record.gpu_name}) but this GPU "
            f"is {gpu_name} (compute capability {compute_capability}): {rebuild}")
    warnings: list[str] = []
    if record.gpu_name != gpu_name:
        msg = (f"engines were built on {record.gpu_name} but this GPU is {gpu_name} (same compute capability "
               f"{compute_capability})")
        if not allow_gpu_mismatch:
            raise EngineMismatchError(f"{msg}; {rebuild}, or set {ALLOW_GPU_MISMATCH_ENV}=1 to run them anyway "
                                      "(tactics were timed on the other GPU)")
        warnings.append(msg)
    for name in ENGINE_GRAPHS:
        if name not in record.engines:
            raise EngineMismatchError(f"engine record has no '{name}' engine; {rebuild}")
        ef = record.engines[name]
        graph = manifest.graphs.get(name)
        if graph is None or graph.file != ef.onnx_file or graph.size_bytes != ef.onnx_size_bytes:
            raise EngineMismatchError(
                f"the '{name}' engine was built from {ef.onnx_file} ({ef.onnx_size_bytes} bytes) but the package now "
                f"has {graph.file if graph else 'no such graph'} ({graph.size_bytes if graph else 0} bytes): the package "
                f"was re-exported or re-quantized after the build; {rebuild}")
        if package_dir is not None:
            path = Path(package_dir) / ef.file
            if not path.is_file() or path.stat().st_size != ef.size_bytes:
                raise EngineMismatchError(f"engine file {path} is missing or truncated; {rebuild}")
    return warnings


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


def _ck(result: Any) -> Any:
    """cuda-python returns (err, *values); raise on error, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


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


# ------------------------------------------------------------------------------------ device memory
class _DeviceBuffer:
    def __init__(self, cudart, nbytes: int):
        self.cudart, self.nbytes = cudart, max(int(nbytes), 1)
        self.ptr = int(_ck(cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


class _PinnedBuffer:
    """Page-locked host memory (async copies need it) with a numpy view."""

    def __init__(self, cudart, nbytes: int):
        self.cudart, self.nbytes = cudart, max(int(nbytes), 1)
        self.ptr = int(_ck(cudart.cudaMallocHost(self.nbytes)))
        self._bytes = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n > self.nbytes:
            raise BackendError(f"internal: pinned buffer of {self.nbytes} bytes too small for {shape} {dtype}")
        return self._bytes[:n].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._bytes = None
            self.cudart.cudaFreeHost(self.ptr)
            self.ptr = 0


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


@dataclass
class TrtKVCache:
    """Handle on the backend's device KV slabs: which slab holds ``past`` and how much is filled."""

    batch: int
    max_len: int
    epoch: int
    length: int = 0
    current: int = 0  # slab index holding past


class TrtBackend:
    """TensorRT engines of a package, driven through the :class:`~llava_edge.runtime.backend.Backend`
    protocol. ``TrtBackend(package_dir, manifest, device_index=0)``."""

    name = "tensorrt"

    def __init__(self, package_dir: str | os.PathLike, manifest: Manifest, device_index: int = 0, *,
                 allow_gpu_mismatch: bool | None = None):
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
        self.float_dtype = np.dtype(manifest.dtype)
        self._logger = trt.Logger(trt.Logger.WARNING)
        # AOT plugin engines carry their kernels' PTX: nothing to register at run time (trt_plugins.py).
        self._runtime = trt.Runtime(self._logger)
        self._buffers: list[Any] = []
        self.stream = int(_ck(cudart.cudaStreamCreate()))
        self.engines = {n: _Engine(trt, self._runtime, root / self.record.engines[n].file, n) for n in ENGINE_GRAPHS}
        t = manifest.text
        self._layers, self._kvh, self._hd, self._vocab = t.num_layers, t.num_kv_heads, t.head_dim, t.vocab_size
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")]

        # every buffer, once: device I/O of vision/embed/decoder (but the KV), pinned host staging
        self.dev: dict[tuple[str, str], _DeviceBuffer] = {}
        self.host: dict[tuple[str, str], _PinnedBuffer] = {}
        for g, eng in self.engines.items():
            for n in eng.names:
                if g == "decoder" and (n in self.past_names or n in self.present_names):
                    continue
                self.dev[g, n] = self._alloc(_DeviceBuffer, eng.max_bytes[n])
                if g == "decoder" and n == "logits":
                    continue  # only [B, V] comes back: sized below
                self.host[g, n] = self._alloc(_PinnedBuffer, eng.max_bytes[n])
        dec = self.engines["decoder"]
        self.max_batch = dec.profile_max("inputs_embeds", DECODE_PROFILE)[0]
        self.max_context = dec.profile_max("attention_mask", DECODE_PROFILE)[1]
        self.max_prompt = dec.profile_max("inputs_embeds", PREFILL_PROFILE)[1]
        self._kv_dtype = dec.dtype[self.present_names[0]]
        self._slot = self.max_batch * self._kvh * self.max_context * self._hd * self._kv_dtype.itemsize
        self.slabs = [self._alloc(_DeviceBuffer, self._slot * len(self.past_names)) for _ in range(2)]
        self._logits_dtype = dec.dtype["logits"]
        self.host["decoder", "logits"] = self._alloc(_PinnedBuffer, self.max_batch * self._vocab * self._logits_dtype.itemsize)
        self._epoch = 0
        self.cuda_graphs = False  # see the module docstring: not possible with the portable graph

    # -- memory --------------------------------------------------------------------------------------
    def _alloc(self, kind, nbytes: int):
        buf = kind(self.cudart, nbytes)
        self._buffers.append(buf)
        return buf

    def close(self) -> None:
        """Free device and pinned memory now (Jetson: it is the system's RAM)."""
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
        """No allocation: the slabs exist since construction. Invalidates earlier caches (one device
        cache per backend; the pipeline uses one at a time)."""
        if batch > self.max_batch:
            raise BackendError(f"batch {batch} > the engines' max batch {self.max_batch}; rebuild with --max-batch")
        if max_len > self.max_context:
            raise BackendError(f"{max_len} tokens > the engines' max context {self.max_context}; "
                               "rebuild with a larger --max-context or shorten the prompt/max_new_tokens")
        self._epoch += 1
        return TrtKVCache(batch=batch, max_len=max_len, epoch=self._epoch)

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
        self._h2d("decoder", "attention_mask", mask)
        self._h2d("decoder", "position_ids", positions)
        past_slab, present_slab = self.slabs[cache.current].ptr, self.slabs[1 - cache.current].ptr
        past_shape = (b, self._kvh, cache.length, self._hd)
        for j, (pn, on) in enumerate(zip(self.past_names, self.present_names)):
            ctx.set_input_shape(pn, past_shape)
            ctx.set_tensor_address(pn, past_slab + j * self._slot)
            ctx.set_tensor_address(on, present_slab + j * self._slot)
        ctx.set_tensor_address("logits", self.dev["decoder", "logits"].ptr)
        self._execute("decoder")
        # last position of each row: rows are T*V apart on the device, V apart on the host
        itemsize = self._logits_dtype.itemsize
        row = self._vocab * itemsize
        host = self.host["decoder", "logits"].view(self._logits_dtype, (b, self._vocab))
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ck(self.cudart.cudaMemcpy2DAsync(host.ctypes.data, row, self.dev["decoder", "logits"].ptr + (t - 1) * row,
                                          t * row, row, b, kind, self.stream))
        _ck(self.cudart.cudaStreamSynchronize(self.stream))
        cache.current = 1 - cache.current
        cache.length += t
        return host.astype(np.float32)  # a copy: the pinned buffer is reused
