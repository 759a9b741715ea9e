"""The task-state changelog: every task's support set on a compacted, co-partitioned topic.

A replica owns the tasks of its partitions. After every batch it writes the new support set of
each task the batch taught to ``<prefix>.task-state`` (key: task id), on the *same partition
number* as the events that taught it, and with the offset of the last of those events. The
records are sent with the batch's outputs and acknowledged before any offset is committed, so
the changelog is never behind the committed offsets.

When a replica is assigned a partition it reads that partition of the changelog from the
beginning to its end and loads every task whose support set there has seen more examples than
its own copy (a partition that moved from a killed replica; or events processed after this
replica's last state checkpoint). Events that are then redelivered (from the committed offset
on) and that the changelog already reflects (offset <= the task's applied offset) are predicted
again but not learned twice. This is the changelog-topic design of Kafka Streams, with the
applied offsets the state records carry.

Value format (little-endian): ``b"SMT1"``, seen (int64), applied offset (int64), n (uint32),
x_dim (uint32), label type (uint8: 0 float32, 1 int64), then ``xs`` float32 ``[n, x_dim]`` and
``ys`` ``[n]``. A record that does not parse or holds non-finite values is skipped and counted.

>>> import numpy as np
>>> blob = encode(7, 41, np.ones((2, 1), np.float32), np.array([0.5, 1.5], np.float32))
>>> rec = decode(blob, x_dim=1)
>>> rec.seen, rec.applied_offset, rec.ys.tolist()
(7, 41, [0.5, 1.5])
>>> decode(b"junk", x_dim=1) is None, decode(blob, x_dim=3) is None
(True, True)
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TaskRecord", "decode", "encode", "read_partitions"]

log = logging.getLogger(__name__)

_MAGIC = b"SMT1"
_HEAD = struct.Struct("<4sqqIIB")
_Y: dict[int, np.dtype[Any]] = {0: np.dtype("<f4"), 1: np.dtype("<i8")}


@dataclass(frozen=True)
class TaskRecord:
    """One task's support set as the changelog holds it."""

    seen: int
    applied_offset: int
    xs: np.ndarray  # [n, x_dim] float32
    ys: np.ndarray  # [n]


def encode(seen: int, applied_offset: int, xs: np.ndarray, ys: np.ndarray) -> bytes:
    y_code = 0 if ys.dtype.kind == "f" else 1
    xs = np.ascontiguousarray(xs, dtype="<f4")
    return (
        _HEAD.pack(_MAGIC, seen, applied_offset, len(ys), xs.shape[1], y_code)
        + xs.tobytes()
        + np.ascontiguousarray(ys, dtype=_Y[y_code]).tobytes()
    )


def decode(value: bytes | None, *, x_dim: int) -> TaskRecord | None:
    """The record of a changelog value, or None when it is unusable."""
    if value is None or len(value) < _HEAD.size:
        return None
    magic, seen, applied, n, dim, y_code = _HEAD.unpack_from(value)
    if magic != _MAGIC or dim != x_dim or y_code not in _Y or seen < n or applied < 0:
        return None
    y_type = _Y[y_code]
    if len(value) != _HEAD.size + 4 * n * dim + y_type.itemsize * n:
        return None
    start = _HEAD.size
    xs = np.frombuffer(value, dtype="<f4", count=n * dim, offset=start).reshape(n, dim)
    ys = np.frombuffer(value, dtype=y_type, count=n, offset=start + 4 * n * dim)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None
    y_out = ys.astype(np.float32 if y_code == 0 else np.int64)
    return TaskRecord(int(seen), int(applied), xs.astype(np.float32), y_out)


def read_partitions(
    reader: Any, topic: str, partitions: list[int], *, x_dim: int, timeout_s: float = 60.0
) -> tuple[dict[tuple[int, str], TaskRecord], int]:
    """Every task's newest record on ``partitions`` of ``topic``, read from the beginning to
    the end -> ``({(partition, task id): record}, records skipped)``.

    ``reader`` is a ``KafkaConsumer`` without a group. The end of a partition is its high
    watermark as fetch responses report it (ListOffsets(latest) is not trusted: the suite's
    broker answers it short of the end); an empty partition has none after a few empty polls.
    """
    from kafka import TopicPartition

    tps = [TopicPartition(topic, p) for p in partitions]
    if not tps:
        return {}, 0
    reader.assign(tps)
    reader.seek_to_beginning(*tps)
    latest: dict[tuple[int, str], TaskRecord] = {}
    skipped, empty_polls = 0, 0
    open_tps = set(tps)
    deadline = time.monotonic() + timeout_s
    while open_tps:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{topic}: changelog partitions {sorted(partitions)} not read "
                f"to their end within {timeout_s:g} s"
            )
        polled = reader.poll(timeout_ms=200)
        for tp, records in polled.items():
            for r in records:
                rec = decode(r.value, x_dim=x_dim)
                try:
                    task_id = r.key.decode("utf-8") if r.key else ""
                except UnicodeDecodeError:
                    task_id = ""
                if rec is None or not task_id:
                    skipped += 1
                    continue
                latest[(tp.partition, task_id)] = rec
        empty_polls = 0 if any(polled.values()) else empty_polls + 1
        for tp in list(open_tps):
            high = reader.highwater(tp)
            if (high is not None and reader.position(tp) >= high) or (
                high is None and empty_polls >= 3
            ):
                open_tps.discard(tp)
    return latest, skipped
