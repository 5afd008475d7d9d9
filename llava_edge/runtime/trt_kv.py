"""What the TensorRT backend's KV layouts share: the cache handle and the cache's dimensions.

One file per layout owns its buffers, bindings, commit and step: ``kv_inplace.py``, ``kv_pingpong.py``,
``kv_plugin.py``; the layout names are in ``llava_edge/contract.py``. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Alloc", "KVDims", "RunStep", "TrtKVCache"]

Alloc = Callable[..., Any]  # the backend's allocator: alloc(kind, nbytes, **kw) -> buffer it will free
# one engine run: run(cache, embeds [B,T,E], mask [B,length+T], positions [B,T]) -> logits [B, V]
RunStep = Callable[[Any, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class TrtKVCache:
    """Handle on the backend's device cache: which request owns it and how much is filled."""

    batch: int
    max_len: int
    epoch: int
    length: int = 0
    current: int = 0  # ping-pong: slab index holding past
    # plugin engines (kv_plugin): real tokens of each row (rows start at slot 0, ragged), and the
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
