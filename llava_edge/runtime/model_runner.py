"""The engine's view of a backend: KV slots, prompt chunks into one slot, one decode call for many.

Two runners behind one small interface:
- ``SlotRunner`` (fast onnxruntime backend): one long-lived slot-addressed cache; a prompt chunk goes
  into its own row, and one decode call advances every running row (continuous batching).
- ``SingleRunner`` (portable onnxruntime, TensorRT, anything with the plain Backend protocol): these
  cannot address rows of a cache, so the engine runs one sequence at a time (one slot), with the
  backend's own cache per request and the whole prompt in one ``step`` (TensorRT chunks internally).
  ``Pipeline.generate_batch`` still runs them as one static left-padded batch (``Pipeline.run``).
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import numpy as np

from .backend import BackendError, SlotBackend, supports_prefix_reuse
from .scheduler import PREFILL_CHUNK


class ModelRunner(Protocol):
    slots: int
    max_len: int  # positions a sequence may use (prompt + generated)
    chunk: int | None  # prefill chunk size the runner wants (None: the whole prompt in one call)
    supports_prefix: bool

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...
    def embed(self, input_ids: np.ndarray) -> np.ndarray: ...
    def begin(self, slot: int, capacity: int, state: Any = None, prefix_len: int = 0) -> None: ...
    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray: ...
    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray: ...
    def snapshot(self, slot: int) -> Any: ...
    def release(self, slot: int) -> None: ...


class SlotRunner:
    """Continuous batching over FastOrtBackend's slot-addressed cache."""

    supports_prefix = True

    def __init__(self, backend: Any, slots: int, chunk: int | None = PREFILL_CHUNK, max_len: int | None = None):
        self.backend = backend
        self.slots = slots
        self.chunk = chunk
        self.kv = backend.new_slot_cache(slots, max_len)
        self.max_len = self.kv.max_len
        self.pad_id = 0

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.backend.encode_images(pixel_values)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.backend.embed(input_ids)

    def begin(self, slot: int, capacity: int, state: Any = None, prefix_len: int = 0) -> None:
        if capacity > self.kv.max_len:
            raise BackendError(f"a sequence of {capacity} positions does not fit the slot ({self.kv.max_len})")
        if state is None:
            self.kv.lengths[slot] = 0
        else:
            self.backend.resume_slot(self.kv, slot, state, prefix_len)

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray:
        return self.backend.prefill_slot(self.kv, slot, embeds[None])

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        n = max(slots) + 1  # rows [0, n): lowest-slot-first admission keeps this close to len(slots)
        ids = np.full((n, 1), self.pad_id, np.int64)
        active = np.zeros(n, bool)
        ids[slots, 0] = tokens
        active[slots] = True
        logits = self.backend.decode_slots(self.kv, self.backend.embed(ids), active)
        return logits[slots]

    def snapshot(self, slot: int) -> Any:
        return self.backend.snapshot_slot(self.kv, slot)

    def release(self, slot: int) -> None:
        self.kv.lengths[slot] = 0


class SingleRunner:
    """Any Backend-protocol backend, one sequence at a time, with the backend's own per-request cache."""

    chunk = None

    def __init__(self, backend: Any, slots: int = 1):
        self.backend = backend
        self.slots = 1
        self.max_len = sys.maxsize  # each request gets a cache of its own size (the engine caps at the context)
        self.supports_prefix = supports_prefix_reuse(backend)
        self.cache: Any = None
        self.length = 0

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.backend.encode_images(pixel_values)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.backend.embed(input_ids)

    def begin(self, slot: int, capacity: int, state: Any = None, prefix_len: int = 0) -> None:
        if state is None:
            self.cache = self.backend.new_cache(1, capacity)
        else:
            self.cache = self.backend.resume(state, prefix_len, capacity)
        self.length = prefix_len

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray:
        t = embeds.shape[0]
        mask = np.ones((1, self.length + t), np.int64)
        positions = np.arange(self.length, self.length + t, dtype=np.int64)[None]
        logits = self.backend.step(self.cache, embeds[None], mask, positions)
        self.length += t
        return logits[0]

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        mask = np.ones((1, self.length + 1), np.int64)
        logits = self.backend.step(self.cache, self.backend.embed(np.array([[tokens[0]]], np.int64)), mask,
                                   np.array([[self.length]], np.int64))
        self.length += 1
        return logits

    def snapshot(self, slot: int) -> Any:
        return self.backend.snapshot(self.cache)

    def release(self, slot: int) -> None:
        self.cache, self.length = None, 0


def make_runner(backend: Any, slots: int, chunk: int | None = PREFILL_CHUNK, max_len: int | None = None) -> ModelRunner:
    """A SlotRunner where the backend can address cache rows, else a SingleRunner (one slot)."""
    if isinstance(backend, SlotBackend):
        return SlotRunner(backend, slots, chunk, max_len)
    return SingleRunner(backend)
