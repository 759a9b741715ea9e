"""Export a Kafka topic to a recording (``stream-meta export``), for offline replay.

The topic's partitions are assigned manually (no consumer group: nothing is committed, no
running service is disturbed) and read from a start (``from_offset``, or the first record at
or after ``since_ms``) to an end (``to_offset`` exclusive, or the last record at or before
``until_ms``, or the end of the partition, found as ``idle_timeout_s`` without a new record).
Every record's value is written as it is, with its topic, partition, offset and timestamp, in
the :mod:`stream_meta.recording` format, so ``stream-meta replay`` reads it like a recording
made by ``serve --record``.

Order: Kafka orders records only within a partition. The export keeps each partition's order
and interleaves partitions in the order they are fetched; since events are keyed by task, every
task's events stay in order, which is what the engine's semantics depend on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from stream_meta.recording import EventRecorder

__all__ = ["ExportRange", "export_topic"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRange:
    """Which records of every partition to export (bounds may be combined; None = open)."""

    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def __post_init__(self) -> None:
        if self.from_offset is not None and self.since_ms is not None:
            raise ValueError("give a start offset or a start time, not both")
        for name in ("from_offset", "to_offset", "since_ms", "until_ms"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if (self.from_offset or 0) > (self.to_offset if self.to_offset is not None else 1 << 62):
            raise ValueError("from_offset is after to_offset")
        if (self.since_ms or 0) > (self.until_ms if self.until_ms is not None else 1 << 62):
            raise ValueError("since is after until")

    def keeps(self, offset: int, timestamp_ms: int) -> bool:
        return (self.since_ms is None or timestamp_ms >= self.since_ms) and (
            self.from_offset is None or offset >= self.from_offset
        )

    def past_end(self, offset: int, timestamp_ms: int) -> bool:
        return (self.to_offset is not None and offset >= self.to_offset) or (
            self.until_ms is not None and timestamp_ms > self.until_ms
        )


def export_topic(
    consumer: Any,
    topic: str,
    recorder: EventRecorder,
    bounds: ExportRange,
    *,
    idle_timeout_s: float = 5.0,
    max_events: int | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Copy ``topic``'s records within ``bounds`` into ``recorder``; returns a summary.

    ``consumer`` is a ``kafka.KafkaConsumer`` without a group (manual assignment).
    """
    from kafka import TopicPartition

    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise ValueError(f"topic {topic} does not exist")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    _seek(consumer, tps, bounds)
    open_tps = set(tps)
    written, per_partition = 0, {tp.partition: 0 for tp in tps}
    idle_since = time.monotonic()
    while open_tps and not (stop is not None and stop.is_set()):
        if max_events is not None and written >= max_events:
            break
        polled = consumer.poll(timeout_ms=200)
        if not any(polled.values()):
            if time.monotonic() - idle_since > idle_timeout_s:
                break  # every open partition is at its end
            continue
        idle_since = time.monotonic()
        raws, meta = [], []
        for tp, records in polled.items():
            for r in records:
                if tp not in open_tps:
                    break
                if bounds.past_end(r.offset, r.timestamp):
                    open_tps.discard(tp)
                    consumer.pause(tp)
                    break
                if not bounds.keeps(r.offset, r.timestamp):
                    continue
                raws.append(r.value)
                meta.append(
                    {
                        "topic": r.topic,
                        "partition": r.partition,
                        "offset": r.offset,
                        "ts": r.timestamp,
                    }
                )
                per_partition[r.partition] += 1
        if max_events is not None:
            raws, meta = raws[: max_events - written], meta[: max_events - written]
        if raws:
            recorder.events(raws, start=written, meta=meta)
            written += len(raws)
    return {
        "topic": topic,
        "events": written,
        "partitions": per_partition,
        "complete": not open_tps or max_events is None or written < max_events,
    }


def _seek(consumer: Any, tps: list[Any], bounds: ExportRange) -> None:
    """Position every partition at the first record to export."""
    if bounds.from_offset is not None:
        for tp in tps:
            consumer.seek(tp, bounds.from_offset)
        return
    consumer.seek_to_beginning(*tps)
    if bounds.since_ms is None:
        return
    try:  # ListOffsets by time; where the broker cannot answer, the scan filters instead
        found = consumer.offsets_for_times({tp: bounds.since_ms for tp in tps})
    except Exception as exc:  # kafka-python raises several types here
        log.warning("offsets by time unavailable (%s): scanning from the beginning", exc)
        return
    for tp, ot in found.items():
        if ot is not None:
            consumer.seek(tp, ot.offset)
