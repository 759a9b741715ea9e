"""The Kafka-fed service loop behind ``stream-meta serve`` (first slice of issue 3).

Consumes ``<prefix>.events`` in a consumer group, runs every polled batch through the
:class:`~stream_meta.engine.Engine`, and produces exactly one output per consumed record: a
prediction to ``<prefix>.predictions`` (key: task id; the record ``run --output`` writes) or
a dead letter to ``<prefix>.dead-letter`` (reason, detail, the original bytes base64-encoded,
source topic, partition and offset). Offsets are committed only after the batch's outputs are
flushed with ``acks=all``, so a crash re-delivers rather than loses (at-least-once).

Not yet here (issue 3): state checkpoints and de-duplication by event id (a redelivered
labelled event is learned again), commit on revocation, broker-outage backoff, lag metrics,
health endpoints.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from stream_meta.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """The service's topic names for a prefix."""

    events: str
    predictions: str
    dead_letter: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Topics:
        return cls(f"{prefix}.events", f"{prefix}.predictions", f"{prefix}.dead-letter")


class KafkaService:
    """Consume, adapt, produce, commit; see the module docstring.

    ``kafka`` is a :class:`~stream_meta.config.KafkaSettings`; ``batch_size`` bounds one poll.
    """

    def __init__(self, engine: Engine, kafka: Any, *, batch_size: int = 512) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self.engine, self.settings, self.batch_size = engine, kafka, batch_size
        self.topics = Topics.for_prefix(kafka.topic_prefix)
        self.stop_event = threading.Event()
        self.consumer = KafkaConsumer(
            self.topics.events,
            bootstrap_servers=kafka.bootstrap_servers.split(","),
            group_id=kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            max_poll_interval_ms=kafka.max_poll_interval_ms,
            max_poll_records=batch_size,
        )
        self.producer = KafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers.split(","),
            acks="all",
            linger_ms=5,
        )
        self.consumed = self.predicted = self.dead_lettered = 0

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT finish the current batch, flush, commit, then stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def run(self, *, events: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Serve until stopped, ``events`` records were consumed, or ``timeout_s`` passed."""
        start = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if events is not None and self.consumed >= events:
                    break
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    break
                polled = self.consumer.poll(timeout_ms=self.settings.poll_timeout_ms)
                records = [r for batch in polled.values() for r in batch]
                if records:
                    self._handle(records)
        finally:
            self.close()
        return {
            "consumed": self.consumed,
            "predicted": self.predicted,
            "dead_lettered": self.dead_lettered,
            **self.engine.summary(),
        }

    def _handle(self, records: list[Any]) -> None:
        result = self.engine.process([r.value for r in records])
        out = result.outputs
        send = self.producer.send
        for record, ref in zip(records, result.order, strict=True):
            if ref >= 0 and out is not None:
                send(
                    self.topics.predictions,
                    key=out.task_ids[ref].encode(),
                    value=out.record(ref).to_json().encode(),
                )
                self.predicted += 1
            else:
                rejection = result.rejections[-1 - ref]
                letter = {
                    **rejection.to_record(),
                    # the whole original bytes (the rejection keeps only the first 4 KiB)
                    "raw_b64": base64.b64encode(record.value or b"").decode("ascii"),
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                }
                send(self.topics.dead_letter, key=record.key, value=json.dumps(letter).encode())
                self.dead_lettered += 1
        self.producer.flush()  # outputs durable (acks=all) before the offsets move
        self.consumer.commit()
        self.consumed += len(records)

    def close(self) -> None:
        try:
            self.producer.flush()
            self.producer.close()
        finally:
            self.consumer.close()
