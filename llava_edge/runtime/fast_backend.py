"""onnxruntime backend over the fast decoder graph: one preallocated KV buffer per layer, updated in place.

Same Backend protocol as OrtBackend, so the pipeline does not change. The differences are inside:
- the cache is one [B, kvH, max_len, D] buffer per layer and tensor, bound with IO binding as both
  the past input and the present output of GroupQueryAttention (shared-buffer mode): no cache tensor
  is allocated or copied per token;
- rows are stored from position 0 with their own lengths. The pipeline hands a left-padded prompt;
  prefill moves each row's real tokens to the front (once), and every later step appends at each
  row's own length, so rows of different lengths share a batch and finish independently;
- the graph returns logits of each row's last real token only ([B,V]), into a bound output buffer.

Slot-addressed use (the engine's continuous batching): ``new_slot_cache`` makes one [max_slots, kvH,
max_ctx, D] buffer per layer that outlives requests. A row-range of that buffer is contiguous, so an
OrtValue over rows [lo, hi) is a view of the same memory: ``prefill_slot`` binds one row and appends a
prompt chunk to it while the other rows keep their state, and ``decode_slots`` binds rows [0, n) and
appends one token to every active row in one call (an idle row in the range gets a dummy token written
at its own length, which its next real write overwrites).

Positions: a fast decoder exported with ``position_ids`` (``takes_positions``; every export since pruned
images keep their original positions) rotates each token by the position it is given while k/v still go
to the row's next cache slot, so a pruned prompt is dense in the cache and gapped in positions. An older
graph derives positions from the cache fill (GroupQueryAttention's own rotary): it gets none, and the
engine renumbers (docs/pruning.md, "Positions").

Prefill on OpenVINO (``prefill="openvino"``, backends ``ort-fast-ov`` / ``ort-fast-int4-ov``): long prompt
chunks of ``prefill_slot`` run the same graph file in OpenVINO, which writes into the same buffers
(ov_prefill.py); everything else is unchanged.

Imports neither torch nor onnx (runtime rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..package import Manifest
from .backend import BackendError
from .ort_backend import EMBED_THREADS, open_session, session_options
from .ov_prefill import OpenVinoPrefill, PrefillEngine
from .ragged import right_align


@dataclass
class FastKVCache:
    """Preallocated in-place cache of ``rows`` rows; lengths[r] = tokens of row r in the cache. One class
    for both uses: a per-request batch (``new_cache``: rows = the batch) and the engine's long-lived
    slot cache (``new_slot_cache``: rows = slots, each row a sequence of its own)."""

    rows: int
    max_len: int
    keys: list[np.ndarray]
    values: list[np.ndarray]
    lengths: np.ndarray  # int32 [rows]
    logits: np.ndarray  # float32 [rows, V], bound as the graph's output
    bindings: dict[tuple[int, int], Any] = field(default_factory=dict)  # (lo, hi) row range -> IOBinding
    held: list[Any] = field(default_factory=list)  # the bindings' OrtValues, kept alive with the buffers

    @property
    def batch(self) -> int:
        return self.rows

    @property
    def length(self) -> int:
        return int(self.lengths.max()) if self.rows else 0

    @property
    def past(self) -> list[np.ndarray]:
        """Every layer's keys then values, in the graph's past_key_values (and present) order."""
        return [buf for pair in zip(self.keys, self.values) for buf in pair]



class FastOrtBackend:
    name = "onnxruntime-fast"
    supports_prefix_reuse = True

    def __init__(self, package_dir: str | os.PathLike, manifest: Manifest, threads: int | None = None,
                 decoder: str = "decoder_fast", device: str = "cpu",
                 prefill: PrefillEngine = PrefillEngine.ONNXRUNTIME):
        if decoder not in manifest.graphs:
            fast = [g for g in manifest.graphs if g.startswith("decoder_fast")]
            flag = "--fast" if decoder == "decoder_fast" else "--fast-int4"
            raise BackendError(f"package has no '{decoder}' graph (has: {', '.join(fast) or 'none'}); export one with "
                               f"`llava-edge export {manifest.source.get('path') or 'CHECKPOINT'} -o {package_dir} "
                               f"{flag} --overwrite`")
        if device != "cpu":
            raise BackendError("the fast backend is CPU-only for now (GroupQueryAttention shared buffer on CPU)")
        root = Path(package_dir)
        opts = session_options(threads)
        providers = ["CPUExecutionProvider"]
        self.manifest = manifest
        self.vision = open_session(root, manifest, "vision", opts, providers)
        self.embedder = open_session(root, manifest, "embed", session_options(EMBED_THREADS), providers)
        self.decoder = open_session(root, manifest, decoder, opts, providers)
        self.decoder_graph = decoder
        past = [i for i in self.decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.present_names = [o.name for o in self.decoder.get_outputs() if o.name.startswith("present.")]
        self.float_dtype = np.dtype(np.float16 if "float16" in past[0].type else np.float32)
        t = manifest.text
        self.kv_heads, self.head_dim, self.vocab = t.num_kv_heads, t.head_dim, t.vocab_size
        self.max_context = t.max_context
        self.takes_positions = "position_ids" in {i.name for i in self.decoder.get_inputs()}
        self.ov_prefill = None  # OpenVinoPrefill: long prompt chunks (ov_prefill.py)
        if PrefillEngine(prefill) is PrefillEngine.OPENVINO:
            self.ov_prefill = OpenVinoPrefill(root / manifest.graphs[decoder].file, threads, self.past_names,
                                              self.present_names)
            self.name = f"{self.name}+openvino-prefill"

    # -- protocol ---------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.manifest.dtype)
        return self.vision.run(None, {"pixel_values": pixel_values.astype(dtype, copy=False)})[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embedder.run(None, {"input_ids": input_ids.astype(np.int64, copy=False)})[0]

    def new_cache(self, batch: int, max_len: int) -> FastKVCache:
        if max_len > self.max_context:
            raise BackendError(f"max_len {max_len} exceeds the model's context {self.max_context} (rotary table)")
        return FastKVCache(batch, max_len, *self._kv_buffers(batch, max_len), np.zeros(batch, np.int32),
                           np.zeros((batch, self.vocab), np.float32))

    def step(self, cache: FastKVCache, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        b, t = inputs_embeds.shape[:2]
        if b != cache.batch:
            raise BackendError(f"batch {b} does not match the cache's {cache.batch}")
        embeds = inputs_embeds.astype(self.float_dtype, copy=False)
        positions = None
        if not cache.lengths.any():
            # prefill: left-padded rows -> right-padded from position 0 (their positions with them)
            new_mask = attention_mask[:, -t:]
            embeds, n = right_align(embeds, new_mask)
            if self.takes_positions and position_ids is not None:
                positions = right_align(np.asarray(position_ids, np.int64)[..., None], new_mask)[0][..., 0]
            new_lengths = n
            index = np.arange(b, dtype=np.int64) * t + (n - 1)
        else:
            # every row appends t tokens at its own length (finished rows get the pipeline's padding)
            if not (attention_mask[:, -t:] == 1).all():
                raise BackendError("the fast backend appends whole columns after prefill (no padding inside)")
            if self.takes_positions and position_ids is not None:
                positions = np.asarray(position_ids, np.int64)
            elif position_ids is not None and not np.array_equal(position_ids[:, 0], cache.lengths):
                raise BackendError("position_ids do not continue the cached rows (this fast decoder takes no "
                                   "positions: they follow the cache fill)")
            new_lengths = cache.lengths + t
            index = np.arange(b, dtype=np.int64) * t + (t - 1)
        if int(new_lengths.max()) > cache.max_len:
            raise BackendError(f"KV cache full: {int(new_lengths.max())} > {cache.max_len}")
        if positions is None:
            positions = self._cache_positions(cache.lengths, t)
        self._run(cache, np.ascontiguousarray(embeds), new_lengths, index, positions)
        cache.lengths = new_lengths
        return cache.logits.copy()

    # -- prefix reuse -------------------------------------------------------------------------------
    def snapshot(self, cache: FastKVCache) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """A copy of row 0's filled positions: the live buffers are overwritten by later steps."""
        if cache.batch != 1:
            raise BackendError("prefix snapshots are for batch 1")
        n = int(cache.lengths[0])
        return [k[:, :, :n].copy() for k in cache.keys], [v[:, :, :n].copy() for v in cache.values], n

    def resume(self, state: tuple[list[np.ndarray], list[np.ndarray], int], prefix_len: int,
               max_len: int) -> FastKVCache:
        keys, values, n = state
        if prefix_len > n:
            raise BackendError(f"prefix of {prefix_len} tokens is longer than the snapshot ({n})")
        cache = self.new_cache(1, max_len)
        for dst, src in zip([*cache.keys, *cache.values], [*keys, *values]):
            dst[:, :, :prefix_len] = src[:, :, :prefix_len]
        cache.lengths[:] = prefix_len
        return cache

    # -- slot-addressed cache (continuous batching) --------------------------------------------------
    def new_slot_cache(self, slots: int, max_len: int | None = None) -> FastKVCache:
        return self.new_cache(slots, max_len or self.max_context)

    def prefill_slot(self, kv: FastKVCache, slot: int, inputs_embeds: np.ndarray,
                     positions: np.ndarray | None = None) -> np.ndarray:
        """Append [1, T, H] prompt embeddings to slot's row; logits of the last one [V]. ``positions``
        int64 [T]: their rotary positions (default: their cache indices; only with ``takes_positions``)."""
        t = inputs_embeds.shape[1]
        old = int(kv.lengths[slot])
        new_len = old + t
        if new_len > kv.max_len:
            raise BackendError(f"KV cache full: {new_len} > {kv.max_len}")
        embeds = np.ascontiguousarray(inputs_embeds.astype(self.float_dtype, copy=False))
        pos = self._given(positions, np.arange(old, new_len, dtype=np.int64))
        if self.ov_prefill is not None and self.ov_prefill.takes(t):
            self._check_positions(pos)
            logits = self.ov_prefill.prefill(kv.past, slot, old, embeds, pos)
        else:
            self._execute(self._slot_binding(kv, slot, slot + 1), embeds, np.array([new_len], np.int32),
                          np.array([t - 1], np.int64), pos.reshape(1, t))
            logits = kv.logits[slot].copy()
        kv.lengths[slot] = new_len
        return logits

    def decode_slots(self, kv: FastKVCache, inputs_embeds: np.ndarray, active: np.ndarray,
                     positions: np.ndarray | None = None) -> np.ndarray:
        """One token for rows [0, n) (inputs_embeds [n, 1, H]); only ``active`` rows keep theirs.
        Returns logits [n, V] (rows that are not active hold garbage). ``positions`` int64 [n]: each row's
        rotary position (default: its cache fill; only with ``takes_positions``)."""
        n = inputs_embeds.shape[0]
        grown = kv.lengths[:n] + 1
        if int(grown[active].max(initial=0)) > kv.max_len:
            raise BackendError(f"KV cache full: {int(grown[active].max())} > {kv.max_len}")
        embeds = np.ascontiguousarray(inputs_embeds.astype(self.float_dtype, copy=False))
        lengths = np.minimum(grown, kv.max_len).astype(np.int32)
        fill = (lengths - 1).astype(np.int64)  # the cache index each row writes (an idle row: overwritten later)
        pos = self._given(None if positions is None else np.where(active, positions, fill), fill)
        self._execute(self._slot_binding(kv, 0, n), embeds, lengths, np.arange(n, dtype=np.int64), pos.reshape(n, 1))
        kv.lengths[:n] = np.where(active, grown, kv.lengths[:n])
        return kv.logits[:n].copy()

    def snapshot_slot(self, kv: FastKVCache, slot: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        n = int(kv.lengths[slot])
        return ([k[slot : slot + 1, :, :n].copy() for k in kv.keys],
                [v[slot : slot + 1, :, :n].copy() for v in kv.values], n)

    def resume_slot(self, kv: FastKVCache, slot: int, state: tuple[list[np.ndarray], list[np.ndarray], int],
                    prefix_len: int) -> None:
        keys, values, n = state
        if prefix_len > n:
            raise BackendError(f"prefix of {prefix_len} tokens is longer than the snapshot ({n})")
        for dst, src in zip([*kv.keys, *kv.values], [*keys, *values]):
            dst[slot, :, :prefix_len] = src[0, :, :prefix_len]
        kv.lengths[slot] = prefix_len

    def _slot_binding(self, kv: FastKVCache, lo: int, hi: int) -> Any:
        binding = kv.bindings.get((lo, hi))
        if binding is None:
            binding = kv.bindings[(lo, hi)] = self._bind(kv, lo, hi)
        return binding

    # -- internals ----------------------------------------------------------------------------------
    def _kv_buffers(self, rows: int, max_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Zeroed keys and values, one [rows, kvH, max_len, D] buffer per layer each."""
        shape = (rows, self.kv_heads, max_len, self.head_dim)
        n = len(self.past_names) // 2
        return ([np.zeros(shape, self.float_dtype) for _ in range(n)],
                [np.zeros(shape, self.float_dtype) for _ in range(n)])

    def _bind(self, kv: FastKVCache, lo: int, hi: int) -> Any:
        """An IOBinding of rows [lo, hi) of the buffers as both past and present (in place) and of logits;
        a row range of a [rows, ...] buffer is contiguous, so the OrtValues wrap it without a copy."""
        binding = self.decoder.io_binding()
        for name, out_name, buf in zip(self.past_names, self.present_names, kv.past):
            ov = ort.OrtValue.ortvalue_from_numpy(buf[lo:hi])
            kv.held.append(ov)
            binding.bind_ortvalue_input(name, ov)
            binding.bind_ortvalue_output(out_name, ov)
        binding.bind_output("logits", "cpu", 0, np.float32, [hi - lo, self.vocab], kv.logits[lo:hi].ctypes.data)
        return binding

    def _given(self, positions: np.ndarray | None, cache_index: np.ndarray) -> np.ndarray:
        """The positions to feed: those given (a graph without position_ids takes only the cache index)."""
        if positions is None:
            return cache_index
        positions = np.asarray(positions, np.int64).reshape(cache_index.shape)
        if not self.takes_positions and not np.array_equal(positions, cache_index):
            raise BackendError(f"the {self.decoder_graph} graph takes no position_ids (exported before they were "
                               "added): positions must follow the cache fill; export the package again")
        return positions

    @staticmethod
    def _cache_positions(lengths: np.ndarray, t: int) -> np.ndarray:
        """[B, t] positions of t tokens appended at each row's length."""
        return lengths.astype(np.int64)[:, None] + np.arange(t, dtype=np.int64)

    def _run(self, cache: FastKVCache, embeds: np.ndarray, new_lengths: np.ndarray, index: np.ndarray,
             positions: np.ndarray) -> None:
        self._execute(self._slot_binding(cache, 0, cache.rows), embeds, new_lengths, index, positions)

    def _check_positions(self, positions: np.ndarray) -> None:
        if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= self.max_context):
            raise BackendError(f"positions {int(positions.min())}..{int(positions.max())} are outside the "
                               f"model's {self.max_context}")

    def _execute(self, binding: Any, embeds: np.ndarray, new_lengths: np.ndarray, index: np.ndarray,
                 positions: np.ndarray) -> None:
        seqlens = (new_lengths - 1).astype(np.int32)
        total = np.array(int(new_lengths.max()), dtype=np.int32)
        feeds = [("inputs_embeds", embeds), ("seqlens_k", seqlens), ("total_sequence_length", total),
                 ("logits_index", index)]
        if self.takes_positions:
            self._check_positions(positions)
            feeds.append(("position_ids", np.ascontiguousarray(positions, dtype=np.int64)))
        keep = []  # OrtValues wrap the numpy memory; keep them alive through the run
        for name, arr in feeds:
            ov = ort.OrtValue.ortvalue_from_numpy(arr)
            keep.append(ov)
            binding.bind_ortvalue_input(name, ov)
        self.decoder.run_with_iobinding(binding)
