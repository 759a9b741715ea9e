"""The one batch step every loop uses: process -> drift watch -> meta-updater -> recorder, with
the real engine, updater and recording."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from stream_meta.app import build_drift_watch, build_engine
from stream_meta.config import load_settings
from stream_meta.continual.update_job import UpdateConfig
from stream_meta.continual.updater import MetaUpdateConfig, MetaUpdater
from stream_meta.metrics import EngineMetrics
from stream_meta.pipeline import Pipeline
from stream_meta.recording import EventRecorder, read_records
from stream_meta.tasks.scenarios import get_scenario
from tests.conftest import sinusoid_events


def _engine(model: Any) -> Any:
    settings = load_settings(None, env={})
    return build_engine(model, settings, metrics=EngineMetrics(CollectorRegistry()))


def _promoting_updater(engine: Any) -> MetaUpdater:
    config = MetaUpdateConfig(
        on_drift=False,
        cooldown_events=0,
        collect_events=0,
        promote="always",
        update=UpdateConfig(steps=5, min_val_tasks=1),
    )
    return MetaUpdater(engine, config, metrics=engine.metrics)


def test_a_step_records_the_batch_then_notes_a_promotion_from_the_next_position(
    shipped_sinusoid: Any, tmp_path: Path
) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    updater = _promoting_updater(engine)
    with EventRecorder(tmp_path / "rec") as recorder:
        pipeline = Pipeline(engine, updater=updater, recorder=recorder)
        events = sinusoid_events(3000, tasks=100)
        for lo in range(0, 2000, 500):
            pipeline.step(events[lo : lo + 500])
        updater.request("manual", "test")
        step = pipeline.step(events[2000:2500])  # the inline job runs within this step
        assert step.model_version == 1  # the batch was served by the model before the swap
        [outcome] = step.outcomes
        assert outcome["outcome"] == "promoted" and engine.model_version == 2
        assert pipeline.position == 2500
        after = pipeline.step(events[2500:])
        assert after.model_version == 2 and after.result.outputs.model_version == 2
    records = list(read_records(tmp_path / "rec"))
    positions = [r["i"] for r in records if r["kind"] == "event"]
    assert positions == list(range(3000))  # every event, in order, at its stream position
    [change] = [r for r in records if r["kind"] == "model"]
    assert change == {"kind": "model", "i": 2500, "version": 2, "outcome": "promoted"}


def test_drift_alarms_carry_the_version_that_served_their_batch(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    settings = load_settings(None, env={})
    watch = build_drift_watch(settings, engine, engine.metrics, None)
    pipeline = Pipeline(engine, watch=watch)
    stream = get_scenario("sinusoid-amplitude-shift").stream(seed=0)
    events = [e.event for e in stream.iter_events(26_000)]
    alarms = []
    for lo in range(0, len(events), 512):
        step = pipeline.step(events[lo : lo + 512])
        alarms += step.alarm_records()
    assert alarms, "the amplitude shift at 20,000 raised no alarm"
    assert all(a["type"] == "drift_alarm" and a["model_version"] == 1 for a in alarms)
    assert pipeline.summary()["alarms"]  # the watch's own account agrees


def test_adopt_without_an_updater_swaps_and_idle_is_a_no_op(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    pipeline = Pipeline(engine)
    assert pipeline.idle() == []
    assert pipeline.adopt(model, 7, "published model version 7") == []
    assert engine.model_version == 7
    assert pipeline.summary() == {}


def test_adopt_with_an_updater_puts_the_model_on_probation(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    updater = _promoting_updater(engine)
    pipeline = Pipeline(engine, updater=updater)
    pipeline.step(sinusoid_events(600, tasks=30))
    [rec] = pipeline.adopt(model, 5, "published model version 5")
    assert rec["outcome"] == "promoted" and rec["version"] == 5
    assert engine.model_version == 5 and updater.status()["probation"]
