"""The backend protocol: what the generation loop needs from an inference engine, and nothing more.

A backend owns its sessions/engines and its KV cache representation; the loop only sees numpy
embeddings in and logits out. onnxruntime (CPU/CUDA) lives in ort_backend.py; TensorRT plugs in here
too without the loop changing.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    name: str
    float_dtype: np.dtype  # dtype of embeddings / image features the graphs take

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N,3,S,S] float32 -> image features [N, tokens_per_image, hidden]."""

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """[B,T] int64 -> [B,T,hidden]."""

    def new_cache(self, batch: int, max_len: int) -> Any:
        """An empty KV cache for `batch` sequences of up to max_len tokens."""

    def step(self, cache: Any, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Run the decoder on T new positions, append their k/v to the cache, return logits of the
        last position [B, V] (float32)."""
