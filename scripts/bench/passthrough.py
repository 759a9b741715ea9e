"""The pass-through baseline of the ``serve`` section, as a process of its own:

    python -m scripts.bench.passthrough BOOTSTRAP PREFIX EVENTS

forwards ``EVENTS`` records of ``PREFIX.events`` to ``PREFIX.predictions`` with a minimal
kafka-python loop (manual assignment, the service's fetch and producer settings): what the
broker and the client library cost, without the engine. Kept light (the standard library and
kafka-python only): it must be polling within the 2 s the measurement waits before producing.
"""

from __future__ import annotations

import sys


def passthrough(bootstrap: str, prefix: str, events: int) -> None:
    """Forward ``events`` records of ``<prefix>.events`` to ``<prefix>.predictions``, batch by
    batch, waiting for the acknowledgements as ``serve`` does (run as its own process)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    topic = f"{prefix}.events"
    consumer.assign(
        [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    done = 0
    while done < events:
        records = [r for b in consumer.poll(timeout_ms=200, max_records=512).values() for r in b]
        for r in records:
            producer.send(f"{prefix}.predictions", key=r.key, value=r.value)
        producer.flush()
        done += len(records)
    producer.close()
    consumer.close()


if __name__ == "__main__":
    if len(sys.argv) == 4:
        passthrough(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m scripts.bench.passthrough BOOTSTRAP PREFIX EVENTS")
