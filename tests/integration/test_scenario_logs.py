"""Regression floor: every shipped scenario, recorded under tests/data/logs, replays as well as
when it was recorded (``scripts/make_test_logs.py`` wrote the logs and ``expected.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stream_meta.config import load_settings
from stream_meta.evaluation.replay import ReplayConfig, replay_strategy
from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint
from stream_meta.recording import read_records, recorded_events
from stream_meta.tasks.scenarios import SCENARIOS

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"
MANIFEST = json.loads((LOGS / "manifest.json").read_text())
EXPECTED = json.loads((LOGS / "expected.json").read_text())


def _replay(name: str, strategy: str, out: Path) -> dict[str, Any]:
    family = SCENARIOS[name].model_family
    model, _ = load_checkpoint(shipped_checkpoint(family))
    settings = load_settings(None, env={}, overrides={"metrics": {"port": 0}})
    raws = [raw for raw, _ in recorded_events(LOGS / name)]
    config = ReplayConfig(batch_size=settings.engine.micro_batch)
    return replay_strategy(strategy, raws, model, settings, config, out, family=family)


def test_every_shipped_scenario_has_a_log() -> None:
    assert set(MANIFEST) == set(SCENARIOS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_a_scenario_log_replays_at_its_recorded_quality(name: str, tmp_path: Path) -> None:
    records = list(read_records(LOGS / name))
    assert len(records) == MANIFEST[name]["events"]
    ours = _replay(name, "no-meta-update", tmp_path / "a.jsonl")
    prior = _replay(name, "global", tmp_path / "b.jsonl")
    assert ours["events"] == MANIFEST[name]["events"]
    assert ours["rejected"] == MANIFEST[name]["malformed"] == 3  # rejected, never a crash
    assert ours["labelled"] == prior["labelled"] > 1000
    # within 10% of the loss measured when the log was recorded (a regression gate)
    assert ours["prequential_loss"] <= 1.10 * EXPECTED[name]["no-meta-update"], ours
    # and adapting is worth it on every scenario
    assert ours["prequential_loss"] < 0.6 * prior["prequential_loss"]
