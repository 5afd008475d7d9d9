"""Load benchmark of ``llava-edge serve``: N concurrent streaming clients, a late arrival, and a soak.

  llava-edge bench-serve PKG [--clients 1,2,4,8] [--requests 4] [--max-tokens 32] [--max-slots 8]
                         [--threads 2] [--soak 500] [--name NAME]

Starts the server as a subprocess (so it can read the server's peak RSS from /proc and its log), or
measures a running one with ``--url`` (then RSS is read only with ``--server-pid``). Every request is
a streaming chat completion with its own random image (no cache hits: cold vision and prefill each
time), ``temperature 0`` and ``ignore_eos`` (every request generates exactly ``max_tokens``).

Reported per concurrency level: aggregate tokens/s (all tokens over the level's wall time) and its
ratio to one client, time to first token p50/p99, per-token interval p50/p99, server peak RSS, errors.
The *arrival* scenario: 3 streams decoding, a 4th request arrives; its TTFT vs alone, and the 3
streams' per-token p99 while it prefills vs their steady state (what chunked prefill protects).
The *soak*: mixed sizes, every 7th request cancelled mid-stream, every 11th malformed; RSS after the
first 50 vs after all, slots free at the end, server log lines that are neither 2xx nor expected 4xx.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.scheduler import SERVE_PREFILL_CHUNK
from .measure import machine_info, percentiles


# -- the server under test -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``llava-edge serve PKG`` in a subprocess on a free port; waits for /health; stopped on close()."""

    def __init__(self, package: Path, args: list[str] = (), env: dict[str, str] | None = None,
                 log: Path | None = None, timeout_s: float = 600):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "llava_edge.cli", "serve", str(package), "--port",
                                      str(self.port), *args], env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} (log: {log})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not become healthy in {timeout_s:.0f} s")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def rss_mb(pid: int | None, peak: bool = False) -> float | None:
    """VmRSS (or VmHWM, the peak since start) of a process, in MB; None where /proc is not readable."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:" if peak else "VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- one streaming request ---------------------------------------------------------------------------
@dataclass
class Outcome:
    ok: bool
    status: int = 0
    start: float = 0.0
    ttft_s: float | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token chunk
    tokens: int = 0
    error: str = ""


def image_url(seed: int, size: int = 96) -> str:
    rng = np.random.default_rng(seed)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(seed: int, max_tokens: int, prompt: str = "What is in the picture?",
                 prune: str | None = None) -> dict[str, Any]:
    """One streamed image request; ``prune`` (METHOD:RATIO) sent as the request's own setting when given."""
    body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed)}},
                                                      {"type": "text", "text": prompt}]}]}
    if prune is not None:
        body["prune"] = prune
    return body


def chunk_tokens(chunk: dict[str, Any]) -> int:
    """Tokens one streamed chunk carries: our ``token_ids`` extension where the server sends it, else 1 for a
    chunk with text in ``delta.content`` (any OpenAI server, llama-server included: it streams one chunk per
    token, except that a token ending in an incomplete UTF-8 character rides with the next one; the closing
    ``usage`` chunk then gives the exact count)."""
    if not chunk.get("choices"):
        return 0
    choice = chunk["choices"][0]
    if choice.get("token_ids"):
        return len(choice["token_ids"])
    return 1 if (choice.get("delta") or {}).get("content") else 0


def stream_request(client: Any, url: str, body: dict[str, Any], cancel_after: int | None = None,
                   out: Outcome | None = None) -> Outcome:
    """One streaming request; ``out`` (optional) is filled live, so other threads can watch progress."""
    out = out or Outcome(ok=False)
    out.start = time.perf_counter()
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            out.status = r.status_code
            if r.status_code != 200:
                r.read()
                out.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"].get("message", "error")
                    return out
                if chunk.get("usage") and not chunk["choices"]:  # the closing usage chunk: the exact count
                    out.tokens = max(out.tokens, chunk["usage"].get("completion_tokens", 0))
                n = chunk_tokens(chunk)
                if n:
                    now = time.perf_counter()
                    if out.ttft_s is None:
                        out.ttft_s = now - out.start
                    out.token_times.append(now)
                    out.tokens += n
                    if cancel_after is not None and out.tokens >= cancel_after:
                        out.ok = True
                        return out  # leaving the block closes the connection: the server cancels
        out.ok = True
    except Exception as e:  # noqa: BLE001 - counted as an error of the run
        out.error = f"{type(e).__name__}: {e}"
    return out


