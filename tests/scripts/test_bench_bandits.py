"""The pure helpers of the ``bandits`` benchmark section, ``scripts/bench/bandits.py`` (the
measurement itself is not run)."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.bench.bandits import (
    POPULATIONS,
    curve_note,
    family_arg_flags,
    ope_consistent,
    ope_rows,
    population_check,
    regret_checks,
    regret_table,
    write_log,
)

TARGETS = {"ts": "vs ts", "pooled": "vs pooled", "late": "late"}


def _out(meta20: float, ts20: float, pooled20: float, meta200: float, ts200: float) -> dict:
    def e(m: float) -> dict:
        return {"mean": m, "se": 0.1}

    return {
        "strategies": {
            "meta": {"20": e(meta20), "200": e(meta200)},
            "per-task-ts": {"20": e(ts20), "200": e(ts200)},
            "pooled": {"20": e(pooled20), "200": e(100.0)},
        }
    }


def test_regret_targets_pass_at_the_bounds_and_fail_past_them() -> None:
    ok = regret_checks(_out(5.0, 10.0, 20.0 / 3, 20.0, 20.0), TARGETS)
    assert [c.ok for c in ok] == [True, True, True]
    assert "50% below" in ok[0].measured
    bad = regret_checks(_out(5.1, 10.0, 6.0, 20.1, 20.0), TARGETS)
    assert [c.ok for c in bad] == [False, False, False]
    assert "above" in bad[2].measured


def test_a_horizon_not_reached_is_not_measured() -> None:
    out = _out(5.0, 10.0, 20.0, 1.0, 1.0)
    for v in out["strategies"].values():
        v.pop("200")
    late = regret_checks(out, TARGETS)[2]
    assert late.ok is None and late.status == "n/a"


def test_regret_table_has_a_row_per_strategy_and_a_column_per_horizon() -> None:
    table = regret_table(_out(5.0, 10.0, 20.0, 6.0, 12.0)).splitlines()
    assert len(table) == 2 + 3
    assert table[0].count("cumulative regret after") == 2
    assert table[2].startswith("| meta | 5.00 ± 0.10 | 6.00 ± 0.10 |")


def test_ope_is_consistent_only_when_every_estimate_is_near_its_truth() -> None:
    def report(ips: float) -> dict:
        est = {"value": ips, "se": 0.1}
        return {"off_policy": {"t": {"truth": 1.0, "ips": est, "dr": est}}}

    assert ope_consistent(report(1.25))
    assert not ope_consistent(report(1.35))
    assert "0.5 SE off" in ope_rows("uniform", report(1.05))[0]


def test_write_log_writes_logged_decisions(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    assert write_log(path, 3, 2, 1.0, seed=0) == 6
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first["logged"]) == {"action_id", "propensity", "reward"}


def test_curve_note_reads_the_first_decision_the_early_rate_and_the_late_rate() -> None:
    curve = [1.0 + 0.5 * i for i in range(40)]  # 1.0 at the first, then 0.5 per decision
    note = curve_note({"meta": curve})
    assert "meta 1.00 / 0.525 / 0.5000" in note


def test_population_rows_are_context_with_both_ratios() -> None:
    assert family_arg_flags({"archetypes": 16, "spread": 0.6}) == [
        "--family-arg",
        "archetypes=16",
        "--family-arg",
        "spread=0.6",
    ]
    check = population_check("diffuse", {"spread": 0.6}, 1.17, _out(8.0, 10.0, 16.0, 25.0, 20.0))
    assert check.ok is None and check.status == "context"
    assert "'diffuse' (spread=0.6; per-task-ts prior N(0, 1.17^2))" in check.target
    assert "8.00 vs per-task-ts 10.00 (0.80x: 20% below)" in check.measured
    assert "pooled 16.00 (0.50x: 50% below)" in check.measured
    assert "after 200: 25.00 vs per-task-ts 20.00 (1.25x: 25% above)" in check.measured
    assert {"diffuse", "linear"} <= set(POPULATIONS)


def test_every_population_is_a_valid_family() -> None:
    from stream_meta.cli.common import family_for, parse_family_args

    for args, prior in POPULATIONS.values():
        flags = family_arg_flags(args)
        family = family_for("bandit", split="test", args=parse_family_args("bandit", flags[1::2]))
        # per-task-ts's prior matched to the population's taste scale (1.01 ~ 1 at 0.15)
        assert abs(prior - (1 + family.spread**2) ** 0.5) < 0.015
