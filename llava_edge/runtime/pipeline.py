"""The Python API: Pipeline.from_package(dir).generate(image, prompt, ...).

One generation loop serves single requests, batches and streaming: it yields TokenEvents as tokens
arrive and returns the final results. Batches are left-padded (real tokens end at the same column, so
every row's next token comes from the last position and rows finish independently).
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
from ..package import TOKENIZER_NAME, Manifest, PackageError, load_manifest
from . import anyres
from . import prompt as prompts
from .backend import supports_prefix_reuse
from .backends import open_backend
from .inputs import check_count, check_stop, check_text, check_threads
from .prefix_cache import PrefixCache, image_digest
from .preprocess import MAX_IMAGE_PIXELS, load_image, preprocess
from .ragged import left_pad
from .sampling import Sampler, SamplingConfig


class PromptTooLongError(UsageError):
    """The prompt plus max_new_tokens does not fit the package's context."""


@dataclass
class Timings:
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0  # decode steps after the first token, summed over the batch

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"vision_ms": round(self.vision_ms, 3), "prefill_ms": round(self.prefill_ms, 3),
                "decode_ms": round(self.decode_ms, 3), "tokens_per_s": round(self.tokens_per_s, 2)}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, eos included when generation stopped on it
    finish_reason: str  # "eos", "stop" (a stop string), "length"
    prompt_tokens: int
    timings: Timings

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "timings": self.timings.as_dict()}


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


