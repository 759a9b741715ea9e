"""Task embeddings shared between replicas through a compacted Kafka topic.

Each ``serve`` replica of a consumer group owns the tasks of its partitions. After every batch
it publishes the embeddings of the tasks it just re-encoded to ``<prefix>.task-embeddings``
(key: task id, so compaction keeps each task's newest), and it reads that topic from the
beginning, on every partition, without a group: every replica's FAISS index then covers every
task of the deployment, and neighbours are found across partitions.

Value format (little-endian): ``b"SMZ1"``, the model version (uint32), the dimension (uint32),
then ``d`` float32. A record that does not parse, has the wrong dimension, holds NaN/inf or
comes from another model version (embeddings of two models live in different spaces) is
skipped and counted; a replica republishes all of its tasks after a model swap.

>>> import numpy as np
>>> blob = encode(3, np.ones(4, dtype=np.float32))
>>> decode(blob, version=3, d=4).tolist()
[1.0, 1.0, 1.0, 1.0]
>>> decode(blob, version=2, d=4) is None, decode(b"junk", version=3, d=4) is None
(True, True)
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import numpy as np

__all__ = ["EmbeddingSync", "decode", "encode"]

log = logging.getLogger(__name__)

_MAGIC = b"SMZ1"
_HEAD = struct.Struct("<4sII")


def encode(version: int, z: np.ndarray) -> bytes:
    """One embedding as a record value."""
    z = np.ascontiguousarray(z, dtype="<f4")
    return _HEAD.pack(_MAGIC, version, z.shape[0]) + z.tobytes()


def decode(value: bytes | None, *, version: int, d: int) -> np.ndarray | None:
    """The embedding of a record value, or None when it is unusable (see the module doc)."""
    if value is None or len(value) != _HEAD.size + 4 * d:
        return None
    magic, v, dim = _HEAD.unpack_from(value)
    if magic != _MAGIC or v != version or dim != d:
        return None
    z = np.frombuffer(value, dtype="<f4", offset=_HEAD.size).astype(np.float32)
    return z if bool(np.isfinite(z).all()) else None


class EmbeddingSync:
    """Publishes an engine's new embeddings and indexes the other replicas' (see module doc).

    ``consumer`` is a ``KafkaConsumer`` without a group; :meth:`start` assigns it every
    partition of ``topic`` from the beginning. ``metrics`` is a
    :class:`~stream_meta.metrics.ServiceMetrics`.
    """

    def __init__(self, engine: Any, topic: str, consumer: Any, metrics: Any) -> None:
        self.engine, self.topic, self.consumer, self.metrics = engine, topic, consumer, metrics
        engine.share_embeddings()
        self._started = False

    def start(self) -> bool:
        """Assign the topic's partitions (False while its metadata is not known yet)."""
        from kafka import TopicPartition

        parts = self.consumer.partitions_for_topic(self.topic)
        if not parts:
            return False
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self._started = True
        return True

    def outgoing(self) -> list[tuple[str, bytes, bytes]]:
        """``(topic, key, value)`` sends for the embeddings computed since the last call (all
        live tasks after a model swap)."""
        engine = self.engine
        version = engine.model_version
        sends = [
            (self.topic, task_id.encode(), encode(version, z))
            for task_id, z in engine.drain_embeddings().items()
        ]
        if sends:
            self.metrics.embeddings_published.inc(len(sends))
        return sends

    def poll(self, max_records: int = 5000) -> int:
        """Index what other replicas published since the last poll; returns how many."""
        if not self._started and not self.start():
            return 0
        polled = self.consumer.poll(timeout_ms=0, max_records=max_records)
        records = [r for batch in polled.values() for r in batch]
        if not records:
            return 0
        engine = self.engine
        version, d = engine.model_version, engine.model.config.embed_dim
        latest: dict[str, np.ndarray] = {}
        skipped = 0
        for r in records:
            z = decode(r.value, version=version, d=d)
            try:
                task_id = r.key.decode("utf-8") if r.key is not None else None
            except UnicodeDecodeError:
                task_id = None
            if z is None or not task_id:
                skipped += 1
                continue
            latest[task_id] = z
        if skipped:
            self.metrics.embeddings_skipped.inc(skipped)
        if not latest:
            return 0
        taken = engine.merge_embeddings(list(latest), np.stack(list(latest.values())))
        self.metrics.embeddings_merged.inc(taken)
        return taken

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception as exc:  # closing must not hide why we stopped
            log.warning("closing the embeddings consumer: %s", exc)
