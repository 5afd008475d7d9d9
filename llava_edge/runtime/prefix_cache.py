"""Reuse of prompt KV across requests: the kiosk asks several questions about one camera frame, the
robot sends the same instructions every turn, a chat re-sends its whole history each turn.

An entry is the KV state of one prefilled prompt, keyed by its token ids and the digests of its
images (image tokens are all the same id, so ids alone cannot tell two pictures apart). A new prompt
reuses the longest common token prefix of an entry with the same images; only the rest is prefilled,
and the vision encoder is skipped when every image token is covered.

A pruned prompt's image digests carry the pruning tag (``PruneSetting.tagged``: the setting, and for a
question-aware method the instruction), so an entry's KV was computed with the same kept tokens at the
same positions (runtime/prune.prompt_positions: a function of the ids, the images' counts and the
selection, which the tag fixes) as any prompt that shares its key and token prefix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


def image_digest(image: Image.Image) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class PrefixEntry:
    images: tuple[str, ...]
    ids: np.ndarray
    state: Any  # the backend's snapshot of the cache after prefilling `ids`


class PrefixCache:
    """A small LRU of prefilled prompts (each entry holds a prompt's whole KV: keep capacity low)."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self.entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, images: tuple[str, ...], ids: np.ndarray) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest token prefix with `ids` (same images), and that length.
        The length is capped at len(ids) - 1: the last prompt token must run to produce logits."""
        best, best_n = None, 0
        for key, entry in self.entries.items():
            if entry.images != images:
                continue
            m = min(len(entry.ids), len(ids))
            diff = np.flatnonzero(entry.ids[:m] != ids[:m])
            n = int(diff[0]) if diff.size else m
            if n > best_n:
                best, best_n = entry, n
        best_n = min(best_n, len(ids) - 1)
        if best is None or best_n <= 0:
            return None, 0
        self.entries.move_to_end(self._key(best.images, best.ids))
        self.hits += 1
        self.reused_tokens += best_n
        return best, best_n

    def store(self, images: tuple[str, ...], ids: np.ndarray, state: Any) -> None:
        if self.capacity <= 0:
            return
        key = self._key(images, ids)
        self.entries[key] = PrefixEntry(images, ids.copy(), state)
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    @staticmethod
    def _key(images: tuple[str, ...], ids: np.ndarray) -> tuple:
        return (images, ids.tobytes())
