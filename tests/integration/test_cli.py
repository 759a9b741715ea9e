"""The ``stream-meta`` command end to end, as a user runs it (real processes, files, ports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stream_meta.testing.processes import cli, free_port
from stream_meta.testing.timeouts import scaled
from tests.conftest import sinusoid_events

REQUIRED = {
    "events",
    "labelled",
    "queries",
    "rejected",
    "tasks",
    "events_per_s",
    "prequential_loss",
    "loss_by_shots",
}


def test_run_prints_the_summary_as_json_when_asked() -> None:
    proc = cli("run", "--events", "3000", "--json", "-q", "--metrics-port", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    assert summary.keys() >= REQUIRED
    assert summary["events"] == 3000
    assert summary["labelled"] + summary["queries"] + summary["rejected"] == 3000
    assert summary["rejected"] == 0 and summary["tasks"] > 10
    shots = summary["loss_by_shots"]
    # the trained model adapts: loss with 10 examples is far below the cold-start loss
    assert shots["10"] < 0.2 * shots["0"], shots
    assert summary["query_loss"] < summary["loss_by_shots"]["0"]


def test_run_writes_predictions_and_rejects_when_input_has_bad_lines(tmp_path: Path) -> None:
    events = sinusoid_events(400, tasks=20)
    lines = [json.dumps(e) for e in events]
    bad = [
        '{"event_id": "x1", "task_id": "t1", "x": [1, 2], "y": 0.5}',
        "{not json",
        '{"event_id": "x3", "task_id": "t1", "x": [NaN]}',
        '{"task_id": "t1", "x": [0.1]}',
    ]
    for i, b in enumerate(bad):
        lines.insert(50 * (i + 1), b)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out, rej = tmp_path / "pred.jsonl", tmp_path / "rejects.jsonl"
    proc = cli(
        "run",
        "--input",
        str(src),
        "--output",
        str(out),
        "--rejects",
        str(rej),
        "--json",
        "-q",
        "--metrics-port",
        "0",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    assert summary["events"] == 404 and summary["rejected"] == 4
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["event_id"] for p in preds] == [e["event_id"] for e in events]
    assert {"event_id", "task_id", "prediction", "model_version", "latency_s"} <= preds[0].keys()
    # every regression prediction carries its predictive standard deviation
    assert all(p["std"] > 0 for p in preds) and all(p["probabilities"] is None for p in preds)
    reasons = [json.loads(line)["reason"] for line in rej.read_text().splitlines()]
    assert reasons == ["wrong_dimension", "malformed_json", "non_finite", "missing_field"]


def test_run_reads_stdin_when_input_is_dash() -> None:
    data = "\n".join(json.dumps(e) for e in sinusoid_events(50, tasks=3)).encode()
    proc = cli("run", "--input", "-", "--json", "-q", "--metrics-port", "0", stdin=data)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["events"] == 50


def test_metrics_endpoint_serves_engine_counters_when_run_is_live() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_META_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_meta",
            "run",
            "--input",
            "-",
            "--json",
            "-q",
            "--metrics-port",
            str(port),
            "--set",
            "engine.micro_batch=100",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        events = sinusoid_events(300, tasks=10)
        proc.stdin.write(("\n".join(json.dumps(e) for e in events) + "\n").encode())
        proc.stdin.write(b"garbage\n")
        proc.stdin.flush()
        body, deadline = "", time.time() + scaled(180)
        while time.time() < deadline:
            try:
                body = (
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                    .read()
                    .decode()
                )
                if 'stream_meta_events_total{kind="labelled",outcome="predicted"}' in body:
                    count = sum(
                        float(line.split()[-1])
                        for line in body.splitlines()
                        if line.startswith("stream_meta_events_total{") and "predicted" in line
                    )
                    if count >= 300:
                        break
            except OSError:
                pass
            time.sleep(0.3)
        assert "stream_meta_prediction_latency_seconds_bucket" in body
        assert "stream_meta_build_info{" in body
        assert "stream_meta_model_version 1.0" in body
        labelled = sum(1 for e in events if "y" in e)
        assert (
            f'stream_meta_events_total{{kind="labelled",outcome="predicted"}} {float(labelled)}'
        ) in body
        assert "task_id" not in body  # never a task id as a label
    finally:
        proc.stdin.close()
        proc.wait(timeout=scaled(180))
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["rejected"] == 1


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(["--set", "engine.support_size=-3"], {}, "engine.support_size", id="bad-set"),
        pytest.param(
            [], {"STREAM_META_ENGINE__K_NEIGHBOURS": "many"}, "k_neighbours", id="bad-env"
        ),
        pytest.param(["--config", "/nonexistent/config.toml"], {}, "config", id="missing-file"),
        pytest.param(
            ["--checkpoint", "/nonexistent/m.safetensors"], {}, "not found", id="missing-checkpoint"
        ),
    ],
)
def test_bad_configuration_exits_2_with_one_message_when_run(args, env, message) -> None:
    proc = cli("run", "--events", "10", "-q", "--metrics-port", "0", *args, env=env)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert message in err and "Traceback" not in err


def test_bad_toml_exits_2_when_given_as_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[engine]\nsupport_size = = 3\n")
    proc = cli("run", "--config", str(cfg), "--events", "10", "-q")
    assert proc.returncode == 2 and b"TOML" in proc.stderr


def test_evaluate_prints_the_documented_json_when_asked() -> None:
    proc = cli(
        "evaluate",
        "--family",
        "sinusoid",
        "--shots",
        "1",
        "5",
        "--tasks",
        "60",
        "--bank-tasks",
        "60",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["family"] == "sinusoid" and report["metric"] == "mse"
    assert set(report["shots"]) == {"1", "5"}
    assert {"mean", "ci95"} <= report["shots"]["5"].keys()
    assert report["shots"]["5"]["mean"] < report["shots"]["1"]["mean"]
    for key in ("adapt_latency_ms_p50", "adapt_latency_ms_p99", "predictions_per_s"):
        assert report[key] > 0


def test_train_writes_a_loadable_checkpoint_when_run_briefly(tmp_path: Path) -> None:
    out = tmp_path / "tiny.safetensors"
    proc = cli(
        "train",
        "--family",
        "sinusoid",
        "--steps",
        "30",
        "--out",
        str(out),
        "--eval-tasks",
        "20",
        "-q",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    assert summary["train"]["steps"] == 30
    # the variance was calibrated on fresh episodes, and the checkpoint carries it
    cal = summary["calibration"]
    assert cal["points"] > 0 and cal["var_scale"] > 0 and cal["noise_scale"] > 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["metrics"]["calibration"] == cal
    proc = cli(
        "evaluate",
        "--checkpoint",
        str(out),
        "--shots",
        "5",
        "--tasks",
        "20",
        "--bank-tasks",
        "20",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr.decode()


def test_train_digits_and_serve_it_when_run_briefly(tmp_path: Path) -> None:
    out = tmp_path / "digits.safetensors"
    proc = cli(
        "train",
        "--family",
        "digits",
        "--steps",
        "10",
        "--out",
        str(out),
        "--eval-tasks",
        "10",
        "-q",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    proc = cli(
        "run", "--checkpoint", str(out), "--events", "300", "--json", "-q", "--metrics-port", "0"
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    assert summary["family"] == "digits" and 0.0 <= summary["prequential_accuracy"] <= 1.0


def test_meta_update_explains_an_unreachable_endpoint() -> None:
    port = free_port()  # nothing listens there
    proc = cli("meta-update", "--url", f"http://127.0.0.1:{port}", "--wait", "1")
    assert proc.returncode == 2
    assert b"cannot reach" in proc.stderr and b"--url" in proc.stderr
