"""``stream-meta export``: a Kafka topic, between offsets or times, into a replayable recording."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from kafka import KafkaProducer

from stream_meta.recording import read_records, recorded_events
from stream_meta.testing.kafka import create_topics, new_prefix
from stream_meta.testing.processes import cli

pytestmark = pytest.mark.kafka

T0 = 1_700_000_000_000  # record timestamps: T0 + 10 ms x event number


@pytest.fixture(scope="module")
def topic(kafka_bootstrap: str) -> tuple[str, str]:
    """``(prefix, topic)``: 300 events keyed by task on 3 partitions, timestamps T0 + 10 i ms."""
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(300):
        event = {"event_id": f"e{i}", "task_id": f"t{i % 7}", "x": [i / 100], "y": float(i)}
        producer.send(
            f"{prefix}.events",
            json.dumps(event).encode(),
            key=f"t{i % 7}".encode(),
            timestamp_ms=T0 + 10 * i,
        )
    producer.flush()
    producer.close()
    return prefix, f"{prefix}.events"


def _export(bootstrap: str, prefix: str, out: Path, *extra: str) -> dict:
    proc = cli(
        "export",
        "--bootstrap-servers",
        bootstrap,
        "--topic-prefix",
        prefix,
        "--out",
        str(out),
        "--idle-timeout",
        "2",
        "--json",
        "-q",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def test_the_whole_topic_exports_in_partition_order_and_replays(
    kafka_bootstrap: str, topic: tuple[str, str], tmp_path: Path
) -> None:
    prefix, name = topic
    summary = _export(kafka_bootstrap, prefix, tmp_path / "all")
    assert summary["events"] == 300 and summary["topic"] == name
    records = [r for r in read_records(tmp_path / "all") if r["kind"] == "event"]
    assert [r["i"] for r in records] == list(range(300))
    by_partition = defaultdict(list)
    for r in records:
        by_partition[r["partition"]].append(r["offset"])
    assert all(offs == sorted(offs) for offs in by_partition.values())
    # every task's events in their produced order (a task lives on one partition)
    events = [json.loads(raw) for raw, _ in recorded_events(tmp_path / "all")]
    for t in range(7):
        ids = [int(e["event_id"][1:]) for e in events if e["task_id"] == f"t{t}"]
        assert ids == sorted(ids) and len(ids) == len(range(t, 300, 7))
    proc = cli(
        "replay",
        str(tmp_path / "all"),
        "--report",
        str(tmp_path / "rep"),
        "--family",
        "sinusoid",
        "--strategy",
        "no-meta-update",
        "--json",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["events"] == 300


def test_offset_and_time_bounds_select_the_records_between_them(
    kafka_bootstrap: str, topic: tuple[str, str], tmp_path: Path
) -> None:
    prefix, _ = topic
    _export(
        kafka_bootstrap, prefix, tmp_path / "offsets", "--from-offset", "10", "--to-offset", "40"
    )
    records = [r for r in read_records(tmp_path / "offsets") if r["kind"] == "event"]
    assert records and all(10 <= r["offset"] < 40 for r in records)
    assert len(records) == sum(min(40, n) - 10 for n in _partition_sizes(kafka_bootstrap, prefix))
    since, until = T0 + 10 * 100, T0 + 10 * 199
    timed = _export(
        kafka_bootstrap,
        prefix,
        tmp_path / "times",
        "--since",
        str(since),
        "--until",
        "2023-11-14T22:13:21.990",
    )  # T0 + 1990 ms, as ISO-8601
    records = [r for r in read_records(tmp_path / "times") if r["kind"] == "event"]
    assert timed["events"] == 100 == len(records)
    assert all(since <= r["ts"] <= until for r in records)


def _partition_sizes(bootstrap: str, prefix: str) -> list[int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    topic = f"{prefix}.events"
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    counts = defaultdict(int)
    for _ in range(20):
        for tp, recs in consumer.poll(200).items():
            counts[tp.partition] += len(recs)
    consumer.close()
    return [counts[tp.partition] for tp in tps]


def test_bad_bounds_and_a_missing_topic_are_explained(kafka_bootstrap: str, tmp_path: Path) -> None:
    args = ["export", "--bootstrap-servers", kafka_bootstrap, "--out", str(tmp_path / "x")]
    proc = cli(*args, "--topic", "no-such-topic", "--idle-timeout", "1")
    assert proc.returncode == 2 and b"does not exist" in proc.stderr
    proc = cli(*args, "--from-offset", "5", "--since", "0")
    assert proc.returncode == 2 and b"not both" in proc.stderr
    proc = cli(*args, "--since", "yesterday")
    assert proc.returncode == 2 and b"ISO-8601" in proc.stderr
