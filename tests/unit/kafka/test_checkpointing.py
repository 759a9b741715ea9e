"""The checkpointer's commit order against the suite's real broker: offsets are committed only
once the state that reflects them is on disk (or, with the changelog, once the batch is
acknowledged), never behind what was committed, and never after a failed write."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from stream_meta.kafka.checkpointing import Checkpointer
from stream_meta.kafka.offsets import Offsets
from stream_meta.metrics import ServiceMetrics
from stream_meta.state_checkpoint import StateDir
from stream_meta.testing.broker import FAST_GROUP
from stream_meta.testing.kafka import newest_state
from stream_meta.testing.timeouts import wait_until

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def member(kafka_bootstrap: str) -> Iterator[tuple[KafkaConsumer, str, str]]:
    """A group member that owns every partition of a fresh 6-partition topic (each test uses
    partitions of its own: committed offsets are per partition)."""
    topic, group = f"cp-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics({topic: {"num_partitions": 6, "replication_factor": 1}})
    admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(30):
        producer.send(topic, b"x", partition=i % 6)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FAST_GROUP,
    )

    def owns_all() -> bool:
        consumer.poll(100)
        return len(consumer.assignment()) == 6

    wait_until(owns_all, timeout=120, what="the group assignment")
    yield consumer, topic, group
    consumer.close()


def _checkpointer(
    make_engine: Callable[..., Any],
    make_model: Callable[..., Any],
    consumer: KafkaConsumer,
    group: str,
    state: StateDir | None,
    changelog: bool,
) -> tuple[Checkpointer, Offsets]:
    offsets = Offsets()
    cp = Checkpointer(
        make_engine(make_model()),
        offsets,
        ServiceMetrics(CollectorRegistry()),
        state=state,
        changelog=changelog,
        group=group,
    )
    cp.consumer = consumer
    return cp, offsets


def test_offsets_are_committed_only_with_a_checkpoint_that_reflects_them(
    member: Any, make_engine: Any, make_model: Any, tmp_path: Path
) -> None:
    consumer, topic, group = member
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    cp, offsets = _checkpointer(
        make_engine, make_model, consumer, group, StateDir(tmp_path / "s"), changelog=False
    )
    offsets.advanced(tp0, 3)
    offsets.advanced(tp1, 1)
    cp.batch_done()  # without a changelog, a batch alone commits nothing
    assert consumer.committed(tp0) is None and cp.dirty
    assert cp.checkpoint("test")
    assert newest_state(tmp_path / "s")["header"]["extra"]["offsets"] == {
        f"{topic}:0": 4,
        f"{topic}:1": 2,
    }
    assert (consumer.committed(tp0), consumer.committed(tp1)) == (4, 2)
    assert not cp.dirty
    # an older position (a checkpoint captured before later per-batch commits) never moves
    # the committed offset back
    offsets.positions[tp0] = 2
    cp.dirty = True
    assert cp.checkpoint("test")
    assert consumer.committed(tp0) == 4


def test_a_failed_write_commits_nothing_and_stays_dirty(
    member: Any, make_engine: Any, make_model: Any, tmp_path: Path
) -> None:
    consumer, topic, group = member
    tp0 = TopicPartition(topic, 2)
    state_dir = tmp_path / "s"
    cp, offsets = _checkpointer(
        make_engine, make_model, consumer, group, StateDir(state_dir), changelog=False
    )
    offsets.advanced(tp0, 5)
    cp.batch_done()
    state_dir.write_text("a file where the state directory was")  # every write now fails
    assert not cp.checkpoint("test")
    assert consumer.committed(tp0) is None and cp.dirty
    assert cp.metrics.checkpoint_failures._value.get() == 1


def test_with_the_changelog_every_batch_is_committed_at_once(
    member: Any, make_engine: Any, make_model: Any, tmp_path: Path
) -> None:
    consumer, topic, group = member
    tp1 = TopicPartition(topic, 3)
    cp, offsets = _checkpointer(
        make_engine, make_model, consumer, group, StateDir(tmp_path / "s"), changelog=True
    )
    offsets.advanced(tp1, 2)
    cp.batch_done()
    assert consumer.committed(tp1) == 3
    assert not list((tmp_path / "s").glob("state-*.npz"))  # no checkpoint was needed for it
    cp.close()
