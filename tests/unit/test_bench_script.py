"""Smoke tests of ``scripts/bench.py``'s helpers (the measurements themselves are not run)."""

from __future__ import annotations

import pytest

from scripts import bench


def _meta(quick: bool) -> dict:
    machine = {
        "cpu": "Test CPU",
        "cores": 2,
        "cores_usable": 2,
        "ram_bytes": 8 << 30,
        "os": "Linux",
        "python": "3.11",
        "torch": "2",
        "faiss": "1",
        "numpy": "2",
        "loadavg_start": "0.10 / 0.10 / 0.10",
        "loadavg_end": "0.20 / 0.10 / 0.10",
        "thread_env": {},
        "git": "abc123",
    }
    return {
        "command": "python -m scripts.bench",
        "date_utc": "2026-01-01 00:00 UTC",
        "seconds": 1.0,
        "quick": quick,
        "json_path": "docs/benchmarks.json",
        "checkpoint_dir": "stream_meta/checkpoints",
        "machine": machine,
    }


def test_change_says_lower_or_higher_when_comparing_losses() -> None:
    assert bench.change(0.5, 1.0) == "50.0% lower"
    assert bench.change(1.1, 1.0) == "10.0% higher"


def test_check_status_when_passed_failed_context_or_unmeasured() -> None:
    assert bench.Check("t", "1", True, "h").status == "pass"
    assert bench.Check("t", "1", False, "h").status == "**FAIL**"
    assert bench.Check("t", "1", None, "h").status == "context"
    assert bench.Check("t", "not measured: no digits checkpoint", None, "-").status == "n/a"


def test_parse_args_rejects_unknown_section_when_only_is_given() -> None:
    assert bench.parse_args(["--only", "memory,index"]).only == ["memory", "index"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nope"])


def test_render_labels_quick_runs_and_reports_misses_and_errors() -> None:
    ok = bench.Section("latency", "Adaptation latency")
    ok.checks.append(bench.Check("p50 <= 1 ms", "p50 2 ms", False, "`cmd`"))
    broken = bench.Section("memory", "Memory per task", error="MeasurementError: boom")
    text = bench.render(_meta(quick=True), [ok, broken])
    assert "QUICK smoke run" in text
    assert "| p50 <= 1 ms | p50 2 ms | **FAIL** | `cmd` |" in text
    assert "**ERROR**" in text and "boom" in text
    assert "QUICK" not in bench.render(_meta(quick=False), [ok])


def test_need_checkpoint_marks_targets_not_measured_when_checkpoint_is_missing(tmp_path) -> None:
    ctx = bench.Context(quick=True, checkpoint_dir=tmp_path)
    section = bench.Section("digits", "Digits")
    assert not bench.need_checkpoint(ctx, section, "digits", ["beats the baseline"])
    assert section.checks[0].measured == "not measured: no digits checkpoint"
    assert section.checks[0].status == "n/a"


def test_serve_sizes_last_the_target_minute_when_full() -> None:
    # 60 s of consuming even at 12,000 events/s, and 60 s of producing at 2,000 events/s
    assert bench.FULL.serve_events / 12_000 >= bench.SERVE_SUSTAIN_S
    assert bench.FULL.serve_latency_events / bench.SERVE_LATENCY_RATE >= bench.SERVE_SUSTAIN_S


def test_serve_log_times_finds_the_startup_lines_when_logged() -> None:
    from scripts import bench_serve

    log = (
        "2026-11-27 06:10:36,100 INFO stream_meta: serving sinusoid (model version 1) from x\n"
        "2026-11-27 06:10:36,101 INFO stream_meta.service: partitions revoked: none\n"
        "2026-11-27 06:10:39,350 INFO stream_meta.service: partitions assigned: x.events[0]\n"
        "2026-11-27 06:10:45,000 INFO stream_meta.service: partitions assigned: x.events[0]\n"
    )
    marks = bench_serve.log_times(log)
    assert marks["assigned"] - marks["serving"] == pytest.approx(3.25, abs=1e-6)
    assert bench_serve.log_times("no such lines\n") == {}


def test_serve_latency_joins_on_event_id_when_predictions_repeat_or_miss() -> None:
    import json

    from scripts import bench_serve

    def ev(i: int) -> bytes:
        return json.dumps({"event_id": f"e{i}", "task_id": "t", "x": [0.0]}).encode()

    events = [(1000 + i, ev(i)) for i in range(4)]  # sent at 1000, 1001, 1002, 1003 ms
    predictions = [
        (1010, ev(0)),  # 10 ms
        (1021, ev(1)),  # 20 ms
        (1500, ev(1)),  # a repeat (at-least-once): the first copy counts
        (1032, ev(2)),  # 30 ms; e3 has no prediction
        (1040, ev(9)),  # not one of these events
    ]
    stats = bench_serve.latency_ms(events, predictions)
    assert (stats["events"], stats["matched"], stats["missing"]) == (4, 3, 1)
    assert stats["p50_ms"] == pytest.approx(20.0)
    assert stats["max_ms"] == pytest.approx(30.0)
    assert stats["over_50ms"] == 0
    assert stats["event_rate_per_s"] == pytest.approx(1000.0)
