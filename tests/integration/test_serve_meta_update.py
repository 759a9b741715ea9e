"""Meta-updates in ``serve``: requested through the admin endpoint by ``stream-meta
meta-update``, trained in a worker process, hot-swapped, published to the drift topic, and
still served (with the replay buffer) after a restart."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from stream_meta.recording import read_records
from stream_meta.testing import kafka as topic_tools
from stream_meta.testing.processes import (
    Serve,
    cli,
    free_port,
    updater_status,
    wait_for_updater_events,
)

pytestmark = pytest.mark.kafka


def test_a_requested_update_is_trained_swapped_published_and_kept_across_a_restart(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"sm-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    kafka = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix]
    settings = [
        "--set",
        "service.partitions=1",
        "--set",
        "kafka.session_timeout_ms=6000",
        "--set",
        "kafka.heartbeat_interval_ms=2000",
        # a short job whose candidate is swapped in whatever the gate says: this test is about
        # the plumbing (the gate has its own tests)
        "--set",
        "meta_update.steps=20",
        "--set",
        "meta_update.promote=always",
        "--set",
        "meta_update.min_val_tasks=1",
    ]
    produced = cli(
        "produce", *kafka, *settings, "--events", "4000", "--tasks", "200", "-q", "--run-id", "a"
    )
    assert produced.returncode == 0, produced.stderr.decode()

    port = free_port()  # the admin port (meta-update requests); metrics are off
    recording = tmp_path / "recording"
    serve_args = [
        *kafka,
        *settings,
        "--group",
        f"g-{prefix}",
        "--state-dir",
        str(state),
        "--metrics-port",
        "0",
        "--admin-port",
        str(port),
        "--timeout",
        "150",
        "--record",
        str(recording),
    ]
    first = Serve(tmp_path, "first", *serve_args)
    try:
        wait_for_updater_events(port, 4000, first)
        asked = cli(
            "meta-update",
            "--url",
            f"http://127.0.0.1:{port}",
            "--wait",
            "90",
            "--json",
            "--reason",
            "test",
            timeout=120,
        )
        assert asked.returncode == 0, asked.stderr.decode() + first.stderr()
        outcome = json.loads(asked.stdout)
        assert outcome["outcome"] == "promoted" and outcome["version"] == 2, outcome
        assert outcome["trigger"] == "manual" and outcome["detail"] == "test"
        status = updater_status(port)
        assert status["model_version"] == 2 and status["replay"]["tasks"] > 0
        # events after the swap are served by version 2
        more = cli(
            "produce", *kafka, *settings, "--events", "300", "--tasks", "200", "-q", "--run-id", "b"
        )
        assert more.returncode == 0, more.stderr.decode()
        preds = topic_tools.read_records(kafka_bootstrap, f"{prefix}.predictions", 4300, settle=0.5)
        versions = [json.loads(r.value)["model_version"] for r in preds]
        assert len(versions) == 4300
        assert versions[-300:] == [2] * 300
        code, summary = first.stop()
    except BaseException:
        if first.proc.poll() is None:
            first.kill()
        raise
    assert code == 0, first.stderr()
    assert summary is not None and summary["model_version"] == 2
    assert [r["outcome"] for r in summary["meta_updates"]] == ["promoted"]
    assert (state / "models" / "model-v2.safetensors").is_file()

    # the recording holds every consumed record, with its Kafka coordinates, and the swap
    recorded = list(read_records(recording))
    events = [r for r in recorded if r["kind"] == "event"]
    assert len(events) == 4300
    assert [r["offset"] for r in events] == list(range(4300))
    assert {r["topic"] for r in events} == {f"{prefix}.events"}
    changes = [(r["version"], r["outcome"]) for r in recorded if r["kind"] == "model"]
    assert changes == [(1, "start"), (2, "promoted")]

    # the outcome is on the drift topic
    drift = [
        json.loads(r.value)
        for r in topic_tools.read_records(kafka_bootstrap, f"{prefix}.drift", 1, settle=0.5)
    ]
    updates = [d for d in drift if d["type"] == "meta_update"]
    assert [(u["outcome"], u["version"]) for u in updates] == [("promoted", 2)]
    assert updates[0]["validation"]["candidate"]["new"]["tasks"] >= 1

    # a restart serves version 2 again, with the replay buffer it had
    port2 = free_port()
    second = Serve(tmp_path, "second", *[a if a != str(port) else str(port2) for a in serve_args])
    try:
        second.wait_for_log("serving the promoted model version 2 again", timeout=60)
        more = cli(
            "produce", *kafka, *settings, "--events", "100", "--tasks", "200", "-q", "--run-id", "c"
        )
        assert more.returncode == 0, more.stderr.decode()
        preds = topic_tools.read_records(kafka_bootstrap, f"{prefix}.predictions", 4400, settle=0.5)
        assert [json.loads(r.value)["model_version"] for r in preds[-100:]] == [2] * 100
        after = wait_for_updater_events(port2, status["events"] + 100, second)
        assert after["model_version"] == 2
        # restored from the checkpoint (a fresh buffer would hold the 100 new events' tasks only)
        assert after["replay"]["tasks"] >= status["replay"]["tasks"]
        code, summary = second.stop()
    except BaseException:
        if second.proc.poll() is None:
            second.kill()
        raise
    assert code == 0, second.stderr()
    assert summary is not None and summary["model_version"] == 2
