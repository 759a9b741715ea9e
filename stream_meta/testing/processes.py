"""``stream-meta`` as child processes, the way a user runs it: one-shot commands
(:func:`cli`) and long-running ``serve`` processes (:class:`Serve`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream_meta.testing.timeouts import scaled, wait_until


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without STREAM_META_* settings, in any case, as the settings read them
    (the suite may run inside a deploy), with the admin port off (``STREAM_META_ADMIN__PORT=0``:
    processes running side by side would all want its default 9109; a test that talks to it
    passes ``--admin-port``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_META_")}
    env["STREAM_META_ADMIN__PORT"] = "0"
    env.update(extra)
    return env


def cli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m stream_meta ARGS`` to its end (``timeout`` seconds, scaled by
    ``TEST_TIMEOUT_SCALE``), in the environment without ``STREAM_META_*`` settings."""
    return subprocess.run(
        [sys.executable, "-m", "stream_meta", *args],
        input=stdin,
        capture_output=True,
        timeout=scaled(timeout),
        env=clean_env(**(env or {})),
        check=False,
    )


class Serve:
    """``stream-meta serve`` as a child process (stderr kept in a file for diagnostics).

    ``program``: how to start ``stream-meta`` (default ``python -m stream_meta`` of this
    interpreter); ``cwd``: its working directory (default ours). :attr:`args` holds its
    arguments after the program, :attr:`started` the epoch time just before the launch."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        program: Sequence[str] | None = None,
        cwd: Path | None = None,
    ):
        self.log = tmp / f"{name}.log"
        self.args = ["serve", "--json", "-q", *args]
        self._fh = self.log.open("wb")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [*(program or (sys.executable, "-m", "stream_meta")), *self.args],
            stdout=subprocess.PIPE,
            stderr=self._fh,
            env=clean_env(**(env or {})),
            cwd=cwd,
        )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 120.0, interval: float = 0.1) -> None:
        """Wait until the process logged ``text`` (``timeout`` scaled; the log is read every
        ``interval`` s); fail if it exits."""
        timeout = scaled(timeout)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.stderr():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}):\n{self.stderr()}")
            time.sleep(interval)
        raise TimeoutError(f"no {text!r} in the serve log after {timeout} s:\n{self.stderr()}")

    def kill(self) -> None:
        """SIGKILL (nothing to do once it has exited), wait, close its log."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=scaled(30))
        self._fh.close()

    def stop(self, timeout: float = 180.0) -> tuple[int, dict[str, Any] | None]:
        """SIGTERM, wait; ``(exit code, printed JSON summary or None)``."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 300.0) -> tuple[int, dict[str, Any] | None]:
        """Wait for the exit (``timeout`` scaled; ``subprocess.TimeoutExpired`` after it);
        ``(exit code, the JSON summary on the last line of stdout, or None)``."""
        out, _ = self.proc.communicate(timeout=scaled(timeout))
        self._fh.close()
        lines = [ln for ln in out.decode().splitlines() if ln.strip()]
        return self.proc.returncode, json.loads(lines[-1]) if lines else None


def updater_status(port: int) -> dict[str, Any]:
    """``GET /meta-updates`` of a process's admin port ``port`` (no token)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/meta-updates", timeout=10) as resp:
        status: dict[str, Any] = json.loads(resp.read())
    return status


def wait_for_updater_events(
    port: int, events: int, process: Serve, timeout: float = 180.0
) -> dict[str, Any]:
    """The meta-updater's status once it has seen ``events`` events (the endpoint comes up a
    moment after the process starts); fails if the process exits, times out (scaled)."""

    def reached() -> dict[str, Any] | None:
        if process.proc.poll() is not None:
            raise AssertionError(f"the process exited:\n{process.stderr()}")
        try:
            status = updater_status(port)
        except OSError:
            return None
        return status if status["events"] >= events else None

    return wait_until(
        reached, timeout=timeout, what=f"{events} events seen by the updater", interval=0.2
    )
