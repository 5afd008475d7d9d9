"""The continuous-batching engine: ``add`` requests any time, ``step`` advances all of them one round.

One ``step()`` = admit waiting sequences into free KV slots (prefix-cache lookup, image features from
the image-embedding cache or the vision encoder on its own thread, so running streams keep decoding
meanwhile; prompt embeddings), prefill whole chunks within the step's time budget (a multiple of the
decode call's measured cost: runtime/scheduler.py), then ONE decode call that gives every running
sequence its next token, every step. Finished and cancelled sequences leave
at once and free their slot for the next step. ``add``/``cancel`` may be called from other threads
(the server's event loop); ``step`` runs on one thread (the server's worker, or the caller of
``Pipeline.generate``).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable, Sequence as Seq

import numpy as np
from tokenizers import Tokenizer

from ..errors import UsageError
from ..package import Manifest
from .backend import takes_positions
from .model_runner import ModelRunner
from .prefix_cache import PrefixCache, image_digest
from . import anyres
from .preprocess import MAX_IMAGE_PIXELS, load_image, preprocess
from .prune import OFF, PruneSetting, prompt_positions
from .sampling import token_logprobs
from .scheduler import PREFILL_BUDGET, PrefillChunk, Scheduler
from .sequence import FinishReason, GenerationParams, PendingVision, Sequence, Status, TokenEvent


class PromptTooLongError(UsageError):
    """The prompt plus max_new_tokens does not fit the package's context."""


def check_context(prompt_len: int, max_tokens: int, context: int, span: int | None = None,
                  max_positions: int | None = None) -> None:
    """The one context check a request goes through: prompt + answer must fit ``context`` cache slots.
    With pruned images at their original positions (``span``: the prompt's length before pruning) the
    positions outrun the cache fill, so span + answer must also fit ``max_positions`` (the model's
    context: its rotary table)."""
    if prompt_len + max_tokens > context:
        raise PromptTooLongError(
            f"prompt of {prompt_len} tokens (image tokens included) plus max_new_tokens={max_tokens} "
            f"exceeds the model's context of {context}")
    if span is not None and max_positions is not None and span + max_tokens > max_positions:
        raise PromptTooLongError(
            f"prompt of {prompt_len} tokens ({span} positions: pruned image tokens keep their original "
            f"positions) plus max_new_tokens={max_tokens} exceeds the model's context of {max_positions}")


def unpruned_span(prompt_len: int, full: Seq[int], kept: Seq[int]) -> int:
    """Positions a pruned prompt spans: its tokens plus the image tokens pruning dropped (``full`` less
    ``kept`` per image), since kept tokens stay at their original positions (check_context's ``span``)."""
    return prompt_len + sum(full) - sum(kept)


def image_token_counts(images: Seq[Any], vision: Any, prune: PruneSetting,
                       max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> list[int]:
    """Tokens each image takes in a prompt: the package's count (LLaVA-NeXT: a function of the image's size,
    all its tiles together), less what ``prune`` drops. Known before anything runs, so prompts are laid
    out (and checked against the context) with it."""
    if not vision.anyres:
        return [prune.kept_count(vision.num_image_tokens)] * len(images)
    return [prune.kept_count(anyres.num_image_tokens(load_image(im, max_image_pixels).size[::-1], vision))
            for im in images]


def original_positions(prune: PruneSetting, runner_or_backend: Any) -> bool:
    """Whether a pruned prompt's tokens keep their original positions: pruning is on and the decoder takes
    positions (else it is renumbered: docs/pruning.md, "Positions")."""
    return prune.active and takes_positions(runner_or_backend)


@dataclass
class StepPlan:
    """What one backend round runs: prefill chunks (each into its sequence's slot) or one decode batch."""

    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)


@dataclass(frozen=True)
class AddRequest:
    """Inbox message: a new sequence to schedule."""

    seq: Sequence


@dataclass(frozen=True)
class CancelRequest:
    """Inbox message: end this sequence (a no-op once it has finished)."""

    seq_id: str


