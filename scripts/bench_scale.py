"""The mechanics of ``make bench``'s ``scale`` section (issue 6): replicas through a real broker.

``scripts/bench.py`` (``measure_scale``) calls :func:`measure` and turns its raw results into the
report. As in ``scripts/bench_serve.py``, everything runs through the real commands as child
processes (``STREAM_META_*`` removed) against a local Tansu broker started for each measurement,
with the fast-join group settings (``FAST_GROUP_SETS``) and the default settings otherwise: the
replica topics (task embeddings, task-state changelog, model versions) are on.

* ``scale_out``: ``stream-meta produce`` pre-loads the events topic (6 partitions); then 1, and on
  a fresh broker 2, ``serve`` replicas of one group, launched together, consume it all (done
  when the group has committed every offset: nothing is read while they run). The throughput
  is the number of predictions (by record timestamp) in the window when every replica was
  serving, over its length (the same measure for one replica: its whole span); each replica's
  CPU time and the broker's are sampled from ``/proc`` over the same window, so the report can
  say whether the machine's cores were the limit.
* ``kill_restart``: two replicas serve a stream produced at a fixed rate; a cycle SIGKILLs one of
  them (alternating) and starts it again on its own state directory, in the same group, and
  waits until it is assigned partitions again. After the last cycle the producer stops, the
  replicas catch up and stop. Then every event must have a prediction (nothing lost) and, on the
  task-state changelog, every task's newest record must have seen exactly as many examples as
  the task had labelled events, with the newest of them as its support set (no example lost,
  none learned twice). Duplicated predictions (outputs are at-least-once) are counted.
* ``soak``: two replicas serve a stream produced at a fixed rate (2,000 events/s) for a fixed
  time (10 minutes); the resident memory of each replica (its process tree) is sampled every 5
  s; the end-to-end latency and the backlog (events produced minus events predicted, from the
  record timestamps) are computed per minute from the topics read back; the replicas' logs are
  searched for errors.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench import ROOT, MeasurementError, clean_env, cli_argv0, say
from scripts.bench_serve import (
    ASSIGNED_LINE,
    Broker,
    Serve,
    cpu_seconds,
    new_name,
    produce,
    produce_args,
    read_topic,
    tail,
    tansu,
)

#: how often the soak samples memory, and the length of its latency / backlog windows
RSS_EVERY_S = 5.0
WINDOW_S = 60.0


# -- processes ----------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident memory of one process (Linux ``/proc``; None when gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def tree_pids(pid: int) -> list[int]:
    """A process and its live descendants (Linux ``/proc``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants (a child that exited is not counted)."""
    return sum(c for c in (cpu_seconds(p) for p in tree_pids(pid)) if c is not None)


def tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and its descendants (Linux ``/proc``; None when gone)."""
    if rss_bytes(pid) is None:
        return None
    return sum(r for r in (rss_bytes(p) for p in tree_pids(pid)) if r is not None)


class Producer:
    """``stream-meta produce --rate R`` in the background: ``events`` of them, or (0) until
    :meth:`finish` stops it."""

    def __init__(
        self, broker: Broker, workdir: Path, prefix: str, tasks: int, rate: float, events: int = 0
    ) -> None:
        self.args = produce_args(broker, prefix, events, tasks, rate=rate)
        self.display = "stream-meta " + " ".join(self.args)
        self.log = workdir / f"{prefix}-produce.log"
        say(f"$ {self.display}")
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*cli_argv0(), *self.args],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=self._fh,
        )

    def finish(self, *, stop: bool) -> dict[str, Any]:
        """Its JSON summary, after SIGTERM (``stop``) or once it sent its events."""
        if stop and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=1200)
        finally:
            self._fh.close()
        if self.proc.returncode != 0:
            raise MeasurementError(
                f"`{self.display}` exited with {self.proc.returncode}: "
                f"{tail(self.log.read_text('utf-8', errors='replace'))}"
            )
        summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return summary


