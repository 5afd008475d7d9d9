"""One request's state inside the engine: prompt ids, images, generated ids, text, timings.

What a request asks for is one frozen ``GenerationParams`` (max tokens, sampling, stop strings, eos
handling, a grammar, logprobs), given when the sequence is made and never changed; the sequence keeps
the state that changes (sampler rng, grammar matcher, generated ids, detokenizer, slot) and ends with a
``FinishReason``. Why each sequence carries its own Sampler (and so its own seeded rng), repetition history, detokenizer
and stop strings: requests with different settings share one decode batch, and a seeded request must
draw the same numbers whether it runs alone or next to seven others.
"""

from __future__ import annotations

import enum
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from concurrent.futures import Future
from typing import Any, Sequence as Seq

import numpy as np
from tokenizers import Tokenizer

from .finish import FinishReason
from .inputs import check_count, check_stop
from .prune import OFF, PruneSetting
from .sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks for; frozen, handed to ``Engine.make_sequence`` and never changed.

    ``grammar`` is a compiled ``runtime.constrain.Grammar`` (shared, immutable): each sequence draws its
    own matcher from it. ``top_logprobs``: None = no logprobs computed; else alternatives per token (0..20).
    ``ignore_eos``: generate through eos tokens (benchmarks; the server's ``ignore_eos``). ``prune``: which
    image tokens reach the decoder (runtime/prune.py); the prompt's ids must be laid out with its kept
    counts (``Pipeline.encode_request``)."""

    max_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    grammar: Any = None
    top_logprobs: int | None = None
    prune: PruneSetting = OFF

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_tokens", check_count(self.max_tokens, "max_new_tokens"))
        object.__setattr__(self, "prune", PruneSetting.parse(self.prune))
        object.__setattr__(self, "stop", tuple(check_stop(self.stop)))
        if self.sampling is None:
            object.__setattr__(self, "sampling", SamplingConfig())


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILL = "prefill"  # has a slot, prompt not fully in the KV cache yet
    RUNNING = "running"  # decoding one token per step
    FINISHED = "finished"


@dataclass
class Timings:
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0  # decode steps after the first token

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
    finish_reason: FinishReason
    prompt_tokens: int
    timings: Timings

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": str(self.finish_reason),
                "prompt_tokens": self.prompt_tokens, "timings": self.timings.as_dict()}


class Detokenizer:
    """Incremental text for one sequence: emits only text that will not change with later tokens.

    Decodes a short window, not the whole answer, so a token costs O(window) instead of O(answer).
    The window is the tokens since the text emitted before last (``prefix``) up to now; the new text is
    what decoding the window adds to decoding its already-emitted head. Both decodes start at the same
    token, so a tokenizer that treats a sequence's first token specially does so in both and it cancels
    out. A window ending inside a UTF-8 character (U+FFFD) waits for the next token. This is the
    prefix/read-offset scheme of Hugging Face TGI and vLLM.
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


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted (what a ByteLevel decoder undoes)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_LEVEL = _byte_level_table()
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_DECODER_KIND: dict[int, tuple[Tokenizer, bool]] = {}  # id(Tokenizer) -> (Tokenizer, byte-level decoder?)


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (OpenAI's logprobs ``bytes``): byte-level BPE pieces mapped back to
    bytes, SentencePiece byte-fallback pieces (``<0xE2>``) as that byte and ``▁`` as a space, anything
    else (word-level pieces, special tokens) as the piece's UTF-8. A piece that is part of a character
    gives that part: joining the tokens' bytes gives the answer's bytes."""
    hit = _DECODER_KIND.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        dec = json.loads(tokenizer.to_str()).get("decoder") or {}
        kinds = [d.get("type") for d in dec.get("decoders", [dec]) if isinstance(d, dict)]
        hit = _DECODER_KIND[id(tokenizer)] = (tokenizer, "ByteLevel" in kinds)
    piece = tokenizer.id_to_token(int(token_id))
    if piece is None:
        return b""
    if hit[1] and all(ch in _BYTE_LEVEL for ch in piece):
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    m = _BYTE_FALLBACK.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


@dataclass
class TokenEvent:
    """What one step produced for one sequence. ``text`` is the newly visible text (may be "")."""

    seq_id: str
    token_id: int | None  # None for an event that only reports an end (cancelled, error)
    text: str
    finish_reason: FinishReason | None = None
    index: int = 0  # the caller's own index (Pipeline: position in the batch)
    logprobs: Any = None  # (logprob, [(id, logprob)...]) of token_id when the request asked (Sequence.logprobs)


_ids = itertools.count()


@dataclass
class PendingVision:
    """A sequence's admission while the vision encoder runs on its own thread."""

    future: Future  # -> the features of the images ``todo``, in that order
    feats: list[np.ndarray | None]  # per image of the prompt: features from the image cache, else None
    todo: list[int]  # indices of the images being encoded
    hit: Any  # the prefix-cache entry the prompt resumes from, or None


@dataclass(eq=False)  # identity: two requests with the same prompt are still two sequences
class Sequence:
    """A request as the engine sees it. ``ids`` are prompt ids with image tokens expanded; ``params`` is
    what the request asked for (frozen); everything else is state the engine advances."""

    ids: np.ndarray
    images: list[Any]  # PIL images, in prompt order
    tokenizer: Tokenizer
    params: GenerationParams = field(default_factory=GenerationParams)
    eos_ids: frozenset[int] = frozenset()  # the model's; empty when params.ignore_eos
    seq_id: str = ""
    index: int = 0

    def __post_init__(self) -> None:
        p = self.params
        self.seq_id = self.seq_id or f"seq-{next(_ids)}"
        if p.ignore_eos:
            self.eos_ids = frozenset()
        self.sampler = Sampler(p.sampling)
        # a runtime.constrain.Constraint (this sequence's matcher of params.grammar): the answer must match
        self.constraint: Any = p.grammar.matcher() if p.grammar is not None else None
        # one (logprob, [(id, logprob)...]) per generated token when params.top_logprobs is not None
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.seen = self.ids.copy() if p.sampling.repetition_penalty != 1.0 else None
        self.detok = Detokenizer(self.tokenizer)
        self.generated: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.exception: Exception | None = None
        self.slot: int | None = None
        self.computed = 0  # prompt tokens already in the KV cache
        self.prefill_start = 0  # first prompt token this sequence prefills itself (after a prefix hit)
        self.embeds: np.ndarray | None = None  # prompt embeddings from prefill_start on: set once ready
        self.vision: PendingVision | None = None  # while the vision encoder runs
        self.digests: tuple[str, ...] = ()  # per image: content digest + pruning tag (image and prefix caches)
        self.raw_digests: tuple[str, ...] = ()  # per image: content digest (the unpruned features' cache key)
        self.image_tokens: list[int] = []  # per image: tokens it takes in the prompt (after pruning)
        self.full_image_tokens: list[int] = []  # per image: its tokens before pruning
        self.kept: list[np.ndarray | None] = []  # per image: which of its tokens are kept, where known
        # per prompt token, its rotary position when pruned images keep their original positions
        # (prune.prompt_positions; -1 where a reused prefix covers an image); None: position = cache index
        self.positions: np.ndarray | None = None
        self.sent = 0  # characters of visible text already handed out in events
        self.timings = Timings()
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    # the request's own settings, read through params
    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def sampling(self) -> SamplingConfig:
        return self.params.sampling

    @property
    def stop(self) -> tuple[str, ...]:
        return self.params.stop

    @property
    def top_logprobs(self) -> int | None:
        return self.params.top_logprobs

    @property
    def prompt_len(self) -> int:
        return len(self.ids)

    @property
    def position_offset(self) -> int:
        """Position minus cache index after the prompt: the image tokens pruning dropped (0 renumbered)."""
        return 0 if self.positions is None else int(self.positions[-1]) + 1 - self.prompt_len

    @property
    def decode_position(self) -> int:
        """Position of the token the next decode step feeds (the last generated one)."""
        return self.prompt_len + len(self.generated) - 1 + self.position_offset

    @property
    def capacity(self) -> int:
        """KV positions this sequence can need: the prompt plus every generated token but the last."""
        return self.prompt_len + self.max_tokens

    def append(self, token_id: int) -> TokenEvent:
        """Record a sampled token; decide whether the sequence ends; return the event to hand out."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token_id)
        if self.seen is not None:
            self.seen = np.append(self.seen, token_id)
        stop = self.stop
        if token_id in self.eos_ids:
            self.finish(FinishReason.EOS)
        else:
            delta = self.detok.push(token_id)
            # a stop string not seen before must end inside this delta: look at the tail only
            tail = self.detok.text[-(len(delta) + max((len(s) for s in stop), default=0)):]
            if stop and delta and any(s in tail for s in stop):
                self.finish(FinishReason.STOP)
            elif len(self.generated) >= self.max_tokens:
                self.finish(FinishReason.LENGTH)
        visible = self.visible_text()
        text, self.sent = visible[self.sent :], max(self.sent, len(visible))
        return TokenEvent(self.seq_id, token_id, text, self.finish_reason, self.index)

    def visible_text(self) -> str:
        """The answer so far as a client may see it (the concatenation of the events' text): cut before
        the first stop string."""
        text = self.detok.text
        if self.finish_reason is FinishReason.STOP:
            return _cut(text, self.stop)
        return text

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = FinishReason(reason)
        self.status = Status.FINISHED
        self.finished_at = time.perf_counter()
        if self.first_token_at is not None:
            self.timings.decode_ms = (self.finished_at - self.first_token_at) * 1000
            self.timings.new_tokens = max(0, len(self.generated) - 1)

    def result(self) -> GenerationResult:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if self.finish_reason is FinishReason.STOP:
            text = _cut(text, self.stop)
        return GenerationResult(text.strip(), list(self.generated), self.finish_reason or FinishReason.LENGTH,
                                self.prompt_len, self.timings)


def _cut(text: str, stop: Seq[str]) -> str:
    """``text`` before the first stop string in it."""
    return text[: min(text.find(s) for s in stop if s in text)]
