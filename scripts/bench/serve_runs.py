"""The mechanics of the ``serve`` section: ``stream-meta serve`` through a real broker.

:mod:`scripts.bench.serve` calls :func:`measure` and turns its raw results into the report.
Everything runs through the real command as child processes (``STREAM_META_*`` removed from
their environment) against a local Tansu broker started for the duration, exactly as the test
suite starts it (:mod:`scripts.bench.harness` on ``stream_meta.testing``):

* ``throughput``: ``stream-meta produce`` pre-loads the events topic, then ``stream-meta serve
  --events N`` consumes it all; its JSON summary's ``events_per_s`` and ``seconds`` (from the
  first record polled to the end: start-up and the group join are excluded).
* ``latency``: ``serve`` is started first and joins its group; then ``produce --rate 2000``
  writes the events while it runs. Both topics are read back (manual assignment) and each
  prediction's record timestamp is joined with its event's on ``event_id``.
* ``passthrough``: the same without the engine (:mod:`scripts.bench.passthrough`).
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from scripts.bench.common import ROOT, MeasurementError, say, tail
from scripts.bench.harness import ASSIGNED_LINE, SERVING_LINE, Replica, new_name, produce, tansu
from stream_meta.testing.broker import Broker
from stream_meta.testing.kafka import create_topics, read_records
from stream_meta.testing.processes import clean_env
from stream_meta.testing.resources import children_cpu_seconds, cpu_seconds


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


def read_back(broker: Broker, topic: str, expected: int) -> list[Any]:
    """At least ``expected`` records of ``topic`` (all partitions, manual assignment: no group)."""
    return read_records(broker.bootstrap, topic, expected, timeout=300.0)


def _stamped(records: Sequence[Any]) -> list[tuple[int, bytes]]:
    return [(r.timestamp, r.value) for r in records]


# -- the measurements ----------------------------------------------------------------------------
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
    serve = Replica(
        broker,
        workdir,
        prefix,
        events=events,
        timeout_s=max(300.0, events / 200),
        fast_group=True,
        checkpoint=checkpoint,
    )
    summary = serve.finish()
    wall = time.time() - serve.started
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
    serve = Replica(
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
        serve.kill()
        raise
    summary = serve.finish()
    if summary.get("consumed") != events:
        raise serve.fail(f"consumed {summary.get('consumed')} of {events} events")
    say(f"  reading back {events:,} events and their predictions")
    ev = read_back(broker, f"{prefix}.events", events)
    pr = read_back(broker, f"{prefix}.predictions", events)
    types = sorted({r.timestamp_type for r in [*ev, *pr]})
    return {
        "prefix": prefix,
        "rate_target": rate,
        "events": events,
        "tasks": tasks,
        "produce": {"command": produce_cmd, "summary": produced},
        "producer_rate_per_s": round(events / produced["seconds"], 1),
        "serve": {"command": serve.display, "summary": summary},
        "timestamp_types": types,  # 0 = CreateTime
        "latency": latency_ms(_stamped(ev), _stamped(pr)),
    }


def measure_passthrough(
    broker: Broker, workdir: Path, events: int, tasks: int, rate: float
) -> dict[str, Any]:
    """The latency harness without the engine: a minimal kafka-python loop (manual assignment,
    the service's fetch and producer settings) forwards every event to the predictions topic;
    what the broker and the client library cost on this machine."""
    prefix = new_name("pass")
    create_topics(broker.bootstrap, prefix, partitions=6)
    argv = [
        sys.executable,
        "-m",
        "scripts.bench.passthrough",
        broker.bootstrap,
        prefix,
        str(events),
    ]
    log_path = workdir / f"{prefix}.log"
    log = log_path.open("wb")
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
            f"pass-through exited {proc.returncode}: {tail(log_path.read_text())}"
        )
    ev = read_back(broker, f"{prefix}.events", events)
    out = read_back(broker, f"{prefix}.predictions", events)
    return {
        "prefix": prefix,
        "command": " ".join(argv[2:]),
        "produce": {"command": produce_cmd, "summary": produced},
        "producer_rate_per_s": round(events / produced["seconds"], 1),
        "latency": latency_ms(_stamped(ev), _stamped(out)),
    }


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
    serve = Replica(
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
    preds = read_back(broker, f"{prefix}.predictions", events)
    first = min(r.timestamp for r in preds) / 1000.0
    marks = log_times(serve.stderr())
    t0 = serve.started

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
    """All of them, each against a broker started for it and stopped at its end; results go
    into ``raw`` as they come (``broker``, ``startup``, ``latency``, ``passthrough``,
    ``throughput``)."""
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
