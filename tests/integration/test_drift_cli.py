"""``stream-meta scenarios`` and ``stream-meta run --scenario`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

from stream_meta.testing.processes import cli
from tests.conftest import REQUIRED_SCENARIOS


def test_scenarios_lists_every_required_scenario_with_its_drift_points() -> None:
    proc = cli("scenarios", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows.keys() >= set(REQUIRED_SCENARIOS)
    assert rows["sinusoid-stationary"]["drift_points"] == []
    assert rows["sinusoid-recurring"]["drift_points"] == [20_000, 40_000]
    assert rows["digits-new-transform"]["model_family"] == "digits"
    text = cli("scenarios").stdout.decode()
    assert all(name in text for name in REQUIRED_SCENARIOS)


def test_run_on_a_scenario_reports_drift_points_alarms_and_loss_windows(tmp_path: Path) -> None:
    log = tmp_path / "drift.jsonl"
    proc = cli(
        "run",
        "--scenario",
        "sinusoid-new-family",
        "--events",
        "25000",
        "--json",
        "-q",
        "--metrics-port",
        "0",
        "--drift-log",
        str(log),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    s = json.loads(proc.stdout)
    assert s["scenario"] == "sinusoid-new-family" and s["drift_points"] == [20_000]
    assert s["events"] == 25_000
    first = s["detection"]["drift_points"][0]
    assert first["drift_point"] == 20_000 and 0 <= first["delay"] <= 300
    assert s["detection"]["false_alarms"] == 0
    assert {"event_index", "detector", "statistic", "threshold"} <= s["alarms"][0].keys()
    assert len(s["loss_windows"]) == 25 and s["loss_windows"][0]["start"] == 0
    assert len(log.read_text().splitlines()) == len(s["alarms"])


def test_run_explains_a_bad_scenario_and_can_switch_the_monitor_off() -> None:
    proc = cli("run", "--scenario", "nope", "--events", "10", "--metrics-port", "0")
    assert proc.returncode == 2
    assert "unknown scenario" in proc.stderr.decode()
    proc = cli(
        "run",
        "--scenario",
        "digits-new-transform",
        "--family",
        "sinusoid",
        "--events",
        "10",
        "--metrics-port",
        "0",
    )
    assert proc.returncode == 2 and "digits" in proc.stderr.decode()
    proc = cli("run", "--events", "3000", "--no-drift", "--json", "-q", "--metrics-port", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "alarms" not in json.loads(proc.stdout)
