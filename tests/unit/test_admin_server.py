"""The admin port (``AdminServer``): control routes behind a bearer token.

Without the token no route runs (401 without one, 403 with a wrong one, counted, logged
without it); a real meta-updater behind it is never asked for an update then. Hypothesis
sends random methods, paths, headers and bodies: the server always answers, and a route runs
only with the right token. Also the settings and the start-up rules (a host beyond loopback
needs a token; a missing or empty token file stops the process) and ``stream-meta
meta-update``'s token handling.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from stream_meta.cli.common import UsageError, admin_server
from stream_meta.cli.serve import _admin_call
from stream_meta.config import ConfigError, is_loopback, load_settings
from stream_meta.http_server import AdminServer
from stream_meta.metrics import ADMIN_OUTCOMES, AdminMetrics

TOKEN = "s3cret-token-0123456789"


class Calls:
    """Routes that count what reached them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []

    def post(self, body: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            self.bodies.append(body)
        return 202, {"accepted": True, "model_version": 1, "records": 0}

    def routes(self) -> dict[tuple[str, str], Any]:
        return {("POST", "/meta-update"): self.post, ("GET", "/meta-updates"): self.get}

    def get(self, _body: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            return 200, {"requests": len(self.bodies)}


def _count(metrics: AdminMetrics, outcome: str) -> float:
    return float(metrics.requests.labels(outcome)._value.get())


def _call(
    port: int, method: str, path: str, body: bytes | None = None, auth: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {} if auth is None else {"Authorization": auth}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[AdminServer, Calls]]:
    calls = Calls()
    server = AdminServer(calls.routes(), port=0, token=TOKEN)
    try:
        yield server, calls
    finally:
        server.close()


def test_the_right_token_reaches_the_route_when_sent(guarded) -> None:
    server, calls = guarded
    before = len(calls.bodies), _count(server.metrics, "ok")
    status, _, body = _call(
        server.port, "POST", "/meta-update", b'{"reason": "x"}', f"Bearer {TOKEN}"
    )
    assert status == 202 and json.loads(body)["accepted"] is True
    assert len(calls.bodies) == before[0] + 1 and calls.bodies[-1] == {"reason": "x"}
    assert _count(server.metrics, "ok") == before[1] + 1
    assert _call(server.port, "GET", "/meta-updates", auth=f"bearer  {TOKEN} ")[0] == 200


@pytest.mark.parametrize(
    "auth", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", TOKEN, f"Token {TOKEN}"]
)
@pytest.mark.parametrize(
    "method,path", [("POST", "/meta-update"), ("GET", "/meta-updates"), ("POST", "/nope")]
)
def test_a_missing_token_answers_401_and_runs_nothing_when_requested(
    guarded, auth, method, path
) -> None:
    server, calls = guarded
    before = len(calls.bodies), _count(server.metrics, "unauthorized")
    status, headers, _ = _call(server.port, method, path, b"{}", auth)
    assert status == 401
    assert headers["WWW-Authenticate"] == "Bearer"
    assert len(calls.bodies) == before[0]
    assert _count(server.metrics, "unauthorized") == before[1] + 1


@pytest.mark.parametrize(
    "wrong", ["x", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "Bearer " + TOKEN, "é" * 5]
)
def test_a_wrong_token_answers_403_and_runs_nothing_when_requested(guarded, wrong) -> None:
    server, calls = guarded
    before = len(calls.bodies), _count(server.metrics, "forbidden")
    status, headers, _ = _call(
        server.port, "POST", "/meta-update", b"{}", "Bearer " + wrong.encode().decode("latin-1")
    )
    assert status == 403
    assert "WWW-Authenticate" not in headers
    assert len(calls.bodies) == before[0]
    assert _count(server.metrics, "forbidden") == before[1] + 1


def test_refusals_are_logged_without_the_token_when_they_happen(guarded, caplog) -> None:
    server, _ = guarded
    with caplog.at_level(logging.WARNING, logger="stream_meta.http_server"):
        _call(server.port, "POST", "/meta-update", b"{}", "Bearer wrong-" + TOKEN[:6])
        _call(server.port, "POST", "/meta-update", b"{}")
    text = caplog.text
    assert "forbidden" in text and "unauthorized" in text
    assert "wrong-" not in text and TOKEN[:6] not in text


@pytest.mark.parametrize(
    "method,path,body,status,outcome",
    [
        ("POST", "/nope", b"{}", 404, "not_found"),
        ("GET", "/meta-update", None, 404, "not_found"),
        ("POST", "/meta-update", b"[1]", 400, "bad_request"),
        ("POST", "/meta-update", b"{not json", 400, "bad_request"),
        ("POST", "/meta-update", b"\xff\xfe", 400, "bad_request"),
    ],
)
def test_after_the_token_bad_requests_are_refused_and_counted_when_sent(
    guarded, method, path, body, status, outcome
) -> None:
    server, calls = guarded
    before = len(calls.bodies), _count(server.metrics, outcome)
    assert _call(server.port, method, path, body, f"Bearer {TOKEN}")[0] == status
    assert len(calls.bodies) == before[0]
    assert _count(server.metrics, outcome) == before[1] + 1


def test_a_failing_route_answers_500_and_the_server_goes_on_when_it_raises() -> None:
    def boom(_body: dict[str, Any]) -> tuple[int, Any]:
        raise RuntimeError("boom")

    server = AdminServer({("POST", "/x"): boom, ("GET", "/y"): lambda _b: (200, 1)}, port=0)
    try:
        assert _call(server.port, "POST", "/x")[0] == 500
        assert _count(server.metrics, "error") == 1
        assert _call(server.port, "GET", "/y")[0] == 200
    finally:
        server.close()


def test_without_a_token_every_request_is_let_through_when_on_loopback() -> None:
    calls = Calls()
    server = AdminServer(calls.routes(), port=0)
    try:
        assert _call(server.port, "POST", "/meta-update", b"{}")[0] == 202
        assert len(calls.bodies) == 1
    finally:
        server.close()


def test_an_empty_token_is_refused_when_building() -> None:
    with pytest.raises(ValueError, match="empty"):
        AdminServer({}, port=0, token="")


def test_the_metric_registers_every_outcome_when_built() -> None:
    registry = CollectorRegistry()
    AdminMetrics(registry)
    for outcome in ADMIN_OUTCOMES:
        value = registry.get_sample_value("stream_meta_admin_requests_total", {"outcome": outcome})
        assert value == 0.0


# -- fuzzing ------------------------------------------------------------------------------------
_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FOO"])
_PATHS = st.one_of(
    st.sampled_from(["/meta-update", "/meta-updates", "/", "/metrics", "//meta-update"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
        lambda p: "/" + p
    ),
    st.sampled_from(["/meta-update?x=1", "/meta-update#f", "/%6deta-update", "*"]),
)
_HEADER_NAME = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=20,
)
_HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_AUTH = st.one_of(
    st.none(),
    _HEADER_VALUE,
    st.sampled_from(
        [
            "Bearer",
            "Bearer ",
            f"Basic {TOKEN}",
            f"Bearer {TOKEN[:-1]}",
            f"Bearer {TOKEN}",
            f"bearer {TOKEN}",
            TOKEN,
        ]
    ),
    _HEADER_VALUE.map(lambda t: f"Bearer {t}"),
)
_LENGTH = st.one_of(st.none(), st.sampled_from(["-1", "abc", "99999999", "0", "3"]))


def _raw_request(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    auth: str | None,
    length: str | None,
    body: bytes,
) -> bytes:
    """Send a hand-built request (nothing checked on the way); the raw answer."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=_METHODS,
    path=_PATHS,
    headers=st.lists(st.tuples(_HEADER_NAME, _HEADER_VALUE), max_size=4).filter(
        lambda hs: all(
            k.lower() not in ("authorization", "content-length", "host", "connection")
            for k, _ in hs
        )
    ),
    auth=_AUTH,
    length=_LENGTH,
    body=st.one_of(st.binary(max_size=200), st.sampled_from([b"{}", b'{"reason": 1}', b"[]"])),
)
def test_random_requests_never_crash_and_never_reach_a_route_without_the_token_when_fuzzed(
    guarded, method, path, headers, auth, length, body
) -> None:
    server, calls = guarded
    before = len(calls.bodies)
    answer = _raw_request(server.port, method, path, headers, auth, length, body)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), answer[:200]
    status = int(status_line.split()[1])
    reached = len(calls.bodies) - before
    scheme, _, given = (auth or "").strip().partition(" ")
    if scheme.lower() != "bearer" or given.strip() != TOKEN:
        assert reached == 0, (method, path, auth)
        assert status >= 400
    else:
        assert reached <= 1
    if reached:
        assert status == 202
    # and the server still answers
    assert _call(server.port, "GET", "/meta-updates", auth=f"Bearer {TOKEN}")[0] == 200


# -- a real meta-updater behind it ----------------------------------------------------------------
def test_refused_requests_leave_a_real_meta_updater_untouched_when_sent(shipped_sinusoid) -> None:
    from stream_meta.app import build_engine
    from stream_meta.continual.updater import MetaUpdateConfig, MetaUpdater
    from stream_meta.metrics import EngineMetrics

    model, _ = shipped_sinusoid
    registry = CollectorRegistry()
    settings_ = load_settings(None, env={})
    engine = build_engine(model, settings_, metrics=EngineMetrics(registry))
    updater = MetaUpdater(engine, MetaUpdateConfig(on_drift=False), metrics=engine.metrics)
    metrics = AdminMetrics(registry)
    server = AdminServer(updater.routes(), port=0, token=TOKEN, metrics=metrics)
    try:
        for auth in (None, "Bearer nope", f"Bearer {TOKEN}x"):
            assert _call(server.port, "POST", "/meta-update", b"{}", auth)[0] in (401, 403)
        assert updater._manual == []  # no request queued
        status = updater.status()
        assert status["pending"] is None and not status["training"]
        assert status["total_records"] == 0
        assert (
            registry.get_sample_value(
                "stream_meta_admin_requests_total", {"outcome": "unauthorized"}
            )
            == 1.0
        )
        assert (
            registry.get_sample_value("stream_meta_admin_requests_total", {"outcome": "forbidden"})
            == 2.0
        )
        # the right token queues exactly one request
        assert _call(server.port, "POST", "/meta-update", b"{}", f"Bearer {TOKEN}")[0] == 202
        assert len(updater._manual) == 1
    finally:
        server.close()
        updater.close()


# -- settings and start-up ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback) -> None:
    assert is_loopback(host) is loopback


def test_a_host_beyond_loopback_without_a_token_is_refused_when_loading() -> None:
    with pytest.raises(ConfigError, match="beyond loopback"):
        load_settings(None, env={"STREAM_META_ADMIN__HOST": "0.0.0.0"})
    # port 0 (off), or a token, makes it fine
    load_settings(None, env={"STREAM_META_ADMIN__HOST": "0.0.0.0", "STREAM_META_ADMIN__PORT": "0"})
    s = load_settings(
        None, env={"STREAM_META_ADMIN__HOST": "0.0.0.0", "STREAM_META_ADMIN__TOKEN": TOKEN}
    )
    assert s.admin.read_token() == TOKEN


def test_the_token_is_never_shown_when_the_settings_are_printed() -> None:
    from stream_meta.config import settings_summary

    s = load_settings(None, env={"STREAM_META_ADMIN__TOKEN": TOKEN})
    assert TOKEN not in repr(s) and TOKEN not in json.dumps(settings_summary(s))


def test_token_and_token_file_together_are_refused_when_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_settings(
            None,
            env={"STREAM_META_ADMIN__TOKEN": TOKEN, "STREAM_META_ADMIN__TOKEN_FILE": str(tmp_path)},
        )


def _settings(**admin: Any) -> Any:
    return load_settings(None, env={}, overrides={"admin": {"port": 0, **admin}})


def test_admin_server_reads_the_token_file_stripped_when_starting(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    s = load_settings(None, env={}, overrides={"admin": {"port": 0, "token_file": str(token_file)}})
    assert s.admin.read_token() == TOKEN


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_a_missing_or_empty_token_file_stops_the_start_when_read(tmp_path: Path, content) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    s = load_settings(
        None, env={}, overrides={"admin": {"port": _free_port(), "token_file": str(token_file)}}
    )
    with pytest.raises(UsageError, match="token_file"):
        admin_server(s, CollectorRegistry(), Calls().routes())


def test_admin_server_is_off_without_routes_or_port_when_started() -> None:
    assert admin_server(_settings(), CollectorRegistry(), Calls().routes()) is None
    s = load_settings(None, env={}, overrides={"admin": {"port": _free_port()}})
    assert admin_server(s, CollectorRegistry(), None) is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_admin_server_serves_the_routes_with_the_token_when_started(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = _free_port()
    s = load_settings(
        None, env={}, overrides={"admin": {"port": port, "token_file": str(token_file)}}
    )
    registry = CollectorRegistry()
    server = admin_server(s, registry, Calls().routes())
    try:
        base = f"http://127.0.0.1:{port}"
        assert _admin_call(base, "GET", "/meta-updates", token=TOKEN) == {"requests": 0}
        assert _admin_call(base, "POST", "/meta-update", {"reason": "r"}, token=TOKEN)["accepted"]
        with pytest.raises(UsageError, match="wants an admin token"):
            _admin_call(base, "POST", "/meta-update", {})
        with pytest.raises(UsageError, match="refused the admin token"):
            _admin_call(base, "POST", "/meta-update", {}, token="nope")
        assert (
            registry.get_sample_value("stream_meta_admin_requests_total", {"outcome": "ok"}) == 2.0
        )
    finally:
        server.close()


def test_meta_update_points_at_the_metrics_port_clearly_when_misdirected() -> None:
    from stream_meta.http_server import MetricsServer

    server = MetricsServer(CollectorRegistry(), port=0)
    try:
        with pytest.raises(UsageError, match="admin port"):
            _admin_call(f"http://127.0.0.1:{server.port}", "POST", "/meta-update", {})
    finally:
        server.close()


def test_the_meta_update_command_sends_the_token_and_explains_refusals_when_run(
    tmp_path: Path,
) -> None:
    from stream_meta.testing.processes import cli

    calls = Calls()
    server = AdminServer(calls.routes(), port=0, token=TOKEN)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(TOKEN + "\n")
    bad.write_text("nope\n")
    url = ["--url", f"http://127.0.0.1:{server.port}"]
    try:
        # --token-file wins over the environment's token
        env = {"STREAM_META_ADMIN__TOKEN": "from-env"}
        done = cli("meta-update", *url, "--token-file", str(good), "--json", "-q", env=env)
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)["accepted"] is True and len(calls.bodies) == 1
        refused = cli("meta-update", *url, "--token-file", str(bad), "-q")
        assert refused.returncode == 2 and b"refused the admin token" in refused.stderr
        missing = cli("meta-update", *url, "-q")
        assert missing.returncode == 2 and b"--token-file" in missing.stderr
        assert len(calls.bodies) == 1
        assert TOKEN.encode() not in refused.stderr + missing.stderr + done.stderr
    finally:
        server.close()
