"""The serving loop's pieces that need no broker: one output per record, the changelog records
of a batch, redelivered events the restored changelog already reflects, and the bound on a
batch's size. (The loop against a real broker: tests/integration/test_service.py.)"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import CollectorRegistry

from stream_meta.app import build_engine
from stream_meta.config import load_settings
from stream_meta.kafka.changelog import decode
from stream_meta.kafka.service import KafkaService
from stream_meta.metrics import EngineMetrics, ServiceMetrics
from tests.conftest import sinusoid_events


def _record(partition: int, offset: int, value: bytes, key: bytes | None = None) -> Any:
    return ConsumerRecord(
        "p.events", partition, -1, offset, 1_700_000_000_000, 0, key, value, [], None, 0, 0, 0
    )


@pytest.fixture
def service(shipped_sinusoid: Any) -> KafkaService:
    model, _ = shipped_sinusoid
    settings = load_settings(None, env={}, overrides={"kafka": {"topic_prefix": "p"}})
    registry = CollectorRegistry()
    engine = build_engine(model, settings, metrics=EngineMetrics(registry))
    return KafkaService(engine, settings, ServiceMetrics(registry))


def test_every_record_gets_one_output_in_order_and_bad_ones_keep_their_bytes(
    service: KafkaService,
) -> None:
    good = [json.dumps(e).encode() for e in sinusoid_events(5, tasks=2)]
    raws = [good[0], b"\xff{not json", good[1], good[2], b'{"task_id": "t"}', good[3], good[4]]
    records = [_record(1, 10 + i, raw, key=b"k") for i, raw in enumerate(raws)]
    result = service.engine.process([r.value for r in records])
    sends, reasons = service._outputs(records, result)
    assert [s[0] for s in sends] == [
        "p.predictions",
        "p.dead-letter",
        "p.predictions",
        "p.predictions",
        "p.dead-letter",
        "p.predictions",
        "p.predictions",
    ]
    assert reasons == ["malformed_json", "missing_field"]
    letter = json.loads(sends[1][2])
    assert base64.b64decode(letter["raw_b64"]) == raws[1]  # the whole original bytes
    assert (letter["topic"], letter["partition"], letter["offset"]) == ("p.events", 1, 11)
    predicted = [json.loads(s[2])["event_id"] for s in sends if s[0] == "p.predictions"]
    assert predicted == [json.loads(g)["event_id"] for g in good]
    assert all(s[1] == json.loads(s[2])["task_id"].encode() for s in sends if s[0].endswith("s"))


def test_a_batch_writes_each_taught_task_to_the_changelog_on_its_partition(
    service: KafkaService,
) -> None:
    service.engine.track_changes()
    events = [e for e in sinusoid_events(40, tasks=3) if "y" in e]
    records = [
        _record(int(e["task_id"][1:]), 100 + i, json.dumps(e).encode())
        for i, e in enumerate(events)
    ]
    result = service.engine.process([r.value for r in records])
    sends = service._changelog(records, result)
    assert {s[1].decode() for s in sends} == {e["task_id"] for e in events}
    for topic, key, value, partition in sends:
        task = key.decode()
        mine = [r for r, e in zip(records, events, strict=True) if e["task_id"] == task]
        rec = decode(value, x_dim=1)
        assert topic == "p.task-state" and partition == mine[-1].partition
        assert rec is not None and rec.applied_offset == mine[-1].offset
        assert rec.seen == len(mine)
        ys = [e["y"] for e in events if e["task_id"] == task]
        np.testing.assert_allclose(rec.ys, np.asarray(ys, dtype=rec.ys.dtype))
    assert service._changelog(records, service.engine.process([])) == []  # drained


def test_redelivered_events_the_changelog_reflects_are_not_learned_again(
    service: KafkaService,
) -> None:
    service.recovery.restored([0], {(0, "t1"): 41})
    records = [_record(0, 41, b"{}", key=b"t1"), _record(0, 42, b"{}", key=b"t1")]
    records.append(_record(0, 5, b"{}", key=b"\xff"))  # not UTF-8: never a restored task
    assert service._already_applied(records) == [True, False, False]
    service.recovery.passed(0, 41)
    assert not service.recovery.active


def test_batches_shrink_when_records_take_long(service: KafkaService) -> None:
    budget = 0.25 * service.kafka.max_poll_interval_ms / 1000
    service._bound_batches(100, 100 * budget / 50)  # 50 records fit the budget
    assert service._max_records == 50
    service._bound_batches(100, 1e-6)  # fast again: the running mean comes back up
    assert 50 < service._max_records <= service.batch_size
    service.offsets.advanced(TopicPartition("p.events", 0), 9)
    assert service.offsets.positions == {TopicPartition("p.events", 0): 10}
