"""The scrape port (``MetricsServer``): Prometheus exposition, the liveness / readiness probes,
and nothing else (405 for another method on those paths, 404 for any other path)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from stream_meta.http_server import MetricsServer


def _get(port: int, path: str) -> tuple[int, str, str]:
    """``(status, content type, body)`` of a GET, also for 4xx/5xx answers."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("test_widgets_total", "Widgets made.", registry=registry).inc(3)
    return registry


@pytest.fixture(scope="module")
def _server(registry) -> Iterator[MetricsServer]:
    """One server for the module: each close() waits out serve_forever's 0.5 s poll."""
    server = MetricsServer(registry, host="127.0.0.1", port=0)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def serve(_server) -> Iterator[Callable[..., MetricsServer]]:
    """Factory: the shared server with the given probes (reset to the defaults afterwards)."""
    defaults = (_server.health, _server.ready)

    def make(**probes) -> MetricsServer:
        _server.health = probes.pop("health", defaults[0])
        _server.ready = probes.pop("ready", defaults[1])
        assert not probes, f"unknown probes {probes}"
        return _server

    yield make
    _server.health, _server.ready = defaults


def test_metrics_returns_the_registry_exposition_when_scraped(serve) -> None:
    server = serve()
    assert server.port > 0
    status, ctype, body = _get(server.port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert "# TYPE test_widgets_total counter" in body
    assert "test_widgets_total 3.0" in body


def test_metrics_shows_new_values_when_the_registry_changes(serve, registry) -> None:
    server = serve()
    Counter("test_late_total", "Registered after start.", registry=registry).inc(5)
    _, _, body = _get(server.port, "/metrics")
    assert "test_late_total 5.0" in body


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probe_answers_200_with_reason_when_it_passes(serve, path) -> None:
    server = serve(health=lambda: (True, "loop alive"), ready=lambda: (True, "serving"))
    status, _, body = _get(server.port, path)
    assert status == 200
    assert body.strip() == ("loop alive" if path == "/healthz" else "serving")


def test_probes_answer_503_with_reason_when_they_fail(serve) -> None:
    server = serve(
        health=lambda: (False, "loop stalled for 42 s"),
        ready=lambda: (False, "restoring state"),
    )
    assert _get(server.port, "/healthz")[::2] == (503, "loop stalled for 42 s\n")
    assert _get(server.port, "/readyz")[::2] == (503, "restoring state\n")


def test_probes_are_independent_when_only_one_fails(serve) -> None:
    server = serve(health=lambda: (True, "ok"), ready=lambda: (False, "joining group"))
    assert _get(server.port, "/healthz")[0] == 200
    assert _get(server.port, "/readyz")[0] == 503


def test_readiness_follows_the_probe_when_its_answer_changes(serve) -> None:
    state = {"ready": False}
    server = serve(ready=lambda: (state["ready"], "ready" if state["ready"] else "starting"))
    assert _get(server.port, "/readyz")[::2] == (503, "starting\n")
    state["ready"] = True
    assert _get(server.port, "/readyz")[::2] == (200, "ready\n")


def test_probes_answer_200_when_no_probe_is_given(serve) -> None:
    server = serve()
    assert _get(server.port, "/healthz")[0] == 200
    assert _get(server.port, "/readyz")[0] == 200


@pytest.mark.parametrize("path", ["/nope", "/metrics/extra", "/healthz/x"])
def test_unknown_path_answers_404_when_requested(serve, path) -> None:
    server = serve()
    status, _, body = _get(server.port, path)
    assert status == 404
    assert "/metrics" in body


def test_query_string_is_ignored_when_routing(serve) -> None:
    server = serve(ready=lambda: (False, "warming up"))
    assert _get(server.port, "/readyz?verbose=1")[::2] == (503, "warming up\n")


def test_close_stops_serving_when_called(registry) -> None:
    server = MetricsServer(registry, port=0)
    port = server.port
    assert _get(port, "/healthz")[0] == 200
    server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """``(status, headers)`` of any request, also for 4xx answers."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/metrics", "/healthz", "/readyz"])
def test_the_scrape_port_refuses_other_methods_with_405_when_the_path_is_known(
    serve, method, path
) -> None:
    server = serve()
    status, headers = _request(server.port, method, path, b"{}" if method != "OPTIONS" else None)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/meta-update", "/meta-updates", "/admin", "/metricsx"])
def test_the_scrape_port_answers_404_for_any_other_path_when_requested(serve, method, path) -> None:
    server = serve()
    assert _request(server.port, method, path, b"{}" if method != "GET" else None)[0] == 404


def test_the_scrape_port_takes_no_routes_when_built() -> None:
    with pytest.raises(TypeError):
        MetricsServer(CollectorRegistry(), port=0, routes={})  # type: ignore[call-arg]


def test_head_answers_like_get_without_a_body_when_probing(serve) -> None:
    server = serve(ready=lambda: (False, "starting"))
    assert _request(server.port, "HEAD", "/readyz")[0] == 503
    assert _request(server.port, "HEAD", "/metrics")[0] == 200


def test_a_refused_post_closes_its_connection_and_gets_still_work_when_reusing_a_client(
    serve,
) -> None:
    import http.client

    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", "/metrics", body=b"x" * 100)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 405 and resp.getheader("Connection") == "close"
        for path in ("/metrics", "/healthz", "/readyz"):  # the unread body is no request
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
    finally:
        conn.close()


_SCRAPE_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(_SCRAPE_METHODS),
    path=st.one_of(
        st.sampled_from(["/", "/metrics", "/healthz", "/readyz", "/meta-update"]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(
            lambda p: "/" + p.replace("?", "").replace("#", "")
        ),
    ),
    body=st.binary(max_size=100),
)
def test_only_gets_of_the_three_paths_succeed_on_the_scrape_port_when_fuzzed(
    serve, method, path, body
) -> None:
    server = serve()
    status, _ = _request(server.port, method, path, body if method not in ("GET", "HEAD") else None)
    known = urlsplit(path).path in ("/", "/metrics", "/healthz", "/readyz")
    if known and method in ("GET", "HEAD"):
        assert status == 200
    else:
        assert status == (405 if known else 404), (method, path, status)
