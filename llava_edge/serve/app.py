"""The FastAPI app: OpenAI chat completions (streaming or not), models, health, Prometheus metrics.

Every request is validated, its images decoded and its prompt tokenized on a worker thread before it
reaches the engine, so anything wrong with it is a 4xx with OpenAI's error JSON and never touches the
running batch. The model loads in the background after the socket is open: ``/health`` (and every
``/v1`` route) answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UsageError
from ..runtime.engine import PromptTooLongError
from ..runtime.pipeline import Pipeline
from ..runtime.pipeline import Request as ChatTurns
from ..runtime.prune import PruneError, PruneSetting
from ..runtime.sampling import SamplingConfig
from ..runtime.sequence import FinishReason, GenerationParams, Sequence
from .media import load_image_url
from .metrics import CONTENT_TYPE, Metrics
from .guard import Guard, GuardMiddleware, bearer_ok
from .protocol import (ApiError, ChatRequest, api_key_error, chunk_body, completion_body, completion_id,
                       logprobs_body, parse_chat_request, usage)
from .settings import ServeConfig
from .worker import EngineWorker

log = logging.getLogger("llava_edge.serve")
CHAT_PATH = "/v1/chat/completions"
DEBUG_ENV = "LLAVA_EDGE_SERVE_DEBUG"


def resolve_backend(package: Path, name: str) -> str:
    """``auto``: see runtime/backends.resolve_auto."""
    if name != "auto":
        return name
    from ..package import load_manifest
    from ..runtime.backends import resolve_auto

    return resolve_auto(package, load_manifest(package))


class ServerState:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.pipe: Pipeline | None = None
        self.worker: EngineWorker | None = None
        self.backend = ""
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.worker.engine if self.worker else None)

    def load(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.config
        try:
            self.backend = resolve_backend(c.package, c.backend)
            pipe = Pipeline.from_package(c.package, backend=self.backend, threads=c.threads,
                                         max_image_pixels=c.max_image_pixels)
            engine = pipe.make_engine(max_slots=c.max_slots, prefill_chunk=c.prefill_chunk,
                                      image_cache_mb=c.image_cache_mb, prefill_budget=c.prefill_budget)
            worker = EngineWorker(engine, loop)
            worker.start()
            c.limits.vision = pipe.manifest.vision  # media.py checks elongation by the runtime's own rule
            self.pipe, self.worker = pipe, worker
            log.info("model %s ready (backend %s, %d slot(s))", c.model_name, self.backend, engine.runner.slots)
        except Exception as e:  # noqa: BLE001 - reported by /health
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.load_error)

    def require_ready(self) -> None:
        if self.worker is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ApiError(503, msg, "model_not_ready")

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:  # an empty key never gets here: settings.check_api_key refuses it at start
            return
        if not bearer_ok(request.headers.get("authorization", ""), key):
            raise api_key_error()

    def check_queue(self) -> None:
        size = self.config.queue_size
        if self.worker.engine.queued >= size:
            raise ApiError(429, f"the request queue is full ({size} waiting); retry later", "queue_full")

    def health(self) -> tuple[int, dict[str, Any]]:
        """HTTP status and body of ``/health``; a Ray Serve replica's health check asks the same."""
        if self.worker is None:
            status = "error" if self.load_error else "loading"
            return 503, {"status": status, "error": self.load_error}
        if not self.worker.alive:
            return 503, {"status": "error", "error": "the engine thread has stopped"}
        engine = self.worker.engine
        return 200, {"status": "ok", "model": self.config.model_name, "backend": self.backend,
                     "slots": engine.runner.slots, "slots_in_use": engine.scheduler.slots_in_use,
                     "queued": engine.queued}

    # -- request -> sequence (runs on a thread: image decoding, tokenizing) --------------------------
    def build_sequence(self, chat: ChatRequest) -> Sequence:
        pipe, engine, c = self.pipe, self.worker.engine, self.config
        turns, images = self._turns(chat)
        try:  # the request's own, else the server's (checked at start)
            prune = PruneSetting.parse(chat.prune if chat.prune is not None else c.prune)
        except PruneError as e:
            raise ApiError(400, str(e), "invalid_value", "prune") from None
        try:
            ids = pipe.encode_request(ChatTurns(turns, images), prune)
        except UsageError as e:
            raise ApiError(400, str(e), "invalid_prompt") from None
        context = engine.context  # the model's, capped by the slots' length (the engine's own check)
        requested = chat.max_completion_tokens or chat.max_tokens
        if requested is not None and requested > c.max_tokens:
            raise ApiError(400, f"max_tokens={requested} is over the server's limit of {c.max_tokens}",
                           "invalid_value", "max_tokens")
        max_tokens = requested or max(1, min(c.max_tokens, context - len(ids)))
        stop = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop strings", "invalid_value", "stop")
        grammar = None
        if chat.response_format is not None and chat.response_format.type != "text":
            grammar = self._grammar(chat.response_format)
        try:
            sampling = SamplingConfig(temperature=1.0 if chat.temperature is None else chat.temperature,
                                      top_p=1.0 if chat.top_p is None else chat.top_p, top_k=chat.top_k or 0,
                                      repetition_penalty=chat.repetition_penalty or 1.0, seed=chat.seed)
            params = GenerationParams(max_tokens, sampling, tuple(stop), ignore_eos=bool(chat.ignore_eos),
                                      grammar=grammar, top_logprobs=(chat.top_logprobs or 0) if chat.logprobs else None,
                                      prune=prune)
            return engine.make_sequence(ids, images, params)  # the runtime's one context check
        except PromptTooLongError:  # its answer in API words
            raise ApiError(400, f"the prompt has {len(ids)} tokens (image tokens included); with max_tokens="
                           f"{max_tokens} it does not fit the model's context of {context}",
                           "context_length_exceeded", "messages") from None
        except UsageError as e:
            raise ApiError(400, str(e), "invalid_value") from None

    def _grammar(self, fmt: Any) -> Any:
        """The compiled grammar of a response_format (cached by schema text); a bad schema is a 400."""
        from ..runtime.constrain import ConstraintError, cached_grammar

        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a 'json_schema' object with a 'schema'",
                           "invalid_value", "response_format")
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        try:
            return cached_grammar(self.pipe.tokenizer, frozenset(self.pipe.manifest.text.eos_token_ids), schema)
        except ConstraintError as e:
            raise ApiError(400, str(e), "unsupported_schema", "response_format") from None

    def _turns(self, chat: ChatRequest) -> tuple[list[tuple[str, str | None]], list[Any]]:
        image_token = self.pipe.manifest.text.image_token
        parts_count = sum(1 for m in chat.messages if isinstance(m.content, list)
                          for p in m.content if p.type == "image_url")
        if parts_count > self.config.max_images_per_request:
            raise ApiError(400, f"{parts_count} images in one request; the server's limit is "
                           f"{self.config.max_images_per_request}", "too_many_images", "messages")
        system: list[str] = []
        turns: list[tuple[str, str | None]] = []
        user: str | None = None
        images: list[Any] = []
        budget = self.config.limits.new_budget()  # decoded image bytes, summed over this request's images
        for i, m in enumerate(chat.messages):
            if isinstance(m.content, list):
                pieces = []
                for p in m.content:
                    if p.type == "text":
                        if p.text is None:
                            raise ApiError(400, "a text part needs 'text'", "invalid_value", f"messages.{i}.content")
                        pieces.append(p.text)
                    else:
                        if p.image_url is None:
                            raise ApiError(400, "an image_url part needs 'image_url'", "invalid_value",
                                           f"messages.{i}.content")
                        if m.role != "user":
                            raise ApiError(400, "images are accepted in user messages only", "invalid_value",
                                           f"messages.{i}.content")
                        images.append(load_image_url(p.image_url.url, self.config.limits, budget))
                        pieces.append(image_token + "\n")
                text = "".join(pieces)
            else:
                text = m.content or ""
            if m.role in ("system", "developer"):
                system.append(text)
            elif m.role == "user":
                user = text if user is None else user + "\n" + text
            else:
                if user is None:
                    raise ApiError(400, "an assistant message must follow a user message", "invalid_value",
                                   f"messages.{i}")
                turns.append((user, text))
                user = None
        if user is None:
            raise ApiError(400, "the last message must be the user's", "invalid_value", "messages")
        turns.append((user, None))
        if system:
            first, answer = turns[0]
            turns[0] = ("\n".join(system) + "\n" + first, answer)
        return turns, images


