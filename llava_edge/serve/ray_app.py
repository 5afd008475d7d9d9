"""Scale-out on Ray Serve: replicas that each hold one engine, behind one OpenAI-compatible endpoint.

Ray does the distributed part (placing replicas on machines, routing, restarting dead replicas,
autoscaling on ongoing requests); this file only wraps our own FastAPI app, so a replica answers every
route exactly as ``llava-edge serve`` does. A replica loads its model before it reports ready, and
Ray's health check asks the same ``ServerState.health`` as ``/health``.

Several packages (say an fp16 and an int4 build) get one deployment each, plus a thin router that
reads the request's ``model`` and forwards the HTTP request to that package's replicas. Not Ray's
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import UsageError
from .app import ServeConfig, ServerState, create_app
from .server import parse_size

REPLICA_HEADER = "x-llava-edge-replica"
APP_IMPORT_PATH = "llava_edge.serve.ray_app:app"
API_KEY_ENV = "LLAVA_EDGE_API_KEY"


@dataclass
class RayOptions:
    """How many replicas, with what resources: the deployment side of a package's serving."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces `replicas`
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    target_ongoing_requests: float | None = None  # autoscaling target per replica; default max_slots
    max_ongoing_requests: int | None = None  # sent to one replica at once; default 2 * max_slots
    graceful_shutdown_timeout_s: float = 30.0  # a stopping replica's streams get this long to finish
    health_check_period_s: float = 10.0

    def deployment_options(self, config: ServeConfig) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests or 2 * config.max_slots,
            # the rest wait in each Ray proxy, up to --queue-size per replica; past that Ray answers 503
            "max_queued_requests": config.queue_size * max(self.replicas, self.autoscale[1] if self.autoscale else 1),
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscale:
            lo, hi = self.autoscale
            opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": self.target_ongoing_requests or config.max_slots}
        else:
            opts["num_replicas"] = self.replicas
        return opts


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in str(text).split(","))
    except ValueError:
        raise UsageError(f"--autoscale {text!r}: give MIN,MAX replicas, e.g. 1,4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise UsageError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


# builder args (strings from `serve run k=v`, typed from a YAML) -> ServeConfig and RayOptions fields
_SERVE_ARGS = {"backend": str, "max_slots": int, "api_key": str, "max_image_bytes": "size", "max_image_pixels": "size",
               "max_images_per_request": int, "max_tokens": int, "queue_size": int, "media_dir": Path, "threads": int,
               "prefill_chunk": int, "image_cache_mb": float, "ui": "bool"}
_RAY_ARGS = {"replicas": int, "autoscale": parse_autoscale, "cpus_per_replica": float, "gpus_per_replica": float,
             "target_ongoing_requests": float, "max_ongoing_requests": int, "graceful_shutdown_timeout_s": float,
             "health_check_period_s": float}


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
    names = [c.model_name for c in configs]
    if len(set(names)) != len(names):
        raise UsageError(f"two packages have the same model name (their directory names): {names}")
    return configs, options


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


@serve.deployment
class ModelRouter:
    """One endpoint for several packages: a chat request goes to the deployment named by its ``model``;
    ``/v1/models`` and ``/health`` gather every package's answer; any other route goes to the first
    package. Auth, limits and errors stay the replicas' own: the router forwards headers and body
    untouched. A plain deployment rather than a second FastAPI ingress (Ray allows one per application,
    and the package replicas have it)."""

    def __init__(self, models: dict[str, DeploymentHandle]):
        self.models = models
        self.default = next(iter(models))

    async def __call__(self, request: Request) -> Response:
        path = self._path(request)
        if request.method == "GET" and path == "/v1/models":
            data = []
            for name in self.models:
                status, headers, body = await self._call(name, request, b"")
                if status != 200:
                    return Response(body, status_code=status, headers=headers)
                data += json.loads(body)["data"]
            return JSONResponse({"object": "list", "data": data})
        if request.method == "GET" and path == "/health":
            out = {}
            for name in self.models:
                status, _, body = await self._call(name, request, b"")
                out[name] = json.loads(body) if status in (200, 503) else {"status": "error", "code": status}
            ok = all(v.get("status") == "ok" for v in out.values())
            return JSONResponse({"status": "ok" if ok else "error", "models": out}, status_code=200 if ok else 503)
        body = await request.body()
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
        status, headers = await gen.__anext__()
        data = b"".join([chunk async for chunk in gen])
        return status, {k: v for k, v in headers if k.lower() not in _HOP_HEADERS}, data


def build(configs: list[ServeConfig], options: RayOptions):
    """The Ray Serve application: one package's replicas as the ingress, or a router over several."""
    if len(configs) == 1:
        c = configs[0]
        return LlavaEdgeReplica.options(name=f"llava-edge-{c.model_name}", **options.deployment_options(c)).bind(c)
    bound = {c.model_name: PackageReplica.options(name=f"llava-edge-{c.model_name}",
                                                  **options.deployment_options(c)).bind(c)
             for c in configs}
    return ModelRouter.options(name="llava-edge-router", max_ongoing_requests=1000,
                               ray_actor_options={"num_cpus": 0.25}).bind(bound)


def app(args: dict[str, Any]):
    """Ray Serve application builder: ``serve run llava_edge.serve.ray_app:app package=PKG replicas=2``."""
    return build(*parse_args(args))


def config_yaml(args: dict[str, Any], host: str = "0.0.0.0", port: int = 8000, name: str = "llava-edge") -> str:
    """A config for ``serve deploy FILE``: the builder and its args, so Ray builds the same app."""
    import yaml

    parse_args(args)  # refuse a config that would not build
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in args.items() if v is not None and k != "api_key"}
    doc = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
           "applications": [{"name": name, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": plain}]}
    note = (f"# Written by `llava-edge serve --ray --write-config`; deploy with `serve deploy FILE`.\n"
            f"# Package paths must exist on every node. The API key is never written here: set {API_KEY_ENV}\n"
            f"# in the environment of `ray start` on every node (each replica reads it).\n")
    return note + yaml.safe_dump(doc, sort_keys=False)


def run(args: dict[str, Any], address: str | None, host: str, port: int, name: str = "llava-edge") -> None:
    """``llava-edge serve --ray``: connect to (or start) a Ray cluster, deploy, serve until Ctrl-C."""
    import ray

    configs, options = parse_args(args)
    for c in configs:
        if not c.package.is_dir():
            raise UsageError(f"package {c.package} is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ray.init(address=address)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(configs, options), name=name, route_prefix="/")
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
            serve.delete(name)
        ray.shutdown()
