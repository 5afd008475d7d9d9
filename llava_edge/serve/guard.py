"""What stands between the network and the app: host and origin checks, slow clients, connection cap.

Why this exists: a kiosk server usually has a browser open on the same machine, and a keyless server on
127.0.0.1 is reachable by any page that browser loads. A foreign page can POST a "simple" request
(``Content-Type: text/plain`` needs no CORS preflight), and DNS rebinding (evil.example resolving to
127.0.0.1 after the page loaded) lets it read the answers too. So, on by default:

- ``Host`` must name this server: a loopback name, an IP literal (rebinding needs a hostname the attacker
  controls), the bound address, this machine's hostname, or an ``--allowed-host`` value;
- a request that carries ``Origin`` must come from this server's own origin (the kiosk page) or an
  ``--allow-origin`` value; ``Origin: null`` (sandboxed frames, files) is refused;
- a POST with a body must say ``Content-Type: application/json``, which a cross-origin page cannot send without a
  preflight that we never answer.

The second half is the transport: uvicorn never times out a client that trickles its request headers,
and accepts connections until file descriptors run out. :class:`GuardedH11Protocol` closes a connection
whose headers are not complete within ``header_timeout`` and refuses connections over ``max_connections``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from .protocol import ApiError

log = logging.getLogger("llava_edge.serve")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
WILDCARD = "*"


@dataclass(frozen=True)
class Guard:
    """The host/origin policy of one server; built once from ServeConfig."""

    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    hostnames: frozenset[str] = field(default_factory=lambda: _machine_names())

    def host_ok(self, host_header: str) -> bool:
        if WILDCARD in self.allowed_hosts:
            return True
        name = split_host(host_header)
        if name is None:
            return False
        if name in LOOPBACK_NAMES or _is_ip(name) or name == self.bind_host.lower() or name in self.hostnames:
            return True
        return any(name == h.lower() or (h.startswith(".") and name.endswith(h.lower()))
                   for h in self.allowed_hosts)

    def origin_ok(self, origin: str, host_header: str) -> bool:
        if WILDCARD in self.allowed_origins or origin.rstrip("/") in self.allowed_origins:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.strip().lower()


def bearer_ok(header: str, key: str) -> bool:
    """``Authorization: Bearer KEY``, compared as bytes in constant time after the header's strip; the
    key itself is printable ASCII (serve/settings.check_api_key refuses any other at start)."""
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1", "replace"),
                                                              key.encode())


def not_json(content_type: str) -> str | None:
    """Why a POST body with this Content-Type header is refused, or None for JSON (charset allowed)."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json":
        return None
    return f"POST bodies must be sent with 'Content-Type: application/json', not {ctype or 'none'!r}"


def split_host(host_header: str) -> str | None:
    """The name of a Host header without its port, lower case; None when it is not a host[:port]."""
    h = host_header.strip().lower()
    if not h or any(c in h for c in "/@?# \t"):
        return None
    if h.startswith("["):  # [v6]:port
        end = h.find("]")
        return h[1:end] if end > 0 else None
    name, sep, port = h.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name.rstrip(".")
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _machine_names() -> frozenset[str]:
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return frozenset(n for n in names if n) | frozenset(n + ".local" for n in names if "." not in n)


Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class GuardMiddleware:
    """Pure ASGI middleware (no body buffering) answering refusals as OpenAI error JSON."""

    def __init__(self, app: ASGIApp, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), refusal.message)
                await _send_error(send, refusal)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> ApiError | None:
        headers = _headers(scope)
        host = headers.get("host", "")
        if not self.guard.host_ok(host):
            return ApiError(403, f"Host {host!r} is not this server's; start it with --allowed-host NAME to serve "
                            "that name (this protects against DNS rebinding)", "forbidden_host")
        origin = headers.get("origin")
        if origin is not None and not self.guard.origin_ok(origin, host):
            return ApiError(403, f"requests from the page at {origin!r} are refused; start the server with "
                            "--allow-origin ORIGIN to accept them", "forbidden_origin")
        has_body = headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers
        if scope.get("method") == "POST" and has_body:  # a bodiless POST (the debug routes) carries no JSON
            wrong = not_json(headers.get("content-type", ""))
            if wrong:
                return ApiError(415, wrong, "unsupported_media_type")
        return None


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


async def _send_error(send: Callable, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a deadline for request headers and a cap on open connections.

    The deadline is armed when a connection opens and again after each response (a kept-alive
    connection that starts a new request must finish its headers in time too); it is disarmed when
    h11 has parsed a whole request head. A connection over the cap is closed before any byte is read,
    so a flood of idle sockets cannot exhaust file descriptors or starve real clients of the event loop.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = None
            if len(self.connections) > max_connections:
                log.warning("connection refused: %d connections open (--max-connections %d)",
                            len(self.connections) - 1, max_connections)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection whose request headers took over %.0f s", header_timeout)
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if getattr(self, "_header_timer", None) is not None and self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
