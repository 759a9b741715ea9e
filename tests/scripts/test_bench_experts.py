"""The pure helpers of the ``experts`` benchmark section, ``scripts/bench/experts.py`` (the
measurement itself is not run)."""

from __future__ import annotations

import json

from scripts.bench.experts import (
    Predictions,
    added_before,
    experts_served,
    first_promotion,
    return_delay,
    same_events,
    saved_model,
    update_counts,
)


def _line(i: int, task: str, shots: int, loss: float | None, expert: int | None, v: int = 1) -> str:
    return json.dumps(
        {
            "event_id": f"e{i}",
            "task_id": task,
            "shots": shots,
            "loss": loss,
            "expert": expert,
            "model_version": v,
        }
    )


def test_return_delay_is_zero_when_every_window_is_served_by_the_old_expert() -> None:
    rows = [(40_000 + i, 1) for i in range(1000)]
    delay, shares = return_delay(rows, 40_000, window=250)
    assert delay == 0
    assert shares == [1.0, 1.0, 1.0, 1.0]


def test_return_delay_starts_at_the_window_from_which_every_later_one_reaches_the_share() -> None:
    # windows of 4 events: 25%, 75%, 25% (a relapse), 50%, 100%
    windows = [[1, 2, 2, 2], [1, 1, 1, 2], [2, 2, 2, 1], [1, 1, 2, 2], [1, 1, 1, 1]]
    rows = [(100 + 2 * i, e) for i, e in enumerate(e for w in windows for e in w)]
    delay, shares = return_delay(rows, 100, window=4, share=0.5)
    assert shares == [0.25, 0.75, 0.25, 0.5, 1.0]
    assert delay == rows[12][0] - 100  # the 4th window's first event, not the 2nd's


def test_return_delay_is_none_when_the_last_window_is_below_the_share() -> None:
    rows = [(i, 1) for i in range(8)] + [(8 + i, 3) for i in range(4)]
    delay, shares = return_delay(rows, 0, window=4)
    assert delay is None
    assert shares == [1.0, 1.0, 0.0]


def test_return_delay_leaves_out_an_incomplete_last_window() -> None:
    rows = [(i, 1) for i in range(8)] + [(8, 2)]
    delay, shares = return_delay(rows, 0, window=4)
    assert delay == 0
    assert len(shares) == 2
    assert return_delay([], 0) == (None, [])


def test_predictions_are_sorted_by_position_and_a_single_model_is_named_by_its_version() -> None:
    lines = [
        _line(2, "new:t1", 3, 0.5, 4),
        _line(0, "base:t0", 0, None, None),
        "",
        json.dumps({"event_id": "x9", "task_id": "base:t0", "shots": 1, "loss": 1.0}),
        _line(1, "base:t0", 1, 2.0, None, v=3),
    ]
    p = Predictions.from_lines(lines)
    assert p.pos == [0, 1, 2]
    assert p.expert == [1, 3, 4]
    assert p.loss == [None, 2.0, 0.5]
    assert p.window_loss(0, 3) == 1.25  # the unlabelled event is not scored
    assert p.window_loss(0, 3, (3, None)) == 0.5
    assert p.window_loss(0, 3, (0, 0)) != p.window_loss(0, 3, (0, 0))  # nan: none scored
    assert p.experts_from(1, "base:") == [(1, 3)]


def _rec(index: int, outcome: str, version: int, experts: dict | None = None) -> dict:
    rec = {"event_index": index, "outcome": outcome, "version": version}
    if experts is not None:
        rec["experts"] = experts
    return rec


def test_update_counts_split_promotions_by_what_they_did_to_the_set() -> None:
    records = [
        _rec(25_600, "promoted", 2, {"action": "add", "expert": 2, "members": [1, 2]}),
        _rec(35_840, "promoted", 3, {"action": "replace", "expert": 3, "members": [1, 3]}),
        _rec(46_080, "rejected", 3),
        _rec(50_000, "promoted", 4),
        _rec(51_000, "rolled_back", 3),
    ]
    counts = update_counts(records)
    assert (counts["add"], counts["replace"], counts["overwrite"]) == (1, 1, 1)
    assert (counts["rejected"], counts["rolled_back"], counts["failed"]) == (1, 1, 0)
    assert first_promotion(records)["event_index"] == 25_600
    assert first_promotion(records[2:3]) is None


def test_experts_served_follow_the_served_version_after_a_rollback() -> None:
    records = [
        _rec(25_600, "promoted", 2, {"action": "add", "expert": 2, "members": [1, 2]}),
        _rec(35_840, "promoted", 3, {"action": "add", "expert": 3, "members": [1, 2, 3]}),
        _rec(36_000, "rolled_back", 2),
    ]
    assert experts_served(records, 2) == [1, 2]
    assert experts_served(records, 3) == [1, 2, 3]
    assert experts_served([], 1) == [1]
    assert added_before(records, 30_000)
    assert not added_before(records, 25_600)
    assert not added_before([_rec(1, "promoted", 2)], 40_000)  # an overwrite adds none


def test_saved_model_takes_the_served_version_else_the_highest_saved(tmp_path) -> None:
    assert saved_model(tmp_path, 3) is None
    for v in (2, 3, 10):
        (tmp_path / f"model-v{v}.safetensors").write_bytes(b"")
    assert saved_model(tmp_path, 3).name == "model-v3.safetensors"
    assert saved_model(tmp_path, 7).name == "model-v10.safetensors"


def test_same_events_compares_tasks_and_shots_before_a_position_only() -> None:
    a = Predictions.from_lines([_line(0, "base:t0", 0, None, 1), _line(1, "new:t1", 1, 0.5, 1)])
    b = Predictions.from_lines([_line(0, "base:t0", 0, None, 2), _line(1, "base:t2", 1, 0.7, 1)])
    assert same_events(a, b, 1)  # losses and experts may differ
    assert not same_events(a, b, 2)
