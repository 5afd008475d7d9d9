"""The Python API: Pipeline.from_package(dir).generate(image, prompt, ...).

``generate``, ``stream``, ``generate_batch`` and ``run`` (the `run` and `chat` verbs; `watch` and
`eval` call ``generate``) are thin clients of the continuous-batching ``Engine`` (runtime/engine.py):
each request becomes a Sequence, and the engine steps until they end, so a request gets exactly the
tokens, stop handling and text it would get from the server (one stop/detokenize path:
``Sequence.append``). On backends without KV slots (portable onnxruntime, TensorRT) the engine has one
slot (``model_runner.SingleRunner``). One exception, ``run`` with several requests on such a backend:
one left-padded batch in one cache (``_run_static``), rows finishing independently, since a one-slot
engine would serialize them; it is also the benchmark harness's static-batch baseline (see
docs/serving.md, "The engine").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from ..errors import UsageError
from ..package import Manifest, load_manifest
from . import anyres
from . import prompt as prompts
from .backend import SlotBackend, supports_prefix_reuse
from .backends import open_backend
from .inputs import check_count, check_stop, check_text, check_threads
from .engine import (Engine, PromptTooLongError, check_context, image_token_counts, original_positions,
                     unpruned_span)
from .model_runner import make_runner
from .prefix_cache import PrefixCache, image_digest
from .preprocess import MAX_IMAGE_PIXELS, load_image, preprocess
from .prune import OFF, PruneSetting, instruction_ids, prompt_positions
from .ragged import left_pad
from .sampling import Sampler, SamplingConfig
from .scheduler import PREFILL_BUDGET, PREFILL_CHUNK
from .sequence import Detokenizer as _Detokenizer
from .sequence import FinishReason, GenerationParams, GenerationResult, Timings
from ..tokenizer_check import load_tokenizer

__all__ = ["Pipeline", "Request", "TokenEvent", "GenerationParams", "GenerationResult", "FinishReason", "Timings",
           "PromptTooLongError", "drain"]


@dataclass
class TokenEvent:
    index: int  # which request of the batch
    token_id: int
    text: str  # newly decodable text (may be "" while a multi-byte character is incomplete)


@dataclass
class Request:
    turns: list[tuple[str, str | None]]  # conversation so far; the last turn's answer is None
    images: list[Any] = field(default_factory=list)


def drain(gen: Iterator[TokenEvent], on_event: Callable[[TokenEvent], None] | None = None) -> list[GenerationResult]:
    """Run a `Pipeline.run` generator to the end, passing each event to on_event; return its results."""
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            return done.value
        if on_event is not None:
            on_event(event)


class Pipeline:
    def __init__(self, package_dir: str | os.PathLike, manifest: Manifest, backend, tokenizer: Tokenizer,
                 template: str | None = None, prefix_cache: int = 2, *, max_slots: int = 4,
                 prefill_chunk: int = PREFILL_CHUNK,
                 image_cache_mb: float = 0.0,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, prune: PruneSetting | str | None = OFF):
        self.package_dir = Path(package_dir)
        # image tokens dropped before the decoder (runtime/prune.py): every call's default, a request may differ
        self.prune = PruneSetting.parse(prune)
        self.max_image_pixels = max_image_pixels  # images from files/bytes above this are refused before decoding
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.template = template or manifest.text.chat_template
        # prompts whose KV is kept for reuse (0 disables); each entry holds one prompt's whole KV
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        if self.template not in prompts.TEMPLATES:
            raise UsageError(f"unknown chat template {self.template!r}; known: {', '.join(prompts.TEMPLATES)}")
        self.max_slots, self.prefill_chunk, self.image_cache_mb = max_slots, prefill_chunk, image_cache_mb
        self._engine: Engine | None = None

    def make_engine(self, max_slots: int | None = None, prefill_chunk: int | None = None,
                    image_cache_mb: float | None = None, max_len: int | None = None,
                    prefill_budget: float | None = PREFILL_BUDGET) -> Engine:
        """A new engine over this pipeline's backend (the server makes its own with its --max-slots).
        It shares the pipeline's prefix cache; its KV slots (max_len positions each, the model's context
        by default) are allocated now. ``prefill_budget``: prefill time per step in decode calls (None:
        one chunk per step; runtime/scheduler.py)."""
        runner = make_runner(self.backend, max_slots or self.max_slots, prefill_chunk or self.prefill_chunk, max_len)
        engine = Engine(runner, self.manifest, self.tokenizer, self.prefix_cache,
                        self.image_cache_mb if image_cache_mb is None else image_cache_mb,
                        prefill_budget=prefill_budget)
        engine.max_image_pixels = self.max_image_pixels
        return engine

    def engine_for(self, n: int, capacity: int) -> Engine:
        """The pipeline's own engine, grown when a call needs more slots (up to max_slots) or positions:
        sized to what was asked, not to max_slots x the whole context, so one generate on a big model
        holds one slot's worth of KV sized like its request (rounded up to a power of two)."""
        e = self._engine
        slots = min(max(n, 1), self.max_slots)
        if e is None or e.runner.slots < slots or e.runner.max_len < capacity:
            max_len = min(self.manifest.text.max_context, 1 << max(capacity - 1, 1).bit_length())
            if e is not None:
                slots, max_len = max(slots, e.runner.slots), max(max_len, e.runner.max_len)
            self._engine = e = self.make_engine(slots, max_len=max_len)
        e.prefix_cache = self.prefix_cache  # callers may swap or drop the prefix cache
        return e

    @classmethod
    def from_package(cls, package_dir: str | os.PathLike, backend: str = "auto", device: str | None = None,
                     threads: int | None = None, template: str | None = None,
                     prefix_cache: int = 2, max_image_pixels: int | None = MAX_IMAGE_PIXELS,
                     prune: PruneSetting | str | None = OFF) -> "Pipeline":
        """Open a package for generation. backend "auto" (the default, as on the command line) runs the
        fastest graph the package holds (runtime/backends.resolve_auto): a cpu-int4 package opens its int4
        fast decoder, a portable one its portable decoder; name one (ort, ort-fast, ...) to choose."""
        check_threads(threads)
        manifest = load_manifest(package_dir)
        tokenizer = load_tokenizer(package_dir, manifest)  # one PackageError line if broken, foreign or hostile
        engine = open_backend(backend, package_dir, manifest, device=device, threads=threads)
        return cls(package_dir, manifest, engine, tokenizer, template, prefix_cache, max_image_pixels=max_image_pixels,
                   prune=prune)

    # -- prompt preparation -------------------------------------------------------------------
    def encode_request(self, request: Request, prune: PruneSetting | None = None) -> np.ndarray:
        """Prompt ids, each image expanded to the tokens it takes after ``prune`` (default: the pipeline's)."""
        t = self.manifest.text
        turns = [(check_text(q, "prompt", allow_empty=bool(request.images) or a is not None),
                  None if a is None else check_text(a, "answer", allow_empty=True)) for q, a in request.turns]
        text = prompts.render(self.template, turns, t.image_token, len(request.images))
        ids = self.tokenizer.encode(text).ids
        ids, n_images = prompts.expand_image_tokens(ids, t.image_token_id,
                                                    self._tokens_per_image(request.images, prune or self.prune))
        if n_images != len(request.images):
            raise UsageError(f"the prompt has {n_images} image placeholder(s) but {len(request.images)} image(s) "
                             "were given")
        return ids

    def _decoded(self, requests: Sequence[Request]) -> list[Request]:
        """The requests with their images decoded (and refused) once, before anything needs them: the
        prompt layout (a LLaVA-NeXT image's token count depends on its size) and the vision encoder."""
        return [Request(r.turns, [load_image(im, self.max_image_pixels) for im in r.images]) for r in requests]

    def _tokens_per_image(self, images: Sequence[Any], prune: PruneSetting = OFF) -> int | list[int]:
        """Image tokens each image takes: fixed, or (LLaVA-NeXT anyres) a function of its size; less what
        ``prune`` drops."""
        v = self.manifest.vision
        if not v.anyres:
            return prune.kept_count(v.num_image_tokens)
        return image_token_counts(images, v, prune, self.max_image_pixels)

    def _full_counts(self, images: Sequence[Any]) -> list[int]:
        """Each image's token count before pruning."""
        n = self._tokens_per_image(images)
        return list(n) if isinstance(n, list) else [n] * len(images)

    def _image_features(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Each image's features [tokens, hidden], in prompt order."""
        v = self.manifest.vision
        if v.anyres:
            return anyres.encode(images, v, self.backend.encode_images)
        features = self.backend.encode_images(np.stack([preprocess(im, v, self.max_image_pixels) for im in images]))
        return list(features)

    def _pruned_features(self, requests: Sequence[Request],
                         encoded: Sequence[np.ndarray]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """All requests' image features in prompt order, each image pruned as the engine does (with its
        request's instruction): [total image tokens, hidden], and per request each image's kept indices."""
        images = [im for r in requests for im in r.images]
        feats = iter(self._image_features(images))
        out, kept = [], []
        for r, ids in zip(requests, encoded):
            instruction = None
            if self.prune.needs_instruction and r.images:
                instruction = self.backend.embed(instruction_ids(ids, self.manifest.text.image_token_id)[None])[0]
            kept.append([])
            for _ in r.images:
                f = next(feats)
                index = self.prune.select(f, instruction) if self.prune.active else np.arange(len(f))
                out.append(f[index])
                kept[-1].append(index)
        return np.concatenate([f.reshape(-1, f.shape[-1]) for f in out]), kept

    # -- generation ---------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
            stop: Sequence[str] = ()) -> Iterator[TokenEvent]:
        """Generate for a batch; yields TokenEvents, returns list[GenerationResult] (StopIteration.value).
        Through the engine, but for several requests on a backend without KV slots (one static batch)."""
        if len(requests) > 1 and not isinstance(self.backend, SlotBackend):
            return (yield from self._run_static(requests, max_new_tokens, sampling, stop))
        return (yield from self.run_engine(requests, max_new_tokens, sampling, stop))

    def _run_static(self, requests: Sequence[Request], max_new_tokens: int = 64,
                    sampling: SamplingConfig | None = None, stop: Sequence[str] = ()) -> Iterator[TokenEvent]:
        """One left-padded batch in one backend cache, rows finishing independently."""
        max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
        if not requests:
            raise UsageError("no requests")
        sampling = sampling or SamplingConfig()
        stop = check_stop(stop)
        t = self.manifest.text
        requests = self._decoded(requests)
        encoded = [self.encode_request(r) for r in requests]
        lengths = [len(e) for e in encoded]
        longest = max(lengths)
        # pruned images at their original positions (engine.original_positions): each row's unpruned count
        original = original_positions(self.prune, self.backend)
        full = [self._full_counts(r.images) for r in requests] if original else []
        kept_counts = [[self.prune.kept_count(n) for n in f] for f in full]
        spans = [unpruned_span(n, f, k) for n, f, k in zip(lengths, full, kept_counts)]
        check_context(longest, max_new_tokens, t.max_context, max(spans) if original else None, t.max_context)
        b = len(requests)
        timings = Timings()
        images = [im for r in requests for im in r.images]

        # prefix reuse (batch 1): skip the tokens, and the vision encoder, that an earlier prompt covered
        reuse = self.prefix_cache is not None and b == 1 and supports_prefix_reuse(self.backend)
        # keyed as the engine keys them (Engine._prepare)
        digests = self.prune.tagged(tuple(map(image_digest, images)), encoded[0], t.image_token_id) if reuse else ()
        hit, start = self.prefix_cache.lookup(digests, encoded[0]) if reuse else (None, 0)

        # left-padded batch
        ids, mask = left_pad(encoded, t.pad_token_id)
        positions = np.maximum(mask.cumsum(-1) - 1, 0)
        new_ids = ids[:, start:]
        slots = new_ids == t.image_token_id

        flat, kept = None, [[None] * len(r.images) for r in requests]  # unknown: a reused prefix covers them
        if slots.any():  # all images of the batch in one call
            t0 = time.perf_counter()
            flat, kept = self._pruned_features(requests, encoded)
            timings.vision_ms = (time.perf_counter() - t0) * 1000
        if original:  # each row's positions, left-padded like its ids (only [start:] is run)
            for i, (e, f, c, k) in enumerate(zip(encoded, full, kept_counts, kept)):
                positions[i, longest - len(e) :] = prompt_positions(e, t.image_token_id, f, c, k)

        t0 = time.perf_counter()
        embeds = self.backend.embed(new_ids)
        if flat is not None:
            # a reused prefix can only cover leading image tokens: the rest are the last rows
            embeds[slots] = flat[flat.shape[0] - int(slots.sum()) :].astype(embeds.dtype, copy=False)
        if hit is not None:
            cache = self.backend.resume(hit.state, start, longest + max_new_tokens)
        else:
            cache = self.backend.new_cache(b, longest + max_new_tokens)
        logits = self.backend.step(cache, embeds, mask, positions[:, start:])
        if reuse:
            self.prefix_cache.store(digests, encoded[0], self.backend.snapshot(cache))
        timings.prefill_ms = (time.perf_counter() - t0) * 1000

        sampler = Sampler(sampling)
        seen = [e.copy() for e in encoded] if sampling.repetition_penalty != 1.0 else None
        generated: list[list[int]] = [[] for _ in range(b)]
        detok = [_Detokenizer(self.tokenizer) for _ in range(b)]
        finish: list[FinishReason | None] = [None] * b
        eos = set(t.eos_token_ids)
        next_pos = positions[:, -1] + 1
        t_decode = time.perf_counter()
        for step in range(max_new_tokens):
            tokens = sampler(logits, seen)
            for i in range(b):
                if finish[i] is not None:
                    continue
                tok = int(tokens[i])
                generated[i].append(tok)
                if seen is not None:
                    seen[i] = np.append(seen[i], tok)
                if tok in eos:
                    finish[i] = FinishReason.EOS
                    continue
                delta = detok[i].push(tok)
                # a stop string not seen before must end inside this delta: look at the tail only
                if stop and any(s in detok[i].text[-(len(delta) + len(s)):] for s in stop):
                    finish[i] = FinishReason.STOP
                if delta:
                    yield TokenEvent(i, tok, delta)
            if all(f is not None for f in finish) or step == max_new_tokens - 1:
                break
            tokens = np.array([generated[i][-1] if finish[i] is None else t.pad_token_id for i in range(b)],
                              dtype=np.int64)
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            logits = self.backend.step(cache, self.backend.embed(tokens[:, None]), mask, next_pos[:, None])
            next_pos = next_pos + 1
            timings.new_tokens += sum(f is None for f in finish)
        timings.decode_ms = (time.perf_counter() - t_decode) * 1000

        results = []
        for i in range(b):
            text = detok[i].tokenizer.decode(generated[i], skip_special_tokens=True)
            reason = finish[i] or FinishReason.LENGTH
            if reason is FinishReason.STOP:
                cut = min(text.find(s) for s in stop if s in text)
                text = text[:cut]
            results.append(GenerationResult(text.strip(), generated[i], reason, lengths[i], timings))
        return results


    def sequences(self, requests: Sequence[Request], max_new_tokens: int = 64,
                  sampling: SamplingConfig | None = None, stop: Sequence[str] = (), engine: Engine | None = None,
                  json_schema: dict | None = None, *, top_logprobs: int | None = None,
                  ignore_eos: bool = False) -> list:
        """Engine sequences for requests (prompt checked against the context, images decoded now); without
        an engine, the pipeline's own, sized for them. All of them share one frozen GenerationParams (with the
        pipeline's ``prune``)."""
        max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
        stop = check_stop(stop)
        if not requests:
            raise UsageError("no requests")
        requests = self._decoded(requests)
        encoded = [self.encode_request(r) for r in requests]
        if engine is None:
            engine = self.engine_for(len(requests), max(len(e) for e in encoded) + max_new_tokens)
        grammar = None
        if json_schema is not None:  # the answers must parse and validate (runtime/constrain.py)
            from .constrain import cached_grammar

            grammar = cached_grammar(self.tokenizer, frozenset(self.manifest.text.eos_token_ids), json_schema)
        params = GenerationParams(max_new_tokens, sampling or SamplingConfig(), tuple(stop), ignore_eos, grammar,
                                  top_logprobs, self.prune)
        return [engine.make_sequence(e, r.images, params, index=i) for i, (e, r) in enumerate(zip(encoded, requests))]

    def run_engine(self, requests: Sequence[Request], max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                   stop: Sequence[str] = (), json_schema: dict | None = None) -> Iterator[TokenEvent]:
        """Like ``run``, through the engine: yields TokenEvents, returns list[GenerationResult]."""
        seqs = self.sequences(requests, max_new_tokens, sampling, stop, json_schema=json_schema)
        engine = self._engine
        done = False
        try:
            for ev in engine.run_until_done(seqs):
                if ev.token_id is not None and ev.text:
                    yield TokenEvent(ev.index, ev.token_id, ev.text)
            done = True
        finally:
            if not done:  # the caller stopped early: free the slots
                for s in seqs:
                    engine.cancel(s.seq_id)
                engine.step()
        for s in seqs:
            if s.exception is not None:
                raise s.exception
        return [s.result() for s in seqs]

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 stop: Sequence[str] = (), history: Sequence[tuple[str, str]] = (),
                 json_schema: dict | None = None) -> GenerationResult:
        """One image (or None) and one question; history holds earlier (question, answer) turns; with
        ``json_schema`` the answer is constrained to JSON that validates against it."""
        req = Request([*history, (prompt, None)], [image] if image is not None else [])
        return drain(self.run_engine([req], max_new_tokens, sampling, stop, json_schema))[0]

    def generate_batch(self, images: Sequence[Any], prompts_: Sequence[str], max_new_tokens: int = 64,
                       sampling: SamplingConfig | None = None, stop: Sequence[str] = ()) -> list[GenerationResult]:
        """Continuously batched through the engine where the backend has KV slots; otherwise (portable
        onnxruntime, TensorRT) one static left-padded batch."""
        if len(images) != len(prompts_):
            raise UsageError("generate_batch needs one image (or None) per prompt")
        reqs = [Request([(p, None)], [im] if im is not None else []) for im, p in zip(images, prompts_)]
        return drain(self.run(reqs, max_new_tokens, sampling, stop))

    def stream(self, image: Any, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
               stop: Sequence[str] = (), history: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        """Text deltas as they are generated."""
        req = Request([*history, (prompt, None)], [image] if image is not None else [])
        for event in self.run_engine([req], max_new_tokens, sampling, stop):
            yield event.text
