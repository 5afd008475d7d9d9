"""bench-serve end to end on the tiny model: every scenario runs, its numbers are consistent, files written."""

from __future__ import annotations

import json

from llava_edge.benchmarks.serve_load import bench_serve, unexpected_log_lines

from .conftest import Server


def test_bench_serve_small_run(served_package, tmp_path):
    srv = Server(served_package, "--max-slots", "4", "--max-tokens", "200", log=tmp_path / "server.log")
    try:
        result = bench_serve(None, url=srv.url, server_pid=srv.pid, clients=[1, 2], requests=2, max_tokens=6,
                             arrival=40, soak=23, name="t", out_dir=tmp_path, progress=lambda s: None)
    finally:
        srv.close()
    assert [r["clients"] for r in result["levels"]] == [1, 2]
    for row in result["levels"]:
        assert row["errors"] == 0 and row["tokens"] == row["requests"] * 6 and row["requests"] == 2 * row["clients"]
        assert row["peak_rss_mb"] > 10 and row["ttft_ms"]["p50"] > 0
    soak = result["soak"]
    # i % 11 == 5 is malformed (5, 16), i % 7 == 3 is cancelled after 3 tokens (3, 10, 17)
    assert (soak["malformed_4xx"], soak["cancelled"], soak["ok"], soak["unexpected"]) == (2, 3, 18, 0)
    assert soak["slots_in_use_at_end"] == 0 and soak["queued_at_end"] == 0
    assert result["roundtrip_1_token"]["p50_ms"] > 0
    assert result["arrival"]["ttft_alone_ms"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["levels"] == result["levels"]
    assert "| 2 | 4 | 0 |" in (tmp_path / "t.md").read_text()
    assert unexpected_log_lines(srv.log_path) == []


def test_decode_scaling_times_slot_and_static_decode(served_package):
    from llava_edge.benchmarks.serve_load import decode_scaling

    out = decode_scaling(served_package, "ort-fast", (1, 2, 4), steps=2, repeats=1, context=32, threads=1)
    assert [r["batch"] for r in out["rows"]] == [1, 2, 4]
    assert all(r["continuous_tok_per_s"] > 0 and r["static_tok_per_s"] > 0 for r in out["rows"])
    assert out["rows"][0]["continuous_vs_1"] == 1.0


def _sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _delta(delta: dict, finish: str | None = None) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_stream_request_counts_a_plain_openai_stream():
    """llama-server (any OpenAI server) streams text in delta.content, no token_ids: bench-serve --url must still
    see a first token and count tokens; a byte token held back for an incomplete UTF-8 character rides with the
    next chunk, so the closing usage chunk's count wins, and the role chunk (content null) is no token."""
    import httpx

    from llava_edge.benchmarks.serve_load import request_body, stream_request

    sent = []
    usage = {"choices": [], "usage": {"prompt_tokens": 600, "completion_tokens": 4, "total_tokens": 604}}
    pieces = [_delta({"role": "assistant", "content": None}), _delta({"content": "Hel"}), _delta({"content": "lo"}),
              _delta({"content": "\u00e9"}), _delta({}, "length")]

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        body = _sse(*pieces, usage) if sent[-1]["stream_options"]["include_usage"] else _sse(*pieces)
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        body = request_body(1, 4)
        out = stream_request(client, "http://peer", body)
        assert out.ok and out.ttft_s is not None and len(out.token_times) == 3 and out.tokens == 4
        body["stream_options"]["include_usage"] = False  # a server that ignores stream_options: chunks counted
        out = stream_request(client, "http://peer", body)
        assert out.ok and out.tokens == 3
    assert sent[0]["max_tokens"] == 4 and sent[0]["stream"] and sent[0]["temperature"] == 0


def test_a_level_records_why_its_requests_failed():
    """A failed request is excluded from the level's tokens and its cause is kept, so a sitting's JSON says why
    a peer (or we) dropped a request instead of only counting it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from llava_edge.benchmarks.serve_load import run_level

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(1)
            if len(seen) == 1:
                body = json.dumps({"error": {"message": "slot unavailable"}}).encode()
                self.send_response(503)
            else:
                body = _sse(_delta({"content": "a"}), _delta({"content": "b"}), _delta({}, "length"))
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        row = run_level(f"http://127.0.0.1:{httpd.server_port}", clients=1, requests=3, max_tokens=2, pid=None,
                        seed=0)
    finally:
        httpd.shutdown()
    assert (row["requests"], row["errors"], row["tokens"]) == (3, 1, 4)
    assert row["error_messages"] == ['HTTP 503: {"error": {"message": "slot unavailable"}}']
