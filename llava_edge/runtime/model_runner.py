"""The engine's view of a backend: KV slots, prompt chunks into one slot, one decode call for many.

Two runners behind one small interface:
- ``SlotRunner`` (fast onnxruntime backend): one long-lived slot-addressed cache; a prompt chunk goes
  into its own row, and one decode call advances every running row (continuous batching).
- ``SingleRunner`` (portable onnxruntime, TensorRT, anything with the plain Backend protocol): these
  cannot address rows of a cache, so the engine runs one sequence at a time (one slot), with the
  backend's own cache per request and the whole prompt in one ``step`` (TensorRT chunks internally).
  ``Pipeline.generate_batch`` still runs them as one static left-padded batch (``Pipeline.run``).

Positions: ``takes_positions`` is the backend's (``backend.takes_positions``); only then does the engine
hand ``prefill``/``decode`` positions (pruned images at their original positions), and a runner passes
them on only when given, so a backend without positions is called exactly as before.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import numpy as np

from .backend import BackendError, SlotBackend, supports_prefix_reuse, takes_positions
from .scheduler import PREFILL_CHUNK


class ModelRunner(Protocol):
    slots: int
    max_len: int  # positions a sequence may use (prompt + generated)
    chunk: int | None  # prefill chunk size the runner wants (None: the whole prompt in one call)
    supports_prefix: bool
    takes_positions: bool  # prefill/decode accept positions other than the cache index

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...
    def embed(self, input_ids: np.ndarray) -> np.ndarray: ...
    def begin(self, slot: int, capacity: int, state: Any = None, prefix_len: int = 0) -> None: ...
    def prefill(self, slot: int, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray: ...
    def decode(self, slots: list[int], tokens: list[int], positions: list[int] | None = None) -> np.ndarray: ...
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
        self.takes_positions = takes_positions(backend)

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

    def prefill(self, slot: int, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        if positions is None:
            return self.backend.prefill_slot(self.kv, slot, embeds[None])
        return self.backend.prefill_slot(self.kv, slot, embeds[None], positions=np.asarray(positions, np.int64))

    def decode(self, slots: list[int], tokens: list[int], positions: list[int] | None = None) -> np.ndarray:
        n = max(slots) + 1  # rows [0, n): lowest-slot-first admission keeps this close to len(slots)
        ids = np.full((n, 1), self.pad_id, np.int64)
        active = np.zeros(n, bool)
        ids[slots, 0] = tokens
        active[slots] = True
        if positions is None:
            logits = self.backend.decode_slots(self.kv, self.backend.embed(ids), active)
        else:
            pos = np.zeros(n, np.int64)  # idle rows in the range: the backend puts them at their fill
            pos[slots] = positions
            logits = self.backend.decode_slots(self.kv, self.backend.embed(ids), active, positions=pos)
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
        self.takes_positions = takes_positions(backend)
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

    def prefill(self, slot: int, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        t = embeds.shape[0]
        mask = np.ones((1, self.length + t), np.int64)
        if positions is None:
            positions = np.arange(self.length, self.length + t, dtype=np.int64)
        logits = self.backend.step(self.cache, embeds[None], mask, np.asarray(positions, np.int64)[None])
        self.length += t
        return logits[0]

    def decode(self, slots: list[int], tokens: list[int], positions: list[int] | None = None) -> np.ndarray:
        mask = np.ones((1, self.length + 1), np.int64)
        pos = self.length if positions is None else positions[0]
        logits = self.backend.step(self.cache, self.backend.embed(np.array([[tokens[0]]], np.int64)), mask,
                                   np.array([[pos]], np.int64))
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
