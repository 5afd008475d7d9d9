"""logprobs/top_logprobs in OpenAI's shape through a real server and the real `openai` client, and the
request fields this server refuses rather than ignores (tool calling)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from .conftest import API_KEY

MESSAGES = [{"role": "user", "content": "What is in the picture?"}]


def _ids(choice) -> list[int]:
    return (choice.model_extra or {}).get("token_ids") or []


def test_logprobs_match_the_greedy_answer_streamed_or_not(client):
    kw = dict(model="tiny-llava", messages=MESSAGES, temperature=0, max_tokens=24)
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None  # not asked, not computed
    r = client.chat.completions.create(logprobs=True, top_logprobs=5, **kw)
    c = r.choices[0]
    assert _ids(c) == _ids(plain.choices[0])  # asking changes no token
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens == len(_ids(c)) > 1
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and all(math.isfinite(v) and v <= 0 for v in [e.logprob, *tops])
        assert tops == sorted(tops, reverse=True)
        assert e.logprob == tops[0] and e.token == e.top_logprobs[0].token  # greedy: the most likely token
        assert sum(math.exp(v) for v in tops) <= 1 + 1e-9
        assert bytes(e.bytes).decode() == e.token
    # the tokens reported spell the answer (byte-level BPE: each token's bytes, joined, are the text), then
    # the end-of-sequence token that stopped it (reported, as it was sampled; not part of the text)
    assert c.finish_reason == "stop" and content[-1].token == "</s>"
    assert b"".join(bytes(e.bytes) for e in content[:-1]).decode() == c.message.content

    streamed = []
    for chunk in client.chat.completions.create(stream=True, logprobs=True, top_logprobs=5, **kw):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            assert len(chunk.choices[0].logprobs.content) == len(_ids(chunk.choices[0])) == 1
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    for s, e in zip(streamed, content):
        assert abs(s.logprob - e.logprob) <= 1e-5
        assert [t.token for t in s.top_logprobs] == [t.token for t in e.top_logprobs]
        assert all(abs(a.logprob - b.logprob) <= 1e-5 for a, b in zip(s.top_logprobs, e.top_logprobs))


def test_logprobs_without_alternatives_and_when_sampling(client):
    r = client.chat.completions.create(model="tiny-llava", messages=MESSAGES, max_tokens=8, logprobs=True,
                                       temperature=1.5, seed=7)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(e.top_logprobs == [] and math.isfinite(e.logprob) and e.logprob <= 0 for e in content)


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, **body},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("body, param", [
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"tools": [TOOL]}, "tools"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"n": 2}, "n"),
])
def test_unsupported_fields_are_a_400_naming_them(server, body, param):
    r = _post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    if param in ("tools", "functions"):
        assert "not supported" in err["message"]


def test_harmless_fields_are_accepted(server, client):
    for body in [{"tools": [], "tool_choice": "none"}, {"tools": None, "function_call": "none"},
                 {"logit_bias": {"5": 10}}, {"logprobs": False}]:
        r = _post(server, body)
        assert r.status_code == 200, (body, r.text)
        assert r.json()["choices"][0]["logprobs"] is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llava", messages=MESSAGES, tools=[TOOL])
    assert e.value.param == "tools"
