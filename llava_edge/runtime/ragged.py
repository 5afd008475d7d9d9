"""The ragged-row convention the in-place backends share: the pipeline hands prompts left-padded (one
mask column per position, zeros on the left); GroupQueryAttention (``fast_backend``) and our attention
plugin (``kv_plugin``) want each row's tokens from cache slot 0 with a per-row length."""

from __future__ import annotations

import numpy as np

__all__ = ["left_pad", "right_align"]


def left_pad(encoded: list[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of different lengths as one left-padded batch: ``(ids [B,T] int64, mask [B,T] int64)``."""
    longest = max(len(e) for e in encoded)
    ids = np.full((len(encoded), longest), pad, dtype=np.int64)
    mask = np.zeros((len(encoded), longest), dtype=np.int64)
    for i, e in enumerate(encoded):
        ids[i, longest - len(e) :] = e
        mask[i, longest - len(e) :] = 1
    return ids, mask


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
