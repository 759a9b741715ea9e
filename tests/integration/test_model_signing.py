"""Signed model versions through the suite's real broker: a replica (a
:class:`~stream_meta.kafka.service.KafkaService` built as ``stream-meta serve`` builds it, on a
thread of this process) adopts a version signed by a trusted key; a version signed by an
unknown key, one with a tampered signature, an unsigned one and replays of signed versions
(an older one, the served one again) are refused and counted while the served model stays;
a version signed by a second, rotated-in trusted key is adopted."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from stream_meta.app import build_engine
from stream_meta.config import load_settings
from stream_meta.kafka.model_signing import Signer, generate_keys
from stream_meta.kafka.model_topic import _HEAD2, chunk_messages
from stream_meta.kafka.service import KafkaService
from stream_meta.metrics import EngineMetrics, ServiceMetrics
from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint
from stream_meta.testing.kafka import create_topics, new_prefix
from stream_meta.testing.timeouts import scaled, wait_until

pytestmark = pytest.mark.kafka


def _send(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 << 20)
    try:
        for value in values:
            producer.send(topic, value=value, partition=0)
        producer.flush()
    finally:
        producer.close()


def test_a_replica_serves_only_trusted_fresh_signed_versions(
    kafka_bootstrap: str, tmp_path: Path, model_keys: Any
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    topic = f"{prefix}.models"
    rotated_private, rotated_public, _ = generate_keys(tmp_path / "rotated")
    rotated = Signer.from_file(rotated_private)
    stranger = Signer.generate()
    settings = load_settings(
        None,
        env={},
        overrides={
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "topic_prefix": prefix,
                "group_id": f"{prefix}-g",
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 2000,
            },
            "meta_update": {"enabled": False},
            # the first key from a directory, the rotated-in one named: both trusted
            "models": {
                "trusted_keys_dir": str(model_keys.dir),
                "trusted_keys": [str(rotated_public)],
            },
        },
    )
    registry = CollectorRegistry()
    shipped, _ = load_checkpoint(shipped_checkpoint("sinusoid"))
    engine = build_engine(shipped, settings, metrics=EngineMetrics(registry), model_version=1)
    metrics = ServiceMetrics(registry)
    service = KafkaService(engine, settings, metrics, updater=None)
    service.start()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def refused(reason: str) -> float:
        labels = {"reason": reason}
        return registry.get_sample_value("stream_meta_model_messages_refused_total", labels) or 0

    def serving(version: int) -> bool:
        assert not errors, errors
        return engine.model_version == version

    blob = shipped_checkpoint("sinusoid").read_bytes()
    try:
        _send(kafka_bootstrap, topic, chunk_messages(blob, version=3, signer=model_keys.signer))
        wait_until(lambda: serving(3), timeout=60, what="version 3 (trusted key) adopted")

        refusals = [
            ("unknown_key", chunk_messages(blob, version=4, signer=stranger)),
            ("unsigned", chunk_messages(blob, version=5)),
            ("stale", chunk_messages(blob, version=2, signer=model_keys.signer)),  # older
            ("stale", chunk_messages(blob, version=3, signer=model_keys.signer)),  # the same
        ]
        tampered = []
        for value in chunk_messages(blob, version=6, signer=model_keys.signer):
            damaged = bytearray(value)
            damaged[_HEAD2.size - 10] ^= 0x40  # a byte of the signature, in every chunk
            tampered.append(bytes(damaged))
        refusals.insert(1, ("bad_signature", tampered))
        for reason, values in refusals:
            before = refused(reason)
            _send(kafka_bootstrap, topic, values)
            wait_until(
                lambda r=reason, b=before: refused(r) > b, timeout=60, what=f"refused: {reason}"
            )
            assert serving(3), reason  # the model in use stays

        _send(kafka_bootstrap, topic, chunk_messages(blob, version=7, signer=rotated))
        wait_until(lambda: serving(7), timeout=60, what="version 7 (rotated-in key) adopted")
    finally:
        service.stop_event.set()
        thread.join(scaled(120))
    assert not thread.is_alive() and not errors, errors
    assert {r: refused(r) for r in ("unknown_key", "bad_signature", "unsigned", "stale")} == {
        "unknown_key": 1,
        "bad_signature": 1,
        "unsigned": 1,
        "stale": 2,
    }
    assert refused("sha256") == 0 and engine.model_version == 7
