"""Ray scale-out without a cluster: the router's checks before it reads a body (API key, content type,
size) on starlette Requests built from a scope, the resource check against fake cluster resources, and
the pending ``/health`` answer from a fake Serve status. Fast: nothing here starts Ray."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("ray", reason="Ray Serve is the optional extra: pip install 'llava-edge[ray]'")

from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from llava_edge.errors import UsageError  # noqa: E402
from llava_edge.serve import ray_app  # noqa: E402
from llava_edge.serve.app import ServeConfig  # noqa: E402
from llava_edge.serve.ray_app import ModelRouter, RayOptions, check_resources, pending_health  # noqa: E402

KEY = "router-key"


class _Gen:
    """What ``handle.options(stream=True).forward.remote(...)`` returns: (status, headers), then chunks."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, name: str):
        self.name, self.calls = name, []
        self.forward = SimpleNamespace(remote=self._remote)

    def options(self, **_):
        return self

    def _remote(self, method, path, query, headers, body):
        self.calls.append((method, path, dict(headers), body))
        if path == "/health":
            return _Gen([(200, [("content-type", "application/json")]), json.dumps({"status": "ok"}).encode()])
        return _Gen([(200, [("content-type", "application/json"), ("content-length", "2")]),
                     json.dumps({"model": self.name}).encode()])


def _router(**kw) -> tuple[object, dict[str, _Handle]]:
    handles = {"a": _Handle("a"), "b": _Handle("b")}
    kw.setdefault("api_key", KEY)
    kw.setdefault("max_body", 1000)
    return ModelRouter.func_or_class(handles, **kw), handles


def _request(method: str, path: str, headers: dict[str, str], chunks=(b"",)) -> tuple[Request, list[int]]:
    """A Request whose ``receive`` counts how many body messages were read."""
    reads, parts = [], list(chunks)

    async def receive():
        reads.append(1)
        if parts:
            part = parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(parts)}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], "http_version": "1.1",
             "scheme": "http", "server": ("test", 80), "client": None}
    return Request(scope, receive), reads


def _call(router, request) -> tuple[int, dict]:
    async def go():
        r: Response = await router(request)
        if hasattr(r, "body_iterator"):
            body = b"".join([c async for c in r.body_iterator])
        else:
            body = r.body
        return r.status_code, json.loads(body)

    return asyncio.run(go())


def _code(body: dict) -> str:
    return body["error"]["code"]


JSON = {"content-type": "application/json"}
AUTH = {"authorization": f"Bearer {KEY}"}


def test_key_checked_before_the_body_is_read():
    router, handles = _router()
    for headers in ({**JSON, "content-length": "10"}, {**JSON, "content-length": "10", "authorization": "Bearer no"},
                    {**JSON, "content-length": "10", "authorization": KEY},  # no scheme
                    {**JSON, "content-length": "99999999", "authorization": "Basic " + KEY}):
        req, reads = _request("POST", "/v1/chat/completions", headers, [b'{"model": "b"}'])
        status, body = _call(router, req)
        assert status == 401 and _code(body) == "invalid_api_key" and not reads, (headers, body)
    req, reads = _request("GET", "/v1/models", {})
    assert _call(router, req)[0] == 401 and not any(h.calls for h in handles.values())


def test_content_type_and_size_checked_before_the_body_is_read():
    router, handles = _router()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**AUTH, "content-length": "14", **({"content-type": ctype} if ctype else {})}
        req, reads = _request("POST", "/v1/chat/completions", headers, [b'{"model": "b"}'])
        status, body = _call(router, req)
        assert status == 415 and _code(body) == "unsupported_media_type" and not reads, (ctype, body)
    req, reads = _request("POST", "/v1/chat/completions", {**AUTH, **JSON, "content-length": str(10**9)}, [b"{}"])
    status, body = _call(router, req)
    assert status == 413 and _code(body) == "request_too_large" and not reads
    req, reads = _request("POST", "/v1/chat/completions", {**AUTH, **JSON, "content-length": "x"}, [b"{}"])
    assert _call(router, req)[0] == 400 and not reads
    # chunked, no declared length: read only until the limit is passed, not to the end
    req, reads = _request("POST", "/v1/chat/completions", {**AUTH, **JSON, "transfer-encoding": "chunked"},
                          [b"x" * 300] * 100)
    status, body = _call(router, req)
    assert status == 413 and len(reads) == 4, (status, len(reads))
    assert not any(h.calls for h in handles.values())


