"""The backend protocol: what the generation loop needs from an inference engine, and nothing more.

A backend owns its sessions/engines and its KV cache; the loop only sees numpy embeddings in and logits
out. Prefix reuse is optional: a backend that can copy its cache out and back in sets
``supports_prefix_reuse = True`` and implements :class:`SupportsPrefixReuse`; the pipeline checks the
flag (never ``hasattr``). ``takes_positions`` says whether ``step`` (and a slot backend's calls) rotate
each token by the position it is given, which pruning needs to keep image tokens at their original
positions while the cache fills densely; a backend whose decoder derives positions from the cache fill
leaves it False and the engine renumbers (``takes_positions``). Backend names and the opener are in
``backends.py``; see docs/architecture.md.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import BackendError

__all__ = ["Backend", "BackendError", "SlotBackend", "SupportsPrefixReuse", "supports_prefix_reuse", "takes_positions"]


class Backend(Protocol):
    name: str
    float_dtype: np.dtype  # dtype of embeddings / image features the graphs take
    supports_prefix_reuse: bool  # True: also implements SupportsPrefixReuse
    takes_positions: bool  # True: position_ids may differ from the cache index (pruned prompts); optional

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N,3,S,S] float32 -> image features [N, tokens_per_image, hidden]."""

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """[B,T] int64 -> [B,T,hidden]."""

    def new_cache(self, batch: int, max_len: int) -> Any:
        """An empty KV cache for `batch` sequences of up to max_len tokens."""

    def step(self, cache: Any, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Run the decoder on T new tokens at ``position_ids`` [B,T], append their k/v to the cache, return
        logits of the last token [B, V] (float32). Without ``takes_positions`` the positions must continue
        each row's cache fill."""


@runtime_checkable
class SupportsPrefixReuse(Protocol):
    """A backend whose batch-1 cache can be kept and resumed (the pipeline's prefix cache)."""

    def snapshot(self, cache: Any) -> Any:
        """A host-side state of ``cache`` that stays valid after the cache is written again."""

    def resume(self, state: Any, prefix_len: int, max_len: int) -> Any:
        """A new cache holding the first ``prefix_len`` tokens of ``state``, room for ``max_len``."""


@runtime_checkable
class SlotBackend(Protocol):
    """A backend whose one long-lived cache holds ``slots`` independent rows: the engine's continuous
    batching (``model_runner.SlotRunner``). ``isinstance(backend, SlotBackend)`` picks the runner."""

    def new_slot_cache(self, slots: int, max_len: int | None = None) -> Any:
        """A cache of ``slots`` rows of up to ``max_len`` positions (default: the model's context)."""

    def prefill_slot(self, kv: Any, slot: int, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append [1, T, H] embeddings to ``slot``'s row; logits of the last one [V]. A backend that
        ``takes_positions`` also accepts ``positions=`` (int64 [T]; default: the cache indices)."""

    def decode_slots(self, kv: Any, inputs_embeds: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One token for rows [0, n) (``inputs_embeds`` [n, 1, H]); only ``active`` rows keep theirs. [n, V].
        With ``takes_positions``, ``positions=`` (int64 [n]) too."""

    def snapshot_slot(self, kv: Any, slot: int) -> Any:
        """A host-side copy of ``slot``'s filled positions (the prefix cache)."""

    def resume_slot(self, kv: Any, slot: int, state: Any, prefix_len: int) -> None:
        """Put the first ``prefix_len`` positions of ``state`` into ``slot``'s row."""


def takes_positions(backend: Any) -> bool:
    """Whether the backend rotates tokens by the positions it is given, not by their cache index (an
    undeclared backend does not: the engine then gives it consecutive positions)."""
    return bool(getattr(backend, "takes_positions", False))


def supports_prefix_reuse(backend: Any) -> bool:
    """Whether the backend declares prefix reuse (and so implements snapshot/resume)."""
    return bool(getattr(backend, "supports_prefix_reuse", False))
