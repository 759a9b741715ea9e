"""Smoke tests of the pure helpers of the benchmarks, ``scripts/bench/`` (the measurements
themselves are not run)."""

from __future__ import annotations

import json

import pytest

from scripts.bench import report, runner, scale_stats, serve, serve_runs
from scripts.bench.common import Check, Context, MeasurementError, Section, change, need_checkpoint
from scripts.bench.sizes import FULL


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
    assert change(0.5, 1.0) == "50.0% lower"
    assert change(1.1, 1.0) == "10.0% higher"


def test_check_status_when_passed_failed_context_or_unmeasured() -> None:
    assert Check("t", "1", True, "h").status == "pass"
    assert Check("t", "1", False, "h").status == "**FAIL**"
    assert Check("t", "1", None, "h").status == "context"
    assert Check("t", "not measured: no digits checkpoint", None, "-").status == "n/a"


def test_parse_args_rejects_unknown_section_when_only_is_given() -> None:
    assert runner.parse_args(["--only", "memory,index"]).only == ["memory", "index"]
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "nope"])


def test_render_labels_quick_runs_and_reports_misses_and_errors() -> None:
    ok = Section("latency", "Adaptation latency")
    ok.checks.append(Check("p50 <= 1 ms", "p50 2 ms", False, "`cmd`"))
    broken = Section("memory", "Memory per task", error="MeasurementError: boom")
    text = report.render(_meta(quick=True), [ok, broken])
    assert "QUICK smoke run" in text
    assert "| p50 <= 1 ms | p50 2 ms | **FAIL** | `cmd` |" in text
    assert "**ERROR**" in text and "boom" in text
    assert "QUICK" not in report.render(_meta(quick=False), [ok])


def test_need_checkpoint_marks_targets_not_measured_when_checkpoint_is_missing(tmp_path) -> None:
    ctx = Context(quick=True, checkpoint_dir=tmp_path)
    section = Section("digits", "Digits")
    assert not need_checkpoint(ctx, section, "digits", ["beats the baseline"])
    assert section.checks[0].measured == "not measured: no digits checkpoint"
    assert section.checks[0].status == "n/a"


def test_serve_sizes_last_the_target_minute_when_full() -> None:
    # 60 s of consuming even at 12,000 events/s, and 60 s of producing at 2,000 events/s
    assert FULL.serve_events / 12_000 >= serve.SERVE_SUSTAIN_S
    assert FULL.serve_latency_events / serve.SERVE_LATENCY_RATE >= serve.SERVE_SUSTAIN_S


def test_serve_log_times_finds_the_startup_lines_when_logged() -> None:
    log = (
        "2026-11-27 06:10:36,100 INFO stream_meta: serving sinusoid (model version 1) from x\n"
        "2026-11-27 06:10:36,101 INFO stream_meta.kafka.service: partitions revoked: none\n"
        "2026-11-27 06:10:39,350 INFO stream_meta.kafka.service: partitions assigned: x.events[0]\n"
        "2026-11-27 06:10:45,000 INFO stream_meta.kafka.service: partitions assigned: x.events[0]\n"
    )
    marks = serve_runs.log_times(log)
    assert marks["assigned"] - marks["serving"] == pytest.approx(3.25, abs=1e-6)
    assert serve_runs.log_times("no such lines\n") == {}


def test_serve_latency_joins_on_event_id_when_predictions_repeat_or_miss() -> None:
    import json

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
    stats = serve_runs.latency_ms(events, predictions)
    assert (stats["events"], stats["matched"], stats["missing"]) == (4, 3, 1)
    assert stats["p50_ms"] == pytest.approx(20.0)
    assert stats["max_ms"] == pytest.approx(30.0)
    assert stats["over_50ms"] == 0
    assert stats["event_rate_per_s"] == pytest.approx(1000.0)


def test_scale_windows_report_latency_and_backlog_per_window_when_outputs_lag() -> None:
    events = [(0, "a"), (500, "b"), (1000, "c"), (1500, "d")]
    # b's first prediction counts (a second copy is later); d is never predicted
    preds = [(10, "a"), (900, "b"), (2500, "b"), (1100, "c")]
    rows = scale_stats.windows(events, preds, width_s=1.0)
    assert [r["from_s"] for r in rows] == [0.0, 1.0]
    assert rows[0]["events"] == 2 and rows[0]["max_ms"] == 400.0  # b: 900 - 500
    assert rows[0]["backlog_at_end"] == 0  # a, b produced and predicted before 1,000 ms
    assert rows[1]["events"] == 1  # c (d has no prediction)
    assert rows[1]["backlog_at_end"] == 1  # d


