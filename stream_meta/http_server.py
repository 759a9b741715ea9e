"""The HTTP endpoint of a process: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``.

``/healthz`` answers 200 while the process's loop is alive (a liveness probe restarts it
otherwise); ``/readyz`` answers 200 once it serves (restored state, joined its consumer group)
and 503 with the reason before. A process may add JSON routes (``routes``: ``GET`` and
``POST`` paths, e.g. ``POST /meta-update``). Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

Probe = Callable[[], tuple[bool, str]]
#: a JSON route: the request body (parsed JSON, {} when empty) -> (status code, JSON reply)
Route = Callable[[dict[str, Any]], tuple[int, Any]]


def _always() -> tuple[bool, str]:
    return True, "ok"


class AdminServer:
    """Serve ``registry`` and the two probes on ``host:port`` from a daemon thread.

    ``port=0`` picks a free port (see :attr:`port`).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 9108,
        health: Probe = _always,
        ready: Probe = _always,
        routes: Mapping[tuple[str, str], Route] | None = None,
    ) -> None:
        self.registry, self.health, self.ready = registry, health, ready
        self.routes = dict(routes or {})
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path in ("/metrics", "/"):
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._reply(200, encoder(server.registry), content_type)
                elif path in ("/healthz", "/readyz"):
                    ok, why = (server.health if path == "/healthz" else server.ready)()
                    self._reply(200 if ok else 503, f"{why}\n".encode(), "text/plain")
                elif ("GET", path) in server.routes:
                    self._route(server.routes[("GET", path)], {})
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                route = server.routes.get(("POST", path))
                if route is None:
                    self._reply(404, b"no such action\n")
                    return
                size = int(self.headers.get("Content-Length") or 0)
                if size > 65_536:
                    self._reply(413, b"request body too large\n")
                    return
                raw = self.rfile.read(size) if size else b""
                try:
                    body = json.loads(raw) if raw.strip() else {}
                    if not isinstance(body, dict):
                        raise ValueError("the body must be a JSON object")
                except ValueError as exc:
                    self._reply(400, f"bad request body: {exc}\n".encode())
                    return
                self._route(route, body)

            def _route(self, route: Route, body: dict[str, Any]) -> None:
                code, reply = route(body)
                self._reply(code, (json.dumps(reply) + "\n").encode(), "application/json")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would flood the log

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="admin-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
