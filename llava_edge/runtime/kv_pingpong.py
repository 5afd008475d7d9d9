"""The ping-pong KV layout (portable decoder graph: past [B,kvH,P,D] in, present [B,kvH,P+T,D] out).

Two device slabs hold all layers' k/v at max batch x max context; each step reads ``past`` from one and
TensorRT writes ``present`` into the other, then they swap. A [B,kvH,n,D] tensor is contiguous, so the
present written at n+t is the next past: no copy, but twice the memory and a new shape every step (no
CUDA graphs). Prefill runs only on an empty cache; later multi-token steps go one token at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..contract import KV_PINGPONG
from .backend import BackendError
from .trt_kv import Alloc, KVDims, RunStep, TrtKVCache
from .trt_memory import DeviceBuffer

__all__ = ["PingPongKV"]


class PingPongKV:
    """Two slabs, swapped every step (see the module docstring)."""

    layout = KV_PINGPONG

    def __init__(self, dims: KVDims, past_names: list[str], present_names: list[str], alloc: Alloc,
                 max_prompt: int):
        self.dims, self.past_names, self.present_names = dims, past_names, present_names
        self.max_prompt = max_prompt
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

    def step(self, run: RunStep, cache: TrtKVCache, embeds: np.ndarray, mask: np.ndarray,
             positions: np.ndarray) -> np.ndarray:
        """Prefill (T > 1) only on an empty cache (the prefill profile has past = 0); any other T > 1
        goes one token at a time through the decode profile."""
        t = embeds.shape[1]
        if t > 1 and cache.length > 0:
            logits = None
            for j in range(t):
                logits = run(cache, embeds[:, j : j + 1], mask[:, : cache.length + 1], positions[:, j : j + 1])
            return logits
        if t > self.max_prompt:
            raise BackendError(f"prompt of {t} tokens > the engines' max prompt {self.max_prompt}; rebuild with "
                               "larger --max-images/--max-context")
        return run(cache, embeds, mask, positions)
