"""Ray Serve end to end: a real local Ray cluster (CPU only, started here, torn down after), 2 replicas of
the shipped tiny LLaVA, the real openai client.

Each response names its replica in ``x-llava-edge-replica``, which gives the per-replica counts. Greedy
answers through Ray are compared token for token with ``Pipeline.generate`` in this process (the same
reference the plain server's tests use).
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llava_edge.runtime.pipeline import Pipeline

from .conftest import ROOT
from .test_server import PROMPTS, _images, user

ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra: pip install 'llava-edge[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is the optional extra: pip install 'llava-edge[ray]'")

APP = "llava-edge-test"
KEY = "ray-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(served_package):
    from llava_edge.serve.app import DEBUG_ENV
    from llava_edge.serve.ray_app import app as build_app

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                                       DEBUG_ENV: "1"}})  # debug routes: tests hold an engine still
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"package": str(served_package), "replicas": "2", "cpus_per_replica": "0.5",
                         "threads": "1", "max_slots": "4", "api_key": KEY, "max_tokens": "200",
                         "graceful_shutdown_timeout_s": "5", "health_check_period_s": "2"}),
              name=APP, route_prefix="/")
    print(f"\nray cluster + 2 replicas up in {time.monotonic() - t0:.1f} s")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(served_package):
    ref = Pipeline.from_package(served_package, backend="ort-fast", prefix_cache=0)
    ref.manifest.text.eos_token_ids = []  # requests below use ignore_eos, so lengths are exactly max_tokens
    return ref


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _ask(client, messages, max_tokens: int, stream: bool) -> tuple[list[int], str, str]:
    """(token ids, text, replica) of one greedy request."""
    kw = dict(model="tiny-llava", messages=messages, max_tokens=max_tokens, temperature=0,
              extra_body={"ignore_eos": True})
    if not stream:
        raw = client.chat.completions.with_raw_response.create(**kw)
        c = raw.parse().choices[0]
        return c.model_extra["token_ids"], c.message.content, raw.headers["x-llava-edge-replica"]
    raw = client.chat.completions.with_raw_response.create(stream=True, **kw)
    ids, text = [], ""
    for chunk in raw.parse():
        for c in chunk.choices:
            ids += (c.model_extra or {}).get("token_ids") or []
            text += c.delta.content or ""
    return ids, text.strip(), raw.headers["x-llava-edge-replica"]


def _jobs(n: int) -> list[tuple[str, object, int, bool]]:
    images = _images()
    return [(PROMPTS[i % 8], images[(3 * i) % 8], 3 + (5 * i) % 17, i % 2 == 1) for i in range(n)]


def _check(jobs, got, reference) -> dict[str, int]:
    per_replica: dict[str, int] = {}
    for (prompt, img, n, stream), (ids, text, replica) in zip(jobs, got):
        alone = reference.generate(img, prompt, max_new_tokens=n)
        assert ids == alone.token_ids, (prompt, n, stream)
        assert text == alone.text
        per_replica[replica] = per_replica.get(replica, 0) + 1
    return per_replica


def test_sixteen_concurrent_requests_over_two_replicas_equal_generate(cluster, reference):
    client = _client(cluster)
    jobs = _jobs(16)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: _ask(client, user(j[0], j[1]), j[2], j[3]), jobs))
    per_replica = _check(jobs, got, reference)
    print("requests per replica:", per_replica)
    assert len(per_replica) == 2 and all(v > 0 for v in per_replica.values()), per_replica
    assert [m.id for m in client.models.list()] == ["tiny-llava"]


def test_same_routes_and_errors_as_plain_serve(cluster):
    import httpx

    r = httpx.get(cluster + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["slots"] == 4
    r = httpx.post(cluster + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(cluster + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def _replica_actor(uid: str):
    return ray.get_actor(f"SERVE_REPLICA::{APP}#llava-edge-tiny-llava#{uid}", namespace="serve")


def _wait_replicas(url: str, n: int, exclude: str, timeout_s: float) -> tuple[set[str], float]:
    """Ask /health until n replicas other than ``exclude`` have answered: a replacement is serving."""
    import httpx

    t0, seen = time.monotonic(), set()
    while time.monotonic() - t0 < timeout_s:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                seen.add(r.headers["x-llava-edge-replica"])
        except httpx.HTTPError:
            pass
        if len(seen - {exclude}) >= n:
            return seen - {exclude}, time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"only {seen} answered in {timeout_s} s")


def test_killed_replica_fails_its_requests_cleanly_and_is_restarted(cluster, reference):
    """One replica dies with streams in flight: each request completes with the right tokens or raises
    (none hangs past 60 s), Ray starts a new replica, and the next 16 requests all succeed."""
    import threading

    from openai import APIError

    client = _client(cluster)
    jobs = [(PROMPTS[i], _images()[i], 200, True) for i in range(8)]
    started: dict[str, list[int]] = {}
    first_chunk = threading.Event()

    def ask(i: int):
        prompt, img, n, _ = jobs[i]
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-llava", messages=user(prompt, img), max_tokens=n, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        replica, ids, finish = raw.headers["x-llava-edge-replica"], [], None
        try:
            for chunk in raw.parse():
                for c in chunk.choices:
                    ids += (c.model_extra or {}).get("token_ids") or []
                    finish = c.finish_reason or finish
                started.setdefault(replica, []).append(i)
                first_chunk.set()
        except APIError as e:
            return "error", replica, type(e).__name__
        return "ok", replica, (ids, finish)

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        assert first_chunk.wait(60)
        victim = next(iter(started))
        ray.kill(_replica_actor(victim), no_restart=True)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=max(1.0, 60 - (time.monotonic() - t0))))
            except APIError as e:  # refused before its stream started (the replica was already gone)
                outcomes.append(("error", None, type(e).__name__))
    print("outcomes:", [(o[0], o[1], o[2] if o[0] == "error" else o[2][1]) for o in outcomes])
    for i, (kind, replica, detail) in enumerate(outcomes):
        if kind == "ok":  # a completed answer is whole and right, never silently cut short
            ids, finish = detail
            assert finish == "length"
            assert ids == reference.generate(jobs[i][1], jobs[i][0], max_new_tokens=200).token_ids
    assert any(o[0] == "error" and o[1] == victim for o in outcomes), "the kill hit no request in flight"
    assert all(o[0] == "ok" for o in outcomes if o[1] not in (victim, None)), outcomes
    replicas, waited = _wait_replicas(cluster, 2, victim, 120)
    print(f"a new replica answered {waited:.1f} s after the kill")
    jobs16 = _jobs(16)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: _ask(client, user(j[0], j[1]), j[2], j[3]), jobs16))
    per_replica = _check(jobs16, got, reference)
    assert set(per_replica) <= replicas and sum(per_replica.values()) == 16, per_replica


def test_several_packages_behind_one_endpoint_chosen_by_model(cluster, served_package, reference, tmp_path):
    """Two packages (here the same model under two names), one deployment each behind the router:
    ``model`` picks the deployment, answers are right streaming or not, errors stay the replicas' own."""
    import shutil

    import httpx
    from openai import NotFoundError

    from llava_edge.serve.ray_app import app as build_app

    other = tmp_path / "tiny-llava-b"
    shutil.copytree(served_package, other)
    serve.run(build_app({"package": f"{served_package},{other}", "replicas": "1", "cpus_per_replica": "0.25",
                         "threads": "1", "api_key": KEY}), name="multi", route_prefix="/multi")
    try:
        client = _client(cluster + "/multi")
        assert sorted(m.id for m in client.models.list()) == ["tiny-llava", "tiny-llava-b"]
        img, replicas = _images()[1], {}
        alone = reference.generate(img, PROMPTS[1], max_new_tokens=12).token_ids
        for model in ("tiny-llava", "tiny-llava-b", "tiny-llava-b", "tiny-llava"):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=user(PROMPTS[1], img), max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})
            r = raw.parse()
            assert r.model == model and r.choices[0].model_extra["token_ids"] == alone
            replicas.setdefault(model, set()).add(raw.headers["x-llava-edge-replica"])
            ids = []
            for chunk in client.chat.completions.create(model=model, messages=user(PROMPTS[1], img), max_tokens=12,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
                assert chunk.model == model
                ids += [t for c in chunk.choices for t in (c.model_extra or {}).get("token_ids") or []]
            assert ids == alone
        assert all(len(v) == 1 for v in replicas.values()) and replicas["tiny-llava"] != replicas["tiny-llava-b"]
        with pytest.raises(NotFoundError, match="model_not_found|not served"):
            client.chat.completions.create(model="nope", messages=user("hi"), max_tokens=2)
        r = httpx.post(cluster + "/multi/v1/chat/completions", json={"model": "tiny-llava-b", "messages": []},
                       timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        h = httpx.get(cluster + "/multi/health", timeout=10).json()
        assert h["status"] == "ok" and set(h["models"]) == {"tiny-llava", "tiny-llava-b"}

        def cancelled() -> float:  # other GET routes go to the first package's replica
            text = httpx.get(cluster + "/multi/metrics", timeout=10).text
            return float(next(ln.split()[-1] for ln in text.splitlines()
                              if ln.startswith("llava_edge_cancelled_requests_total")))

        before = cancelled()
        auth = {"Authorization": f"Bearer {KEY}"}  # the router checks the key on every POST
        assert httpx.post(cluster + "/multi/debug/pause", json={}, headers=auth, timeout=10).status_code == 200
        stream = client.chat.completions.create(model="tiny-llava", messages=user(PROMPTS[0], img), max_tokens=20,
                                                temperature=0, stream=True)
        next(iter(stream))  # the role chunk: the request is in the replica's engine
        stream.close()  # the client leaves: the router cancels its call, the replica its sequence
        deadline = time.monotonic() + 20
        while cancelled() == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cancelled() == before + 1
        httpx.post(cluster + "/multi/debug/resume", json={}, headers=auth, timeout=10)
    finally:
        serve.delete("multi")


def test_impossible_resources_are_refused_and_pending_replicas_answer_503(cluster, served_package, tmp_path):
    """A replica the cluster can never place: the CLI's check refuses it at once (from the live
    ``cluster_resources``); deployed anyway, ``/health`` answers 503 with the reason instead of waiting
    on the pending replica, through the router (two packages) and through the placeholder ``run`` puts
    in front of one package."""
    import shutil

    import httpx

    from llava_edge.errors import UsageError
    from llava_edge.serve.ray_app import StartingHealth, check_resources, parse_args
    from llava_edge.serve.ray_app import app as build_app

    t0 = time.monotonic()
    with pytest.raises(UsageError, match=r"^1 replica x 4 CPUs needs 4 CPUs; the Ray cluster has 2 \(lower"):
        check_resources(*parse_args({"package": str(served_package), "cpus_per_replica": "4"}))
    assert time.monotonic() - t0 < 2

    other = tmp_path / "tiny-llava-b"
    shutil.copytree(served_package, other)
    deploy = serve.api._run  # serve.run waits for running replicas, which never come here
    quick = {"graceful_shutdown_timeout_s": "0.5"}  # Serve's default 20 s grace would hold the teardown
    deploy(build_app({"package": f"{served_package},{other}", "cpus_per_replica": "4", "api_key": KEY, **quick}),
           name="pending", route_prefix="/pending", _blocking=False)
    deploy(build_app({"package": str(served_package), "cpus_per_replica": "4", "api_key": KEY, **quick}),
           name="pending1", route_prefix="/pending1", _blocking=False)
    deploy(StartingHealth.options(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=0.5).bind(
        "pending1", "llava-edge-tiny-llava", {"CPU": 4.0}), name="pending1-starting", route_prefix="/pending1/health",
        _blocking=False)
    try:
        for url in (cluster + "/pending/health", cluster + "/pending1/health"):
            deadline, r = time.monotonic() + 30, None
            while time.monotonic() < deadline:  # the router / placeholder itself starts in a second or two
                try:
                    r = httpx.get(url, timeout=3)
                    if r.status_code == 503:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            assert r is not None and r.status_code == 503, (url, r and r.text)
            text = r.text
            assert "pending" in text and "waiting for resources" in text and "4 CPU" in text, text
        print(f"refused, then 503 from both, in {time.monotonic() - t0:.1f} s")
    finally:
        for name in ("pending", "pending1-starting", "pending1"):
            serve.delete(name, _blocking=False)


def _stream_in_thread(client, max_tokens: int):
    """Start a greedy stream on a thread; returns (first chunk seen, thread, result dict)."""
    import threading

    from openai import APIError

    first, result = threading.Event(), {}

    def stream():
        ids = []
        try:
            for chunk in client.chat.completions.create(model="tiny-llava", messages=user(PROMPTS[0], _images()[0]),
                                                        max_tokens=max_tokens, temperature=0, stream=True,
                                                        extra_body={"ignore_eos": True}):
                ids += [t for c in chunk.choices for t in (c.model_extra or {}).get("token_ids") or []]
                first.set()
            result["ids"] = ids
        except APIError as e:
            result["error"] = type(e).__name__
        first.set()

    t = threading.Thread(target=stream)
    t.start()
    return first, t, result


def test_shutdown_lets_streams_finish_within_the_grace_and_cuts_them_after(cluster, reference):
    """Deleting an app while streams run: a stream that ends within ``graceful_shutdown_timeout_s`` is
    answered whole; one held past it (the engine paused by the debug route) ends in a client error
    shortly after the grace, never a hang. Runs last: it deletes the module's app."""
    import httpx

    from llava_edge.serve.app import ServeConfig
    from llava_edge.serve.ray_app import LlavaEdgeReplica

    first, t, result = _stream_in_thread(_client(cluster), 200)  # the module's app: grace 5 s
    assert first.wait(60)
    serve.delete(APP)
    t.join(30)
    assert result.get("ids") == reference.generate(_images()[0], PROMPTS[0], max_new_tokens=200).token_ids, result

    serve.run(LlavaEdgeReplica.options(name="drain", graceful_shutdown_timeout_s=0.5, graceful_shutdown_wait_loop_s=0.1,
                                       ray_actor_options={"num_cpus": 0.25})
              .bind(ServeConfig(reference.package_dir, threads=1, api_key=KEY)), name="drain", route_prefix="/drain")
    first, t, result = _stream_in_thread(_client(cluster + "/drain"), 200)
    assert first.wait(60)
    assert httpx.post(cluster + "/drain/debug/pause", json={}, timeout=10).status_code == 200
    t0 = time.monotonic()
    serve.delete("drain")
    t.join(30)
    print(f"held stream ended {time.monotonic() - t0:.1f} s after the delete began:", result)
    assert not t.is_alive() and "error" in result, result