def replicas(
    broker: Broker,
    workdir: Path,
    prefix: str,
    n: int,
    *,
    group: str,
    checkpoint: str | None,
    timeout_s: float,
    extra: tuple[str, ...] = (),
) -> list[Serve]:
    """``n`` replicas of ``group``, launched together, each with its own state directory."""
    return [
        Serve(
            broker,
            workdir,
            prefix,
            events=None,
            timeout_s=timeout_s,
            fast_group=True,
            checkpoint=checkpoint,
            group=group,
            state_dir=workdir / f"{group}-state{i}",
            extra=extra,
        )
        for i in range(n)
    ]


def stop_all(serves: Sequence[Serve]) -> list[dict[str, Any]]:
    """SIGTERM every replica (they finish their batch, checkpoint and commit); their summaries."""
    for s in serves:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    return [s.finish() for s in serves]


class Outputs:
    """A group-less reader of a topic of JSON records (all partitions, from the beginning) that
    keeps ``(record timestamp, event_id)`` of every record it has read. (The suite's broker
    answers ListOffsets(latest) short of a topic's end: progress is counted by reading.)"""

    def __init__(self, broker: Broker, topic: str, timeout: float = 120.0) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
        )
        deadline = time.monotonic() + timeout
        parts = self.consumer.partitions_for_topic(topic)
        while not parts:
            if time.monotonic() > deadline:
                raise MeasurementError(f"topic {topic} has no partitions")
            time.sleep(0.2)
            parts = self.consumer.partitions_for_topic(topic)
        self.consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        self.rows: list[tuple[int, str]] = []
        self.partitions: list[int] = []  # the partition of each row
        self.ids: set[str] = set()
        self.first_by_key: dict[bytes, int] = {}  # record key -> first record timestamp

    def pull(self) -> int:
        """Read what is there now; the number of records read."""
        n = 0
        while True:
            polled = self.consumer.poll(timeout_ms=300, max_records=50_000)
            got = [r for batch in polled.values() for r in batch]
            if not got:
                return n
            for r in got:
                eid = json.loads(r.value)["event_id"]
                self.rows.append((r.timestamp, eid))
                self.partitions.append(r.partition)
                self.ids.add(eid)
                self.first_by_key.setdefault(r.key, r.timestamp)
            n += len(got)

    def close(self) -> None:
        self.consumer.close()


def wait_for_outputs(
    outputs: Outputs, expected: set[str], serves: Sequence[Serve], timeout: float = 600.0
) -> None:
    """Until ``outputs`` holds a prediction of every expected event id, then until it stops
    growing for a few seconds (late duplicates)."""

    def done() -> bool:
        outputs.pull()
        return expected <= outputs.ids

    wait_until(done, serves, timeout, f"predictions of {len(expected):,} events")
    quiet = time.monotonic()
    while time.monotonic() - quiet < 5.0:
        if outputs.pull():
            quiet = time.monotonic()
        time.sleep(0.5)


def read_ids(outputs: Outputs, count: int, serves: Sequence[Serve], timeout: float) -> None:
    """Until ``outputs`` has read ``count`` distinct event ids."""

    def done() -> bool:
        outputs.pull()
        return len(outputs.ids) >= count

    wait_until(done, serves, timeout, f"reading {count:,} records of {outputs.topic}")


