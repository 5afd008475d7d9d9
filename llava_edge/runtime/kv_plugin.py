"""The plugin KV layout: engines built from the plugin-attention decoder graph (``trt/plugin_decoder.py``;
record ``attention == "plugin"``). One buffer per layer k/v is bound as both the past input and its aliased
present output (the plugin writes new k/v itself: no scatter); inputs are ``prompt_lens``/``start_pos``
instead of mask/positions, so :class:`RaggedRows` moves left-padded prompts to slot 0 at prefill and the
logits of each row's last real token are read back. The cache is not zeroed (the kernels never read past
a row's length; the fake CUDA's NaN memory would show it). A decode step is a 1-token prompt with fixed
shapes and buffers, so it is captured in a CUDA graph per batch size. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..contract import DECODE_PROFILE, KV_PLUGIN, PREFILL_PROFILE
from .backend import BackendError
from .ragged import right_align
from .trt_kv import Alloc, KVDims, TrtKVCache
from .trt_memory import DeviceBuffer, PinnedBuffer, ck, memcpy_kind

__all__ = ["PluginKV", "PluginChunk", "RaggedRows", "PluginDecoderSteps"]


class PluginKV:
    """One buffer per layer k/v, bound as the past input and as its aliased present output."""

    layout = KV_PLUGIN

    def __init__(self, dims: KVDims, past_names: list[str], present_names: list[str], alloc: Alloc):
        self.dims, self.past_names, self.present_names = dims, past_names, present_names
        self.buffers = [alloc(DeviceBuffer, dims.layer_bytes) for _ in past_names]

    @property
    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def bind(self, ctx: Any, cache: TrtKVCache, b: int) -> None:
        """The first ``b`` rows of each buffer (batch is the outer dim, so they are contiguous)."""
        d = self.dims
        shape = (b, d.kv_heads, d.max_context, d.head_dim)
        for pn, on, buf in zip(self.past_names, self.present_names, self.buffers):
            ctx.set_input_shape(pn, shape)
            ctx.set_tensor_address(pn, buf.ptr)
            ctx.set_tensor_address(on, buf.ptr)  # aliased output: the plugin updated the input in place

    def commit(self, cache: TrtKVCache, b: int, t: int) -> None:
        """Nothing to copy: the plugin wrote the new k/v into the bound buffers."""


@dataclass(frozen=True)
class PluginChunk:
    """One engine pass over right-padded rows."""

    embeds: np.ndarray  # [B, T, E]
    prompt_lens: np.ndarray  # int32 [B]: real tokens of each row in this pass (0: the row sits it out)
    start_pos: np.ndarray  # int32 [B]: cache slot of each row's first token in this pass
    last: np.ndarray  # int64 [B]: index in this pass of the row's last real token of the step, -1 if elsewhere


class RaggedRows:
    """Host-side conversion of the pipeline's step (mask columns) into right-padded rows with lengths."""

    pack = staticmethod(right_align)  # runtime/ragged.py, shared with the onnxruntime fast backend

    @staticmethod
    def chunks(packed: np.ndarray, n: np.ndarray, lengths: np.ndarray, chunk: int) -> Iterator[PluginChunk]:
        """Passes of at most ``chunk`` columns over ``packed[:, :max(n)]``. Row r's token j goes to slot
        ``lengths[r] + j``; a row with no token left in a pass gets prompt_lens 0 (the kernel skips it)."""
        width = int(n.max()) if n.size else 0
        for s in range(0, width, chunk):
            e = min(width, s + chunk)
            lens = np.clip(n - s, 0, e - s).astype(np.int32)
            last = np.where((n - 1 >= s) & (n - 1 < e), n - 1 - s, -1).astype(np.int64)
            yield PluginChunk(np.ascontiguousarray(packed[:, s:e]), lens, (lengths + s).astype(np.int32), last)


class PluginDecoderSteps:
    """``step`` of the TensorRT backend for a plugin-attention decoder engine.

    Holds what it needs from the backend (the decoder engine, its staging copy, the cache, the graph
    runner, the logits buffers) rather than the backend itself; allocates nothing per step."""

    def __init__(self, engine: Any, h2d: Callable[[str, np.ndarray], Any], kv: PluginKV, graphs: Any, cudart: Any,
                 stream: int, logits_dev: DeviceBuffer, logits_host: PinnedBuffer, logits_dtype: np.dtype,
                 vocab: int, chunk: int):
        self.engine, self.h2d, self.kv, self.graphs = engine, h2d, kv, graphs
        self.cudart, self.stream = cudart, stream
        self.logits_dev, self.logits_host, self.logits_dtype = logits_dev, logits_host, logits_dtype
        self.vocab, self.chunk = vocab, chunk
        self._d2h = memcpy_kind(cudart, "DeviceToHost")

    def step(self, cache: TrtKVCache, embeds: np.ndarray, mask: np.ndarray,
             position_ids: np.ndarray | None) -> np.ndarray:
        """``mask`` is the pipeline's [B, length + T]; its last T columns say which new tokens are real.
        Returns float32 [B, V]: each row's logits at its last real token (rows with no new real token
        keep the logits of their previous step)."""
        b, t = embeds.shape[:2]
        packed, n = RaggedRows.pack(embeds, mask[:, cache.length :])
        if position_ids is not None:
            first = np.argmax(mask[:, cache.length :].astype(bool), axis=1)
            got = position_ids[np.arange(b), first]
            if not np.array_equal(got[n > 0], cache.lengths[n > 0]):
                raise BackendError("position_ids do not continue the cached rows (the plugin cache stores each row "
                                   f"from slot 0: expected {cache.lengths.tolist()}, got {got.tolist()})")
        if int((cache.lengths + n).max()) > cache.max_len:
            raise BackendError(f"KV cache full: {int((cache.lengths + n).max())} > {cache.max_len}")
        for c in RaggedRows.chunks(packed, n, cache.lengths, self.chunk if t > 1 else 1):
            self._pass(cache, c, b)
        cache.lengths = (cache.lengths + n).astype(np.int32)
        cache.length += t
        return cache.logits[:b].copy()

    def _pass(self, cache: TrtKVCache, c: PluginChunk, b: int) -> None:
        ctx = self.engine.context
        t = c.embeds.shape[1]
        self.engine.use_profile(PREFILL_PROFILE if t > 1 else DECODE_PROFILE, self.stream)
        self.h2d("inputs_embeds", c.embeds)
        self.h2d("prompt_lens", c.prompt_lens)
        self.h2d("start_pos", c.start_pos)
        self.kv.bind(ctx, cache, b)
        ctx.set_tensor_address("logits", self.logits_dev.ptr)
        if t == 1:
            self.graphs.run(key=b)  # fixed shapes and addresses per batch size (module docstring)
        else:
            self.graphs.execute()
        rows = np.flatnonzero(c.last >= 0)
        if not rows.size:
            return
        # each row's last real token: row r's logits sit at (r*T + last[r]) * V on the device
        size = self.vocab * self.logits_dtype.itemsize
        host = self.logits_host.view(self.logits_dtype, (b, self.vocab))
        for r in rows:
            ck(self.cudart.cudaMemcpyAsync(host.ctypes.data + int(r) * size,
                                           self.logits_dev.ptr + (int(r) * t + int(c.last[r])) * size, size,
                                           self._d2h, self.stream))
        ck(self.cudart.cudaStreamSynchronize(self.stream))
        cache.logits[rows] = host[rows]