def create_app(config: ServeConfig, state: ServerState | None = None) -> FastAPI:
    """The app over ``state``, or over a new one whose model loads once the app starts. A Ray Serve
    replica passes a state it has already loaded, so the replica is not ready before its model."""
    state = state or ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.worker is None and state.load_error is None:
            loop = asyncio.get_running_loop()
            threading.Thread(target=state.load, args=(loop,), name="llava-edge-load", daemon=True).start()
        yield
        if state.worker is not None:
            state.worker.stop()

    # redirect_slashes off: a redirect would be built from the client's Host header
    app = FastAPI(title="llava-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.serve = state
    app.add_middleware(GuardMiddleware, guard=Guard(config.host.lower(), config.allowed_hosts,
                                                    tuple(o.rstrip("/") for o in config.allow_origins)))
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
    app.include_router(router)
    if os.environ.get(DEBUG_ENV) == "1":
        app.include_router(debug_router)
    if config.ui:
        from .ui import mount_ui

        mount_ui(app, suggest=config.suggest)
    return app


# -- errors: OpenAI's JSON, counted for the chat route --------------------------------------------------
def _error_response(request: Request, e: ApiError) -> JSONResponse:
    if request.url.path == CHAT_PATH:
        _state(request).metrics.requests.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error_response(request, e)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return _error_response(request, ApiError(e.status_code, str(e.detail), code))


async def _internal(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return _error_response(request, ApiError(500, f"internal error: {type(e).__name__}", "internal_error"))


# -- routes -----------------------------------------------------------------------------------------
router = APIRouter()
debug_router = APIRouter()  # test hooks, mounted only with LLAVA_EDGE_SERVE_DEBUG=1


def _state(request: Request) -> ServerState:
    return request.app.state.serve


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    code, body = _state(request).health()
    return JSONResponse(body, status_code=code)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    state = _state(request)
    state.authorize(request)
    state.require_ready()
    return JSONResponse({"object": "list", "data": [{"id": state.config.model_name, "object": "model",
                                                     "created": int(time.time()), "owned_by": "llava-edge"}]})


@router.post(CHAT_PATH)
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    config = state.config
    state.authorize(request)
    state.require_ready()
    body = await read_body(request, config)
    if body is None:  # the client left mid-upload: nobody to answer
        return Response(status_code=499)
    chat = await asyncio.to_thread(parse_request_body, body, config.max_prompt_bytes)
    state.check_queue()
    seq = await asyncio.to_thread(state.build_sequence, chat)
    state.check_queue()  # again: others may have queued while this one was prepared
    state.metrics.prompt_tokens.inc(seq.prompt_len)
    state.metrics.requests.labels("200").inc()
    reader = ResponseReader(state, seq)
    cid = completion_id()
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return StreamingResponse(_stream(reader, cid, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(reader, request, cid)


@debug_router.post("/debug/pause")
async def pause(request: Request) -> JSONResponse:
    _ready_worker(request).pause()
    return JSONResponse({"paused": True})


@debug_router.post("/debug/resume")
async def resume(request: Request) -> JSONResponse:
    _ready_worker(request).resume()
    return JSONResponse({"paused": False})


@debug_router.post("/debug/step")
async def step(request: Request, n: int = 1) -> JSONResponse:
    _ready_worker(request).allow_steps(n)
    return JSONResponse({"steps": n})


def _ready_worker(request: Request) -> EngineWorker:
    state = _state(request)
    state.require_ready()
    return state.worker


def body_limit(config: ServeConfig) -> int:
    """Base64 images plus the prompt text plus JSON: anything larger is refused before it is held."""
    return config.max_images_per_request * (config.max_image_bytes * 4 // 3 + 1024) + config.max_prompt_bytes + 2**16


async def read_body(request: Request, config: ServeConfig) -> bytes | None:
    """The chat route's body: within ``body_limit`` and ``body_timeout``; None when the client went away."""
    return await read_limited(request, body_limit(config), config.body_timeout)


async def read_limited(request: Request, limit: int, timeout: float | None = None) -> bytes | None:
    """A request body of at most ``limit`` bytes (the declared Content-Length is checked before a byte is
    read, then the bytes as they stream in), within ``timeout`` seconds for the whole body (None: no
    deadline); None when the client went away. Raises ApiError 400/413/408. The Ray router reads with it too.

    Why a deadline for the whole body and not per read: a client trickling a byte a second never
    trips a per-read timeout, and it holds a connection and a buffer for as long as it likes."""
    from starlette.requests import ClientDisconnect

    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "Content-Length is not a number", "invalid_request") from None
    if declared > limit:
        raise ApiError(413, f"request body over {limit} bytes", "request_too_large")
    if declared == 0 and "transfer-encoding" not in request.headers:
        return b""
    body = bytearray()

    async def collect() -> None:
        async for part in request.stream():
            body.extend(part)
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes", "request_too_large")

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body took over {timeout:g} s to arrive", "request_timeout") from None
    except ClientDisconnect:
        log.info("a client left while sending its request (%d bytes received)", len(body))
        return None
    return bytes(body)


_DATA_URL = re.compile(rb'"\s*data:[^"]*"', re.IGNORECASE)


def parse_request_body(body: bytes, max_prompt_bytes: int) -> ChatRequest:
    """Parse a chat request, refusing an oversized prompt before parsing (run on a thread).

    Why before: parsing and tokenizing a 50 MB prompt holds the process for a minute and gigabytes,
    and the body limit alone must admit several images. The bytes outside ``data:`` URLs bound the
    text from above (JSON escapes only make it longer), so that is checked first; the exact UTF-8
    length of the messages' text is checked after parsing."""
    outside = len(body) - sum(m.end() - m.start() for m in _DATA_URL.finditer(body))
    if outside > max_prompt_bytes + 2**16:
        raise ApiError(413, f"the prompt text is over the server's limit of {max_prompt_bytes} bytes "
                       "(--max-prompt-bytes)", "prompt_too_large", "messages")
    chat = parse_chat_request(body)
    text = 0
    for m in chat.messages:
        if isinstance(m.content, str):
            text += len(m.content.encode("utf-8", "surrogatepass"))
        elif m.content:
            text += sum(len((p.text or "").encode("utf-8", "surrogatepass")) for p in m.content)
    if text > max_prompt_bytes:
        raise ApiError(413, f"the prompt text is {text} bytes, over the server's limit of {max_prompt_bytes} "
                       "bytes (--max-prompt-bytes)", "prompt_too_large", "messages")
    return chat


class _Clock:
    """Time to first token and per-token intervals of one request, into the histograms."""

    def __init__(self, state: ServerState, seq: Sequence):
        self.metrics, self.seq, self.last = state.metrics, seq, None

    def see(self, ev: Any) -> None:
        if ev.token_id is None:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.seq.arrival)
        else:
            self.metrics.tpot.observe(now - self.last)
        self.last = now
        self.metrics.completion_tokens.inc()


class ResponseReader:
    """The events of one submitted sequence, as llama.cpp's server_response_reader: leaving its ``async
    with`` block before the last event (the client went away, the server stops, an exception) cancels the
    sequence, so its slot is free for the next engine step. The sequence is submitted on entering."""

    def __init__(self, state: ServerState, seq: Sequence):
        self.state, self.seq, self.done = state, seq, False
        self.clock = _Clock(state, seq)
        self.queue: asyncio.Queue | None = None

    async def __aenter__(self) -> "ResponseReader":
        self.queue = self.state.worker.submit(self.seq)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if not self.done:
            self.state.worker.cancel(self.seq.seq_id)
            self.state.metrics.cancelled.inc()

    async def next(self, timeout: float | None = None) -> Any:
        """The next event, or None when ``timeout`` passes first."""
        try:
            ev = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        self.clock.see(ev)
        self.done = ev.finish_reason is not None
        return ev

    @property
    def buffered(self) -> bool:
        return not self.queue.empty()


async def _complete(reader: ResponseReader, request: Request, cid: str) -> Response:
    state, seq = reader.state, reader.seq
    async with reader:
        checked = time.monotonic()
        while not reader.done:
            await reader.next(timeout=0.25)
            if not reader.done and time.monotonic() - checked >= 0.25:  # also while tokens keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    return Response(status_code=499)
    if seq.finish_reason == FinishReason.ERROR:
        raise ApiError(500, f"generation failed: {seq.error}", "generation_error")
    r = seq.result()
    logprobs = None
    if seq.top_logprobs is not None:
        logprobs = logprobs_body(state.pipe.tokenizer, r.token_ids, seq.logprobs)
    # the text the stream would have sent, delta for delta (not re-decoded from all ids and stripped)
    return JSONResponse(completion_body(cid, state.config.model_name, seq.visible_text(), r.finish_reason, r.token_ids,
                                        r.prompt_tokens, logprobs, sum(seq.image_tokens)))


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(reader: ResponseReader, cid: str, include_usage: bool) -> AsyncIterator[bytes]:
    state, seq = reader.state, reader.seq
    model, created = state.config.model_name, int(time.time())
    async with reader:
        yield _sse(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
        while not reader.done:
            ev = await reader.next()
            if ev.finish_reason == FinishReason.ERROR:
                yield _sse({"error": ApiError(500, f"generation failed: {seq.error}",
                                              "generation_error").body()["error"]})
                break
            if ev.token_id is not None:
                delta = {"content": ev.text} if ev.text else {}
                lp = None if ev.logprobs is None else logprobs_body(state.pipe.tokenizer, [ev.token_id],
                                                                     [ev.logprobs])
                yield _sse(chunk_body(cid, model, created, delta, ev.finish_reason, [ev.token_id], lp))
            if not reader.done and reader.buffered:
                await asyncio.sleep(0)  # let the loop see a disconnect between buffered chunks
        if include_usage:
            body = chunk_body(cid, model, created, {})
            body["choices"] = []
            body["usage"] = usage(seq.prompt_len, len(seq.generated), sum(seq.image_tokens))
            yield _sse(body)
        yield b"data: [DONE]\n\n"