def wait_until(
    check: Callable[[], bool], serves: Sequence[Serve], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for s in serves:
            if s.proc.poll() is not None:
                raise s.fail(f"exited with {s.proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            for s in serves:
                s.stop()
            raise MeasurementError(f"{what}: not reached in {timeout:g} s")
        time.sleep(0.5)


def read_changelog(broker: Broker, prefix: str, partitions: int, x_dim: int) -> dict[str, Any]:
    """Every task's newest record on the task-state changelog (all partitions)."""
    from kafka import KafkaConsumer

    from stream_meta.kafka.changelog import read_partitions

    reader = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    try:
        latest, skipped = read_partitions(
            reader, f"{prefix}.task-state", list(range(partitions)), x_dim=x_dim, timeout_s=300
        )
    finally:
        reader.close()
    if skipped:
        raise MeasurementError(f"{skipped} changelog records did not decode")
    return {task: rec for (_p, task), rec in latest.items()}


def assigned_count(serve: Serve) -> int:
    return serve.text().count(ASSIGNED_LINE)


# -- pure helpers (unit-tested) -----------------------------------------------------------------
def cores_between(
    trace: Sequence[tuple[float, list[float | None], float | None]], lo: float, hi: float
) -> dict[str, Any]:
    """Cores each replica and the broker used between epoch seconds ``lo`` and ``hi``, from
    CPU-time samples ``(epoch s, [replica CPU s], broker CPU s)`` (the samples nearest the
    bounds, inside them)."""
    inside = [t for t in trace if lo <= t[0] <= hi and None not in t[1] and t[2] is not None]
    if len(inside) < 2:
        return {"replicas": None, "broker": None}
    (t0, r0, b0), (t1, r1, b1) = inside[0], inside[-1]
    dt = t1 - t0
    return {
        "replicas": [round((b - a) / dt, 3) for a, b in zip(r0, r1, strict=True)],  # type: ignore[operator]
        "broker": round((b1 - b0) / dt, 3),  # type: ignore[operator]
        "seconds": round(dt, 2),
    }


def steady_window(
    rows: Sequence[tuple[int, str]], partitions: Sequence[int], owned: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Throughput while every replica was serving: from the latest of the replicas' first
    predictions to the earliest of their last ones (a replica's predictions are those on the
    partitions it owns: predictions are keyed by task id like the events, so they land on the
    events' partition number). ``rows``: ``(timestamp ms, event id)`` per prediction."""
    firsts, lasts = [], []
    for parts in owned:
        stamps = [ts for (ts, _), p in zip(rows, partitions, strict=True) if p in set(parts)]
        if not stamps:
            raise MeasurementError(f"no prediction on partitions {list(parts)}")
        firsts.append(min(stamps))
        lasts.append(max(stamps))
    lo, hi = max(firsts), min(lasts)
    n = sum(1 for ts, _ in rows if lo <= ts <= hi)
    span = (hi - lo) / 1000.0
    return {
        "from_ms": lo,
        "to_ms": hi,
        "span_s": round(span, 3),
        "events": n,
        "events_per_s": round(n / span, 1) if span > 0 else None,
    }


def assigned_partitions(serve: Serve) -> list[int]:
    """The partitions of a replica's latest assignment, from its log."""
    lines = [ln for ln in serve.text().splitlines() if ASSIGNED_LINE in ln]
    return [int(m) for m in re.findall(r"\.events\[(\d+)\]", lines[-1])] if lines else []


def committed_offsets(broker: Broker, group: str, topic: str) -> list[int]:
    """The group's committed offsets of ``topic`` (OffsetFetch; this reader joins nothing)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False
    )
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        return [consumer.committed(TopicPartition(topic, p)) or 0 for p in parts]
    finally:
        consumer.close()


def cores_in(cpu: Sequence[Sequence[Any]], lo: float, hi: float) -> str:
    """Cores each replica (process tree) and the broker used between ``lo`` and ``hi`` seconds,
    from samples ``(seconds, [replica CPU s], broker CPU s)``: ``"0.31, 0.25 / 0.94"``."""
    inside = [c for c in cpu if lo <= c[0] <= hi]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return "?"
    (t0, r0, b0), (t1, r1, b1) = inside[0], inside[-1]
    dt = t1 - t0
    reps = ", ".join(f"{(b - a) / dt:.2f}" for a, b in zip(r0, r1, strict=True))
    brk = "?" if b0 is None or b1 is None else f"{(b1 - b0) / dt:.2f}"
    return f"{reps} / {brk}"


def cores_text(cpu: Sequence[Sequence[Any]], width_s: float) -> str:
    """Cores each replica and the broker used over the last ``width_s`` (for the progress log)."""
    if not cpu:
        return "?"
    return "replicas / broker " + cores_in(cpu, cpu[-1][0] - width_s, cpu[-1][0])


def span_throughput(stamps_ms: Sequence[int], events: int) -> dict[str, Any]:
    """``events`` over the span of the output timestamps (first to last, ms)."""
    lo, hi = min(stamps_ms), max(stamps_ms)
    span = (hi - lo) / 1000.0
    return {"span_s": round(span, 3), "events_per_s": round(events / span, 1) if span else None}


def windows(
    events: Sequence[tuple[int, str]], predictions: Sequence[tuple[int, str]], width_s: float
) -> list[dict[str, Any]]:
    """Per window of ``width_s`` from the first event: events produced, end-to-end latency p50 /
    p99 of the events produced in it (first prediction of each), and the backlog at its end
    (events produced so far minus events predicted so far). Inputs: ``(timestamp_ms, event_id)``."""
    first: dict[str, int] = {}
    for ts, eid in predictions:
        if eid not in first or ts < first[eid]:
            first[eid] = ts
    ev = sorted(events)
    t0 = ev[0][0]
    width = width_s * 1000.0
    predicted = np.sort(np.array(list(first.values()), dtype=np.int64))
    produced = np.array([ts for ts, _ in ev], dtype=np.int64)
    out = []
    k = 0
    while t0 + k * width <= ev[-1][0]:
        lo, hi = t0 + k * width, t0 + (k + 1) * width
        lat = np.array([first[e] - ts for ts, e in ev if lo <= ts < hi and e in first], float)
        backlog = int((produced < hi).sum() - (predicted < hi).sum())
        row: dict[str, Any] = {
            "from_s": round(k * width_s, 1),
            "events": len(lat),
            "backlog_at_end": backlog,
        }
        if len(lat):
            p50, p99 = np.percentile(lat, [50, 99])
            row.update(p50_ms=float(p50), p99_ms=float(p99), max_ms=float(lat.max()))
        out.append(row)
        k += 1
    return out


def rss_growth(
    samples: Sequence[tuple[float, int]], warm_s: float, width_s: float = 30.0
) -> dict[str, Any]:
    """Memory growth after warm-up: the median of the samples in the ``width_s`` after ``warm_s``
    against the median of the last ``width_s``. ``samples``: ``(seconds since start, bytes)``."""
    end = samples[-1][0]
    start = [b for t, b in samples if warm_s <= t < warm_s + width_s]
    last = [b for t, b in samples if t > end - width_s]
    if not start or not last:
        raise MeasurementError(f"too few memory samples after {warm_s:g} s of warm-up")
    a, b = float(np.median(start)), float(np.median(last))
    return {
        "warm_s": warm_s,
        "after_warm_up_bytes": int(a),
        "end_bytes": int(b),
        "growth": round(b / a - 1.0, 4),
        "max_bytes": max(x for _, x in samples),
    }


def changelog_check(labels: dict[str, list[float]], newest: dict[str, Any]) -> dict[str, Any]:
    """Every task's newest changelog record (``newest``: task id -> record with ``seen`` and
    ``ys``) against its labels in stream order (``labels``): ``seen`` equals the number of its
    labelled events and its support set holds the newest of their labels (the default
    ``recent`` buffer is a ring: compared as multisets)."""
    wrong_seen, wrong_set, missing = [], [], []
    for task, ys in labels.items():
        rec = newest.get(task)
        if rec is None:
            missing.append(task)
            continue
        if rec.seen != len(ys):
            wrong_seen.append((task, rec.seen, len(ys)))
        n = len(rec.ys)  # a ring buffer: the newest n labels, rotated
        if n > len(ys) or not np.allclose(np.sort(rec.ys), np.sort(ys[len(ys) - n :])):
            wrong_set.append(task)
    return {
        "labelled_tasks": len(labels),
        "labelled_events": sum(map(len, labels.values())),
        "tasks_missing": len(missing),
        "seen_mismatch": len(wrong_seen),
        "seen_mismatch_examples": wrong_seen[:5],
        "support_set_mismatch": len(wrong_set),
        "support_set_mismatch_examples": wrong_set[:5],
    }


def labels_in_order(events: Sequence[Any]) -> dict[str, list[float]]:
    """Each task's labels in stream order (its events share a partition: offset order)."""
    labels: dict[str, list[float]] = defaultdict(list)
    for r in sorted(events, key=lambda r: (r.partition, r.offset)):
        e = json.loads(r.value)
        if e.get("y") is not None:
            labels[e["task_id"]].append(float(e["y"]))
    return dict(labels)


def log_errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if " ERROR " in ln or ln.startswith("Traceback")]


# -- the three measurements ---------------------------------------------------------------------
def measure_scale_out(
    broker: Broker, workdir: Path, n: int, events: int, tasks: int, checkpoint: str | None
) -> dict[str, Any]:
    """Pre-load ``events``; ``n`` replicas launched together consume them all."""
    prefix = new_name(f"scale{n}")
    loaded, produce_cmd = produce(broker, prefix, events, tasks)
    say(f"  pre-loaded {events:,} events; {n} replica(s)")
    group = f"{prefix}-g"
    serves = replicas(
        broker,
        workdir,
        prefix,
        n,
        group=group,
        checkpoint=checkpoint,
        timeout_s=max(600.0, events / 100),
    )
    stop = threading.Event()
    cpu_trace: list[tuple[float, list[float | None], float | None]] = []

    def sample_cpu() -> None:  # (epoch s, each replica's CPU s, the broker's), every 0.25 s
        while not stop.wait(0.25):
            cpu_trace.append(
                (time.time(), [cpu_seconds(s.proc.pid) for s in serves], cpu_seconds(broker.pid))
            )

    sampler = threading.Thread(target=sample_cpu, daemon=True)
    sampler.start()
    try:
        # done when the group committed every offset (a commit per batch): nothing is read
        # from the outputs while the replicas run, so this script takes no CPU from them
        wait_until(
            lambda: sum(committed_offsets(broker, group, f"{prefix}.events")) >= events,
            serves,
            max(600.0, events / 100),
            f"{events:,} events committed",
        )
        stop.set()
        sampler.join()
        wall = time.time() - serves[0].t0
        rebalances = [assigned_count(s) for s in serves]
        owned = [assigned_partitions(s) for s in serves]
        summaries = stop_all(serves)
    except BaseException:
        for s in serves:
            s.stop()
        raise
    finally:
        stop.set()
    outputs = Outputs(broker, f"{prefix}.predictions")
    try:
        read_ids(outputs, events, [], 600.0)
    finally:
        outputs.close()
    if len(outputs.ids) != events:
        raise MeasurementError(f"{len(outputs.ids):,} distinct events predicted of {events:,}")
    together = steady_window(outputs.rows, outputs.partitions, owned)
    busy = cores_between(cpu_trace, together["from_ms"] / 1000.0, together["to_ms"] / 1000.0)
    return {
        "prefix": prefix,
        "replicas": n,
        "events": events,
        "tasks": tasks,
        "produce": {"command": produce_cmd, "summary": loaded},
        "serve_commands": [s.display for s in serves],
        "summaries": summaries,
        "throughput": together,
        "whole_span": span_throughput([ts for ts, _ in outputs.rows], events),
        "partitions_owned": owned,
        "predictions_read": len(outputs.rows),
        # cores used over the same window (CPU seconds / wall seconds)
        "replica_cores": busy["replicas"],
        "broker_cores": busy["broker"],
        "wall_s": round(wall, 2),
        "assignments_logged": rebalances,
    }


def measure_kill_restart(
    broker: Broker,
    workdir: Path,
    cycles: int,
    rate: float,
    tasks: int,
    checkpoint: str | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Two replicas under a steady stream; ``cycles`` SIGKILL-and-restart cycles, alternating."""
    rng = random.Random(seed)
    prefix = new_name("kill")
    group = f"{prefix}-g"
    serves = replicas(
        broker, workdir, prefix, 2, group=group, checkpoint=checkpoint, timeout_s=3600.0
    )
    commands = [s.display for s in serves]
    producer: Producer | None = None
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for s in serves:
            s.wait_for_log(ASSIGNED_LINE)
        producer = Producer(broker, workdir, prefix, tasks, rate)
        time.sleep(5.0)
        for cycle in range(cycles):
            time.sleep(rng.uniform(1.0, 4.0))
            i = cycle % 2
            victim = serves[i]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            killed_at = time.monotonic() - t0
            serves[i] = Serve(
                broker,
                workdir,
                prefix,
                events=None,
                timeout_s=3600.0,
                fast_group=True,
                checkpoint=checkpoint,
                group=group,
                state_dir=victim.state_dir,
            )
            serves[i].wait_for_log(ASSIGNED_LINE)
            timeline.append(
                {
                    "cycle": cycle + 1,
                    "replica": i,
                    "killed_at_s": round(killed_at, 2),
                    "back_after_s": round(time.monotonic() - t0 - killed_at, 2),
                }
            )
            say(
                f"  cycle {cycle + 1}/{cycles}: replica {i} killed at {killed_at:.1f} s, "
                f"assigned again {timeline[-1]['back_after_s']:.1f} s later"
            )
        time.sleep(3.0)
        produce_cmd = producer.display
        produced = producer.finish(stop=True)
        producer = None
        total = produced["events"]
        say(f"  {total:,} events produced; waiting for the replicas to predict them all")
        ev = read_topic(broker, f"{prefix}.events", total)
        expected_ids = {json.loads(r.value)["event_id"] for r in ev}
        outputs = Outputs(broker, f"{prefix}.predictions")
        try:
            wait_for_outputs(outputs, expected_ids, serves)
            summaries = stop_all(serves)
            outputs.pull()
        finally:
            outputs.close()
    except BaseException:
        for s in serves:
            s.stop()
        if producer is not None:
            producer.proc.kill()
        raise
    got = [eid for _, eid in outputs.rows]
    partitions = len({r.partition for r in ev})
    check = changelog_check(labels_in_order(ev), read_changelog(broker, prefix, partitions, 1))
    return {
        "prefix": prefix,
        "cycles": cycles,
        "rate": rate,
        "tasks": tasks,
        "produce": {"command": produce_cmd, "summary": produced},
        "serve_commands": commands,
        "events": total,
        "predictions_read": len(got),
        "events_without_prediction": len(expected_ids - set(got)),
        "duplicate_predictions": len(got) - len(set(got)),
        "changelog": check,
        "timeline": timeline,
        "final_summaries": summaries,
    }


def measure_soak(
    broker: Broker,
    workdir: Path,
    seconds: float,
    rate: float,
    tasks: int,
    checkpoint: str | None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Two replicas serve ``rate`` events/s for ``seconds``; memory, CPU, latency, backlog,
    errors. ``extra``: more options for the replicas."""
    prefix = new_name("soak")
    group = f"{prefix}-g"
    events = int(seconds * rate)
    serves = replicas(
        broker,
        workdir,
        prefix,
        2,
        group=group,
        checkpoint=checkpoint,
        timeout_s=seconds + 1200,
        extra=extra,
    )
    samples: list[list[tuple[float, int]]] = [[], []]  # each replica's process tree
    own: list[list[tuple[float, int]]] = [[], []]  # its main process alone
    cpu: list[tuple[float, list[float], float | None]] = []  # (s, replica trees', broker's)
    try:
        for s in serves:
            s.wait_for_log(ASSIGNED_LINE)
        producer = Producer(broker, workdir, prefix, tasks, rate, events=events)
        t0 = time.monotonic()
        next_log = 60.0
        while producer.proc.poll() is None:
            now = time.monotonic() - t0
            for i, s in enumerate(serves):
                if s.proc.poll() is not None:
                    raise s.fail(f"exited with {s.proc.returncode} during the soak")
                rss, main = tree_rss_bytes(s.proc.pid), rss_bytes(s.proc.pid)
                if rss is not None and main is not None:
                    samples[i].append((round(now, 2), rss))
                    own[i].append((round(now, 2), main))
            cpu.append(
                (
                    round(now, 2),
                    [tree_cpu_seconds(s.proc.pid) for s in serves],
                    cpu_seconds(broker.pid),
                )
            )
            if now >= next_log:
                say(
                    f"  soak {now:.0f} s: replica memory "
                    + ", ".join(f"{x[-1][1] / 2**20:.0f} MiB" for x in samples if x)
                    + "; cores in the last minute: "
                    + cores_text(cpu, 60.0)
                )
                next_log += 60.0
            time.sleep(RSS_EVERY_S)
        produced = producer.finish(stop=False)
        say(f"  reading back {events:,} events and their predictions")
        ev, pr = Outputs(broker, f"{prefix}.events"), Outputs(broker, f"{prefix}.predictions")
        try:
            read_ids(ev, events, serves, 1200.0)
            wait_for_outputs(pr, ev.ids, serves, timeout=1200.0)
            assignments = [assigned_count(s) for s in serves]
            summaries = stop_all(serves)
            pr.pull()
        finally:
            ev.close()
            pr.close()
    except BaseException:
        for s in serves:
            s.stop()
        raise
    ev_pairs, pr_pairs = ev.rows, pr.rows
    first_seen = ev.first_by_key
    start_ms = min(ts for ts, _ in ev_pairs)
    last_new_task_s = (max(first_seen.values()) - start_ms) / 1000.0
    # warm-up: every task live and a fifth of the run, but never more than half of it
    warm = min(max(0.2 * seconds, last_new_task_s + 30.0), 0.5 * seconds)
    errors = [log_errors(s.text()) for s in serves]
    return {
        "prefix": prefix,
        "seconds": seconds,
        "rate": rate,
        "tasks": tasks,
        "produce": {"command": producer.display, "summary": produced},
        "serve_commands": [s.display for s in serves],
        "summaries": summaries,
        "assignments_logged": assignments,
        "distinct_tasks": len(first_seen),
        "last_new_task_s": round(last_new_task_s, 1),
        "rss_samples": samples,
        "rss": [rss_growth(x, warm) for x in samples],
        "rss_main_process": [rss_growth(x, warm) for x in own],
        "cpu_samples": cpu,
        "extra_options": list(extra),
        "windows": windows(ev_pairs, pr_pairs, WINDOW_S),
        "events_without_prediction": len({e for _, e in ev_pairs} - {e for _, e in pr_pairs}),
        "log_errors": [e[:10] for e in errors],
        "log_error_count": sum(map(len, errors)),
    }


def measure(
    raw: dict[str, Any],
    *,
    scale_events: int,
    scale_tasks: int,
    cycles: int,
    kill_rate: float,
    soak_s: float,
    soak_rate: float,
    tasks: int,
    checkpoint: str | None = None,
) -> None:
    """All three, each on a fresh broker; results go into ``raw`` as they come."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        raw["scale_out"] = {}
        for n in (1, 2):
            with tansu(work) as broker:
                say(f"scale: {n} replica(s), {scale_events:,} events pre-loaded")
                raw["scale_out"][str(n)] = measure_scale_out(
                    broker, work, n, scale_events, scale_tasks, checkpoint
                )
        with tansu(work) as broker:
            say(f"scale: {cycles} kill-and-restart cycles at {kill_rate:g} events/s")
            raw["kill_restart"] = measure_kill_restart(
                broker, work, cycles, kill_rate, tasks, checkpoint
            )
        with tansu(work) as broker:
            say(f"scale: soak, {soak_s:g} s at {soak_rate:g} events/s, two replicas")
            raw["soak"] = measure_soak(broker, work, soak_s, soak_rate, tasks, checkpoint)


def _main(argv: Sequence[str]) -> None:
    """``python -m scripts.bench_scale [soak SECONDS [SERVE OPTION ...]]``: all three at small
    sizes, or only the soak (2,000 events/s, 2,000 tasks) for SECONDS; JSON on stdout."""
    out: dict[str, Any] = {}
    ck = "stream_meta/checkpoints/sinusoid.safetensors"
    try:
        if argv and argv[0] == "soak":
            with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, tansu(Path(tmp)) as b:
                out["soak"] = measure_soak(
                    b, Path(tmp), float(argv[1]), 2000.0, 2000, ck, extra=tuple(argv[2:])
                )
        else:
            measure(
                out,
                scale_events=20_000,
                scale_tasks=1000,
                cycles=2,
                kill_rate=500,
                soak_s=60,
                soak_rate=500,
                tasks=500,
                checkpoint=ck,
            )
    finally:
        json.dump(out, sys.stdout, indent=1, default=str)


if __name__ == "__main__":
    _main(sys.argv[1:])
    os._exit(0)
