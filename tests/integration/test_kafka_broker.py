"""The suite's Kafka broker speaks the protocol the service relies on (kafka-python)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from stream_meta.testing.broker import FAST_GROUP
from stream_meta.testing.timeouts import scaled
from tests.conftest import sinusoid_events

pytestmark = pytest.mark.kafka


def _topic(bootstrap: str, partitions: int = 2) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()
    return name


def _produce(bootstrap: str, topic: str, events: list[dict]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for e in events:  # keyed by task: one task's events stay in order on one partition
        producer.send(topic, key=e["task_id"].encode(), value=json.dumps(e).encode())
    producer.flush()
    producer.close()


def test_keyed_events_round_trip_in_task_order_when_partitions_are_assigned(
    kafka_bootstrap: str,
) -> None:
    topic = _topic(kafka_bootstrap)
    events = sinusoid_events(200, tasks=7)
    _produce(kafka_bootstrap, topic, events)
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    consumer.assign([TopicPartition(topic, p) for p in (0, 1)])
    got: list[dict] = []
    deadline = time.time() + scaled(120)
    while len(got) < len(events) and time.time() < deadline:
        for records in consumer.poll(200).values():
            got.extend(json.loads(r.value) for r in records)
    consumer.close()
    assert sorted(e["event_id"] for e in got) == sorted(e["event_id"] for e in events)
    for task in {e["task_id"] for e in events}:
        assert [e["event_id"] for e in got if e["task_id"] == task] == [
            e["event_id"] for e in events if e["task_id"] == task
        ]


def test_consumer_group_gets_every_partition_and_commits_when_alone(
    kafka_bootstrap: str,
) -> None:
    topic = _topic(kafka_bootstrap)
    events = sinusoid_events(50, tasks=5)
    _produce(kafka_bootstrap, topic, events)
    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FAST_GROUP,
    )
    n, deadline = 0, time.time() + scaled(180)
    while n < len(events) and time.time() < deadline:
        n += sum(len(r) for r in consumer.poll(200).values())
    assert n == len(events)
    assert consumer.assignment() == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    consumer.commit()
    committed = sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in (0, 1))
    consumer.close()
    assert committed == len(events)
