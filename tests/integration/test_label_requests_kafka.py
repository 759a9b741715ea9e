"""Label requests through the suite's real broker: one request per eligible event, exactly
once, keyed by task, within the budget."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kafka import KafkaProducer

from stream_meta.testing.kafka import FAST_GROUP_SETS, create_topics, new_prefix, read_records
from stream_meta.testing.processes import cli
from tests.conftest import sinusoid_events

pytestmark = pytest.mark.kafka


def _produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for ev in events:
        producer.send(topic, key=ev["task_id"].encode(), value=json.dumps(ev).encode())
    producer.flush()
    producer.close()


def _serve(bootstrap: str, prefix: str, events: int, *sets: str) -> dict[str, Any]:
    served = cli(
        "serve",
        "--bootstrap-servers",
        bootstrap,
        "--topic-prefix",
        prefix,
        "--group",
        f"g-{prefix}",
        "--events",
        str(events),
        "--metrics-port",
        "0",
        "--timeout",
        "180",
        "--json",
        "-q",
        *FAST_GROUP_SETS,
        "--set",
        "engine.micro_batch=64",
        "--set",
        "labels.enabled=true",
        *sets,
    )
    assert served.returncode == 0, served.stderr.decode()
    return json.loads(served.stdout)


def test_every_unlabelled_event_is_requested_exactly_once(kafka_bootstrap: str) -> None:
    """With the whole budget (random policy, share 1), every unlabelled event gets one label
    request on <prefix>.label-requests, keyed by its task; a redelivered copy of the events
    (same ids) gets none, and labelled events never get one."""
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix)
    events = sinusoid_events(300, tasks=20, seed=5, labelled=0.6)
    _produce(kafka_bootstrap, f"{prefix}.events", events + events[:120])
    summary = _serve(
        kafka_bootstrap,
        prefix,
        420,
        "--set",
        "labels.policy=random",
        "--set",
        "labels.fraction=1.0",
        "--set",
        "labels.burst=1000",
    )
    assert summary["consumed"] == 420
    unlabelled = {e["event_id"]: e["task_id"] for e in events if e.get("y") is None}
    records = read_records(kafka_bootstrap, f"{prefix}.label-requests", len(unlabelled), settle=1.0)
    values = [json.loads(r.value) for r in records]
    ids = [v["event_id"] for v in values]
    assert sorted(ids) == sorted(unlabelled)  # each unlabelled event, once, nothing else
    for record, value in zip(records, values, strict=True):
        assert record.key.decode() == value["task_id"] == unlabelled[value["event_id"]]
        assert value["reason"] == "random_sample" and value["model_version"] >= 1
    assert summary["label_requests"]["repeated"] == sum(
        1 for e in events[:120] if e.get("y") is None
    )


def test_the_share_budget_holds_through_the_broker(kafka_bootstrap: str) -> None:
    """The default uncertainty policy at a 10% share with a burst of 2: at most 10% of the
    unlabelled events are requested (at least half of that: the budget is spent), each once,
    each worth something."""
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix)
    events = sinusoid_events(400, tasks=40, seed=6, labelled=0.5)
    _produce(kafka_bootstrap, f"{prefix}.events", events)
    summary = _serve(
        kafka_bootstrap, prefix, 400, "--set", "labels.fraction=0.1", "--set", "labels.burst=2"
    )
    n_unlabelled = sum(1 for e in events if e.get("y") is None)
    asked = summary["label_requests"]["requested"]
    assert 0.5 * 0.1 * n_unlabelled <= asked <= 0.1 * n_unlabelled
    records = read_records(kafka_bootstrap, f"{prefix}.label-requests", asked, settle=1.0)
    values = [json.loads(r.value) for r in records]
    assert len(values) == asked and len({v["event_id"] for v in values}) == asked
    assert all(v["reason"] == "expected_loss_reduction" and v["score"] > 0 for v in values)
