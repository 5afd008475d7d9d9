"""Finding TensorRT, cuda-python and the GPU: what the builder and the TensorRT backend both need.

Both are optional extras imported lazily here, so every other module loads without them and a missing
one is a one-line :class:`TensorRTUnavailable` instead of an ImportError traceback. Callers use the
module attributes (``trt_env.import_tensorrt()``), so one fake serves the builder and the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BackendError

__all__ = ["TensorRTUnavailable", "GpuInfo", "import_tensorrt", "import_cudart", "gpu_info"]


class TensorRTUnavailable(BackendError):
    """tensorrt / cuda-python is not installed, or no CUDA GPU is visible."""


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
                                  f"{'error ' + str(err) if int(err) else '0 devices'}); the TensorRT backend "
                                  "needs one")
    if not 0 <= device_index < count:
        raise TensorRTUnavailable(f"GPU index {device_index} out of range: {count} device(s) visible")
    err, props = cudart.cudaGetDeviceProperties(device_index)
    if int(err) != 0:
        raise TensorRTUnavailable(f"cudaGetDeviceProperties({device_index}) failed: CUDA error {err}")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\x00 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem))
