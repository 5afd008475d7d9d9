"""The TensorRT backend's device KV cache, in the two layouts a decoder engine can have.

* :class:`PingPongKV` — for the portable decoder graph (past [B,kvH,P,D] in, present = concat(past,
  new) [B,kvH,P+T,D] out). Two device slabs hold all layers' k/v at max batch x max context; each step
  reads ``past`` from one and TensorRT writes ``present`` into the other, then they swap. A tensor of
  shape [B,kvH,n,D] is contiguous, so the present written at length n+t is exactly next step's past:
  no copy, no reallocation, but twice the cache memory, and a new shape every step.
* :class:`InPlaceKV` — for the static-cache decoder graph (``export/static_decoder.py``): past is the
  whole cache buffer [B,kvH,max_ctx,D] of each layer (one buffer, allocated once, zeroed once), the
  engine returns only this step's k/v ``new.{i}.*`` [B,kvH,T,D] into small staging buffers, and one
  ``cudaMemcpy2DAsync`` per layer k/v puts them at the rows' current length: B*kvH rows of T*D
  elements, destination pitch max_ctx*D. A few KB per layer per decoded token; the cache itself is
  never copied or reallocated, and the engine's shapes and addresses are the same every decode step
  (what CUDA graph capture needs).

(A third mode, for plugin-attention engines, is ``trt_plugin_kv.PluginKV``.) Both keep every row of a
batch at the same length (the pipeline left-pads prompts and masks the
padding), so one offset serves the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .trt_memory import DeviceBuffer, ck, memcpy_kind

__all__ = ["TrtKVCache", "PingPongKV", "InPlaceKV", "KV_PINGPONG", "KV_INPLACE"]

KV_PINGPONG, KV_INPLACE = "ping-pong", "in-place"  # EngineRecord.kv_cache values

Alloc = Callable[..., Any]  # the backend's allocator: alloc(kind, nbytes, **kw) -> buffer it will free


@dataclass
class TrtKVCache:
    """Handle on the backend's device cache: which request owns it and how much is filled."""

    batch: int
    max_len: int
    epoch: int
    length: int = 0
    current: int = 0  # ping-pong: slab index holding past
    # plugin engines (trt_plugin_kv): real tokens of each row (rows start at slot 0, ragged), and the
    # float32 [B, V] logits of each row's last real token so far
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


@dataclass(frozen=True)
class KVDims:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    max_batch: int
    max_context: int

    @property
    def layer_bytes(self) -> int:
        """One layer's k (or v) at max batch x max context."""
        return self.max_batch * self.kv_heads * self.max_context * self.head_dim * self.dtype.itemsize


class PingPongKV:
    """Two slabs, swapped every step (see the module docstring)."""

    layout = KV_PINGPONG

    def __init__(self, dims: KVDims, past_names: list[str], present_names: list[str], alloc: Alloc):
        self.dims, self.past_names, self.present_names = dims, past_names, present_names
        self.slabs = [alloc(DeviceBuffer, dims.layer_bytes * len(past_names)) for _ in range(2)]

    @property
    def device_bytes(self) -> int:
        return sum(s.nbytes for s in self.slabs)

    def decoder_mask(self, mask: np.ndarray, length: int, t: int) -> np.ndarray:
        return mask

    def bind(self, ctx: Any, cache: TrtKVCache, b: int) -> None:
        d = self.dims
        past, present = self.slabs[cache.current].ptr, self.slabs[1 - cache.current].ptr
        shape = (b, d.kv_heads, cache.length, d.head_dim)
        for j, (pn, on) in enumerate(zip(self.past_names, self.present_names)):
            ctx.set_input_shape(pn, shape)
            ctx.set_tensor_address(pn, past + j * d.layer_bytes)
            ctx.set_tensor_address(on, present + j * d.layer_bytes)

    def commit(self, cache: TrtKVCache, b: int, t: int) -> None:
        cache.current = 1 - cache.current


class InPlaceKV:
    """One buffer per layer k/v, bound whole as ``past``; new k/v scattered in after each step."""

    layout = KV_INPLACE

    def __init__(self, dims: KVDims, past_names: list[str], new_names: list[str], new_buffers: list[DeviceBuffer],
                 cudart: Any, stream: int, alloc: Alloc):
        self.dims, self.past_names, self.new_names = dims, past_names, new_names
        self.new_buffers, self.cudart, self.stream = new_buffers, cudart, stream
        self.buffers = [alloc(DeviceBuffer, dims.layer_bytes, zero=True) for _ in past_names]
        self._d2d = memcpy_kind(cudart, "DeviceToDevice")

    @property
    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def decoder_mask(self, mask: np.ndarray, length: int, t: int) -> np.ndarray:
        """[B, length+t] (the pipeline's mask) -> [B, max_ctx+t]: the filled cache columns, zeros for the
        unfilled slots, then the new tokens' columns (the graph puts new k/v after the whole buffer)."""
        b, c = mask.shape[0], self.dims.max_context
        full = np.zeros((b, c + t), np.int64)
        full[:, :length] = mask[:, :length]
        full[:, c:] = mask[:, length : length + t]
        return full

    def bind(self, ctx: Any, cache: TrtKVCache, b: int) -> None:
        d = self.dims
        shape = (b, d.kv_heads, d.max_context, d.head_dim)
        for pn, nn, buf, new in zip(self.past_names, self.new_names, self.buffers, self.new_buffers):
            ctx.set_input_shape(pn, shape)
            ctx.set_tensor_address(pn, buf.ptr)
            ctx.set_tensor_address(nn, new.ptr)

    def commit(self, cache: TrtKVCache, b: int, t: int) -> None:
        """new [b,kvH,t,D] -> cache[:, :, length:length+t]: one strided copy per layer k/v, on the stream
        (ordered after the engine, outside any captured graph: the destination moves every step)."""
        d = self.dims
        row = d.head_dim * d.dtype.itemsize
        for buf, new in zip(self.buffers, self.new_buffers):
            ck(self.cudart.cudaMemcpy2DAsync(buf.ptr + cache.length * row, d.max_context * row, new.ptr, t * row,
                                             t * row, b * d.kv_heads, self._d2d, self.stream))