def test_allowed_requests_are_forwarded_to_the_model_they_name():
    router, handles = _router()
    body = b'{"model": "b", "messages": []}'
    for ctype in ("application/json", "Application/JSON; charset=utf-8"):
        req, _ = _request("POST", "/v1/chat/completions",
                          {"authorization": f"bearer {KEY}", "content-type": ctype, "content-length": str(len(body))},
                          [body[:10], body[10:]])
        assert _call(router, req) == (200, {"model": "b"})
    assert [c[3] for c in handles["b"].calls] == [body, body] and not handles["a"].calls
    req, _ = _request("POST", "/v1/chat/completions", {**AUTH, **JSON, "content-length": "16"}, [b'{"model": "zz"}'])
    status, out = _call(router, req)
    assert status == 404 and _code(out) == "model_not_found"
    req, _ = _request("POST", "/debug/pause", {**AUTH, **JSON})  # no body: to the first package
    assert _call(router, req) == (200, {"model": "a"}) and handles["a"].calls[-1][3] == b""
    req, _ = _request("POST", "/debug/pause", AUTH)  # a POST is JSON even without a body, as under plain serve
    assert _call(router, req)[0] == 415
    req, _ = _request("GET", "/metrics", {})  # unauthenticated GETs stay so, as under plain serve
    assert _call(router, req)[0] == 200
    req, _ = _request("GET", "/health", {})
    assert _call(router, req) == (200, {"status": "ok", "models": {"a": {"status": "ok"}, "b": {"status": "ok"}}})


def test_no_key_configured_allows_any_and_the_env_key_counts(monkeypatch):
    router, _ = _router(api_key=None)
    req, _ = _request("POST", "/v1/chat/completions", {**JSON, "content-length": "2"}, [b"{}"])
    assert _call(router, req)[0] == 200
    monkeypatch.setenv(ray_app.API_KEY_ENV, "env-key")
    router, _ = _router(api_key=None)
    req, _ = _request("POST", "/v1/chat/completions", {**JSON, "content-length": "2"}, [b"{}"])
    assert _call(router, req)[0] == 401
    req, _ = _request("POST", "/v1/chat/completions", {**JSON, "content-length": "2",
                                                       "authorization": "Bearer env-key"}, [b"{}"])
    assert _call(router, req)[0] == 200


def test_build_gives_the_router_the_key_and_the_largest_body_limit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    configs = [ServeConfig(a, api_key=KEY), ServeConfig(b, api_key=KEY, max_images_per_request=8)]
    app = ray_app.build(configs, RayOptions(cpus_per_replica=0.5))
    try:  # Ray's private layout of a bound app (2.60); the router's own checks are tested above
        kwargs = app._bound_deployment._replica_config.init_kwargs
    except AttributeError:
        kwargs = None
    if kwargs is not None:
        assert kwargs["api_key"] == KEY and kwargs["max_body"] == ray_app.body_limit(configs[1])
        assert kwargs["needs"] == {"CPU": 0.5}
    with pytest.raises(UsageError, match="share one API key"):
        ray_app.build([ServeConfig(a, api_key="x"), ServeConfig(b, api_key="y")], RayOptions())


# -- the resource check: refuse what the cluster can never place --------------------------------------

TWO_CPUS = {"CPU": 2.0, "memory": 1e10}


def _check(n_packages: int = 1, total=TWO_CPUS, nodes=None, **options):
    configs = [ServeConfig(f"/tmp/pkg{i}") for i in range(n_packages)]
    check_resources(configs, RayOptions(**options), total, [total] if nodes is None else nodes)


