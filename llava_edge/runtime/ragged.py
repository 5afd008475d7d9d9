"""The ragged-row convention the in-place backends share: the pipeline hands prompts left-padded (one
mask column per position, zeros on the left); GroupQueryAttention (``fast_backend``) and our attention
plugin (``trt_plugin_kv``) want each row's tokens from cache slot 0 with a per-row length."""

from __future__ import annotations

import numpy as np

__all__ = ["right_align"]


def right_align(embeds: np.ndarray, new_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real new tokens (mask 1, in order) moved to the front: ``(packed [B,T,E], n [B])``.
    Left padding becomes right padding; with no padding ``embeds`` is returned as it is (no copy)."""
    real = new_mask.astype(bool)
    n = real.sum(axis=1).astype(np.int32)
    if real.all():
        return embeds, n
    packed = np.zeros_like(embeds)
    for r in range(embeds.shape[0]):
        packed[r, : n[r]] = embeds[r, real[r]]
    return packed, n
