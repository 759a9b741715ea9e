"""The mechanics of the ``scale`` section (issue 6): replicas through a real broker.

:mod:`scripts.bench.scale` calls :func:`measure` and turns its raw results into the report. As
in the ``serve`` section, everything runs through the real commands as child processes
(``STREAM_META_*`` removed) against a local Tansu broker started for each measurement
(:mod:`scripts.bench.harness` on ``stream_meta.testing``), with the fast-join group settings
(``FAST_GROUP_SETS``) and the default settings otherwise: the replica topics (task embeddings,
task-state changelog, model versions) are on.

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
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.bench.common import ROOT, MeasurementError, cli_argv0, say, tail
from scripts.bench.harness import (
    ASSIGNED_LINE,
    Replica,
    kill_all,
    new_name,
    produce,
    produce_args,
    tansu,
    wait_while_serving,
)
from scripts.bench.scale_stats import (
    changelog_check,
    cores_between,
    cores_text,
    labels_in_order,
    log_errors,
    rss_growth,
    span_throughput,
    steady_window,
    windows,
)
from stream_meta.testing.broker import Broker
from stream_meta.testing.kafka import committed_offsets, read_records, topic_reader
from stream_meta.testing.processes import clean_env
from stream_meta.testing.resources import cpu_seconds, rss_bytes, tree_cpu_seconds, tree_rss_bytes

#: how often the soak samples memory, and the length of its latency / backlog windows
RSS_EVERY_S = 5.0
WINDOW_S = 60.0


# -- processes ----------------------------------------------------------------------------------
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
) -> list[Replica]:
    """``n`` replicas of ``group``, launched together, each with its own state directory."""
    return [
        Replica(
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


def stop_all(serves: Sequence[Replica]) -> list[dict[str, Any]]:
    """SIGTERM every replica (they finish their batch, checkpoint and commit); their summaries."""
    for s in serves:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    return [s.finish() for s in serves]


def assigned_count(serve: Replica) -> int:
    return serve.stderr().count(ASSIGNED_LINE)


def assigned_partitions(serve: Replica) -> list[int]:
    """The partitions of a replica's latest assignment, from its log."""
    lines = [ln for ln in serve.stderr().splitlines() if ASSIGNED_LINE in ln]
    return [int(m) for m in re.findall(r"\.events\[(\d+)\]", lines[-1])] if lines else []


class CpuSampler:
    """``(epoch s, [each replica's CPU s], the broker's CPU s)`` every 0.25 s, in a thread,
    until :meth:`stop`."""

    def __init__(self, serves: Sequence[Replica], broker_pid: int) -> None:
        self.trace: list[tuple[float, list[float | None], float | None]] = []
        self._serves, self._broker_pid = serves, broker_pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.trace.append(
                (
                    time.time(),
                    [cpu_seconds(s.proc.pid) for s in self._serves],
                    cpu_seconds(self._broker_pid),
                )
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- reading the outputs ------------------------------------------------------------------------
class Outputs:
    """A group-less reader of a topic of JSON records (all partitions, from the beginning) that
    keeps ``(record timestamp, event_id)`` of every record it has read. (The suite's broker
    answers ListOffsets(latest) short of a topic's end: progress is counted by reading.)"""

    def __init__(self, broker: Broker, topic: str, timeout: float = 120.0) -> None:
        self.topic = topic
        self.consumer = topic_reader(broker.bootstrap, topic, timeout=timeout)
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
    outputs: Outputs, expected: set[str], serves: Sequence[Replica], timeout: float = 600.0
) -> None:
    """Until ``outputs`` holds a prediction of every expected event id, then until it stops
    growing for a few seconds (late duplicates)."""

    def done() -> bool:
        outputs.pull()
        return expected <= outputs.ids

    wait_while_serving(done, serves, timeout, f"predictions of {len(expected):,} events")
    quiet = time.monotonic()
    while time.monotonic() - quiet < 5.0:
        if outputs.pull():
            quiet = time.monotonic()
        time.sleep(0.5)


def read_ids(outputs: Outputs, count: int, serves: Sequence[Replica], timeout: float) -> None:
    """Until ``outputs`` has read ``count`` distinct event ids."""

    def done() -> bool:
        outputs.pull()
        return len(outputs.ids) >= count

    wait_while_serving(done, serves, timeout, f"reading {count:,} records of {outputs.topic}")


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


# -- scale-out ----------------------------------------------------------------------------------
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

    def all_committed() -> bool:
        offsets = committed_offsets(broker.bootstrap, group, f"{prefix}.events")
        return sum(o or 0 for o in offsets.values()) >= events

    sampler = CpuSampler(serves, broker.pid)
    try:
        # done when the group committed every offset (a commit per batch): nothing is read
        # from the outputs while the replicas run, so this script takes no CPU from them
        wait_while_serving(
            all_committed, serves, max(600.0, events / 100), f"{events:,} events committed"
        )
        sampler.stop()
        wall = time.time() - serves[0].started
        rebalances = [assigned_count(s) for s in serves]
        owned = [assigned_partitions(s) for s in serves]
        summaries = stop_all(serves)
    except BaseException:
        kill_all(serves)
        raise
    finally:
        sampler.stop()
    outputs = Outputs(broker, f"{prefix}.predictions")
    try:
        read_ids(outputs, events, [], 600.0)
    finally:
        outputs.close()
    if len(outputs.ids) != events:
        raise MeasurementError(f"{len(outputs.ids):,} distinct events predicted of {events:,}")
    together = steady_window(outputs.rows, outputs.partitions, owned)
    busy = cores_between(sampler.trace, together["from_ms"] / 1000.0, together["to_ms"] / 1000.0)
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