def test_scale_rss_growth_compares_medians_after_warm_up_and_at_the_end() -> None:
    samples = [(float(t), 100 + (50 if t < 10 else 0) + (10 if t >= 90 else 0)) for t in range(100)]
    r = scale_stats.rss_growth(samples, warm_s=20.0, width_s=10.0)
    assert r["after_warm_up_bytes"] == 100 and r["end_bytes"] == 110
    assert r["growth"] == pytest.approx(0.10)
    assert r["max_bytes"] == 150  # the warm-up peak is reported, not judged
    with pytest.raises(MeasurementError, match="too few"):
        scale_stats.rss_growth(samples[:5], warm_s=20.0)


def test_scale_changelog_check_finds_lost_and_repeated_examples_when_compared() -> None:
    from types import SimpleNamespace

    labels = {"a": [1.0, 2.0, 3.0, 4.0], "b": [5.0], "c": [6.0]}
    newest = {
        "a": SimpleNamespace(seen=4, ys=[4.0, 2.0, 3.0]),  # a ring buffer of 3: rotated
        "b": SimpleNamespace(seen=2, ys=[5.0, 5.0]),  # learned twice
    }
    r = scale_stats.changelog_check(labels, newest)
    assert r["tasks_missing"] == 1  # c
    assert r["seen_mismatch"] == 1 and r["seen_mismatch_examples"] == [("b", 2, 1)]
    assert r["support_set_mismatch"] == 1  # b's set is not its newest labels
    newest["a"] = SimpleNamespace(seen=4, ys=[1.0, 2.0, 3.0])  # lost the newest example
    assert scale_stats.changelog_check(labels, newest)["support_set_mismatch"] == 2


def test_scale_cores_between_uses_the_samples_inside_the_span() -> None:
    trace = [
        (0.0, [0.0, 0.0], 0.0),
        (1.0, [0.5, 1.0], 0.2),
        (3.0, [1.5, 3.0], 0.6),
        (4.0, [9.0, 9.0], 9.0),
    ]
    r = scale_stats.cores_between(trace, 0.5, 3.5)
    assert r["replicas"] == [0.5, 1.0] and r["broker"] == 0.2 and r["seconds"] == 2.0
    assert scale_stats.cores_between(trace, 3.5, 3.9)["replicas"] is None  # no two samples inside


def test_scale_steady_window_counts_only_while_every_replica_serves() -> None:
    # replica A (partition 0) serves 0..4,000 ms; replica B (partition 1) 2,000..6,000 ms
    rows = [(t, f"a{t}") for t in range(0, 4001, 500)] + [
        (t, f"b{t}") for t in range(2000, 6001, 500)
    ]
    parts = [0] * 9 + [1] * 9
    r = scale_stats.steady_window(rows, parts, [[0], [1]])
    assert (r["from_ms"], r["to_ms"]) == (2000, 4000)
    assert r["events"] == 10 and r["events_per_s"] == 5.0  # 5 of each in 2 s
    one = scale_stats.steady_window(rows[:9], parts[:9], [[0]])
    assert one["span_s"] == 4.0 and one["events"] == 9


def test_scale_cores_in_reads_cpu_samples_of_a_window() -> None:
    cpu = [(0.0, [0.0, 0.0], 0.0), (10.0, [5.0, 2.5], 10.0), (20.0, [10.0, 5.0], 30.0)]
    assert scale_stats.cores_in(cpu, 0.0, 10.0) == "0.50, 0.25 / 1.00"
    assert scale_stats.cores_in(cpu, 10.0, 20.0) == "0.50, 0.25 / 2.00"
    assert scale_stats.cores_in(cpu, 30.0, 40.0) == "?"