def _gaps(outs: list[Outcome]) -> list[float]:
    return [(b - a) * 1000 for o in outs for a, b in zip(o.token_times, o.token_times[1:])]


def _decode_rate(outs: list[Outcome]) -> float | None:
    """Tokens/s of pure decoding: over token intervals during which no request of the run was waiting
    for its first token (no vision, no prefill chunk in those steps), the median of (streams active in
    that interval / its length). Comparable with a static batch's decode rate."""
    prefills = [(o.start, o.start + o.ttft_s) for o in outs if o.ttft_s is not None]
    rates = []
    for o in outs:
        for a, b in zip(o.token_times, o.token_times[1:]):
            if b <= a or any(s < b and e > a for s, e in prefills):
                continue
            active = sum(1 for x in outs if x.token_times and x.token_times[0] <= a and x.token_times[-1] >= b)
            rates.append(active / (b - a))
    return float(np.median(rates)) if rates else None


def _pct(values: list[float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in percentiles(values, (50, 99)).items()} if values else {}


# -- scenarios -------------------------------------------------------------------------------------
def run_level(url: str, clients: int, requests: int, max_tokens: int, pid: int | None, seed: int,
              prune: str | None = None) -> dict[str, Any]:
    import httpx

    outs: list[Outcome] = []
    lock = threading.Lock()
    peak = [rss_mb(pid) or 0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_mb(pid) or 0.0)

    def client(c: int) -> None:
        with httpx.Client() as h:
            for r in range(requests):
                o = stream_request(h, url, request_body(seed + c * 1000 + r, max_tokens, prune=prune))
                with lock:
                    outs.append(o)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    ok = [o for o in outs if o.ok]
    tokens = sum(o.tokens for o in ok)
    gaps = _gaps(ok)
    decode = _decode_rate(ok)
    return {"clients": clients, "requests": len(outs), "errors": len(outs) - len(ok),
            "error_messages": sorted({o.error or f"HTTP {o.status}, no message" for o in outs if not o.ok})[:5],
            "wall_s": round(wall, 3),
            "tokens": tokens, "tok_per_s": round(tokens / wall, 2), "decode_tok_per_s": decode and round(decode, 2),
            "ttft_ms": _pct([o.ttft_s * 1000 for o in ok if o.ttft_s is not None]),
            "token_ms": _pct(gaps), "peak_rss_mb": round(peak[0], 1) if pid else None}


def run_arrival(url: str, stream_tokens: int, seed: int, prune: str | None = None) -> dict[str, Any]:
    """TTFT of a request alone, then of the same-shaped request arriving while 3 streams decode."""
    import httpx

    with httpx.Client() as h:
        alone = [stream_request(h, url, request_body(seed + i, 4, prune=prune)).ttft_s for i in range(3)]
    streams = [Outcome(ok=False) for _ in range(3)]

    def long_stream(i: int) -> None:
        with httpx.Client() as h:
            stream_request(h, url, request_body(seed + 100 + i, stream_tokens, prune=prune), out=streams[i])

    runners = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
    for t in runners:
        t.start()
    # the arrival comes once every stream has some steady-state tokens behind it
    deadline = time.monotonic() + 600
    while min(len(o.token_times) for o in streams) < 6 and time.monotonic() < deadline:
        time.sleep(0.002)
    with httpx.Client() as h:
        late = stream_request(h, url, request_body(seed + 200, 4, prune=prune))
    for t in runners:
        t.join()
    t_in, t_first = late.start, late.start + (late.ttft_s or 0)
    all_streaming = max(o.token_times[0] for o in streams if o.token_times)  # every stream past its own prefill
    during = [(b - a) * 1000 for o in streams for a, b in zip(o.token_times, o.token_times[1:])
              if a < t_first and b > t_in]
    steady = [(b - a) * 1000 for o in streams for a, b in zip(o.token_times, o.token_times[1:])
              if a >= all_streaming and (b <= t_in or a >= t_first)]
    alone_ms = float(np.median([a for a in alone if a is not None])) * 1000
    late_ms = (late.ttft_s or float("nan")) * 1000
    steady_p99 = percentiles(steady, (99,))["p99"] if steady else float("nan")
    during_p99 = percentiles(during, (99,))["p99"] if during else float("nan")
    return {"ttft_alone_ms": round(alone_ms, 2), "ttft_with_3_decoding_ms": round(late_ms, 2),
            "ttft_ratio": round(late_ms / alone_ms, 2), "steady_token_p99_ms": round(steady_p99, 2),
            "token_p99_during_arrival_ms": round(during_p99, 2),
            "token_p99_ratio": round(during_p99 / steady_p99, 2), "intervals_during": len(during),
            "streams_outlived_arrival": all(o.token_times and o.token_times[-1] > t_first for o in streams)}


def run_roundtrip(url: str, n: int = 50) -> dict[str, float]:
    """Server overhead: a 1-token text-only request, non-streaming, one at a time, after 5 warm-ups."""
    import httpx

    body = {"model": "bench", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    times = []
    with httpx.Client() as h:
        for i in range(n + 5):
            t0 = time.perf_counter()
            h.post(url + "/v1/chat/completions", json=body, timeout=60).raise_for_status()
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1000)
    return {"requests": n, **{f"{k}_ms": round(v, 2) for k, v in percentiles(times, (50, 90, 99)).items()}}


def run_soak(url: str, total: int, pid: int | None, seed: int, clients: int = 4) -> dict[str, Any]:
    import httpx

    counts = {"ok": 0, "cancelled": 0, "malformed_4xx": 0, "unexpected": 0}
    rss_after_50: list[float | None] = [None]
    done = [0]
    lock = threading.Lock()
    order = iter(range(total))

    def client() -> None:
        with httpx.Client() as h:
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                if i % 11 == 5:  # malformed: broken base64
                    body = request_body(seed + i, 4)
                    body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,@@@"
                    r = h.post(url + "/v1/chat/completions", json=body, timeout=60)
                    key = "malformed_4xx" if 400 <= r.status_code < 500 else "unexpected"
                else:
                    cancel = 3 if i % 7 == 3 else None
                    o = stream_request(h, url, request_body(seed + i, 4 + (i * 13) % 40), cancel_after=cancel)
                    key = ("cancelled" if cancel else "ok") if o.ok else "unexpected"
                with lock:
                    counts[key] += 1
                    done[0] += 1
                    if done[0] == 50:
                        rss_after_50[0] = rss_mb(pid)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.5)  # let the last cancellations reach the engine
    health = httpx.get(url + "/health", timeout=5).json()
    end = rss_mb(pid)
    growth = (end / rss_after_50[0] - 1) * 100 if end and rss_after_50[0] else None
    return {"requests": total, **counts, "rss_after_50_mb": rss_after_50[0] and round(rss_after_50[0], 1),
            "rss_end_mb": end and round(end, 1), "rss_growth_pct": growth and round(growth, 2),
            "slots_in_use_at_end": health.get("slots_in_use"), "queued_at_end": health.get("queued")}


