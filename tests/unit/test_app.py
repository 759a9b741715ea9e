"""The in-process loop behind ``stream-meta run`` (:func:`stream_meta.app.run_stream`): what it
writes, how it scores queries whose truth the source knows, and how it stops."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_meta.app import QueryScorer, build_engine, run_stream
from stream_meta.config import load_settings
from stream_meta.metrics import EngineMetrics
from stream_meta.sources import JsonlSink
from tests.conftest import sinusoid_events


@pytest.fixture
def engine(shipped_sinusoid: Any) -> Any:
    model, _ = shipped_sinusoid
    settings = load_settings(None, env={})
    return build_engine(model, settings, metrics=EngineMetrics(CollectorRegistry()))


def test_every_event_is_written_once_in_order_when_sinks_are_given(
    engine: Any, tmp_path: Path
) -> None:
    events = sinusoid_events(1200, tasks=40)
    source: list[tuple[Any, Any]] = [(e, None) for e in events]
    source.insert(300, ("{not json", None))
    preds, rejects = JsonlSink(tmp_path / "p.jsonl"), JsonlSink(tmp_path / "r.jsonl")
    summary = run_stream(engine, source, batch_size=100, predictions=preds, rejects=rejects)
    preds.close()
    rejects.close()
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["event_id"] for p in written] == [e["event_id"] for e in events]
    [reject] = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert reject["reason"] == "malformed_json"
    assert summary["events"] == 1201 and summary["rejected"] == 1
    assert summary["events_per_s"] > 0 and summary["engine_events_per_s"] >= summary["events_per_s"]
    assert "batch_latency_ms" not in summary  # no updater: no latency split


def test_queries_are_scored_against_the_truth_the_source_knows(engine: Any) -> None:
    events = sinusoid_events(3000, tasks=30, labelled=0.8)
    truth = {e["event_id"]: 0.0 for e in events if "y" not in e}
    source = [(e, truth.get(e["event_id"])) for e in events]
    summary = run_stream(engine, source, batch_size=256)
    assert summary["queries_scored"] == len(truth) == summary["queries"]
    assert summary["query_loss"] > 0  # predictions of a sinusoid are not all zero


def test_events_and_the_timeout_stop_the_run_deterministically(engine: Any) -> None:
    endless = (
        ({**e, "event_id": f"{k}-{e['event_id']}"}, None)
        for k in range(10**9)
        for e in sinusoid_events(100, 5, seed=k)
    )
    summary = run_stream(engine, endless, events=700, batch_size=64)
    assert summary["events"] == 700
    stopped = run_stream(engine, endless, timeout_s=0.0, batch_size=64)
    assert stopped["events"] == 700 + 64  # one batch, then the deadline is checked


def test_query_scorer_reports_accuracy_for_classification() -> None:
    scorer = QueryScorer("classification")
    scorer.add([1, 2, 3], [1, 0, 3])
    assert scorer.summary() == {"query_accuracy": 2 / 3, "queries_scored": 3}
    regression = QueryScorer("regression")
    assert regression.summary() == {}
    regression.add([0.5, 1.5], [0.0, 1.0])
    assert math.isclose(regression.summary()["query_loss"], 0.25)


def test_decision_records_go_to_the_output_when_a_decider_runs(engine: Any, tmp_path: Path) -> None:
    from stream_meta.app import build_decider

    settings = load_settings(None, env={})
    events: list[Any] = [(e, 0.0 if "y" not in e else None) for e in sinusoid_events(300, 10)]
    actions = [{"action_id": f"a{k}", "x": [k - 2.0]} for k in range(5)]
    events.insert(50, ({"event_id": "d1", "task_id": "t1", "actions": actions}, None))
    events.insert(250, ({"event_id": "r1", "decision_id": "d1", "reward": 0.5}, None))
    events.insert(260, ({"event_id": "r2", "decision_id": "d7", "reward": 0.5}, None))
    preds, rejects = JsonlSink(tmp_path / "p.jsonl"), JsonlSink(tmp_path / "r.jsonl")

    summary = run_stream(
        engine,
        events,
        batch_size=64,
        predictions=preds,
        rejects=rejects,
        decider=build_decider(settings, engine),
    )
    preds.close()
    rejects.close()

    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    [record] = [w for w in written if "decision_id" in w]
    assert record["task_id"] == "t1" and record["action_id"].startswith("a")
    assert len(written) == 302 and "r1" in {w.get("event_id") for w in written}
    [reject] = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (reject["event_id"], reject["reason"]) == ("r2", "unknown_decision")
    assert summary["decisions"]["rewards"] == {
        "learned": 1,
        "duplicate": 0,
        "late": 0,
        "unknown": 1,
    }
    assert summary["queries_scored"] == summary["queries"]  # truths stay aligned
