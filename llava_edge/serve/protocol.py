"""The OpenAI chat-completions wire format: request validation, response bodies, error JSON.

Why strict parsing: a field of the wrong type ("max_tokens": "ten") must be a 400 that names the
field, never a coercion that guesses, and never a 500. Unknown fields are ignored (clients send
vendor extras such as ``user``), as vLLM and llama-server do; ``logit_bias`` is ignored too (accepted,
no effect). What this server cannot do and a client relies on is refused with a 400 naming the field
instead of being ignored: ``tools``/``tool_choice``/``functions``/``function_call`` (no tool calling),
``n`` > 1.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.finish import FinishReason


class ApiError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Strict):
    url: str
    detail: Optional[str] = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class ResponseFormat(_Strict):
    """``json_object``: any JSON object; ``json_schema``: JSON that validates (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class ChatRequest(_Strict):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)  # extension (llama-server, vLLM)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)  # extension
    seed: Optional[int] = None
    ignore_eos: bool = False  # extension (vLLM): generate max_tokens tokens, for benchmarks
    prune: Optional[str] = None  # extension: METHOD:RATIO or off (runtime/prune.py); default: the server's --prune
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None  # the log-probability of each answer token (runtime/sampling.token_logprobs)
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # and this many alternatives each
    # declared only to be refused (check_supported): a client that sends tools expects tool calls
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[Any]] = None
    function_call: Union[str, dict[str, Any], None] = None


def check_supported(chat: ChatRequest) -> None:
    """400 naming the field for what a client relies on and this server does not do (tool calling), and
    for top_logprobs without logprobs=true (as OpenAI answers)."""
    for name in ("tools", "functions"):
        if getattr(chat, name):
            raise ApiError(400, f"{name} are not supported by this server (no tool or function calling)",
                           "unsupported_parameter", name)
    for name in ("tool_choice", "function_call"):
        value = getattr(chat, name)
        if value is not None and value != "none":
            raise ApiError(400, f"{name} is not supported by this server (no tool or function calling); "
                           "only 'none' is accepted", "unsupported_parameter", name)
    if chat.top_logprobs is not None and not chat.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", "invalid_value", "top_logprobs")


def parse_chat_request(body: bytes) -> ChatRequest:
    try:
        chat = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("function-after",))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {msg}", "invalid_json") from None
        raise ApiError(400, f"invalid field '{loc}': {msg}" if loc else msg, "invalid_value", loc or None) from None
    check_supported(chat)
    return chat


def api_key_error() -> ApiError:
    """The 401 of a missing or wrong key (the server and the Ray router say the same)."""
    return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
          FinishReason.CANCELLED: "stop", FinishReason.ERROR: "stop"}  # ours -> OpenAI's


def logprob_entry(tokenizer: Any, token_id: int, logprob: float, alts: list[tuple[int, float]]) -> dict[str, Any]:
    """One token of OpenAI's ``logprobs.content``: token text, logprob, UTF-8 bytes, top alternatives.
    The text of a token that is part of a UTF-8 character has U+FFFD; its ``bytes`` are exact."""
    from ..runtime.sequence import token_bytes

    def one(i: int, lp: float) -> dict[str, Any]:
        b = token_bytes(tokenizer, i)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {**one(token_id, logprob), "top_logprobs": [one(i, lp) for i, lp in alts]}


def logprobs_body(tokenizer: Any, token_ids: list[int], logprobs: list[tuple[float, list[tuple[int, float]]]]
                  ) -> dict[str, Any]:
    """A choice's ``logprobs``: one entry per token id (a stream's chunk: that chunk's tokens)."""
    return {"content": [logprob_entry(tokenizer, t, lp, alts) for t, (lp, alts) in zip(token_ids, logprobs)],
            "refusal": None}


def completion_body(cid: str, model: str, text: str, finish: str, token_ids: list[int], prompt_tokens: int,
                    logprobs: dict[str, Any] | None = None, image_tokens: int | None = None) -> dict[str, Any]:
    """A chat.completion; ``token_ids`` is our extension field on the choice (the generated ids)."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH.get(finish, "stop"), "logprobs": logprobs, "token_ids": token_ids}],
            "usage": usage(prompt_tokens, len(token_ids), image_tokens)}


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None,
               token_ids: list[int] | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs,
                              "finish_reason": FINISH.get(finish, "stop") if finish else None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int, image_tokens: int | None = None) -> dict[str, int]:
    """OpenAI's usage; ``image_tokens`` (our extension): the image tokens the decoder read, after pruning
    (they are part of ``prompt_tokens``)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if image_tokens is not None:
        out["image_tokens"] = image_tokens
    return out
