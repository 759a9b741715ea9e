"""Model versions on Kafka: a checkpoint published in chunks, signed, verified and adopted by
replicas.

``<prefix>.models`` has one partition, so a version's chunks stay in order. A version is the
bytes of a safetensors checkpoint cut into chunks of at most ``CHUNK`` bytes (key:
``v<version>``). Every chunk's value is a header and the chunk's bytes; the header is either

* ``SMM2`` (signed): the magic, the version, the chunk's index, the chunk count, the sha256 of
  the whole checkpoint, the signer's key id (8 bytes) and the Ed25519 signature (64 bytes) of
  the version and the sha256 (:mod:`stream_meta.kafka.model_signing`); or
* ``SMM1`` (unsigned, what earlier releases wrote): the same without key id and signature.
  Still parsed, so old topics read, but refused unless ``models.accept_unsigned`` is on.

A follower reassembles each version, checks its length and sha256, then its signature against
the trusted public keys, and hands over only complete, verified checkpoints. A malformed chunk,
a hash mismatch, an oversized announcement, an unsigned version (outside development mode), a
signature by an untrusted key or a signature that does not match is refused, logged and counted
(``stream_meta_model_messages_refused_total{reason}``), and the model in use stays. So is a
**replay**: a version that arrives after a version at least as high was already read from the
topic (an older signed version published again cannot roll the replicas back). The checkpoint
itself is then loaded by :func:`stream_meta.model_checkpoint.load_checkpoint` (safetensors: no
pickle; format version and finiteness checked).

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
    from stream_meta.kafka.model_signing import Signer, Verifier
    from stream_meta.model import MetaModel

__all__ = ["CHUNK", "Assembler", "ModelFollower", "chunk_messages", "publish_model"]

log = logging.getLogger(__name__)

CHUNK = 512 * 1024
_MAGIC = b"SMM1"  # unsigned
_HEAD = struct.Struct("<4sIII32s")
_MAGIC2 = b"SMM2"  # signed: key id and signature after the SMM1 fields
_HEAD2 = struct.Struct("<4sIII32s8s64s")
#: refuse announcements beyond this size (a hostile or broken publisher cannot exhaust memory)
MAX_MODEL_BYTES = 1 << 30
#: versions reassembled at once (older partial ones are dropped)
MAX_PENDING = 4


def chunk_messages(
    blob: bytes, *, version: int, chunk: int = CHUNK, signer: Signer | None = None
) -> list[bytes]:
    """The record values that carry ``blob`` as model ``version``: signed by ``signer``
    (``SMM2``), or unsigned (``SMM1``) without one."""
    if version < 1:
        raise ValueError("model versions start at 1")
    digest = hashlib.sha256(blob).digest()
    count = max(1, -(-len(blob) // chunk))
    if signer is None:
        heads = [_HEAD.pack(_MAGIC, version, i, count, digest) for i in range(count)]
    else:
        kid, sig = signer.sign(version, digest)
        heads = [_HEAD2.pack(_MAGIC2, version, i, count, digest, kid, sig) for i in range(count)]
    return [head + blob[i * chunk : (i + 1) * chunk] for i, head in enumerate(heads)]


def publish_model(
    producer: Any, topic: str, blob: bytes, *, version: int, signer: Signer | None = None
) -> str:
    """Send ``blob`` as model ``version`` (signed by ``signer``; unsigned without one, which
    only replicas in development mode accept) to partition 0 of ``topic``, wait for every
    acknowledgement; returns the sha256 (hex)."""
    key = f"v{version}".encode()
    futures = [
        producer.send(topic, key=key, value=v, partition=0)
        for v in chunk_messages(blob, version=version, signer=signer)
    ]
    producer.flush()
    for f in futures:
        f.get(timeout=30)  # raises the broker's error, if any
    return hashlib.sha256(blob).hexdigest()


@dataclass
class _Pending:
    count: int
    digest: bytes
    kid: bytes | None
    signature: bytes | None
    chunks: dict[int, bytes] = field(default_factory=dict)


class Assembler:
    """Reassembles versions from chunk values (in any order); refuses what does not check.

    With a ``verifier`` (:class:`~stream_meta.kafka.model_signing.Verifier`), a complete
    version is also checked for its signature; without one (the wire format alone, as in the
    format tests) signatures are not checked: :class:`ModelFollower` always passes one."""

    def __init__(self, verifier: Verifier | None = None) -> None:
        self.verifier = verifier
        self._pending: dict[int, _Pending] = {}
        #: (version, why, reason label), for the caller
        self.refused: list[tuple[int | None, str, str]] = []

    def feed(self, values: Iterable[bytes | None]) -> Iterator[tuple[int, bytes]]:
        """``(version, checkpoint bytes)`` of every version these values complete."""
        for value in values:
            done = self._add(value)
            if done is not None:
                yield done

    def _refuse(self, version: int | None, reason: str, label: str) -> None:
        log.error("model message refused (version %s): %s; the model in use stays", version, reason)
        self.refused.append((version, reason, label))

    def _add(self, value: bytes | None) -> tuple[int, bytes] | None:
        if value is None or len(value) < _HEAD.size:
            self._refuse(None, "not a model chunk (too short)", "malformed")
            return None
        kid: bytes | None = None
        sig: bytes | None = None
        if value[:4] == _MAGIC2:
            if len(value) < _HEAD2.size:
                self._refuse(None, "not a model chunk (too short)", "malformed")
                return None
            magic, version, index, count, digest, kid, sig = _HEAD2.unpack_from(value)
            head = _HEAD2.size
        else:
            magic, version, index, count, digest = _HEAD.unpack_from(value)
            head = _HEAD.size
        if magic not in (_MAGIC, _MAGIC2) or count < 1 or index >= count:
            known = magic in (_MAGIC, _MAGIC2)
            self._refuse(version if known else None, "malformed chunk header", "malformed")
            return None
        if count * CHUNK > MAX_MODEL_BYTES:
            self._refuse(
                version, f"announces {count} chunks, over {MAX_MODEL_BYTES} bytes", "oversized"
            )
            return None
        pending = self._pending.get(version)
        if pending is None or (pending.count, pending.digest, pending.kid, pending.signature) != (
            count,
            digest,
            kid,
            sig,
        ):
            pending = self._pending[version] = _Pending(
                count, digest, kid, sig
            )  # a (re)publication
            while len(self._pending) > MAX_PENDING:
                del self._pending[min(self._pending)]
        pending.chunks[index] = value[head:]
        if len(pending.chunks) < count:
            return None
        del self._pending[version]
        blob = b"".join(pending.chunks[i] for i in range(count))
        if hashlib.sha256(blob).digest() != digest:
            self._refuse(version, "sha256 mismatch: the checkpoint is corrupt", "sha256")
            return None
        if self.verifier is not None:
            problem = self.verifier.check(version, digest, kid, sig)
            if problem is not None:
                label, why = problem
                self._refuse(version, why, label)
                return None
        return version, blob


class ModelFollower:
    """Reads ``topic`` (partition 0, from the beginning, no group) and returns the verified
    checkpoints of versions newer than the one served. ``metrics`` is a
    :class:`~stream_meta.metrics.ServiceMetrics`; ``verifier`` checks every version's signature
    (:func:`stream_meta.kafka.model_signing.verifier_from_settings`).

    A version that completes after a version at least as high was already read from the
    topic is a replay (the same or an older version published again): refused, logged and
    counted as ``stale``. A version read in order but not newer than the served one (the
    history of the topic, read again after a restart) is only skipped."""

    def __init__(
        self, consumer: Any, topic: str, metrics: Any = None, *, verifier: Verifier
    ) -> None:
        self.consumer, self.topic, self.metrics = consumer, topic, metrics
        self.assembler = Assembler(verifier)
        self._started = False
        self.highest_read = 0  # the highest version read (verified) from the topic

    def poll(self) -> list[tuple[int, bytes]]:
        """Complete, verified ``(version, checkpoint bytes)`` since the last poll, in order;
        replays refused."""
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
        for _version, _why, label in self.assembler.refused:
            self._count_refused(label)
        self.assembler.refused.clear()
        fresh = []
        for version, blob in done:
            if version <= self.highest_read:
                self._count_refused("stale")
                log.error(
                    "published model version %d refused: a replay (version %d was already "
                    "read from %s); the model in use stays",
                    version,
                    self.highest_read,
                    self.topic,
                )
                continue
            self.highest_read = version
            fresh.append((version, blob))
        return fresh

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
                "published model version %d is not newer than the served %d: skipped",
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
