"""``run --record`` and ``run --input <recording>``: a recorded stream replays exactly."""

from __future__ import annotations

import json
from pathlib import Path

from stream_meta.recording import read_records
from stream_meta.testing.processes import cli

# a quick meta-update so the recording also holds model changes
QUICK_UPDATE = [
    "--set",
    "meta_update.collect_events=1000",
    "--set",
    "meta_update.steps=20",
    "--set",
    "meta_update.promote=always",
]


def _predictions(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        p = json.loads(line)
        p.pop("latency_s")  # wall time: the only thing a replay may change
        out.append(p)
    return out


def test_a_recorded_run_replays_to_the_same_predictions_and_model_changes(
    tmp_path: Path,
) -> None:
    rec = tmp_path / "rec"
    first = cli(
        "run",
        "--scenario",
        "sinusoid-amplitude-shift",
        "--events",
        "23000",
        "--metrics-port",
        "0",
        "--record",
        str(rec),
        "--output",
        str(tmp_path / "a.jsonl"),
        "--json",
        "-q",
        *QUICK_UPDATE,
    )
    assert first.returncode == 0, first.stderr.decode()
    summary = json.loads(first.stdout)
    promoted = [r for r in summary["meta_updates"] if r["outcome"] == "promoted"]
    assert promoted, summary["meta_updates"]
    records = list(read_records(rec))
    assert sum(r["kind"] == "event" for r in records) == 23_000
    changes = [(r["i"], r["version"]) for r in records if r["kind"] == "model"]
    assert changes[0] == (0, 1) and (promoted[0]["event_index"], 2) in changes

    again = cli(
        "run",
        "--input",
        str(rec),
        "--family",
        "sinusoid",
        "--metrics-port",
        "0",
        "--output",
        str(tmp_path / "b.jsonl"),
        "--json",
        "-q",
        *QUICK_UPDATE,
    )
    assert again.returncode == 0, again.stderr.decode()
    replayed = json.loads(again.stdout)
    assert replayed["events"] == 23_000
    assert replayed["prequential_loss"] == summary["prequential_loss"]
    assert [(r["event_index"], r["outcome"], r["version"]) for r in replayed["meta_updates"]] == [
        (r["event_index"], r["outcome"], r["version"]) for r in summary["meta_updates"]
    ]
    assert _predictions(tmp_path / "a.jsonl") == _predictions(tmp_path / "b.jsonl")


def test_a_parquet_recording_replays_like_a_json_lines_one(tmp_path: Path) -> None:
    for fmt in ("jsonl", "parquet"):
        proc = cli(
            "run",
            "--scenario",
            "sinusoid-stationary",
            "--events",
            "3000",
            "--metrics-port",
            "0",
            "--no-meta-update",
            "--record",
            str(tmp_path / fmt),
            "--record-format",
            fmt,
            "--json",
            "-q",
        )
        assert proc.returncode == 0, proc.stderr.decode()
    assert list((tmp_path / "parquet").glob("events-*.parquet"))
    assert list(read_records(tmp_path / "parquet")) == list(read_records(tmp_path / "jsonl"))
    reports = {}
    for fmt in ("jsonl", "parquet"):
        proc = cli(
            "replay",
            str(tmp_path / fmt),
            "--family",
            "sinusoid",
            "--strategy",
            "no-meta-update",
            "--report",
            str(tmp_path / f"r-{fmt}"),
            "--json",
            "-q",
        )
        assert proc.returncode == 0, proc.stderr.decode()
        reports[fmt] = json.loads(proc.stdout)["strategies"]["no-meta-update"]
    assert reports["jsonl"]["predictions_sha256"] == reports["parquet"]["predictions_sha256"]
