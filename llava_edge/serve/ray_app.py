"""Scale-out on Ray Serve: replicas that each hold one engine, behind one OpenAI-compatible endpoint.

Ray does the distributed part (placing replicas on machines, routing, restarting dead replicas,
autoscaling on ongoing requests); this file only wraps our own FastAPI app, so a replica answers every
route exactly as ``llava-edge serve`` does. A replica loads its model before it reports ready, and
Ray's health check asks the same ``ServerState.health`` as ``/health``.

Several packages (say an fp16 and an int4 build) get one deployment each, plus a thin router that
reads the request's ``model`` (after checking the API key, the content type and the body size) and
forwards the HTTP request to that package's replicas. Not Ray's
model multiplexing: it picks the replica from a header before the body is read, and it loads and
evicts models inside a replica on demand; our engines pre-allocate their KV slots and keep continuous
batches running, so each package keeps its own replicas, resources and autoscaling instead.

``serve run llava_edge.serve.ray_app:app package=PKG_DIR replicas=2`` (or a config YAML from
``llava-edge serve PKG --ray --write-config FILE``, or ``llava-edge serve PKG --ray``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import UsageError
from ..runtime.sizes import parse_size
from .app import ServeConfig, ServerState, body_limit, create_app, read_limited
from .guard import bearer_ok, not_json
from .protocol import ApiError, api_key_error
from .settings import API_KEY_ENV, RayOptions, parse_autoscale, ray_settings, serve_settings

REPLICA_HEADER = "x-llava-edge-replica"
APP_IMPORT_PATH = "llava_edge.serve.ray_app:app"
NO_RESOURCE_CHECK_ENV = "LLAVA_EDGE_RAY_NO_RESOURCE_CHECK"

log = logging.getLogger(__name__)


# builder args (strings from `serve run k=v`, typed from a YAML) -> ServeConfig and RayOptions fields; the
# ServeConfig side is its option fields that Ray forwards (serve/settings.py), typed by their kind
_KIND_TYPES = {"str": str, "int": int, "float": float, "path": Path}
_SERVE_ARGS = {s.name: _KIND_TYPES.get(s.kind, s.kind) for s in serve_settings() if s.ray}
_RAY_ARGS = {s.name: parse_autoscale if s.kind == "autoscale" else _KIND_TYPES[s.kind] for s in ray_settings()}


def parse_args(args: dict[str, Any]) -> tuple[list[ServeConfig], RayOptions]:
    """``package`` (one directory, or several separated by commas) plus any ServeConfig/RayOptions field."""
    unknown = set(args) - {"package"} - set(_SERVE_ARGS) - set(_RAY_ARGS)
    if unknown or "package" not in args:
        raise UsageError(f"ray_app args: need package=PKG_DIR[,PKG_DIR...]; unknown: {sorted(unknown)}; known: "
                         f"{sorted({'package', *_SERVE_ARGS, *_RAY_ARGS})}")

    def convert(name: str, kind: Any, value: Any) -> Any:
        if value is None:
            return None
        if kind == "bool":  # a YAML config gives a bool; `serve run ... ui=false` gives a string
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return str(value).lower() in ("1", "true", "yes", "on")
            raise UsageError(f"ray_app arg {name}={value!r}: expected true or false")
        if kind == "size":
            return value if isinstance(value, int) else parse_size(str(value), name)
        if kind == "list":  # a YAML list, a CLI list, or `serve run ... allowed_hosts=a,b`
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(str(v).strip() for v in items if str(v).strip())
        if not isinstance(kind, type):
            return kind(value)  # a parser with its own error message
        try:
            return value if isinstance(value, kind) else kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"ray_app arg {name}={value!r}: expected {getattr(kind, '__name__', kind)}") from None

    serve_kw = {k: convert(k, t, args[k]) for k, t in _SERVE_ARGS.items() if k in args}
    serve_kw.setdefault("api_key", os.environ.get(API_KEY_ENV))  # a config file should not hold the key
    ray_kw = {k: convert(k, t, args[k]) for k, t in _RAY_ARGS.items() if k in args}
    options = RayOptions(**ray_kw)
    if serve_kw.get("threads") is None:
        serve_kw["threads"] = max(1, int(options.cpus_per_replica))  # onnxruntime gets the CPUs Ray reserved
    packages = [Path(p.strip()) for p in str(args["package"]).split(",") if p.strip()]
    configs = [ServeConfig(p, **serve_kw) for p in packages]
    for c in configs:
        c.validate()  # the same checks as `serve` (serve/settings.py), before any replica starts
    names = [c.model_name for c in configs]
    if len(set(names)) != len(names):
        raise UsageError(f"two packages have the same model name (their directory names): {names}")
    return configs, options


ROUTER_CPUS = 0.25  # the router of several packages: one replica, mostly waiting on I/O


def _num(x: float) -> str:
    return f"{x:g}"


def _plural(n: float, word: str) -> str:
    return f"{_num(n)} {word}" + ("" if n == 1 else "s")


def check_resources(configs: list[ServeConfig], options: RayOptions, total: dict[str, float] | None = None,
                    nodes: list[dict[str, float]] | None = None) -> None:
    """Refuse a deployment the Ray cluster can never place (Ray would keep its replicas pending forever,
    and the endpoint would wait on them without an answer). ``total`` is ``ray.cluster_resources()``,
    ``nodes`` each alive node's resources (``ray.nodes()``); read from the connected cluster when not given.
    Counts the replicas Ray starts first: ``--replicas``, or the autoscaler's initial ``max(MIN, 1)``."""
    if total is None or nodes is None:
        import ray

        total = ray.cluster_resources() if total is None else total
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)] if nodes is None else nodes
    n = max(options.autoscale[0], 1) if options.autoscale else options.replicas
    count = len(configs) * n
    what = (f"{len(configs)} packages x {_plural(n, 'replica')}" if len(configs) > 1 else _plural(n, "replica"))
    for key, unit, flag, per in (("CPU", "CPU", "--cpus-per-replica", options.cpus_per_replica),
                                 ("GPU", "GPU", "--gpus-per-replica", options.gpus_per_replica)):
        if per <= 0:
            continue
        router = ROUTER_CPUS if key == "CPU" and len(configs) > 1 else 0.0
        need, have = count * per + router, float(total.get(key, 0.0))
        fix = f"lower {flag}" + (" or --replicas" if not options.autoscale and n > 1 else
                                 " or the autoscale MIN" if options.autoscale and options.autoscale[0] > 1 else "")
        if need > have + 1e-9:
            extra = f" + the router's {_num(router)}" if router else ""
            raise UsageError(f"{what} x {_plural(per, unit)}{extra} needs {_plural(need, unit)}; the Ray cluster "
                             f"has {_num(have)} ({fix} or add nodes)")
        largest = max((float(r.get(key, 0.0)) for r in nodes), default=have)
        if per > largest + 1e-9:
            raise UsageError(f"one replica needs {_plural(per, unit)} on one node; the Ray cluster's largest node "
                             f"has {_num(largest)} ({fix} or add a larger node)")


