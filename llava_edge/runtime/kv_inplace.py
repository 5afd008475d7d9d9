"""The in-place KV layout (static-cache decoder graph, ``trt/static_decoder.py``).

Past is the whole cache buffer [B,kvH,max_ctx,D] of each layer (allocated once, zeroed once); the engine
returns only this step's k/v ``new.{i}.*`` [B,kvH,T,D], and one ``cudaMemcpy2DAsync`` per layer k/v puts
them at the rows' current length. The cache is never copied or reallocated and a decode step has the same
shapes and addresses every time (what CUDA graph capture needs). Every row of a batch has the same length
(the pipeline left-pads), so one offset serves the batch; any T runs, in chunks of the prefill profile.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..contract import KV_INPLACE
from .trt_kv import Alloc, KVDims, RunStep, TrtKVCache
from .trt_memory import DeviceBuffer, ck, memcpy_kind

__all__ = ["InPlaceKV"]


class InPlaceKV:
    """One buffer per layer k/v, bound whole as ``past``; new k/v scattered in after each step."""

    layout = KV_INPLACE

    def __init__(self, dims: KVDims, past_names: list[str], new_names: list[str], new_buffers: list[DeviceBuffer],
                 cudart: Any, stream: int, alloc: Alloc, max_prompt: int):
        self.dims, self.past_names, self.new_names = dims, past_names, new_names
        self.max_prompt = max_prompt
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

    def step(self, run: RunStep, cache: TrtKVCache, embeds: np.ndarray, mask: np.ndarray,
             positions: np.ndarray) -> np.ndarray:
        """Any T on any cache length: chunks of at most the prefill profile's T."""
        t = embeds.shape[1]
        chunk = self.max_prompt if t > 1 else 1
        logits = None
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            logits = run(cache, embeds[:, s:e], mask[:, : cache.length + e - s], positions[:, s:e])
        return logits
