"""What the suite's broker does with Kafka transactions (docs/KAFKA_TEST_BROKER.md).

    python -m scripts.kafka_transactions_probe [--bootstrap HOST:PORT]

Without ``--bootstrap`` a Tansu broker is started as the suite starts it. Through
kafka-python's transactional producer: a committed transaction with consumed offsets, an
aborted one, a committed one; then what a ``read_uncommitted`` and a ``read_committed``
consumer receive, and whether a second producer with the same ``transactional_id`` fences the
first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from contextlib import ExitStack
from typing import Any


def probe(bootstrap: str) -> dict[str, Any]:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    run = uuid.uuid4().hex[:8]
    src, out, group = f"probe-{run}-in", f"probe-{run}-out", f"probe-{run}-g"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(src, 1, 1), NewTopic(out, 1, 1)])
    finally:
        admin.close()
    plain = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(10):
        plain.send(src, b"in-%d" % i)
    plain.flush()
    plain.close()

    result: dict[str, Any] = {"bootstrap": bootstrap}
    tx = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"probe-{run}")
    tx.init_transactions()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    tp = TopicPartition(src, 0)
    consumer.assign([tp])
    tx.begin_transaction()
    tx.send(out, b"committed-1")
    tx.send_offsets_to_transaction({tp: OffsetAndMetadata(5, "", -1)}, group)
    tx.commit_transaction()
    tx.begin_transaction()
    tx.send(out, b"aborted")
    tx.flush()
    tx.abort_transaction()
    tx.begin_transaction()
    tx.send(out, b"committed-2")
    tx.commit_transaction()
    result["committed_offset_after_transactions"] = consumer.committed(tp)
    consumer.close()

    for isolation in ("read_uncommitted", "read_committed"):
        reader = KafkaConsumer(
            bootstrap_servers=bootstrap,
            isolation_level=isolation,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        reader.assign([TopicPartition(out, 0)])
        got: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for batch in reader.poll(timeout_ms=300).values():
                got += [r.value.decode() for r in batch]
        reader.close()
        result[isolation] = got

    zombie_check = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"probe-{run}")
    zombie_check.init_transactions()
    try:
        tx.begin_transaction()
        tx.send(out, b"zombie")
        tx.commit_transaction()
        result["fenced"] = False
    except KafkaError as exc:
        result["fenced"] = type(exc).__name__
    zombie_check.close()
    result["aborted_records_hidden_from_read_committed"] = "aborted" not in result["read_committed"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--bootstrap", help="an existing broker (default: start Tansu)")
    args = p.parse_args()
    with ExitStack() as stack:
        bootstrap = args.bootstrap
        if bootstrap is None:
            from stream_meta.testing.broker import kafka_broker

            bootstrap = stack.enter_context(kafka_broker())
        print(json.dumps(probe(bootstrap), indent=1))


if __name__ == "__main__":
    main()
