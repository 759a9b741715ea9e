"""The service's delivery guarantees against the suite's real broker: crash and restart,
SIGTERM, a broker outage, and the start-up deadline."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from stream_meta.testing.kafka import (
    FAST_GROUP_SETS,
    committed_offsets,
    create_topics,
    end_offsets,
    new_prefix,
    newest_state,
    read_topic,
)
from stream_meta.testing.processes import Serve, cli
from stream_meta.testing.timeouts import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EVENTS, TASKS = 12_000, 150


def _produce(bootstrap: str, prefix: str, events: int, *, seed: int = 7, run_id: str = "r") -> int:
    proc = cli(
        "produce",
        "--bootstrap-servers",
        bootstrap,
        "--topic-prefix",
        prefix,
        "--json",
        "-q",
        "--events",
        str(events),
        "--tasks",
        str(TASKS),
        "--bad-fraction",
        "0.03",
        "--seed",
        str(seed),
        "--run-id",
        run_id,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return int(json.loads(proc.stdout)["bad"])


def _coverage(bootstrap: str, prefix: str, events: list[Any]) -> tuple[set, set, list]:
    """Which event records (partition, offset) have an output; every prediction record."""
    preds = read_topic(bootstrap, f"{prefix}.predictions", until=lambda r: len(r) > 0)
    letters = read_topic(bootstrap, f"{prefix}.dead-letter", until=lambda r: True)
    by_id: dict[str, tuple[int, int]] = {}
    for r in events:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            by_id[json.loads(r.value)["event_id"]] = (r.partition, r.offset)
    values = [json.loads(r.value) for r in preds]
    covered = {by_id[v["event_id"]] for v in values}
    dead = {(d["partition"], d["offset"]) for d in (json.loads(r.value) for r in letters)}
    return covered, dead, values


def _newest_sequence(state_dir: Path) -> int:
    """The sequence number of the newest state checkpoint in ``state_dir`` (-1: none yet)."""
    return max((int(p.stem.split("-")[1]) for p in state_dir.glob("state-*.npz")), default=-1)


def _all_records(bootstrap: str, topic: str, n: int) -> list[Any]:
    return read_topic(bootstrap, topic, until=lambda r: len(r) >= n, settle=0.2)


def test_sigkill_and_restart_learn_every_example_exactly_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A clean run and a run killed (SIGKILL) mid-stream then restarted, on the same events:
    every event gets an output, and the support sets end up identical (nothing lost, nothing
    learned twice); SIGTERM then exits cleanly with offsets committed and a checkpoint."""
    clean, crash = new_prefix(), new_prefix()
    for prefix in (clean, crash):  # the same events, byte for byte, in two topics
        create_topics(kafka_bootstrap, prefix)
        bad = _produce(kafka_bootstrap, prefix, EVENTS)
    common = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--metrics-port",
        "0",
        *FAST_GROUP_SETS,
        "--set",
        "engine.micro_batch=32",
    ]

    reference = Serve(
        tmp_path,
        "clean",
        *common,
        "--topic-prefix",
        clean,
        "--group",
        "g-clean",
        "--state-dir",
        str(tmp_path / "clean"),
        "--events",
        str(EVENTS),
    )
    crash_args = [
        *common,
        "--topic-prefix",
        crash,
        "--group",
        "g-crash",
        "--state-dir",
        str(tmp_path / "crash"),
        "--set",
        "service.checkpoint_every_s=0.3",
    ]
    first = Serve(tmp_path, "first", *crash_args)
    first.wait_for_log("partitions assigned")
    wait_until(  # kill once a few checkpoints were written
        lambda: _newest_sequence(tmp_path / "crash") >= 3,
        timeout=180,
        what="three state checkpoints of the first run",
        interval=0.02,
    )
    first.kill()
    at_kill = newest_state(tmp_path / "crash")["header"]["extra"]["offsets"]
    assert sum(at_kill.values()) < EVENTS, "the stream was done before the kill: test is void"

    second = Serve(tmp_path, "second", *crash_args)
    events = _all_records(kafka_bootstrap, f"{crash}.events", EVENTS)
    ends = end_offsets(events)

    # done when every event has an output and the restarted service committed to the end
    # (outputs alone are not enough: the killed run wrote some before its last checkpoint)
    def finished() -> tuple[set, set, list] | None:
        covered, dead, values = _coverage(kafka_bootstrap, crash, events)
        committed = committed_offsets(kafka_bootstrap, "g-crash", f"{crash}.events")
        done = len(covered | dead) == EVENTS and committed == ends
        return (covered, dead, values) if done else None

    covered, dead, values = wait_until(
        finished, timeout=600, what="an output for every event and offsets at the end", interval=1
    )
    code, _summary = second.stop()
    assert code == 0, second.stderr()
    assert "restored" in second.stderr()

    # every event has its output (an event may have two after the crash: at-least-once output)
    assert len(covered | dead) == EVENTS
    assert len(dead) == bad and not covered & dead
    # SIGTERM: offsets committed up to the end, and the final checkpoint says the same
    assert committed_offsets(kafka_bootstrap, "g-crash", f"{crash}.events") == ends
    final = newest_state(tmp_path / "crash")
    assert final["header"]["extra"]["offsets"] == {
        f"{crash}.events:{p}": o for p, o in ends.items()
    }

    code, _ = reference.wait()
    assert code == 0, reference.stderr()
    ref = newest_state(tmp_path / "clean")
    # support sets identical task by task: every example learned exactly once
    assert final["tasks"].keys() == ref["tasks"].keys()
    assert final["tasks"] == ref["tasks"]
    # every labelled event scored by one run or the other: those the killed run learned after
    # its last checkpoint came back from the task-state changelog, and their redelivery (its
    # unfinished batch: offsets are committed per batch) was predicted as a duplicate. Only a
    # kill *during* a batch's delivery can score events twice: its predictions reached the
    # topic, its changelog records not all (outputs are at-least-once), so at most one batch
    scored = [v["event_id"] for v in values if v.get("labelled") and not v.get("duplicate")]
    assert len(set(scored)) == ref["labelled"]
    assert len(scored) - len(set(scored)) <= 32  # at most the batch in flight at the kill
    # the restart resumed where the killed run had committed (a commit per batch), not at
    # its older checkpoint: at most the killed run's unfinished micro-batch came again
    redelivered = sum(1 for v in values if v.get("duplicate"))
    assert redelivered <= 32  # at most the killed run's unfinished micro-batch
    # the interleaving of partitions differs between runs (so do neighbours): loss within 5 %
    losses = (final["prequential_loss"], ref["prequential_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=0.05), losses


def test_a_checkpoint_keeps_the_offsets_of_restored_partitions_that_stay_quiet(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """After a restart, a partition with no new events still has its restored offset in the
    next checkpoint (the cause of a rare failure of the SIGKILL test: a partition finished
    before the kill was missing from the final checkpoint)."""
    from kafka import KafkaProducer

    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    _produce(kafka_bootstrap, prefix, 400)
    state = tmp_path / "state"
    args = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--metrics-port",
        "0",
        *FAST_GROUP_SETS,
        "--topic-prefix",
        prefix,
        "--group",
        f"g-{prefix}",
        "--state-dir",
        str(state),
    ]
    first = Serve(tmp_path, "first", *args, "--events", "400")
    code, _ = first.wait()
    assert code == 0, first.stderr()
    before = newest_state(state)["header"]["extra"]["offsets"]
    assert len(before) == 2 and sum(before.values()) == 400
    # new events on partition 0 only; partition 1 stays quiet after the restart
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for k in range(20):
        event = {"event_id": f"late-{k}", "task_id": "late", "x": [0.1 * k], "y": 0.5}
        producer.send(f"{prefix}.events", json.dumps(event).encode(), partition=0)
    producer.flush()
    producer.close()
    second = Serve(tmp_path, "second", *args, "--events", "20")
    code, _ = second.wait()
    assert code == 0, second.stderr()
    after = newest_state(state)["header"]["extra"]["offsets"]
    p0, p1 = f"{prefix}.events:0", f"{prefix}.events:1"
    assert after[p0] == before[p0] + 20
    assert after[p1] == before[p1]  # the quiet partition's offset is kept


def test_serve_rides_out_a_broker_outage(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The broker becomes unreachable mid-stream (connections cut, new ones refused) and
    comes back: the service keeps running, reconnects, and every event gets its output."""
    from stream_meta.testing.broker import kafka_broker_behind_proxy

    with kafka_broker_behind_proxy() as (bootstrap, proxy):
        prefix = new_prefix()
        create_topics(bootstrap, prefix)
        _produce(bootstrap, prefix, 8000, run_id="a")
        serve = Serve(
            tmp_path,
            "outage",
            "--bootstrap-servers",
            bootstrap,
            "--topic-prefix",
            prefix,
            "--group",
            "g-outage",
            "--metrics-port",
            "0",
            "--state-dir",
            str(tmp_path / "state"),
            *FAST_GROUP_SETS,
            "--set",
            "engine.micro_batch=32",
            "--set",
            "kafka.reconnect_backoff_max_ms=1000",
            "--set",
            "kafka.request_timeout_ms=5000",
        )
        # cut mid-stream: batches are being processed and their outputs sent
        preds = read_topic(
            bootstrap, f"{prefix}.predictions", until=lambda r: len(r) > 1500, settle=0
        )
        proxy.cut()
        time.sleep(8)  # longer than the consumer's session and request timeouts
        assert serve.proc.poll() is None, serve.stderr()
        proxy.restore()
        _produce(bootstrap, prefix, 2000, seed=8, run_id="b")
        events = _all_records(bootstrap, f"{prefix}.events", 10_000)

        def finished() -> tuple[set, set] | None:
            covered, dead, _ = _coverage(bootstrap, prefix, events)
            return (covered, dead) if len(covered | dead) == 10_000 else None

        covered, dead = wait_until(
            finished, timeout=600, what="an output for every event after the outage", interval=1
        )
        code, _summary = serve.stop()
        assert code == 0, serve.stderr()
        assert len(covered | dead) == 10_000, serve.stderr()[-3000:]
        assert len(preds) < 8000, "the stream was done before the cut: test is void"
        log = serve.stderr()
        assert "ECONNREFUSED" in log  # the outage was seen, and ridden out
        state = newest_state(tmp_path / "state")
        good_labelled = sum(1 for r in events if _labelled_valid(r.value))
        assert state["labelled"] == good_labelled  # nothing learned twice, nothing lost


def _labelled_valid(raw: bytes) -> bool:
    """Whether the service's own validation accepts ``raw`` as a labelled event."""
    from stream_meta.events import Event, EventSchema, parse_event

    parsed = parse_event(raw, EventSchema(x_dim=1, task="regression"))
    return isinstance(parsed, Event) and parsed.y is not None


def test_serve_fails_clearly_when_the_broker_stays_unreachable(tmp_path: Path) -> None:
    from stream_meta.testing.processes import free_port

    port = free_port()  # nothing listens there
    t0 = time.time()
    proc = cli(
        "serve",
        "--bootstrap-servers",
        f"127.0.0.1:{port}",
        "--metrics-port",
        "0",
        "--set",
        "service.startup_timeout_s=3",
        timeout=60,
    )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "unreachable for 3 s" in err and f"127.0.0.1:{port}" in err
    assert time.time() - t0 < 45
