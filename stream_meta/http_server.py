"""The HTTP listeners of a process: a read-only scrape port and a loopback admin port.

:class:`MetricsServer` (``[metrics]``, default ``127.0.0.1:9108``; deploys bind ``0.0.0.0``) is
where Prometheus and the Kubernetes probes look. It serves ``GET`` (and ``HEAD``) of
``/metrics`` (also ``/``), ``/healthz`` and ``/readyz`` and nothing else: any other method on
one of those paths answers **405** (``Allow: GET, HEAD``), any other path **404**, whatever
the method. Nothing on it changes state. ``/healthz`` answers 200 while the process's loop is
alive (a liveness probe restarts it otherwise); ``/readyz`` answers 200 once it serves
(restored state, joined its consumer group) and 503 with the reason before.

:class:`AdminServer` (``[admin]``, default ``127.0.0.1:9109``) carries the control routes a
process adds (``routes``: JSON routes by ``(method, path)``, e.g. ``POST /meta-update``,
``GET /meta-updates``). With a ``token`` every request must carry
``Authorization: Bearer <token>``, checked in constant time (:func:`hmac.compare_digest`)
*before* the path or the body is looked at: without the header it answers **401** (with
``WWW-Authenticate: Bearer``), with another token **403**; no route runs. Then an unknown
``(method, path)`` answers 404, a body that is not a JSON object (or over 64 KiB) 400/413,
and a route that raises 500. Every request is counted in
``stream_meta_admin_requests_total{outcome}`` (:data:`ADMIN_OUTCOMES`); refusals are logged
with the client address, method and path, never the header. Without a token (allowed on
loopback only: see :func:`stream_meta.cli.common.admin_server`) every request is let through.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from stream_meta.metrics import AdminMetrics

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, str]]
#: a JSON route: the request body (parsed JSON, {} when empty) -> (status code, JSON reply)
Route = Callable[[dict[str, Any]], tuple[int, Any]]

#: the scrape port's paths (all GET)
SCRAPE_PATHS = ("/", "/metrics", "/healthz", "/readyz")
#: the largest admin request body read
MAX_BODY = 65_536
#: methods both servers answer themselves (others get http.server's 501)
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


def _always() -> tuple[bool, str]:
    return True, "ok"


class _Handler(BaseHTTPRequestHandler):
    """Shared plumbing: every method goes to :meth:`handle_any`."""

    # http.server's own error pages (malformed request lines, unknown methods) stay short
    error_content_type = "text/plain"
    error_message_format = "%(code)d %(message)s\n"

    def handle_any(self) -> None:
        raise NotImplementedError

    def _reply(
        self,
        code: int,
        body: bytes,
        ctype: str = "text/plain",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would flood the log


for _method in _METHODS:
    setattr(_Handler, f"do_{_method}", lambda self: self.handle_any())


class _Server:
    """A ``ThreadingHTTPServer`` on ``host:port`` in a daemon thread; ``port=0`` picks a
    free port (see :attr:`port`)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, port: int, name: str):
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class MetricsServer(_Server):
    """Serve ``registry`` and the two probes, read-only (see the module docstring)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 9108,
        health: Probe = _always,
        ready: Probe = _always,
    ) -> None:
        self.registry, self.health, self.ready = registry, health, ready
        server = self

        class Handler(_Handler):
            def handle_any(self) -> None:
                if self.command not in ("GET", "HEAD"):
                    self.close_connection = True  # an unread body must not become a request
                path = urlsplit(self.path).path
                if path not in SCRAPE_PATHS:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")
                elif self.command not in ("GET", "HEAD"):
                    msg = b"the metrics port is read-only (GET only)\n"
                    self._reply(405, msg, headers={"Allow": "GET, HEAD"})
                elif path in ("/metrics", "/"):
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._reply(200, encoder(server.registry), content_type)
                else:
                    ok, why = (server.health if path == "/healthz" else server.ready)()
                    self._reply(200 if ok else 503, f"{why}\n".encode())

        super().__init__(Handler, host, port, "metrics-http")


class AdminServer(_Server):
    """Serve ``routes`` behind the bearer ``token`` (None: no check; see the module docstring).

    ``metrics`` counts the requests by outcome (a fresh, unregistered set when None).
    """

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Route],
        *,
        host: str = "127.0.0.1",
        port: int = 9109,
        token: str | None = None,
        metrics: AdminMetrics | None = None,
    ) -> None:
        if token is not None and not token:
            raise ValueError("the admin token is empty")
        self.routes = dict(routes)
        self.metrics = metrics or AdminMetrics(None)
        expected = None if token is None else token.encode()
        server = self

        class Handler(_Handler):
            def handle_any(self) -> None:
                self.close_connection = True  # a refused request's body is never read
                if self._authorised():
                    self._dispatch()

            def _answer(
                self,
                outcome: str,
                code: int,
                body: bytes,
                ctype: str = "text/plain",
                headers: Mapping[str, str] | None = None,
            ) -> None:
                """Count the request's ``outcome`` (before the client can see the answer),
                then answer."""
                server.metrics.requests.labels(outcome).inc()
                self._reply(code, body, ctype, headers)

            def _authorised(self) -> bool:
                """Whether the request may go on; if not it is answered (401 or 403)."""
                if expected is None:
                    return True
                given = self.headers.get("Authorization")
                scheme, _, credentials = (given or "").strip().partition(" ")
                if not given or scheme.lower() != "bearer" or not credentials.strip():
                    self._refuse(401, "unauthorized", b"a bearer token is required\n")
                    return False
                if not hmac.compare_digest(credentials.strip().encode(), expected):
                    self._refuse(403, "forbidden", b"wrong token\n")
                    return False
                return True

            def _refuse(self, code: int, outcome: str, body: bytes) -> None:
                log.warning(
                    "admin request refused (%s): %s %r from %s",
                    outcome,
                    self.command,
                    self.path[:200],
                    self.client_address[0],
                )
                headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
                self._answer(outcome, code, body, headers=headers)

            def _dispatch(self) -> None:
                route = server.routes.get((self.command, urlsplit(self.path).path))
                if route is None:
                    self._answer("not_found", 404, b"no such action\n")
                    return
                try:
                    size = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    size = -1
                if size < 0:
                    self._answer("bad_request", 400, b"bad Content-Length\n")
                    return
                if size > MAX_BODY:
                    self._answer("bad_request", 413, b"request body too large\n")
                    return
                raw = self.rfile.read(size) if size else b""
                try:
                    body = json.loads(raw) if raw.strip() else {}
                    if not isinstance(body, dict):
                        raise ValueError("the body must be a JSON object")
                except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError too
                    self._answer("bad_request", 400, f"bad request body: {exc}\n".encode())
                    return
                try:
                    code, reply = route(body)
                except Exception:
                    log.exception("admin route %s %s failed", self.command, self.path[:200])
                    self._answer("error", 500, b"internal error\n")
                    return
                reply_body = (json.dumps(reply) + "\n").encode()
                self._answer("ok", code, reply_body, "application/json")

        super().__init__(Handler, host, port, "admin-http")