class ImageCache:
    """Image features by content digest, least recently used first out, bounded in megabytes: the same
    camera frame asked about by several requests goes through the vision encoder once. A pruned request
    keys its kept features by digest + pruning tag (``PruneSetting.cache_tag``) beside the image's full
    features (plain digest), so a pruned and an unpruned request never read each other's rows, and an
    unchanged frame asked the same way skips both the encoder and the selection."""

    def __init__(self, max_mb: float = 64.0):
        self.max_bytes = int(max_mb * 2**20)
        self.entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self.index: dict[str, np.ndarray] = {}  # pruned key -> indices of its kept rows (original positions)
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> np.ndarray | None:
        feats = self.entries.get(digest)
        if feats is None:
            self.misses += 1
            return None
        self.entries.move_to_end(digest)
        self.hits += 1
        return feats

    def kept_index(self, digest: str) -> np.ndarray | None:
        """The indices of the kept rows cached under a pruned key (None: not cached with any)."""
        return self.index.get(digest)

    def put(self, digest: str, feats: np.ndarray, index: np.ndarray | None = None) -> None:
        """``index``: for kept rows, which of the image's tokens they are (they keep those positions)."""
        if feats.nbytes > self.max_bytes or digest in self.entries:
            return
        self.entries[digest] = feats
        if index is not None:
            self.index[digest] = index
        self.bytes += feats.nbytes
        while self.bytes > self.max_bytes:
            key, old = self.entries.popitem(last=False)
            self.index.pop(key, None)
            self.bytes -= old.nbytes