def _needs(options: RayOptions) -> dict[str, float]:
    return {k: v for k, v in (("CPU", options.cpus_per_replica), ("GPU", options.gpus_per_replica)) if v > 0}


async def pending_health(app_name: str, deployment: str, needs: dict[str, float]) -> dict[str, Any] | None:
    """``None`` when ``deployment`` has a running replica (its own ``/health`` answers); otherwise the
    body of a 503 that says why not: replicas waiting for resources or loading their model, a failed
    deployment, or none (autoscaled to zero: ``{"status": "idle"}``, not an error)."""
    import ray

    def look():
        st = serve.status().applications.get(app_name)
        dep = st.deployments.get(deployment) if st else None
        return dep, ray.available_resources()

    dep, free = await asyncio.to_thread(look)
    if dep is None:
        return {"status": "pending", "error": f"{deployment}: not deployed yet (app {app_name} is deploying)"}
    states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
    if states.get("RUNNING"):
        return None
    status = str(getattr(dep.status, "value", dep.status))
    if status in ("DEPLOY_FAILED", "UNHEALTHY"):
        return {"status": "error", "error": f"{deployment}: {status.lower()}: {dep.message}"}
    starting = sum(states.values())
    if not starting:
        return {"status": "idle", "replicas": 0}
    short = [f"{_num(v)} {k}" for k, v in needs.items() if v > float(free.get(k, 0.0)) + 1e-9]
    why = (f"waiting for resources: each replica needs {', '.join(f'{_num(v)} {k}' for k, v in needs.items())}, "
           f"the cluster has {', '.join(f'{_num(float(free.get(k, 0.0)))} {k}' for k in needs)} free" if short
           else "loading the model (or waiting for a place)")
    msg = f"{deployment}: no replica running yet ({_plural(starting, 'replica')} starting: {why})"
    return {"status": "pending", "error": msg + (f"; Ray: {dep.message}" if dep.message else "")}


