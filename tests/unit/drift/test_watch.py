"""The drift monitor watching a real engine on the shipped scenarios (end to end in-process)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_meta.app import build_engine, run_stream
from stream_meta.config import load_settings
from stream_meta.drift.monitor import DriftConfig, DriftMonitor
from stream_meta.drift.watch import DriftWatch
from stream_meta.metrics import EngineMetrics
from stream_meta.tasks.scenarios import get_scenario


def _watch_run(
    shipped_sinusoid: Any, scenario: str, events: int, tmp_path: Path | None = None
) -> tuple[DriftWatch, dict[str, Any], EngineMetrics]:
    model, _ = shipped_sinusoid
    settings = load_settings(None, env={})
    metrics = EngineMetrics(CollectorRegistry())
    engine = build_engine(model, settings, metrics=metrics)
    watch = DriftWatch(
        engine,
        DriftMonitor(DriftConfig()),
        metrics=metrics,
        log_path=str(tmp_path / "drift.jsonl") if tmp_path else None,
    )
    source = ((e.event, e.truth) for e in get_scenario(scenario).stream(seed=0))
    summary = run_stream(engine, itertools.islice(source, events), watch=watch)
    watch.close()
    return watch, summary, metrics


def test_an_abrupt_new_family_is_detected_soon_after_the_drift_point(
    shipped_sinusoid: Any, tmp_path: Path
) -> None:
    watch, summary, metrics = _watch_run(shipped_sinusoid, "sinusoid-new-family", 24_000, tmp_path)
    alarms = watch.monitor.alarms
    assert alarms, "no alarm after the family changed at event 20,000"
    assert all(a.event_index >= 20_000 for a in alarms)  # nothing before the drift
    assert alarms[0].event_index - 20_000 <= 300  # the detection target
    # every alarm is counted (per-cluster detectors share a label) and logged with evidence
    counted = sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "stream_meta_drift_alarms"
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    assert counted == len(alarms)
    lines = [json.loads(line) for line in (tmp_path / "drift.jsonl").read_text().splitlines()]
    assert [x["detector"] for x in lines] == [a.detector for a in alarms]
    assert all(x["type"] == "drift_alarm" and "evidence" in x for x in lines)
    # loss windows account for every labelled event and its loss
    windows = watch.loss_windows()
    assert len(windows) == 24
    assert sum(w["labelled"] for w in windows) == summary["labelled"]
    total = sum(w["loss"] * w["labelled"] for w in windows if w["labelled"])
    assert total == pytest.approx(summary["prequential_loss"] * summary["labelled"], rel=1e-9)
    before = [w["loss"] for w in windows[5:20]]
    after = [w["loss"] for w in windows[20:]]
    assert min(after) > max(before)  # the shift is real in the engine's own losses


def test_a_stationary_scenario_raises_no_alarm(shipped_sinusoid: Any) -> None:
    watch, _summary, metrics = _watch_run(shipped_sinusoid, "sinusoid-stationary", 40_000)
    assert watch.monitor.alarms == []
    assert (
        metrics.registry.get_sample_value(
            "stream_meta_drift_statistic", {"detector": "loss_page_hinkley"}
        )
        is not None
    )