@pytest.mark.parametrize("options, n, message", [
    ({"cpus_per_replica": 4}, 1,
     "1 replica x 4 CPUs needs 4 CPUs; the Ray cluster has 2 (lower --cpus-per-replica or add nodes)"),
    ({"replicas": 3, "cpus_per_replica": 1}, 1,
     "3 replicas x 1 CPU needs 3 CPUs; the Ray cluster has 2 (lower --cpus-per-replica or --replicas or add nodes)"),
    ({"autoscale": (3, 4), "cpus_per_replica": 1}, 1, "3 replicas x 1 CPU needs 3 CPUs; the Ray cluster has 2"),
    ({"gpus_per_replica": 1}, 1, "1 replica x 1 GPU needs 1 GPU; the Ray cluster has 0 (lower --gpus-per-replica"),
    ({"replicas": 1, "cpus_per_replica": 1}, 2,
     "2 packages x 1 replica x 1 CPU + the router's 0.25 needs 2.25 CPUs; the Ray cluster has 2"),
])
def test_impossible_requests_are_refused_in_one_line(options, n, message):
    with pytest.raises(UsageError) as e:
        _check(n, **options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_possible_requests_pass_and_a_replica_must_fit_one_node():
    _check(cpus_per_replica=2)
    _check(replicas=2, cpus_per_replica=1)
    _check(autoscale=(0, 8), cpus_per_replica=2)  # starts one replica; more wait for the autoscaler
    _check(2, replicas=1, cpus_per_replica=0.5)
    _check(total={"CPU": 2.0, "GPU": 1.0}, gpus_per_replica=0.5, replicas=2)
    with pytest.raises(UsageError, match="largest node has 2"):
        _check(total={"CPU": 4.0}, nodes=[{"CPU": 2.0}, {"CPU": 2.0}], cpus_per_replica=4)


# -- /health while replicas are pending ---------------------------------------------------------------

def _status(monkeypatch, states: dict[str, int], status="UPDATING", message="", free=TWO_CPUS):
    dep = SimpleNamespace(replica_states=states, status=status, message=message)
    st = SimpleNamespace(applications={"app": SimpleNamespace(deployments={"llava-edge-a": dep})})
    monkeypatch.setattr(ray_app.serve, "status", lambda: st)
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: free)


def test_pending_health_says_why(monkeypatch):
    _status(monkeypatch, {"STARTING": 1}, free={"CPU": 1.5})
    out = asyncio.run(pending_health("app", "llava-edge-a", {"CPU": 4.0}))
    assert out["status"] == "pending" and "waiting for resources" in out["error"] and "4 CPU" in out["error"], out
    _status(monkeypatch, {"STARTING": 2}, message="Deployment has 2 replicas that have taken more than 30s")
    out = asyncio.run(pending_health("app", "llava-edge-a", {"CPU": 1.0}))
    assert "loading the model" in out["error"] and "Ray: Deployment has 2" in out["error"], out
    _status(monkeypatch, {"RUNNING": 1, "STARTING": 1})
    assert asyncio.run(pending_health("app", "llava-edge-a", {"CPU": 1.0})) is None
    _status(monkeypatch, {}, status="HEALTHY")
    assert asyncio.run(pending_health("app", "llava-edge-a", {}))["status"] == "idle"
    _status(monkeypatch, {}, status="DEPLOY_FAILED", message="boom")
    assert asyncio.run(pending_health("app", "llava-edge-a", {}))["status"] == "error"
    assert asyncio.run(pending_health("app", "llava-edge-x", {}))["status"] == "pending"  # the app is deploying


def test_router_health_is_503_with_the_reason_while_a_package_is_pending(monkeypatch):
    router, handles = _router(needs={"CPU": 1.0})
    monkeypatch.setattr(ray_app.serve, "get_replica_context", lambda: SimpleNamespace(app_name="app"))
    _status(monkeypatch, {"STARTING": 1}, free={"CPU": 0.0})
    # "a" waits for resources, "llava-edge-b" is not in the fake status yet: neither handle is called
    status, body = _call(router, _request("GET", "/health", {})[0])
    assert status == 503 and body["status"] == "error", body
    assert body["models"]["a"]["status"] == body["models"]["b"]["status"] == "pending", body
    assert "each replica needs" in body["models"]["a"]["error"], body
    assert not any(h.calls for h in handles.values())
