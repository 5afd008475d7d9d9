"""Device and pinned host buffers for the TensorRT backend, over cuda-python's runtime API.

Separate from ``trt_backend`` so that the KV-cache and CUDA-graph helpers can use them without
importing the backend. No import of cuda-python here: every buffer is given the ``cudart`` module the
backend imported (lazily, so that this package loads without it).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .backend import BackendError

__all__ = ["ck", "DeviceBuffer", "PinnedBuffer", "memcpy_kind"]


def ck(result: Any) -> Any:
    """cuda-python returns (err, *values); raise on error, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def memcpy_kind(cudart, name: str) -> Any:
    """``cudaMemcpyKind.cudaMemcpy<name>`` ("HostToDevice", "DeviceToHost", "DeviceToDevice")."""
    return getattr(cudart.cudaMemcpyKind, f"cudaMemcpy{name}")


class DeviceBuffer:
    """``cudaMalloc``'d memory; ``zero=True`` clears it once (``cudaMemset``), for buffers that are read
    before every byte was written (the static KV cache: masked slots still go through the matmuls, and
    uninitialised memory may hold NaN/Inf bit patterns that a zero attention weight does not cancel)."""

    def __init__(self, cudart, nbytes: int, zero: bool = False):
        self.cudart, self.nbytes = cudart, max(int(nbytes), 1)
        self.ptr = int(ck(cudart.cudaMalloc(self.nbytes)))
        if zero:
            ck(cudart.cudaMemset(self.ptr, 0, self.nbytes))

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory (async copies need it) with a numpy view."""

    def __init__(self, cudart, nbytes: int):
        self.cudart, self.nbytes = cudart, max(int(nbytes), 1)
        self.ptr = int(ck(cudart.cudaMallocHost(self.nbytes)))
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