# -- kill and restart ---------------------------------------------------------------------------
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

    def restart(victim: Replica) -> Replica:  # in the same group, on its own state
        return Replica(
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

    producer: Producer | None = None
    t0 = time.monotonic()
    try:
        for s in serves:
            s.wait_for_log(ASSIGNED_LINE)
        producer = Producer(broker, workdir, prefix, tasks, rate)
        time.sleep(5.0)
        timeline = kill_cycles(serves, cycles, rng, t0, restart)
        time.sleep(3.0)
        produce_cmd = producer.display
        produced = producer.finish(stop=True)
        producer = None
        total = produced["events"]
        say(f"  {total:,} events produced; waiting for the replicas to predict them all")
        ev = read_records(broker.bootstrap, f"{prefix}.events", total, timeout=300.0)
        expected_ids = {json.loads(r.value)["event_id"] for r in ev}
        outputs, summaries = predictions_then_stop(broker, prefix, expected_ids, serves)
    except BaseException:
        kill_all(serves)
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


def kill_cycles(
    serves: list[Replica],
    cycles: int,
    rng: random.Random,
    t0: float,
    restart: Callable[[Replica], Replica],
) -> list[dict[str, Any]]:
    """Every 1-4 s, SIGKILL one replica (alternating), start it again (``restart``, in place in
    ``serves``) and wait until it is assigned partitions; the timeline (seconds since ``t0``)."""
    timeline: list[dict[str, Any]] = []
    for cycle in range(cycles):
        time.sleep(rng.uniform(1.0, 4.0))
        i = cycle % 2
        victim = serves[i]
        victim.kill()
        killed_at = time.monotonic() - t0
        serves[i] = restart(victim)
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
    return timeline


def predictions_then_stop(
    broker: Broker, prefix: str, expected_ids: set[str], serves: Sequence[Replica]
) -> tuple[Outputs, list[dict[str, Any]]]:
    """Read the predictions until every expected event has one, stop the replicas, read what
    they wrote last; ``(outputs, their summaries)``."""
    outputs = Outputs(broker, f"{prefix}.predictions")
    try:
        wait_for_outputs(outputs, expected_ids, serves)
        summaries = stop_all(serves)
        outputs.pull()
    finally:
        outputs.close()
    return outputs, summaries


# -- soak ---------------------------------------------------------------------------------------
@dataclass
class SoakTrace:
    """What the soak samples every ``RSS_EVERY_S`` while the producer runs."""

    # (seconds since the start, bytes) of each replica's process tree, and of its main process
    rss: list[list[tuple[float, int]]] = field(default_factory=lambda: [[], []])
    rss_main: list[list[tuple[float, int]]] = field(default_factory=lambda: [[], []])
    # (seconds since the start, [each replica tree's CPU s], the broker's CPU s)
    cpu: list[tuple[float, list[float], float | None]] = field(default_factory=list)

    def sample(self, now: float, serves: Sequence[Replica], broker_pid: int) -> None:
        for i, s in enumerate(serves):
            if s.proc.poll() is not None:
                raise s.fail(f"exited with {s.proc.returncode} during the soak")
            rss, main = tree_rss_bytes(s.proc.pid), rss_bytes(s.proc.pid)
            if rss is not None and main is not None:
                self.rss[i].append((round(now, 2), rss))
                self.rss_main[i].append((round(now, 2), main))
        self.cpu.append(
            (
                round(now, 2),
                [tree_cpu_seconds(s.proc.pid) for s in serves],
                cpu_seconds(broker_pid),
            )
        )


def sample_while_producing(
    producer: Producer, serves: Sequence[Replica], broker_pid: int
) -> SoakTrace:
    """Sample the replicas and the broker until the producer has sent its events; progress
    every minute."""
    trace = SoakTrace()
    t0 = time.monotonic()
    next_log = 60.0
    while producer.proc.poll() is None:
        now = time.monotonic() - t0
        trace.sample(now, serves, broker_pid)
        if now >= next_log:
            say(
                f"  soak {now:.0f} s: replica memory "
                + ", ".join(f"{x[-1][1] / 2**20:.0f} MiB" for x in trace.rss if x)
                + "; cores in the last minute: "
                + cores_text(trace.cpu, 60.0)
            )
            next_log += 60.0
        time.sleep(RSS_EVERY_S)
    return trace


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
    try:
        for s in serves:
            s.wait_for_log(ASSIGNED_LINE)
        producer = Producer(broker, workdir, prefix, tasks, rate, events=events)
        trace = sample_while_producing(producer, serves, broker.pid)
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
        kill_all(serves)
        raise
    first_seen = ev.first_by_key
    start_ms = min(ts for ts, _ in ev.rows)
    last_new_task_s = (max(first_seen.values()) - start_ms) / 1000.0
    # warm-up: every task live and a fifth of the run, but never more than half of it
    warm = min(max(0.2 * seconds, last_new_task_s + 30.0), 0.5 * seconds)
    errors = [log_errors(s.stderr()) for s in serves]
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
        "rss_samples": trace.rss,
        "rss": [rss_growth(x, warm) for x in trace.rss],
        "rss_main_process": [rss_growth(x, warm) for x in trace.rss_main],
        "cpu_samples": trace.cpu,
        "extra_options": list(extra),
        "windows": windows(ev.rows, pr.rows, WINDOW_S),
        "events_without_prediction": len({e for _, e in ev.rows} - {e for _, e in pr.rows}),
        "log_errors": [e[:10] for e in errors],
        "log_error_count": sum(map(len, errors)),
    }


# -- all three ------------------------------------------------------------------------------------
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
