"""Measure how long a kafka-python consumer-group join takes against the test broker (Tansu).

    python -m scripts.kafka_join_latency [--session-timeouts 6000 10000 20000 45000]

Starts the suite's test broker (stream_meta/testing/broker.py), writes 10 records to a 2-partition
topic, then for each session timeout times a fresh consumer group from construction to its
first 10 records. Prints one line per setting. Findings: docs/KAFKA_TEST_BROKER.md.
"""

from __future__ import annotations

import argparse
import time
import uuid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--session-timeouts", type=int, nargs="+", default=[6000, 10000, 45000])
    args = parser.parse_args()

    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    from stream_meta.testing.broker import kafka_broker

    with kafka_broker() as bootstrap:
        KafkaAdminClient(bootstrap_servers=bootstrap).create_topics([NewTopic("join", 2, 1)])
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for i in range(10):
            producer.send("join", b"%d" % i)
        producer.flush()
        producer.close()
        for session in args.session_timeouts:
            start = time.time()
            consumer = KafkaConsumer(
                "join",
                bootstrap_servers=bootstrap,
                group_id=f"g-{uuid.uuid4().hex[:8]}",
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                session_timeout_ms=session,
                heartbeat_interval_ms=min(3000, session // 3),
            )
            got = 0
            while got < 10 and time.time() - start < 120:
                got += sum(len(m) for m in consumer.poll(100).values())
            print(
                f"session_timeout_ms={session}: first 10 records after {time.time() - start:.2f} s"
            )
            consumer.close()


if __name__ == "__main__":
    main()
