"""Recordings: what goes in comes back in order, rotation, append-only, a torn tail."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from stream_meta.recording import EventRecorder, is_recording, read_records, recorded_events

RAWS = [
    b'{"event_id": "e0", "task_id": "t", "x": [0.5], "y": 1.0}',
    '{"event_id": "e1", "task_id": "t", "x": [0.25]}',
    {"event_id": "e2", "task_id": "u", "x": [1.0]},
    b"\xff\xfe not utf-8",
    b"",
    b'{"multi":\n"line"}',
]


def test_every_event_comes_back_exactly_and_in_order(tmp_path: Path) -> None:
    with EventRecorder(tmp_path / "rec") as rec:
        rec.model_change(1, index=0, outcome="start")
        rec.events(RAWS[:3], start=0)
        rec.model_change(2, index=3, outcome="promoted")
        rec.events(RAWS[3:], start=3, meta=[{"offset": k} for k in range(3)])
    records = list(read_records(tmp_path / "rec"))
    assert [(r["kind"], r["i"]) for r in records] == [
        ("model", 0),
        ("event", 0),
        ("event", 1),
        ("event", 2),
        ("model", 3),
        ("event", 3),
        ("event", 4),
        ("event", 5),
    ]
    assert [r.get("offset") for r in records[-3:]] == [0, 1, 2]
    raws = [raw for raw, truth in recorded_events(tmp_path / "rec")]
    expected = [
        RAWS[0],
        RAWS[1].encode(),
        json.dumps(RAWS[2], separators=(",", ":")).encode(),
        *RAWS[3:],
    ]
    assert raws == expected
    assert is_recording(tmp_path / "rec") and not is_recording(tmp_path)


def test_files_rotate_and_a_new_recorder_only_appends(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    with EventRecorder(path, max_bytes=200) as rec:
        for k in range(10):
            rec.events([RAWS[0]], start=k)
    first = sorted(path.iterdir())
    assert len(first) >= 4
    before = {p.name: p.read_bytes() for p in first}
    with EventRecorder(path, max_bytes=200, compress=False) as rec:
        rec.events([RAWS[1]], start=10)
    after = sorted(path.iterdir())
    assert {p.name: p.read_bytes() for p in after if p.name in before} == before
    assert after[-1].name == f"events-{len(first) + 1:06d}.jsonl"
    assert [r["i"] for r in read_records(path)] == list(range(11))


def test_a_torn_tail_is_skipped_and_everything_before_it_kept(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    with EventRecorder(path) as rec:
        rec.events([RAWS[0]] * 50, start=0)
        rec.events([RAWS[1]] * 50, start=50)
    [f] = list(path.iterdir())
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 30])  # the writer died mid-file
    got = [r["i"] for r in read_records(path)]
    assert got == list(range(len(got))) and 50 <= len(got) < 100
    with gzip.open(f, "rb") as fh, pytest.raises(EOFError):
        fh.read()  # (the file really is damaged)


def test_reading_what_is_not_a_recording_explains(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no recording"):
        list(read_records(tmp_path))
    with pytest.raises(FileNotFoundError, match="no recording directory"):
        list(read_records(tmp_path / "missing"))
    with pytest.raises(ValueError, match="max_bytes"):
        EventRecorder(tmp_path / "r", max_bytes=0)


def test_a_parquet_recording_holds_the_same_records_and_mixes_with_json_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rec"
    with EventRecorder(path, format="parquet", max_bytes=300) as rec:
        rec.model_change(1, index=0, outcome="start")
        rec.events(RAWS[:3], start=0)
        rec.events(RAWS[3:], start=3, meta=[{"offset": k, "ts": 10 * k} for k in range(3)])
    parquet = [r for r in read_records(path)]
    with EventRecorder(tmp_path / "json") as rec:
        rec.model_change(1, index=0, outcome="start")
        rec.events(RAWS[:3], start=0)
        rec.events(RAWS[3:], start=3, meta=[{"offset": k, "ts": 10 * k} for k in range(3)])
    assert parquet == list(read_records(tmp_path / "json"))
    assert len(list(path.glob("events-*.parquet"))) >= 2  # rotated
    # a JSON-lines recorder appends to the same log after the Parquet files
    with EventRecorder(path) as rec:
        rec.events([RAWS[0]], start=6)
    assert [r["i"] for r in read_records(path)][-2:] == [5, 6]
    assert [raw for raw, _ in recorded_events(path)][3] == RAWS[3]  # bytes kept exactly


def test_an_unclosed_parquet_file_is_skipped_and_closed_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    with EventRecorder(path, format="parquet") as rec:
        rec.events(RAWS[:2], start=0)
    crashed = EventRecorder(path, format="parquet")
    crashed.events(RAWS[2:3], start=2)  # the process dies before close(): no Parquet footer
    assert [r["i"] for r in read_records(path)] == [0, 1]
    crashed.close()
    assert [r["i"] for r in read_records(path)] == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown recording format"):
        EventRecorder(path, format="csv")