class _ReplicaHeader:
    """ASGI middleware: every response says which replica answered (per-replica counts, debugging)."""

    def __init__(self, app: Any, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class EngineReplica:
    """One engine and the plain server's FastAPI app over it. Deployed as the application's HTTP ingress
    (one package: Ray's proxy calls the app), or as a plain deployment that the router calls through
    ``forward`` (several packages: Ray allows one FastAPI ingress per application)."""

    async def __init__(self, config: ServeConfig):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        config.api_key = config.api_key or os.environ.get(API_KEY_ENV)  # set by `ray start` on this node
        self.state = ServerState(config)
        await asyncio.to_thread(self.state.load, asyncio.get_running_loop())
        if self.state.worker is None:  # Ray reports the deployment as failed with this message
            raise RuntimeError(f"{config.model_name}: {self.state.load_error}")
        self.asgi = create_app(config, self.state)
        self.asgi.add_middleware(_ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi

    async def check_health(self) -> None:
        code, body = self.state.health()
        if code != 200:
            raise RuntimeError(f"unhealthy: {body}")

    async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> AsyncIterator[Any]:
        """One HTTP request through this replica's app, for the router: yields ``(status, headers)``,
        then the body in the chunks the app sends (a stream stays a stream). Cancelling the generator
        (the client left) cancels the request, which frees its slot as a disconnect does."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "headers": headers, "root_path": "", "client": None, "server": None}
        out: asyncio.Queue = asyncio.Queue()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # no disconnect until this generator is cancelled
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.asgi(scope, receive, out.put)
            finally:
                out.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (msg := await out.get()) is not None:
                if msg["type"] == "http.response.start":
                    yield msg["status"], [(k.decode(), v.decode()) for k, v in msg.get("headers", [])]
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        break
        finally:
            task.cancel()

    async def __del__(self) -> None:
        """Ray calls this once the replica's requests are done: a stopping replica takes no new requests
        and its streams get ``graceful_shutdown_timeout_s`` to finish; streams still running then are
        cut by Ray's kill (the client sees a closed connection, not a hang)."""
        state = getattr(self, "state", None)
        if state is not None and state.worker is not None:
            state.worker.stop()


LlavaEdgeReplica = serve.deployment(serve.ingress()(EngineReplica))
PackageReplica = serve.deployment(EngineReplica)


_HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}  # of the response: it is re-chunked


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return _answer(ApiError(status, message, code, param))


def _answer(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@serve.deployment
class ModelRouter:
    """One endpoint for several packages: a chat request goes to the deployment named by its ``model``;
    ``/v1/models`` and ``/health`` gather every package's answer; any other route goes to the first
    package. Before it reads a body the router checks what the replicas would check first: the API key
    (on POST and ``/v1/models``), a JSON content type on a POST, and the body size (the
    declared Content-Length, then the bytes as they stream in). The rest (limits, errors) stays the
    replicas' own: the router forwards headers and body untouched. ``/health`` answers 503 with the
    reason while a package has no running replica (pending placement, loading) instead of waiting on
    it. A plain deployment rather than a second FastAPI ingress (Ray allows one per application, and
    the package replicas have it)."""

    HEALTH_TIMEOUT_S = 10.0

    def __init__(self, models: dict[str, DeploymentHandle], api_key: str | None = None,
                 max_body: int | None = None, needs: dict[str, float] | None = None):
        self.models = models
        self.default = next(iter(models))
        self.api_key = api_key or os.environ.get(API_KEY_ENV)  # set by `ray start` on this node
        self.max_body = max_body if max_body is not None else body_limit(ServeConfig(Path(".")))
        self.needs = needs or {}

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        return bearer_ok(request.headers.get("authorization", ""), self.api_key)

    async def _read_body(self, request: Request) -> bytes | Response:
        """The body, or the error answered without reading it: 401, 415, 400/413 on the declared length,
        413 once the streamed bytes pass the limit (app.read_limited, as the replicas read)."""
        post = request.method == "POST"
        if post and not self._authorized(request):
            return _answer(api_key_error())
        wrong = not_json(request.headers.get("content-type", "")) if post else None
        if wrong:  # as the replicas' guard answers (a bodiless POST included: every routed POST is a chat)
            return _error(415, wrong, "unsupported_media_type")
        try:
            body = await read_limited(request, self.max_body)
        except ApiError as e:
            return _answer(e)
        return Response(status_code=499) if body is None else body  # None: the client left mid-upload

    async def __call__(self, request: Request) -> Response:
        path = self._path(request)
        if request.method == "GET" and path == "/v1/models":
            if not self._authorized(request):
                return _answer(api_key_error())
            data = []
            for name in self.models:
                status, headers, body = await self._call(name, request, b"")
                if status != 200:
                    return Response(body, status_code=status, headers=headers)
                data += json.loads(body)["data"]
            return JSONResponse({"object": "list", "data": data})
        if request.method == "GET" and path == "/health":
            out = {name: await self._health(name, request) for name in self.models}
            ok = all(v.get("status") in ("ok", "idle") for v in out.values())
            return JSONResponse({"status": "ok" if ok else "error", "models": out}, status_code=200 if ok else 503)
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        name = self.default
        if request.method == "POST" and body:
            try:
                name = json.loads(body).get("model") or self.default
            except (ValueError, AttributeError):
                pass  # the replica answers with its own invalid_json error
        if name not in self.models:
            return JSONResponse({"error": {"message": f"model {name!r} is not served here; models: "
                                           f"{', '.join(self.models)}", "type": "invalid_request_error",
                                           "param": "model", "code": "model_not_found"}}, status_code=404)
        gen = self._open(name, request, body)
        try:
            status, headers = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in gen:
                    yield chunk
            finally:
                gen.cancel()

        return StreamingResponse(rest(), status_code=status,
                                 headers={k: v for k, v in headers if k.lower() not in _HOP_HEADERS})

    async def _health(self, name: str, request: Request) -> dict[str, Any]:
        """One package's ``/health``: its replica's answer, or why there is none (never a wait on
        replicas that are not running)."""
        try:
            ctx = serve.get_replica_context()
            pending = await pending_health(ctx.app_name, f"llava-edge-{name}", self.needs)
        except Exception as e:  # noqa: BLE001 - outside a replica (unit tests) or the controller is away
            log.debug("no deployment status for %s: %s", name, e)
            pending = None
        if pending is not None:
            return pending
        try:
            status, _, body = await asyncio.wait_for(self._call(name, request, b""), self.HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return {"status": "error", "error": f"no answer from llava-edge-{name} within {self.HEALTH_TIMEOUT_S:g} s"}
        return json.loads(body) if status in (200, 503) else {"status": "error", "code": status}

    @staticmethod
    def _path(request: Request) -> str:
        path, root = request.scope["path"], request.scope.get("root_path", "")
        if root and path.startswith(root):  # the app's own path, under any route prefix
            path = path[len(root):] or "/"
        return path

    def _open(self, name: str, request: Request, body: bytes):
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"transfer-encoding", b"connection")]
        return self.models[name].options(stream=True).forward.remote(
            request.method, self._path(request), request.url.query.encode(), headers, body)

    async def _call(self, name: str, request: Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        gen = self._open(name, request, body)
        try:
            status, headers = await gen.__anext__()
            data = b"".join([chunk async for chunk in gen])
        finally:
            gen.cancel()
        return status, {k: v for k, v in headers if k.lower() not in _HOP_HEADERS}, data


@serve.deployment
class StartingHealth:
    """``/health`` of a one-package app while its replicas are pending: Ray's proxy would hold the request
    until a replica runs (forever, when none can be placed). ``run`` deploys this at ``/health`` (a longer
    route prefix than the app's ``/``, so Ray's proxy sends ``/health`` here) until the app is running,
    then deletes it and ``/health`` is the replicas' own again."""

    def __init__(self, app_name: str, deployment: str, needs: dict[str, float]):
        self.app_name, self.deployment, self.needs = app_name, deployment, needs

    async def __call__(self, request: Request) -> Response:
        body = await pending_health(self.app_name, self.deployment, self.needs)
        if body is None:  # a replica runs; the app is finishing its update (this route goes away next)
            return JSONResponse({"status": "ok", "deployment": self.deployment, "note": "the app is still updating"})
        return JSONResponse(body, status_code=200 if body["status"] == "idle" else 503)


def build(configs: list[ServeConfig], options: RayOptions):
    """The Ray Serve application: one package's replicas as the ingress, or a router over several."""
    if len(configs) == 1:
        c = configs[0]
        return LlavaEdgeReplica.options(name=f"llava-edge-{c.model_name}", **options.deployment_options(c)).bind(c)
    keys = {c.api_key for c in configs}
    if len(keys) > 1:
        raise UsageError("packages behind one router share one API key")
    bound = {c.model_name: PackageReplica.options(name=f"llava-edge-{c.model_name}",
                                                  **options.deployment_options(c)).bind(c)
             for c in configs}
    return ModelRouter.options(name="llava-edge-router", max_ongoing_requests=1000,
                               ray_actor_options={"num_cpus": ROUTER_CPUS}).bind(
        bound, api_key=keys.pop(), max_body=max(body_limit(c) for c in configs), needs=_needs(options))


def app(args: dict[str, Any]):
    """Ray Serve application builder: ``serve run llava_edge.serve.ray_app:app package=PKG replicas=2``."""
    return build(*parse_args(args))


def config_yaml(args: dict[str, Any], host: str = "0.0.0.0", port: int = 8000, name: str = "llava-edge") -> str:
    """A config for ``serve deploy FILE``: the builder and its args, so Ray builds the same app."""
    import yaml

    parse_args(args)  # refuse a config that would not build
    plain = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
             for k, v in args.items() if v is not None and k != "api_key"}
    doc = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
           "applications": [{"name": name, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": plain}]}
    note = (f"# Written by `llava-edge serve --ray --write-config`; deploy with `serve deploy FILE`.\n"
            f"# Package paths must exist on every node. The API key is never written here: set {API_KEY_ENV}\n"
            f"# in the environment of `ray start` on every node (each replica reads it).\n")
    return note + yaml.safe_dump(doc, sort_keys=False)


def run(args: dict[str, Any], address: str | None, host: str, port: int, name: str = "llava-edge") -> None:
    """``llava-edge serve --ray``: connect to (or start) a Ray cluster, refuse what it cannot place,
    deploy, serve until Ctrl-C."""
    import ray

    configs, options = parse_args(args)
    for c in configs:
        if not c.package.is_dir():
            raise UsageError(f"package {c.package} is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ray.init(address=address)
    try:
        if os.environ.get(NO_RESOURCE_CHECK_ENV) != "1":  # a cluster whose autoscaler adds nodes on demand
            check_resources(configs, options)
    except BaseException:
        ray.shutdown()
        raise
    starting = f"{name}-starting"
    try:
        serve.start(http_options={"host": host, "port": port})
        if len(configs) == 1:  # /health answers 503 with the reason until a replica runs (the router does it itself)
            serve.run(StartingHealth.options(name="llava-edge-starting", ray_actor_options={"num_cpus": 0}).bind(
                name, f"llava-edge-{configs[0].model_name}", _needs(options)), name=starting, route_prefix="/health")
        serve.run(build(configs, options), name=name, route_prefix="/")
        if len(configs) == 1:
            serve.delete(starting)
        print(f"serving {', '.join(c.model_name for c in configs)} on http://{host}:{port}/v1 through Ray "
              f"(Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # replicas get graceful_shutdown_timeout_s to finish their streams
        if address is None:
            serve.shutdown()
        else:
            for app_name in (starting, name):
                try:
                    serve.delete(app_name)
                except Exception:  # noqa: BLE001 - not deployed (yet)
                    pass
        ray.shutdown()