def test_keep_carries_the_sections_this_run_did_not_measure(tmp_path) -> None:
    """``--only X --keep``: the other sections of the existing report stay, marked with the run
    that measured them, and stay marked the same way when kept again."""
    meta = {**_meta(quick=False), "date_utc": "2026-11-27 14:17 UTC"}
    meta["machine"] = {**meta["machine"], "git": "old"}
    out, js = tmp_path / "B.md", tmp_path / "b.json"
    first = [
        Section("sinusoid", "Sinusoid few-shot regression", [Check("mse", "0.1", True, "x")]),
        Section("digits", "Digits 5-way classification", [Check("acc", "0.9", True, "y")]),
    ]
    report.write(meta, first, out, js)
    meta2 = {**meta, "date_utc": "2026-12-07 01:00 UTC"}
    meta2["machine"] = {**meta["machine"], "git": "new"}
    new = [Section("digits", "Digits 5-way classification", [Check("acc", "0.8", False, "y")])]
    for _ in range(2):
        report.write(meta2, new, out, js, keep=True)
        text = out.read_text()
        assert "| Sinusoid few-shot regression | mse | 0.1 | pass |" in text
        assert "| Digits 5-way classification | acc | 0.8 | **FAIL** |" in text
        assert "0.9" not in text
        assert text.count("*Kept from the run of 2026-11-27 14:17 UTC (source old)") == 1
    assert set(json.loads(js.read_text())["sections"]) == {"sinusoid", "digits"}
    report.write(meta2, new, out, js)  # without --keep: the other sections are dropped
    assert "Sinusoid" not in out.read_text().split("## Summary")[1].split("Not run")[0]


def _retrieval_report(related: bool, retrieval: list[float]) -> dict:
    from stream_meta.evaluation.retrieval import fractions

    loss = {
        "no-retrieval": [2.0, 1.0, 0.1],
        "attention": [2.0, 0.9, 0.1],
        "retrieval": retrieval,
        "oracle-neighbour": [0.5, 0.5, 0.5] if related else [5.0, 5.0, 5.0],
        "bayes-mixture": [1.9, 0.6, 0.02] if related else [2.0, 1.0, 0.1],
    }
    gains = fractions(loss)
    return {
        "stream": {
            "related": related,
            "clusters": 20,
            "jitter": 0.02,
            "history_tasks": 1000,
            "history_examples": 20,
            "probe_tasks": 200,
            "queries": 10,
            "seed": 0,
        },
        "shots": [0, 1, 2],
        "loss": loss,
        "ci95": {k: [0.01] * 3 for k in loss},
        "attainable": gains["attainable"],
        "fraction": gains["fraction"],
        "mixture": {"variance": [1.0, 0.01, 0.001], "null_prior": [0.5, 0.1, 0.9]},
    }


def test_retrieval_targets_are_judged_from_the_numbers_when_measured() -> None:
    from scripts.bench import retrieval

    assert "retrieval" in runner.parse_args(["--only", "retrieval"]).only
    section = Section("retrieval", "Retrieval")
    targets = [f"t{i}" for i in range(7)]
    reports = {
        # 1 shot: 25% lower, half of an attainable 0.5 (the oracle's); 2 shots: 50% lower,
        # 0.05 of an attainable 0.08 (the mixture's)
        "related": _retrieval_report(True, [2.0, 0.75, 0.05]),
        # 2 shots 2% worse than no retrieval
        "control": _retrieval_report(False, [2.0, 1.0, 0.102]),
    }
    retrieval._quality_checks(section, targets, reports)
    judged = {c.target: c.ok for c in section.checks if c.ok is not None}
    assert judged == {"t0": False, "t1": True, "t2": False, "t3": True, "t4": False}
    assert "50.0% of 0.5" in section.checks[2].measured
    assert "2: 1.020x" in section.checks[4].measured
    speed = {
        "retrieval=False": {
            "events_per_s": 1000.0,
            "adapt_latency_ms_p50": 1.0,
            "adapt_latency_ms_p99": 2.0,
            "window_seconds": [1.0, 1.0, 9.0],
        },
        "default": {
            "events_per_s": 950.0,
            "adapt_latency_ms_p50": 1.3,
            "adapt_latency_ms_p99": 2.5,
            "window_seconds": [1.05, 1.0, 1.0],
        },
        "live_tasks": {"retrieval=False": 10_000, "default": 10_000},
        "torch_threads": 2,
        "timed_events": 60_000,
    }
    retrieval._speed_checks(section, targets[5:], speed)
    # 1.30x latency; events/s window by window 0.95x, 1x, 9x: the median, 1.00x, is judged
    assert [c.ok for c in section.checks[-2:]] == [False, True]
    assert section.checks[-1].measured.startswith("1.00x (median of 3 windows")
    table = retrieval._table("related", reports["related"])
    assert "| fraction realised: retrieval | 0.0% | 50.0% | 62.5% |" in table
    # nothing attainable on the control: no fraction
    control = retrieval._table("control", reports["control"])
    assert "| fraction realised: retrieval | - | - | - |" in control
