"""Topics, readers and offsets of a Kafka-protocol broker, and the state checkpoints a
``serve`` process leaves: what tests and benchmarks read back."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from stream_meta.packing import unpack_strings
from stream_meta.testing.timeouts import scaled

#: consumer-group settings that join in ~3 s on Tansu (see docs/KAFKA_TEST_BROKER.md)
FAST_GROUP_SETS = (
    "--set",
    "kafka.session_timeout_ms=6000",
    "--set",
    "kafka.heartbeat_interval_ms=2000",
)


def new_prefix() -> str:
    return f"sm-{uuid.uuid4().hex[:10]}"


def create_topics(bootstrap: str, prefix: str, partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            {
                f"{prefix}.{t}": {"num_partitions": partitions, "replication_factor": 1}
                for t in ("events", "predictions", "dead-letter")
            }
        )
    finally:
        admin.close()


#: fetch limits of the readers here: reading back hundreds of thousands of records (as
#: ``make bench`` does) is slow with the client's defaults (1 MiB a partition)
BULK_FETCH = {"max_partition_fetch_bytes": 8 << 20, "fetch_max_bytes": 64 << 20}


def _assign_all(consumer: KafkaConsumer, topic: str, deadline: float) -> None:
    """Assign ``consumer`` every partition of ``topic`` once it has some (epoch ``deadline``)."""
    parts = None
    while not parts and time.time() < deadline:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            time.sleep(0.2)
    if not parts:
        raise TimeoutError(f"topic {topic} has no partitions")
    consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])


def _reader(bootstrap: str) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **BULK_FETCH,
    )


def topic_reader(bootstrap: str, topic: str, *, timeout: float = 60.0) -> KafkaConsumer:
    """A consumer of every partition of ``topic`` from its start (manual assignment: no
    group), once the topic exists (``timeout`` scaled); the caller polls and closes it."""
    consumer = _reader(bootstrap)
    try:
        _assign_all(consumer, topic, time.time() + scaled(timeout))
    except BaseException:
        consumer.close()
        raise
    return consumer


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[Any]], bool],
    timeout: float = 120.0,
    settle: float = 0.5,
) -> list[Any]:
    """Every record of ``topic`` (all partitions, manual assignment) once ``until(records)``
    holds, plus whatever arrives in the next ``settle`` seconds; raises on timeout."""
    consumer = _reader(bootstrap)
    try:
        timeout = scaled(timeout)
        deadline = time.time() + timeout
        _assign_all(consumer, topic, deadline)
        out: list[Any] = []
        while not until(out):
            if time.time() > deadline:
                raise TimeoutError(f"{topic}: condition not met after {timeout} s ({len(out)})")
            for batch in consumer.poll(200).values():
                out.extend(batch)
        end = time.time() + settle
        while time.time() < end:
            for batch in consumer.poll(100).values():
                out.extend(batch)
        return out
    finally:
        consumer.close()


def read_records(
    bootstrap: str, topic: str, count: int, *, timeout: float = 300.0, settle: float = 0.0
) -> list[Any]:
    """The records of ``topic`` read until there are at least ``count`` (all partitions,
    manual assignment), plus whatever arrives in the next ``settle`` seconds (a test that
    counts exactly waits a moment for extras); raises on timeout (scaled)."""
    return read_topic(
        bootstrap, topic, until=lambda r: len(r) >= count, timeout=timeout, settle=settle
    )


def end_offsets(records: list[Any]) -> dict[int, int]:
    """Next offset of each partition, from every record read back.

    Not ``KafkaConsumer.end_offsets``: Tansu answers ListOffsets(latest) with the base offset
    of the last record batch, short of the true end (docs/KAFKA_TEST_BROKER.md); fetch
    responses carry the right high watermark, and so do the records themselves.
    """
    ends: dict[int, int] = {}
    for r in records:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offsets (an OffsetFetch: this reader does not join the group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        return {p: consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        consumer.close()


def newest_state(state_dir: Path) -> dict[str, Any]:
    """The newest checkpoint's header and per-task support sets, read straight from disk."""
    files = sorted(state_dir.glob("state-*.npz"))
    assert files, f"no checkpoint in {state_dir}"
    with np.load(files[-1], allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    header = json.loads(a["header"].tobytes())
    ids = unpack_strings(a["store.ids_utf8"], a["store.ids_offsets"])
    n = a["store.n"]
    bounds = np.concatenate([[0], np.cumsum(n)])
    tasks = {
        t: (
            int(a["store.seen"][i]),
            a["store.xs"][bounds[i] : bounds[i + 1]].tobytes(),
            a["store.ys"][bounds[i] : bounds[i + 1]].tobytes(),
        )
        for i, t in enumerate(ids)
    }
    scalars = a["stats.scalars"].tolist()  # events, labelled, queries, rejected, loss_sum, ...
    return {
        "header": header,
        "tasks": tasks,
        "labelled": int(scalars[1]),
        "prequential_loss": scalars[4] / max(1, scalars[1]),
        "files": len(files),
    }


class FakeModelConsumer:
    """What :class:`~stream_meta.kafka.model_topic.ModelFollower` uses of a KafkaConsumer, for
    unit tests without a broker: one partition; ``values`` (appendable) are polled once each."""

    def __init__(self, values: Iterable[bytes] = ()) -> None:
        self.values: list[bytes] = list(values)
        self.assigned: list[Any] = []

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, tps: list[Any]) -> None:
        self.assigned = tps

    def seek_to_beginning(self, *tps: Any) -> None:
        pass

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        out = [SimpleNamespace(value=v) for v in self.values[:max_records]]
        self.values = self.values[len(out) :]
        return {self.assigned[0]: out} if out else {}