def unexpected_log_lines(log: Path) -> list[str]:
    """Server log lines other than INFO lines and 2xx/4xx access lines (errors, tracebacks, 5xx)."""
    bad = []
    for line in log.read_text().splitlines():
        if '" ' in line and line.startswith("INFO:"):  # access line: ... "POST /v1/... HTTP/1.1" 200 OK
            status = line.rsplit('" ', 1)[1][:3]
            if status[0] in "24" or (status == "503" and "GET /health" in line):  # 503: still loading
                continue
        elif line.startswith("INFO"):
            continue
        bad.append(line)
    return bad


def decode_scaling(package: Path, backend: str = "ort-fast-int4", batches: tuple[int, ...] = (1, 2, 4, 8),
                   steps: int = 6, repeats: int = 6, context: int = 256, threads: int | None = 2) -> dict[str, Any]:
    """Decode tokens/s of the engine's slot decode call with B running sequences, next to a static
    batch of B in the backend's own cache, in one process, levels interleaved repeat by repeat (the
    machine is shared: interleaving keeps slow periods from landing on one level). Each of B rows
    holds ``context`` cached positions (their values do not matter for the time)."""
    from ..package import load_manifest
    from ..runtime.fast_backend import FastOrtBackend

    manifest = load_manifest(package)
    graph = {"ort-fast": "decoder_fast", "ort-fast-int4": "decoder_fast_int4"}[backend]
    be = FastOrtBackend(package, manifest, threads=threads, decoder=graph)
    top = max(batches)
    kv = be.new_slot_cache(top, context + steps + 8)
    times: dict[str, dict[int, list[float]]] = {"continuous": {b: [] for b in batches},
                                                "static": {b: [] for b in batches}}
    ids = np.full((top, 1), 5, np.int64)
    for _ in range(repeats):
        for b in batches:
            active = np.ones(b, bool)
            kv.lengths[:] = context
            be.decode_slots(kv, be.embed(ids[:b]), active)  # warm this row range's binding
            t0 = time.perf_counter()
            for _ in range(steps):
                be.decode_slots(kv, be.embed(ids[:b]), active)
            times["continuous"][b].append(steps * b / (time.perf_counter() - t0))
            cache = be.new_cache(b, context + steps + 8)
            cache.lengths[:] = context
            mask = np.ones((b, context + 1), np.int64)
            pos = np.full((b, 1), context, np.int64)
            be.step(cache, be.embed(ids[:b]), mask, pos)
            t0 = time.perf_counter()
            for _ in range(steps):
                pos += 1
                mask = np.ones((b, int(pos[0, 0]) + 1), np.int64)
                be.step(cache, be.embed(ids[:b]), mask, pos)
            times["static"][b].append(steps * b / (time.perf_counter() - t0))
    out: dict[str, Any] = {"backend": backend, "steps": steps, "repeats": repeats, "context": context,
                           "threads": threads, "rows": []}
    for b in batches:
        cont, stat = float(np.median(times["continuous"][b])), float(np.median(times["static"][b]))
        out["rows"].append({"batch": b, "continuous_tok_per_s": round(cont, 2), "static_tok_per_s": round(stat, 2),
                            "continuous_vs_1": round(cont / float(np.median(times["continuous"][batches[0]])), 2),
                            "static_vs_1": round(stat / float(np.median(times["static"][batches[0]])), 2)})
    return out


