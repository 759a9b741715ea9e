"""Model versions on Kafka: a checkpoint published in chunks, verified and adopted by replicas.

``<prefix>.models`` has one partition, so a version's chunks stay in order. A version is the
bytes of a safetensors checkpoint cut into chunks of at most ``CHUNK`` bytes; every chunk's
value is a header (``b"SMM1"``, the version, the chunk's index, the chunk count, the sha256 of
the whole checkpoint) and the chunk's bytes (key: ``v<version>``). A follower reassembles each
version, checks its length and sha256, and hands over only complete, verified checkpoints; a
malformed chunk, a hash mismatch or an oversized announcement is refused and counted, and the
model in use stays. The checkpoint itself is then loaded by
:func:`stream_meta.model_checkpoint.load_checkpoint` (safetensors: no pickle; format version and
finiteness checked).

>>> msgs = chunk_messages(b"x" * 10, version=3, chunk=4)
>>> len(msgs), [v for v, blob in Assembler().feed(msgs)]
(3, [3])
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stream_meta.model import MetaModel

__all__ = ["CHUNK", "Assembler", "ModelFollower", "chunk_messages", "publish_model"]

log = logging.getLogger(__name__)

CHUNK = 512 * 1024
_MAGIC = b"SMM1"
_HEAD = struct.Struct("<4sIII32s")
#: refuse announcements beyond this size (a hostile or broken publisher cannot exhaust memory)
MAX_MODEL_BYTES = 1 << 30
#: versions reassembled at once (older partial ones are dropped)
MAX_PENDING = 4


def chunk_messages(blob: bytes, *, version: int, chunk: int = CHUNK) -> list[bytes]:
    """The record values that carry ``blob`` as model ``version``."""
    if version < 1:
        raise ValueError("model versions start at 1")
    digest = hashlib.sha256(blob).digest()
    count = max(1, -(-len(blob) // chunk))
    return [
        _HEAD.pack(_MAGIC, version, i, count, digest) + blob[i * chunk : (i + 1) * chunk]
        for i in range(count)
    ]


def publish_model(producer: Any, topic: str, blob: bytes, *, version: int) -> str:
    """Send ``blob`` as model ``version`` to partition 0 of ``topic``, wait for every
    acknowledgement; returns the sha256 (hex)."""
    key = f"v{version}".encode()
    futures = [
        producer.send(topic, key=key, value=v, partition=0)
        for v in chunk_messages(blob, version=version)
    ]
    producer.flush()
    for f in futures:
        f.get(timeout=30)  # raises the broker's error, if any
    return hashlib.sha256(blob).hexdigest()


@dataclass
class _Pending:
    count: int
    digest: bytes
    chunks: dict[int, bytes] = field(default_factory=dict)


class Assembler:
    """Reassembles versions from chunk values (in any order); refuses what does not check."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self.refused: list[tuple[int | None, str]] = []  # (version, reason), for the caller

    def feed(self, values: Iterable[bytes | None]) -> Iterator[tuple[int, bytes]]:
        """``(version, checkpoint bytes)`` of every version these values complete."""
        for value in values:
            done = self._add(value)
            if done is not None:
                yield done

    def _refuse(self, version: int | None, reason: str) -> None:
        log.error("model message refused (version %s): %s; the model in use stays", version, reason)
        self.refused.append((version, reason))

    def _add(self, value: bytes | None) -> tuple[int, bytes] | None:
        if value is None or len(value) < _HEAD.size:
            self._refuse(None, "not a model chunk (too short)")
            return None
        magic, version, index, count, digest = _HEAD.unpack_from(value)
        if magic != _MAGIC or count < 1 or index >= count:
            self._refuse(version if magic == _MAGIC else None, "malformed chunk header")
            return None
        if count * CHUNK > MAX_MODEL_BYTES:
            self._refuse(version, f"announces {count} chunks, over {MAX_MODEL_BYTES} bytes")
            return None
        pending = self._pending.get(version)
        if pending is None or pending.count != count or pending.digest != digest:
            pending = self._pending[version] = _Pending(count, digest)  # a (re)publication
            while len(self._pending) > MAX_PENDING:
                del self._pending[min(self._pending)]
        pending.chunks[index] = value[_HEAD.size :]
        if len(pending.chunks) < count:
            return None
        del self._pending[version]
        blob = b"".join(pending.chunks[i] for i in range(count))
        if hashlib.sha256(blob).digest() != digest:
            self._refuse(version, "sha256 mismatch: the checkpoint is corrupt")
            return None
        return version, blob


class ModelFollower:
    """Reads ``topic`` (partition 0, from the beginning, no group) and returns the verified
    checkpoints of versions newer than the one served. ``metrics`` is a
    :class:`~stream_meta.metrics.ServiceMetrics`."""

    def __init__(self, consumer: Any, topic: str, metrics: Any = None) -> None:
        self.consumer, self.topic, self.metrics = consumer, topic, metrics
        self.assembler = Assembler()
        self._started = False

    def poll(self) -> list[tuple[int, bytes]]:
        """Complete, verified ``(version, checkpoint bytes)`` since the last poll, in order."""
        from kafka import TopicPartition

        if not self._started:
            if not self.consumer.partitions_for_topic(self.topic):
                return []
            tp = TopicPartition(self.topic, 0)
            self.consumer.assign([tp])
            self.consumer.seek_to_beginning(tp)
            self._started = True
        polled = self.consumer.poll(timeout_ms=0, max_records=64)
        values = [r.value for batch in polled.values() for r in batch]
        done = list(self.assembler.feed(values)) if values else []
        for _version, reason in self.assembler.refused:
            self._count_refused(_reason_label(reason))
        self.assembler.refused.clear()
        return done

    def newer(self, served: MetaModel, served_version: int) -> tuple[int, MetaModel] | None:
        """The newest version published since the last call, loaded, if it is newer than
        ``served_version`` and has ``served``'s architecture; else None (a refusal is logged
        and counted, and the model in use stays)."""
        from stream_meta.model_checkpoint import CheckpointError, load_checkpoint_bytes

        versions = self.poll()
        if not versions:
            return None
        version, blob = max(versions)
        if version <= served_version:
            log.info(
                "published model version %d is not newer than the served %d: ignored",
                version,
                served_version,
            )
            return None
        try:
            model, _manifest = load_checkpoint_bytes(blob)
        except CheckpointError as exc:
            self._count_refused("invalid")
            log.error(
                "published model version %d refused: %s; the model in use stays", version, exc
            )
            return None
        if model.config != served.config:
            self._count_refused("architecture")
            log.error(
                "published model version %d refused: its configuration differs from the "
                "served model's; the model in use stays",
                version,
            )
            return None
        return version, model

    def _count_refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.models_refused.labels(reason).inc()

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception as exc:  # closing must not hide why we stopped
            log.warning("closing the models consumer: %s", exc)


def _reason_label(reason: str) -> str:
    return "sha256" if "sha256" in reason else "oversized" if "over" in reason else "malformed"