class _Detokenizer:
    """Incremental text for one sequence: emits only text that will not change with later tokens.

    Decodes a short window, not the whole answer, so a token costs O(window) instead of O(answer)
    (re-decoding everything made a long answer quadratic). The window is the tokens since the text
    emitted before last (``prefix``) up to now; the new text is what decoding the window adds to
    decoding its already-emitted head. Both decodes start at the same token, so a tokenizer that
    treats a sequence's first token specially (a leading space, a byte-fallback run) does so in both
    and it cancels out. A window ending inside a UTF-8 character (U+FFFD) waits for the next token.
    This is the prefix/read-offset scheme of Hugging Face TGI and vLLM.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are already in self.text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        head = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        window = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(window) <= len(head) or window.endswith("\ufffd") or not window.startswith(head):
            return ""
        delta = window[len(head) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


class Pipeline:
    def __init__(self, package_dir: str | os.PathLike, manifest: Manifest, backend, tokenizer: Tokenizer,
                 template: str | None = None, prefix_cache: int = 2, max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        self.package_dir = Path(package_dir)
        self.max_image_pixels = max_image_pixels  # images from files/bytes above this are refused before decoding
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.template = template or manifest.text.chat_template
        # prompts whose KV is kept for reuse (0 disables); each entry holds one prompt's whole KV
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        if self.template not in prompts.TEMPLATES:
            raise UsageError(f"unknown chat template {self.template!r}; known: {', '.join(prompts.TEMPLATES)}")

    @classmethod
    def from_package(cls, package_dir: str | os.PathLike, backend: str = "ort", device: str = "cpu",
                     threads: int | None = None, template: str | None = None,
                     prefix_cache: int = 2, max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> "Pipeline":
        check_threads(threads)
        manifest = load_manifest(package_dir)
        try:
            tokenizer = Tokenizer.from_file(str(Path(package_dir) / TOKENIZER_NAME))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot parse
            raise PackageError(f"cannot load {TOKENIZER_NAME} of {package_dir}: {e}") from None
        engine = open_backend(backend, package_dir, manifest, device=device, threads=threads)
        return cls(package_dir, manifest, engine, tokenizer, template, prefix_cache, max_image_pixels)

    # -- prompt preparation -------------------------------------------------------------------
    def encode_request(self, request: Request) -> np.ndarray:
        t = self.manifest.text
        turns = [(check_text(q, "prompt", allow_empty=bool(request.images) or a is not None),
                  None if a is None else check_text(a, "answer", allow_empty=True)) for q, a in request.turns]
        text = prompts.render(self.template, turns, t.image_token, len(request.images))
        ids = self.tokenizer.encode(text).ids
        ids, n_images = prompts.expand_image_tokens(ids, t.image_token_id, self._tokens_per_image(request.images))
        if n_images != len(request.images):
            raise UsageError(f"the prompt has {n_images} image placeholder(s) but {len(request.images)} image(s) were given")
        return ids

    def _tokens_per_image(self, images: Sequence[Any]) -> int | list[int]:
        """Image tokens each image takes: fixed, or (LLaVA-NeXT anyres) a function of its size."""
        v = self.manifest.vision
        if not v.anyres:
            return v.num_image_tokens
        return [anyres.num_image_tokens(load_image(im, self.max_image_pixels).size[::-1], v) for im in images]

    def _image_features(self, images: Sequence[Any]) -> np.ndarray:
        """All images' features, concatenated in prompt order: [total image tokens, hidden]."""
        v = self.manifest.vision
        if v.anyres:
            return np.concatenate(anyres.encode(images, v, self.backend.encode_images))
        features = self.backend.encode_images(np.stack([preprocess(im, v, self.max_image_pixels) for im in images]))
        return features.reshape(-1, features.shape[-1])

    # -- generation ---------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
            stop: Sequence[str] = ()) -> Iterator[TokenEvent]:
        """Generate for a batch; yields TokenEvents, returns list[GenerationResult] (StopIteration.value)."""
        max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
        if not requests:
            raise UsageError("no requests")
        sampling = sampling or SamplingConfig()
        stop = check_stop(stop)
        t = self.manifest.text
        encoded = [self.encode_request(r) for r in requests]
        lengths = [len(e) for e in encoded]
        longest = max(lengths)
        if longest + max_new_tokens > t.max_context:
            raise PromptTooLongError(
                f"prompt of {longest} tokens (image tokens included) plus max_new_tokens={max_new_tokens} "
                f"exceeds the model's context of {t.max_context}"
            )
        b = len(requests)
        timings = Timings()
        # decode (and fail) once, early
        images = [load_image(im, self.max_image_pixels) for r in requests for im in r.images]

        # prefix reuse (batch 1): skip the tokens, and the vision encoder, that an earlier prompt covered
        reuse = self.prefix_cache is not None and b == 1 and supports_prefix_reuse(self.backend)
        digests = tuple(image_digest(im) for im in images) if reuse else ()
        hit, start = self.prefix_cache.lookup(digests, encoded[0]) if reuse else (None, 0)

        # left-padded batch
        ids, mask = left_pad(encoded, t.pad_token_id)
        positions = np.maximum(mask.cumsum(-1) - 1, 0)
        new_ids = ids[:, start:]
        slots = new_ids == t.image_token_id

        flat = None
        if slots.any():  # all images of the batch in one call
            t0 = time.perf_counter()
            flat = self._image_features(images)
            timings.vision_ms = (time.perf_counter() - t0) * 1000

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
        finish: list[str | None] = [None] * b
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
                    finish[i] = "eos"
                    continue
                delta = detok[i].push(tok)
                # a stop string not seen before must end inside this delta: look at the tail only
                if stop and any(s in detok[i].text[-(len(delta) + len(s)):] for s in stop):
                    finish[i] = "stop"
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
            reason = finish[i] or "length"
            if reason == "stop":
                cut = min(text.find(s) for s in stop if s in text)
                text = text[:cut]
            results.append(GenerationResult(text.strip(), generated[i], reason, lengths[i], timings))
        return results


    def generate(self, image: Any, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 stop: Sequence[str] = (), history: Sequence[tuple[str, str]] = ()) -> GenerationResult:
        """One image (or None) and one question; history holds earlier (question, answer) turns."""
        req = Request([*history, (prompt, None)], [image] if image is not None else [])
        return drain(self.run([req], max_new_tokens, sampling, stop))[0]

    def generate_batch(self, images: Sequence[Any], prompts_: Sequence[str], max_new_tokens: int = 64,
                       sampling: SamplingConfig | None = None, stop: Sequence[str] = ()) -> list[GenerationResult]:
        if len(images) != len(prompts_):
            raise UsageError("generate_batch needs one image (or None) per prompt")
        reqs = [Request([(p, None)], [im] if im is not None else []) for im, p in zip(images, prompts_)]
        return drain(self.run(reqs, max_new_tokens, sampling, stop))

    def stream(self, image: Any, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
               stop: Sequence[str] = (), history: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        """Text deltas as they are generated."""
        req = Request([*history, (prompt, None)], [image] if image is not None else [])
        for event in self.run([req], max_new_tokens, sampling, stop):
            yield event.text
