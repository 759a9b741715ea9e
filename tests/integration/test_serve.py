"""``stream-meta produce`` and ``serve`` through the suite's real broker."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from stream_meta.testing.kafka import read_records
from stream_meta.testing.processes import cli

pytestmark = pytest.mark.kafka


def test_every_event_gets_one_prediction_or_one_dead_letter_when_served(
    kafka_bootstrap: str,
) -> None:
    prefix = f"sm-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics(
        [NewTopic(f"{prefix}.{t}", 2, 1) for t in ("events", "predictions", "dead-letter")]
    )
    admin.close()
    common = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix, "--json", "-q"]
    produced = cli(
        "produce",
        *common,
        "--events",
        "600",
        "--tasks",
        "40",
        "--bad-fraction",
        "0.05",
        "--seed",
        "3",
    )
    assert produced.returncode == 0, produced.stderr.decode()
    bad = json.loads(produced.stdout)["bad"]
    assert 10 < bad < 60
    served = cli(
        "serve",
        *common,
        "--group",
        f"g-{prefix}",
        "--events",
        "600",
        "--metrics-port",
        "0",
        "--timeout",
        "120",
        "--set",
        "kafka.session_timeout_ms=6000",
        "--set",
        "kafka.heartbeat_interval_ms=2000",
    )
    assert served.returncode == 0, served.stderr.decode()
    summary = json.loads(served.stdout)
    assert summary["consumed"] == 600
    assert (summary["predicted"], summary["dead_lettered"]) == (600 - bad, bad)

    preds = read_records(kafka_bootstrap, f"{prefix}.predictions", 600 - bad, settle=0.5)
    letters = read_records(kafka_bootstrap, f"{prefix}.dead-letter", bad, settle=0.5)
    values = [json.loads(r.value) for r in preds]
    ids = [v["event_id"] for v in values]
    assert len(ids) == len(set(ids)) == 600 - bad
    assert all(r.key.decode() == v["task_id"] for r, v in zip(preds, values, strict=True))
    assert {"event_id", "task_id", "prediction", "model_version", "latency_s"} <= values[0].keys()
    dead = [json.loads(r.value) for r in letters]
    assert len(dead) == bad
    reasons = {d["reason"] for d in dead}
    assert reasons <= {
        "malformed_json",
        "not_an_object",
        "missing_field",
        "invalid_type",
        "wrong_dimension",
        "non_finite",
        "oversized",
    }
    assert len(reasons) >= 4
    for d in dead:
        assert d["topic"] == f"{prefix}.events" and d["offset"] >= 0
        assert base64.b64decode(d["raw_b64"])  # the original bytes, for replay or inspection

    # `tail` reads both topics back (manual assignment: no group join)
    tail = [
        "tail",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        "--from-beginning",
        "--timeout",
        "5",
    ]
    shown = cli(*tail, "--max", "50")
    assert shown.returncode == 0, shown.stderr.decode()
    lines = [json.loads(line) for line in shown.stdout.decode().splitlines()]
    assert len(lines) == 50 and {v["event_id"] for v in lines} <= set(ids)
    shown = cli(*tail, "--dead-letter", "--meta")
    assert shown.returncode == 0, shown.stderr.decode()
    wrapped = [json.loads(line) for line in shown.stdout.decode().splitlines()]
    assert len(wrapped) == bad  # all of them, then 5 s without a new record ends it
    assert {w["value"]["offset"] for w in wrapped} == {d["offset"] for d in dead}
    assert all({"partition", "offset", "timestamp_ms"} <= w.keys() for w in wrapped)


def test_tail_explains_a_missing_topic(kafka_bootstrap: str) -> None:
    shown = cli(
        "tail",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        f"none-{uuid.uuid4().hex[:8]}",
        "--timeout",
        "1",
    )
    assert shown.returncode == 2
    assert "does not exist" in shown.stderr.decode()


def test_serve_publishes_drift_alarms_of_a_scenario_to_the_drift_topic(
    kafka_bootstrap: str,
) -> None:
    prefix = f"sm-{uuid.uuid4().hex[:8]}"
    common = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        "--json",
        "-q",
        "--set",
        "service.partitions=1",
    ]  # one partition: the scenario's order
    produced = cli("produce", *common, "--scenario", "sinusoid-new-family", "--events", "24000")
    assert produced.returncode == 0, produced.stderr.decode()
    served = cli(
        "serve",
        *common,
        "--group",
        f"g-{prefix}",
        "--events",
        "24000",
        "--metrics-port",
        "0",
        "--timeout",
        "120",
        "--set",
        "kafka.session_timeout_ms=6000",
        "--set",
        "kafka.heartbeat_interval_ms=2000",
    )
    assert served.returncode == 0, served.stderr.decode()
    summary = json.loads(served.stdout)
    assert summary["alarms"], "the new family at event 20,000 raised no alarm"
    records = read_records(kafka_bootstrap, f"{prefix}.drift", len(summary["alarms"]), settle=0.5)
    alarms = [json.loads(r.value) for r in records]
    assert [a["detector"] for a in alarms] == [a["detector"] for a in summary["alarms"]]
    assert all(a["type"] == "drift_alarm" and a["model_version"] == 1 for a in alarms)
    assert all(a["event_index"] >= 20_000 for a in alarms)  # nothing before the drift
    assert alarms[0]["event_index"] <= 20_300