class Engine:
    def __init__(self, runner: ModelRunner, manifest: Manifest, tokenizer: Tokenizer,
                 prefix_cache: PrefixCache | None = None, image_cache_mb: float = 64.0, *,
                 prefill_budget: float | None = PREFILL_BUDGET):
        self.runner = runner
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.image_cache = ImageCache(image_cache_mb) if image_cache_mb > 0 else None
        # prefill time per step in decode calls (scheduler.py); None: one chunk of prefill per step
        self.scheduler = Scheduler(runner.slots, runner.chunk, prefill_budget=prefill_budget)
        self.clock = time.perf_counter  # what the scheduler's costs are measured with (tests: a fake clock)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # added but not admitted yet (inbox + waiting): what a queue limit counts
        self._live: dict[str, Sequence] = {}
        self.wakeup = threading.Event()  # set by add/cancel: a sleeping worker has something to do
        self.steps = 0
        self.tokens_generated = 0
        self._pool: ThreadPoolExecutor | None = None
        self.max_image_pixels: int | None = MAX_IMAGE_PIXELS  # the same limit load_image applies

    # -- requests (any thread) ----------------------------------------------------------------------
    @property
    def context(self) -> int:
        """Positions one sequence may use (prompt + answer): the model's context, capped by the runner's."""
        return min(self.manifest.text.max_context, self.runner.max_len)

    def make_sequence(self, ids: np.ndarray, images: Seq[Any] = (), params: GenerationParams | None = None, *,
                      index: int = 0) -> Sequence:
        """A Sequence for prompt ids (image tokens expanded) and what the request asks for (``params``,
        frozen); refuses what cannot fit the context."""
        params = params or GenerationParams()
        seq = Sequence(np.asarray(ids, np.int64), list(images), self.tokenizer, params,
                       frozenset(self.manifest.text.eos_token_ids), index=index)
        span = None
        if seq.images:
            self._count_image_tokens(seq)
            placed = int((seq.ids == self.manifest.text.image_token_id).sum())
            if placed != sum(seq.image_tokens):
                raise UsageError(f"the prompt has {placed} image tokens but its {len(seq.images)} image(s) take "
                                 f"{sum(seq.image_tokens)} (prune {params.prune}): lay it out with the same setting")
            if original_positions(params.prune, self.runner):
                span = unpruned_span(len(seq.ids), seq.full_image_tokens, seq.image_tokens)
        check_context(len(seq.ids), params.max_tokens, self.context, span, self.manifest.text.max_context)
        return seq

    def add(self, seq: Sequence) -> str:
        with self._lock:
            self._queued += 1
        self._inbox.put(AddRequest(seq))
        self.wakeup.set()
        return seq.seq_id

    def cancel(self, seq_id: str) -> None:
        self._inbox.put(CancelRequest(seq_id))
        self.wakeup.set()

    @property
    def queued(self) -> int:
        return self._queued

    def has_work(self) -> bool:
        return not self._inbox.empty() or not self.scheduler.idle()

    # -- one round (the engine's thread) ------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """schedule -> run -> postprocess, for the prefill chunks (a prompt's last chunk gives its first
        token), then for one decode call over every running sequence (those just prefilled included). The
        decode is never skipped for a prefill: the prefill is what the budget bounds, so a running
        stream's token gap is at most about (1 + prefill_budget) decode calls (or one chunk plus one)."""
        events: list[TokenEvent] = []
        plan = self._schedule(events)
        self._postprocess(self._run(plan, events), events)
        self._postprocess(self._run(StepPlan(decode=self.scheduler.decode_batch()), events), events)
        self.steps += 1
        return events

    def run_until_done(self, seqs: Iterable[Sequence]) -> Iterable[TokenEvent]:
        """Add sequences and step until all of them have finished; yields every event (the Pipeline's loop)."""
        pending = {s.seq_id for s in seqs}
        for s in seqs:
            self.add(s)
        while pending:
            for ev in self.step():
                if ev.finish_reason is not None:
                    pending.discard(ev.seq_id)
                yield ev

    # -- internals ------------------------------------------------------------------------------------
    def _schedule(self, events: list[TokenEvent]) -> StepPlan:
        """Inbox, admission (prefix lookup, vision, embeddings), and this step's prefill chunks."""
        self._drain_inbox(events)
        sched = self.scheduler
        for seq in sched.admit():
            with self._lock:
                self._queued -= 1
            try:
                self._prepare(seq)
            except Exception as e:  # noqa: BLE001 - one bad request must not take the engine down
                self._fail(seq, e, events)
        self._collect_vision(events, wait=False)
        plan = sched.prefill_plan()
        if not plan and not sched.decode_batch():
            self._collect_vision(events, wait=True)  # nothing else to do: wait for the vision encoder
            plan = sched.prefill_plan()
        return StepPlan(prefill=plan)

    def _run(self, plan: StepPlan, events: list[TokenEvent]) -> list[tuple[Sequence, np.ndarray]]:
        """The backend calls of a plan: each prefill chunk into its slot, or one decode call for the batch.
        Returns (sequence, [1, V] logits) for each sequence with a token to sample; failures become events."""
        out: list[tuple[Sequence, np.ndarray]] = []
        costs = self.scheduler.costs
        for chunk in plan.prefill:
            seq = chunk.seq
            costed = not self._vision_running()
            t0 = self.clock()
            try:
                off = seq.prefill_start
                positions = seq.positions[chunk.start : chunk.end] if seq.positions is not None else None
                logits = self.runner.prefill(seq.slot, seq.embeds[chunk.start - off : chunk.end - off], positions)
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e, events)
                continue
            seq.computed = chunk.end
            ms = (self.clock() - t0) * 1000
            seq.timings.prefill_ms += ms
            if costed:
                costs.observe_prefill(chunk.tokens, ms)
            if chunk.last:
                seq.embeds = None
                if self.prefix_cache is not None and self.runner.supports_prefix:
                    self.prefix_cache.store(seq.digests, seq.ids, self.runner.snapshot(seq.slot))
                seq.status = Status.RUNNING
                out.append((seq, logits[None]))
        if plan.decode:
            batch = plan.decode
            costed = not self._vision_running()
            t0 = self.clock()
            try:
                positions = ([s.decode_position for s in batch] if any(s.positions is not None for s in batch)
                             else None)
                logits = self.runner.decode([s.slot for s in batch], [s.generated[-1] for s in batch], positions)
            except Exception as e:  # noqa: BLE001
                for seq in batch:
                    self._fail(seq, e, events)
                return out
            if costed:
                costs.observe_decode(len(batch), (self.clock() - t0) * 1000)
            out += [(seq, logits[i : i + 1]) for i, seq in enumerate(batch)]
        return out

    def _vision_running(self) -> bool:
        """Whether the vision encoder is working now: a call started meanwhile shares the cores with it, so
        its time is not what the scheduler's budget should be made of (StepCosts)."""
        return any(s.vision is not None and not s.vision.future.done() for s in self.scheduler.running)

    def _postprocess(self, outputs: list[tuple[Sequence, np.ndarray]], events: list[TokenEvent]) -> None:
        """Sample each sequence's next token, append it (stop checks, text), retire the finished."""
        for seq, logits in outputs:
            self._emit(seq, self._sample(seq, logits), events)

    def _drain_inbox(self, events: list[TokenEvent]) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, AddRequest):
                self._live[msg.seq.seq_id] = msg.seq
                self.scheduler.add(msg.seq)
                continue
            seq = self._live.get(msg.seq_id)
            if seq is None or seq.status is Status.FINISHED:
                continue
            if seq.status is Status.WAITING:
                with self._lock:
                    self._queued -= 1
            seq.finish(FinishReason.CANCELLED)
            self._retire(seq)
            events.append(TokenEvent(seq.seq_id, None, "", FinishReason.CANCELLED, seq.index))

    def _prepare(self, seq: Sequence) -> None:
        """Admission work: prefix lookup, image features (cache, else the vision encoder on its own
        thread), prompt embeddings, slot. Both caches key an image on its digest plus the pruning tag:
        a pruned prompt's KV and kept rows are never another setting's (or, question-aware, another
        question's)."""
        prune = seq.params.prune
        if seq.images and (self.image_cache is not None or self.prefix_cache is not None):
            seq.raw_digests = tuple(image_digest(im) for im in seq.images)
            seq.digests = prune.tagged(seq.raw_digests, seq.ids, self.manifest.text.image_token_id)
        hit, start = None, 0
        if self.prefix_cache is not None and self.runner.supports_prefix:
            hit, start = self.prefix_cache.lookup(seq.digests, seq.ids)
        seq.computed = seq.prefill_start = start
        feats: list[np.ndarray | None] = []
        if (seq.ids[start:] == self.manifest.text.image_token_id).any():
            cache = self.image_cache
            feats = [cache.get(d) for d in seq.digests] if cache is not None else [None] * len(seq.images)
            if cache is not None and prune.active:  # the full features, pruned in _finish_prepare
                # kept rows come with their indices (their original positions), read now with them
                seq.kept = [cache.kept_index(d) if f is not None else None for f, d in zip(feats, seq.digests)]
                feats = [f if f is not None else cache.get(d) for f, d in zip(feats, seq.raw_digests)]
        todo = [i for i, f in enumerate(feats) if f is None]
        if todo:
            # the running streams keep decoding while the vision encoder works (onnxruntime releases the GIL)
            seq.vision = PendingVision(self._vision_pool().submit(self._encode, seq, todo), feats, todo, hit)
            return
        self._finish_prepare(seq, feats, todo, None, hit)

    def _vision_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="llava-edge-vision")
        return self._pool

    def _encode(self, seq: Sequence, todo: list[int]) -> list[np.ndarray]:
        """Features of the images `todo`, one [tokens_i, hidden] array each (LLaVA-NeXT: tokens_i
        depends on the image's size), from one vision call."""
        t0 = time.perf_counter()
        v = self.manifest.vision
        images = [seq.images[i] for i in todo]
        if v.anyres:
            out = anyres.encode(images, v, self.runner.encode_images)
        else:
            out = list(self.runner.encode_images(np.stack([preprocess(im, v, self.max_image_pixels) for im in images])))
        seq.timings.vision_ms += (time.perf_counter() - t0) * 1000
        return out

    def _finish_prepare(self, seq: Sequence, feats: list, todo: list[int], encoded: np.ndarray | None,
                        hit: Any) -> None:
        for j, i in enumerate(todo):
            feats[i] = encoded[j]
            if self.image_cache is not None:
                self.image_cache.put(seq.raw_digests[i], encoded[j])
        new_ids = seq.ids[seq.prefill_start :]
        embeds = self.runner.embed(new_ids[None])[0]
        slots = new_ids == self.manifest.text.image_token_id
        kept: list[np.ndarray | None] = [None] * len(seq.images)  # unknown where a reused prefix covers them
        if slots.any():
            kept = self._prune(seq, feats, new_ids, embeds)
            flat = np.concatenate([f.reshape(-1, embeds.shape[-1]) for f in feats])
            # a reused prefix can only cover leading image tokens: the rest are the last rows
            embeds[slots] = flat[flat.shape[0] - int(slots.sum()) :].astype(embeds.dtype, copy=False)
        if seq.images and original_positions(seq.params.prune, self.runner):
            self._count_image_tokens(seq)
            seq.positions = prompt_positions(seq.ids, self.manifest.text.image_token_id, seq.full_image_tokens,
                                             seq.image_tokens, kept)
        self.runner.begin(seq.slot, seq.capacity, hit.state if hit is not None else None, seq.prefill_start)
        seq.embeds = embeds

    def _prune(self, seq: Sequence, feats: list, new_ids: np.ndarray, embeds: np.ndarray) -> list[np.ndarray]:
        """Each image's full features -> the rows its prompt has room for (``seq.image_tokens``), kept in
        order; kept rows already cached under the pruned key are used as they are (with the indices cached
        beside them). The instruction of a question-aware method is the prompt's text after its last
        image, embedded in ``embeds`` already. Returns each image's kept indices (its original positions)."""
        prune, hidden = seq.params.prune, embeds.shape[-1]
        self._count_image_tokens(seq)
        instruction = None
        kept = []
        for i, f in enumerate(feats):
            f = f.reshape(-1, hidden)
            want = seq.image_tokens[i]
            index = np.arange(f.shape[0])
            if f.shape[0] != want and prune.active:
                if instruction is None and prune.needs_instruction:
                    last = int(np.flatnonzero(new_ids == self.manifest.text.image_token_id)[-1])
                    instruction = embeds[last + 1 :]
                index = prune.select(f, instruction)
                f = f[index]
                if self.image_cache is not None:
                    self.image_cache.put(seq.digests[i], f, index)
            elif i < len(seq.kept) and seq.kept[i] is not None:  # kept rows from the image cache
                index = seq.kept[i]
            if f.shape[0] != want:
                raise ValueError(f"image {i} gave {f.shape[0]} features for {want} image tokens")
            feats[i] = f
            kept.append(index)
        seq.kept = kept
        return kept

    def _count_image_tokens(self, seq: Sequence) -> None:
        """Its images' token counts, before and after pruning (once: make_sequence, or admission for a
        Sequence made without it)."""
        if not seq.full_image_tokens:
            seq.full_image_tokens = image_token_counts(seq.images, self.manifest.vision, OFF, self.max_image_pixels)
            seq.image_tokens = [seq.params.prune.kept_count(n) for n in seq.full_image_tokens]

    def _collect_vision(self, events: list[TokenEvent], wait: bool) -> None:
        """Finish admission of sequences whose image features are ready (waiting for one if asked)."""
        pending = [s for s in self.scheduler.running if s.vision is not None]
        if wait and pending:
            futures_wait([s.vision.future for s in pending], timeout=0.05, return_when=FIRST_COMPLETED)
        for seq in pending:
            v = seq.vision
            if not v.future.done():
                continue
            seq.vision = None
            try:
                self._finish_prepare(seq, v.feats, v.todo, v.future.result(), v.hit)
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e, events)

    def _sample(self, seq: Sequence, logits: np.ndarray) -> int:
        # logprobs are the model's own (before penalty, temperature, top-k/p, schema mask: see
        # sampling.token_logprobs); the copy is taken only for a request that asked, and the sampler
        # below sees the same logits either way, so asking never changes a token
        raw = logits.reshape(-1).astype(np.float64) if seq.top_logprobs is not None else None
        if seq.constraint is not None:  # structured answers (runtime/constrain.py): mask, draw, follow
            seq.constraint.mask(logits)
        token = int(seq.sampler(logits, [seq.seen] if seq.seen is not None else None)[0])
        if seq.constraint is not None:
            seq.constraint.advance(token)
        if raw is not None:
            seq.logprobs.append(token_logprobs(raw, token, seq.top_logprobs))
        return token

    def _emit(self, seq: Sequence, token: int, events: list[TokenEvent]) -> None:
        self.tokens_generated += 1
        ev = seq.append(token)
        if seq.top_logprobs is not None:
            ev.logprobs = seq.logprobs[-1]
        events.append(ev)
        if seq.status is Status.FINISHED:
            self._retire(seq)

    def _fail(self, seq: Sequence, error: Exception, events: list[TokenEvent]) -> None:
        seq.error = f"{type(error).__name__}: {error}"
        seq.exception = error
        seq.finish(FinishReason.ERROR)
        self._retire(seq)
        events.append(TokenEvent(seq.seq_id, None, "", FinishReason.ERROR, seq.index))

    def _retire(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.runner.release(seq.slot)
        self.scheduler.remove(seq)
        seq.embeds = None
        self._live.pop(seq.seq_id, None)