# -- the command -----------------------------------------------------------------------------------
def bench_serve(package: Path | None, url: str | None = None, clients: list[int] = (1, 2, 4, 8), requests: int = 4,
                max_tokens: int = 32, max_slots: int = 8, threads: int | None = 2, backend: str = "auto",
                arrival: int = 128, soak: int = 0, server_pid: int | None = None, name: str = "serve",
                out_dir: Path = Path("benchmarks/results"), prefill_chunk: int | None = None, scaling: bool = False,
                server_args: list[str] = (), progress=print, prune: str | None = None) -> dict[str, Any]:
    """``prune``: every measured request's own pruning setting (its ``prune`` field), so it means the same
    against a started server and a running one (--url)."""
    server = None
    prefill_chunk = prefill_chunk or SERVE_PREFILL_CHUNK  # serve's own default unless asked
    log = out_dir / f"{name}_server.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    if url is None:
        args = ["--max-slots", str(max_slots), "--backend", backend, "--max-tokens", str(max(512, max_tokens, arrival)),
                "--queue-size", "256", "--prefill-chunk", str(prefill_chunk)]
        args += (["--threads", str(threads)] if threads else []) + list(server_args)
        env = {**os.environ}
        server = ServerProcess(package, args, env=env, log=log)
        url, server_pid = server.url, server.pid
        progress(f"server up at {url} (pid {server_pid})")
    try:
        import httpx

        health = httpx.get(url + "/health", timeout=5).json()
        with httpx.Client() as h:  # warm-up: sessions, allocator, first-call costs
            stream_request(h, url, request_body(1, 4, prune=prune))
        levels = []
        for n in clients:
            row = run_level(url, n, requests, max_tokens, server_pid, seed=10_000 * n, prune=prune)
            levels.append(row)
            progress(f"{n} client(s): {row['tok_per_s']} tok/s, TTFT p50 {row['ttft_ms'].get('p50')} ms, "
                     f"token p50 {row['token_ms'].get('p50')} ms, errors {row['errors']}")
        base = levels[0]["tok_per_s"] if levels and levels[0]["clients"] == 1 else None
        dbase = levels[0]["decode_tok_per_s"] if base else None
        for row in levels:
            row["vs_one_client"] = round(row["tok_per_s"] / base, 2) if base else None
            row["decode_vs_one_client"] = (round(row["decode_tok_per_s"] / dbase, 2)
                                           if dbase and row["decode_tok_per_s"] else None)
        result: dict[str, Any] = {"config": {"package": Path(package).name if package else None, "url": url,
                                             "clients": list(clients), "requests_per_client": requests,
                                             "max_tokens": max_tokens, "server": health, "threads": threads,
                                             "prefill_chunk": prefill_chunk if server is not None else None,
                                             "server_args": list(server_args), "prune": prune or "off"},
                                  "levels": levels, "machine": machine_info(threads)}
        result["roundtrip_1_token"] = run_roundtrip(url)
        progress(f"1-token round trip: {result['roundtrip_1_token']}")
        if arrival:
            result["arrival"] = run_arrival(url, arrival, seed=777, prune=prune)
            progress(f"arrival: {result['arrival']}")
        if soak:
            result["soak"] = run_soak(url, soak, server_pid, seed=999)
            progress(f"soak: {result['soak']}")
        result["server_peak_rss_mb"] = rss_mb(server_pid, peak=True)
    finally:
        if server is not None:
            server.close()
    if scaling and package is not None:
        if backend == "auto":  # what the server picked: the fastest graph the package has
            from ..package import load_manifest
            from ..runtime.backends import resolve_auto

            backend = resolve_auto(package, load_manifest(package))
        result["decode_scaling"] = decode_scaling(package, backend, tuple(clients), threads=threads)
        progress(f"decode scaling: {result['decode_scaling']['rows']}")
    if server is not None and soak:
        result["soak"]["unexpected_log_lines"] = unexpected_log_lines(log)[:20]
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text(markdown(result))
    try:
        plot(result, out_dir / f"{name}.png")
    except ImportError:
        progress("matplotlib not installed: no plot (pip install 'llava-edge[bench]')")
    return result


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"serve load: {c['requests_per_client']} streaming requests per client, {c['max_tokens']} tokens each "
             f"(ignore_eos), one random image each; server {c['server'].get('backend')} with "
             f"{c['server'].get('slots')} slots, threads={c['threads']}, prefill chunk {c.get('prefill_chunk')}, "
             f"prune {c.get('prune', 'off')}", "",
             "| clients | requests | errors | tok/s (all, wall) | vs 1 client | decode tok/s | vs 1 client | "
             "TTFT p50 ms | TTFT p99 ms | token p50 ms | token p99 ms | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["levels"]:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['tok_per_s']} | {r['vs_one_client']} | "
                     f"{r['decode_tok_per_s']} | {r['decode_vs_one_client']} | "
                     f"{r['ttft_ms'].get('p50')} | {r['ttft_ms'].get('p99')} | {r['token_ms'].get('p50')} | "
                     f"{r['token_ms'].get('p99')} | {r['peak_rss_mb']} |")
    lines += ["", "tok/s (all, wall): every generated token over the level's wall time, prefills included. "
              "decode tok/s: median over token intervals with no request in vision or prefill of (streams active / "
              "interval), comparable with a static batch's decode rate."]
    if "arrival" in result:
        a = result["arrival"]
        lines += ["", f"- arrival while 3 stream: TTFT {a['ttft_with_3_decoding_ms']} ms vs {a['ttft_alone_ms']} ms "
                  f"alone (x{a['ttft_ratio']}); running streams' token p99 {a['token_p99_during_arrival_ms']} ms vs "
                  f"{a['steady_token_p99_ms']} ms steady (x{a['token_p99_ratio']})"]
    ds = result.get("decode_scaling")
    if ds:
        lines += ["", f"Decode scaling in-process ({ds['backend']}, {ds['context']} cached positions per row, "
                  f"{ds['steps']} steps, median of {ds['repeats']} interleaved repeats, threads={ds['threads']}):", "",
                  "| running sequences | slot decode (engine) tok/s | vs 1 | static batch tok/s | vs 1 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['continuous_tok_per_s']} | {r['continuous_vs_1']} | {r['static_tok_per_s']} | "
                  f"{r['static_vs_1']} |" for r in ds["rows"]]
        lines.append("")
    rt = result.get("roundtrip_1_token")
    if rt:
        lines += [f"- 1-token text request round trip (non-streaming, sequential, {rt['requests']} requests): "
                  f"p50 {rt['p50_ms']} ms, p90 {rt['p90_ms']} ms, p99 {rt['p99_ms']} ms"]
    if "soak" in result:
        s = result["soak"]
        lines += [f"- soak: {json.dumps(s)}"]
    m = result["machine"]
    lines += [f"- machine: {m.get('cpu')}, {m.get('cpu_count')} cores, load average {m.get('load_average')}",
              f"- server peak RSS (VmHWM): {result.get('server_peak_rss_mb')} MB"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lv = result["levels"]
    x = [r["clients"] for r in lv]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(x, [r["tok_per_s"] for r in lv], "o-")
    ax[0].set(title="aggregate tokens/s", xlabel="concurrent clients")
    ax[1].plot(x, [r["ttft_ms"].get("p50") for r in lv], "o-", label="p50")
    ax[1].plot(x, [r["ttft_ms"].get("p99") for r in lv], "o--", label="p99")
    ax[1].set(title="time to first token (ms)", xlabel="concurrent clients")
    ax[1].legend()
    ax[2].plot(x, [r["token_ms"].get("p50") for r in lv], "o-", label="p50")
    ax[2].plot(x, [r["token_ms"].get("p99") for r in lv], "o--", label="p99")
    ax[2].set(title="per-token interval (ms)", xlabel="concurrent clients")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

