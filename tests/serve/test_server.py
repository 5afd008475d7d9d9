"""The server end to end: a real `llava-edge serve` process on 127.0.0.1, the real `openai` client.

Token ids are compared through our extension field ``token_ids`` on each choice (non-streaming: the
whole answer; streaming: the ids of each chunk), which the openai client keeps in ``model_extra``.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from llava_edge.runtime.pipeline import Pipeline

from .conftest import API_KEY, Server


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: Image.Image) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _images() -> list[Image.Image]:
    from llava_edge.demo import _scene

    rng = np.random.default_rng(3)
    out = [_scene(), _scene(64)]
    for h, w in ((40, 50), (97, 41), (33, 120), (64, 64), (20, 90), (50, 51)):
        out.append(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    return out


PROMPTS = ["What is in the picture?", "What colour is the circle?", "Describe it.", "How many shapes are there?",
           "Where is the red circle?", "What is on the left?", "Is there a square?", "What colour is the square?"]


def _ask(client, messages, max_tokens, stream, ignore_eos=False):
    extra = {"ignore_eos": True} if ignore_eos else None
    if not stream:
        r = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=max_tokens,
                                           temperature=0, extra_body=extra)
        c = r.choices[0]
        return c.model_extra["token_ids"], c.message.content, c.finish_reason, r.usage.completion_tokens
    ids, text, finish, usage = [], "", None, None
    for chunk in client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, extra_body=extra,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        ids += (c.model_extra or {}).get("token_ids") or []
        text += c.delta.content or ""
        finish = c.finish_reason or finish
    return ids, text.strip(), finish, usage


def test_eight_concurrent_greedy_requests_equal_generate_alone(server, client, served_package):
    images = _images()
    # prompt, image, n, stream, no-eos
    jobs = [(PROMPTS[i], images[i], 4 + 5 * i, i % 2 == 1, i >= 4) for i in range(8)]
    before = server.metrics()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: _ask(client, user(j[0], j[1]), j[2], j[3], j[4]), jobs))
    after = server.metrics()
    ref = Pipeline.from_package(served_package, backend="ort-fast", prefix_cache=0)
    ref_no_eos = Pipeline.from_package(served_package, backend="ort-fast", prefix_cache=0)
    ref_no_eos.manifest.text.eos_token_ids = []
    for (prompt, img, n, stream, no_eos), (ids, text, finish, usage) in zip(jobs, got):
        alone = (ref_no_eos if no_eos else ref).generate(img, prompt, max_new_tokens=n)
        assert ids == alone.token_ids, (prompt, stream)
        assert text == alone.text
        assert usage == len(alone.token_ids)
        assert finish == ("length" if alone.finish_reason == "length" else "stop")
    generated = after["llava_edge_engine_tokens_total"] - before["llava_edge_engine_tokens_total"]
    steps = after["llava_edge_engine_steps_total"] - before["llava_edge_engine_steps_total"]
    assert generated == sum(len(g[0]) for g in got)
    assert steps < generated  # several sequences advanced in the same step: batching really happened
    ok = 'llava_edge_requests_total{status="200"}'
    assert after[ok] - before.get(ok, 0) == 8
    assert after["llava_edge_time_to_first_token_seconds_count"] - before.get(
        "llava_edge_time_to_first_token_seconds_count", 0) == 8
    assert after["llava_edge_slots_in_use"] == 0 and after["llava_edge_queue_length"] == 0


def test_stream_is_sse_ending_in_done(server):
    body = {"model": "m", "stream": True, "temperature": 0, "max_tokens": 5,
            "messages": user("Describe it.", _images()[0])}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-llava"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={"messages": []})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def _big_png(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (10, 200, 30))  # compresses to a few KB: passes the byte limit


def _bad_requests(server) -> list[tuple[str, object, int, str]]:
    img = _images()[0]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    (server.media / "ok.png").write_bytes(base64.b64decode(data_url(img).split(",", 1)[1]))
    part = lambda url: {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},  # noqa: E731
                                                    {"type": "text", "text": "what?"}]}
    return [
        ("broken base64", {"messages": [part("data:image/png;base64,@@@not-base64@@@")]}, 400, "invalid_base64"),
        ("undecodable image", {"messages": [part("data:image/png;base64," + base64.b64encode(b"x" * 500).decode())]},
         400, "invalid_image"),
        ("truncated png", {"messages": [part("data:image/png;base64," + base64.b64encode(
            base64.b64decode(data_url(img).split(",", 1)[1])[:300]).decode())]}, 400, "invalid_image"),
        ("too many bytes", {"messages": [part(data_url(noise))]}, 413, "image_too_large"),
        ("too many pixels", {"messages": [part(data_url(_big_png(2000, 1000)))]}, 413, "image_too_large"),
        ("too many images", {"messages": [{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": data_url(img)}}] * 3, {"type": "text", "text": "x"}]}]},
         400, "too_many_images"),
        ("prompt too long", {"messages": [{"role": "user", "content": "circle square " * 400}]}, 400,
         "context_length_exceeded"),
        ("max_tokens too large for the context", {"max_tokens": 200, "messages": [
            {"role": "user", "content": "circle square " * 60}]}, 400, "context_length_exceeded"),
        ("max_tokens over the server limit", {"max_tokens": 201, "messages": user("hi")}, 400, "invalid_value"),
        ("max_tokens wrong type", {"max_tokens": "ten", "messages": user("hi")}, 400, "invalid_value"),
        ("temperature wrong type", {"temperature": "hot", "messages": user("hi")}, 400, "invalid_value"),
        ("temperature out of range", {"temperature": -1, "messages": user("hi")}, 400, "invalid_value"),
        ("stream wrong type", {"stream": "yes", "messages": user("hi")}, 400, "invalid_value"),
        ("messages not a list", {"messages": "hi"}, 400, "invalid_value"),
        ("no messages", {"messages": []}, 400, "invalid_value"),
        ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value"),
        ("last message from the assistant", {"messages": [{"role": "assistant", "content": "hi"}]}, 400,
         "invalid_value"),
        ("n > 1", {"n": 2, "messages": user("hi")}, 400, "invalid_value"),
        ("http url", {"messages": [part("https://example.com/cat.jpg")]}, 400, "unsupported_image_url"),
        ("path outside the media dir", {"messages": [part("../../etc/passwd")]}, 400, "invalid_image_url"),
        ("missing media file", {"messages": [part("nope.png")]}, 400, "invalid_image_url"),
        ("image token typed in the text", {"messages": [{"role": "user", "content": "<image> what?"}]}, 400,
         "invalid_prompt"),
        ("not json", b"{not json", 400, "invalid_json"),
        ("body larger than any allowed request", b"x" * (2 * (200_000 * 4 // 3 + 1024) + 2**20 + 1), 413,
         "request_too_large"),
    ]


def test_every_bad_request_is_a_4xx_and_the_server_keeps_serving(server, client):
    before = server.metrics()
    bad = _bad_requests(server)
    for name, body, status, code in bad:
        kw = {"content": body} if isinstance(body, bytes) else {"json": {"model": "m", **body}}
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw,
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"], name
        ids, text, finish, _ = _ask(client, user("What is in the picture?", _images()[0]), 4, stream=False)
        assert ids and finish in ("stop", "length"), name
    after = server.metrics()
    n4xx = sum(after.get(f'llava_edge_requests_total{{status="{s}"}}', 0)
               - before.get(f'llava_edge_requests_total{{status="{s}"}}', 0) for s in ("400", "413"))
    assert n4xx == len(bad)
    # a file under --media-dir is accepted, and a 404 is OpenAI-shaped too
    ok = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                    json={"max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "ok.png"}}, {"type": "text", "text": "what?"}]}]})
    assert ok.status_code == 200, ok.text
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_one_token_round_trip_is_fast(server, client):
    """Not a speed goal (those live in the benchmark): the median over 20 tiny requests is printed and
    bounded loosely, so a server that sleeps or polls per request would fail."""
    msgs = [{"role": "user", "content": "hi"}]
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        client.chat.completions.create(model="m", messages=msgs, max_tokens=1, temperature=0)
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.25


# ---------------------------------------------------------------------------------------- small server
@pytest.fixture(scope="module")
def small(served_package, tmp_path_factory):
    """One slot, a queue of one, and the debug routes that hold the engine still (staged states)."""
    srv = Server(served_package, "--max-slots", "1", "--queue-size", "1", debug=True,
                 log=tmp_path_factory.mktemp("log") / "small.log")
    yield srv
    srv.close()


def _wait(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_full_queue_answers_429(small):
    from openai import OpenAI, RateLimitError

    c = OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0, timeout=60)
    httpx.post(small.url + "/debug/pause")
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_ask, c, user("Describe it."), 5, False)  # takes the slot once the engine moves
            _wait(lambda: httpx.get(small.url + "/health").json()["queued"] == 1, "the first request to queue")
            with pytest.raises(RateLimitError) as e:
                c.chat.completions.create(model="m", messages=user("hi"), max_tokens=2)
            assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
            httpx.post(small.url + "/debug/resume")
            ids, _, _, _ = first.result(timeout=60)
        assert ids
        assert small.metrics()['llava_edge_requests_total{status="429"}'] == 1
    finally:
        httpx.post(small.url + "/debug/resume")


def test_cancelled_stream_frees_its_slot(small):
    httpx.post(small.url + "/debug/pause")
    try:
        before = small.metrics()
        body = {"model": "m", "stream": True, "temperature": 0, "max_tokens": 150, "ignore_eos": True,
                "messages": user("Describe it.", _images()[1])}
        with httpx.stream("POST", small.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # role chunk
            httpx.post(small.url + "/debug/step", params={"n": 3})  # admit + prefill + decode: 2 tokens
            got = 0
            for ln in lines:
                if ln.startswith("data: ") and "token_ids" in ln:
                    got += 1
                    if got == 2:
                        break
            assert small.metrics()["llava_edge_slots_in_use"] == 1
        # the client is gone; each allowed step lets the engine see the cancel (it is still paused)

        def freed() -> bool:
            httpx.post(small.url + "/debug/step", params={"n": 1})
            return small.metrics()["llava_edge_slots_in_use"] == 0

        _wait(freed, "the cancelled stream's slot to be freed")
        after = small.metrics()
        assert after["llava_edge_cancelled_requests_total"] - before["llava_edge_cancelled_requests_total"] == 1
        assert after["llava_edge_engine_tokens_total"] - before["llava_edge_engine_tokens_total"] < 150
        assert after["llava_edge_running_sequences"] == 0
    finally:
        httpx.post(small.url + "/debug/resume")
    from openai import OpenAI

    ids, _, _, _ = _ask(OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0), user("hi"), 3, True)
    assert ids


def test_debug_routes_are_off_by_default(server):
    assert httpx.post(server.url + "/debug/pause").status_code == 404


def test_disconnected_non_streaming_request_is_cancelled(small):
    import threading

    httpx.post(small.url + "/debug/pause")
    try:
        before = small.metrics()
        body = {"model": "m", "temperature": 0, "max_tokens": 150, "ignore_eos": True, "messages": user("Describe it.")}

        outcome = []

        def give_up_after_a_second() -> None:
            try:
                outcome.append(httpx.post(small.url + "/v1/chat/completions", json=body, timeout=1.0).status_code)
            except httpx.TimeoutException:
                outcome.append("gave up")

        client = threading.Thread(target=give_up_after_a_second)
        client.start()
        _wait(lambda: httpx.get(small.url + "/health").json()["queued"] == 1, "the request to queue")
        httpx.post(small.url + "/debug/step", params={"n": 2})
        _wait(lambda: small.metrics()["llava_edge_slots_in_use"] == 1, "the request to take the slot")
        client.join()
        assert outcome == ["gave up"]  # the engine is paused: no answer could have come

        def freed() -> bool:
            httpx.post(small.url + "/debug/step", params={"n": 1})
            return small.metrics()["llava_edge_slots_in_use"] == 0

        _wait(freed, "the abandoned request's slot to be freed")
        after = small.metrics()
        assert after["llava_edge_cancelled_requests_total"] - before["llava_edge_cancelled_requests_total"] == 1
        assert after["llava_edge_engine_tokens_total"] - before["llava_edge_engine_tokens_total"] < 150
    finally:
        httpx.post(small.url + "/debug/resume")
