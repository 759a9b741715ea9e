"""Replay evaluation (issue 5): section ``replay``. ``stream-meta replay --strategy all`` on a
recording of every shipped scenario (``run --record``, to 10,000 events past the last drift
point; ``--quick``: the logs of tests/data/logs): prequential loss of the system against its
ablations and the baselines, the sinusoid 10-shot MSE and adaptation latency against MAML's,
and replay speed of a 100,000-event recording."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from scripts.bench.common import ROOT, Check, Context, Section, cli_json, need_checkpoint, rel

#: the targets of issue 5 (replay evaluation); FULL replays each scenario to 10,000 events past
#: its last drift point
REPLAY_TAIL_EVENTS = 10_000
REPLAY_MAML_MSE_RATIO = 20.0
REPLAY_MAML_LATENCY_RATIO = 100.0
REPLAY_SPEED_EVENTS = 100_000
REPLAY_SPEED_TARGET = 20_000.0
T_BEST = "the full system has the lowest prequential loss of all strategies"

COLUMNS = [
    "prequential loss",
    "cold start",
    "1 shot",
    "5 shots",
    "10 shots",
    "events/s",
    "adapt p50 (ms)",
    "meta-updates",
    "family backward transfer / forgetting",
]


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _record(log: Path, scenario: str, events: int) -> str:
    """``stream-meta run --record`` of ``events`` events of ``scenario``; the command."""
    _r, _s, rec_cmd = cli_json(
        [
            "run",
            "--scenario",
            scenario,
            "--events",
            str(events),
            "--no-meta-update",
            "--record",
            rel(log),
            "--metrics-port",
            "0",
            "--json",
            "-q",
        ]
    )
    return rec_cmd


def measure_replay(ctx: Context, section: Section) -> None:
    """Issue 5: every strategy on every shipped scenario's recording, the MAML ratios, replay
    speed of a 100,000-event recording."""
    from stream_meta.tasks.scenarios import SCENARIOS

    t_mse = f"sinusoid 10-shot MSE <= 1/{REPLAY_MAML_MSE_RATIO:g} of MAML's (same replay)"
    t_lat = f"adaptation latency >= {REPLAY_MAML_LATENCY_RATIO:g}x lower than MAML's 10 steps"
    t_speed = (
        f"replay of a {REPLAY_SPEED_EVENTS:,}-event recording at >= "
        f"{REPLAY_SPEED_TARGET:,.0f} events/s"
    )
    if not need_checkpoint(ctx, section, "sinusoid", [T_BEST, t_mse, t_lat, t_speed]):
        return
    tmp = Path(ROOT / "build" / "bench-replay")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    runs_by_scenario: dict[str, dict[str, Any]] = {}
    for name, scenario in SCENARIOS.items():
        if ctx.quick:
            log, how = ROOT / "tests" / "data" / "logs" / name, "the test log"
        else:
            last = scenario.drift_points[-1] if scenario.drift_points else 20_000
            log = tmp / f"{name}-recording"
            how = f"`{_record(log, name, last + REPLAY_TAIL_EVENTS)}`"
        runs_by_scenario[name] = _replay_all(section, name, scenario.model_family, log, how, tmp)
    _maml_checks(section, runs_by_scenario["sinusoid-stationary"], t_mse, t_lat)
    _speed_check(ctx, section, tmp, t_speed)
    section.notes.append(
        "Strategies (`stream-meta replay --strategy all`, each on the same events, test then "
        "train): `full` (neighbours, drift monitor, meta-updates trained inline), "
        "`no-neighbours`, `no-meta-update`, `global` (no adaptation: the meta-model's prior for "
        "every event), `scratch` (the target network from a random init, 100 Adam steps per "
        "adaptation), `finetune` (a multi-task pre-trained init, 10 SGD steps), `maml` (MAML "
        "meta-trained with torch.func on the meta-model's budget, 10 SGD steps), "
        "`nearest-task` (the system's adaptation of the nearest other task). Losses are mean "
        "squared errors (sinusoid) or cross-entropies (digits); `N shots` are events served "
        "with exactly N examples of their task; the family columns come from probes of every "
        "task family (task-id prefix) at the end of each phase (see "
        "`stream_meta/evaluation/families.py`): negative backward transfer means a family got "
        "worse after its phase, forgetting is the drop from its best."
    )


def _replay_all(
    section: Section, name: str, family: str, log: Path, how: str, tmp: Path
) -> dict[str, Any]:
    """``stream-meta replay --strategy all`` of one recording: its table and judged row; the
    results of every strategy."""
    result, seconds, cmd = cli_json(
        [
            "replay",
            rel(log),
            "--family",
            family,
            "--strategy",
            "all",
            "--report",
            rel(tmp / name),
            "--json",
            "-q",
        ]
    )
    runs = result["strategies"]
    section.raw[name] = {
        "command": cmd,
        "recorded_by": how,
        "seconds": round(seconds, 1),
        "strategies": {
            k: {m: v for m, v in r.items() if m not in ("adapt_latency_ms", "loss_windows")}
            for k, r in runs.items()
        },
    }
    rows = [
        f"**`{name}`** ({result['events']:,} events recorded by {how}; replayed by "
        f"`{cmd}` in {seconds:.0f} s)",
        "",
        "| strategy | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for strategy, r in runs.items():
        by = r["loss_by_shots"]
        fam = r.get("families") or {}
        bwt = fam.get("backward_transfer")
        fam_cell = "-" if bwt is None else f"{bwt:+.4g} / {fam['forgetting']:.4g}"
        cells = [
            _num(r["prequential_loss"]),
            _num(r["cold_start_loss"]),
            _num(by.get("1")),
            _num(by.get("5")),
            _num(by.get("10")),
            f"{r['events_per_s']:,.0f}",
            _num(r["adapt_latency_ms_p50"]),
            str(sum(u["outcome"] == "promoted" for u in r["meta_updates"])) + " promoted",
            fam_cell,
        ]
        rows.append(f"| {strategy} | " + " | ".join(cells) + " |")
    section.tables.append("\n".join(rows))
    full = runs["full"]["prequential_loss"]
    others = {k: r["prequential_loss"] for k, r in runs.items() if k != "full"}
    best = min(others, key=lambda k: others[k])
    # a tie is possible only with an ablation that served the very same predictions (no
    # meta-update happened): the system is then still not beaten
    sha = runs["full"]["predictions_sha256"]
    ties = [k for k, v in others.items() if v == full and runs[k]["predictions_sha256"] == sha]
    tie = f"; equal to {', '.join(ties)} (identical predictions: no update promoted)"
    section.checks.append(
        Check(
            f"{T_BEST} (`{name}`)",
            f"full {full:.4g}; best other: {best} {others[best]:.4g} "
            f"({full / others[best] - 1:+.1%}){tie if ties else ''}",
            full <= others[best],
            f"`{cmd}`: `prequential_loss`",
        )
    )
    return runs


def _maml_checks(section: Section, stationary: dict[str, Any], t_mse: str, t_lat: str) -> None:
    """The sinusoid 10-shot MSE and the adaptation latency against MAML's (same replay)."""
    cmd = section.raw["sinusoid-stationary"]["command"]
    full10 = stationary["full"]["loss_by_shots"]["10"]
    maml10 = stationary["maml"]["loss_by_shots"]["10"]
    section.checks.append(
        Check(
            t_mse,
            f"full {full10:.4g} vs MAML {maml10:.4g}: 1/{maml10 / full10:.0f}",
            full10 * REPLAY_MAML_MSE_RATIO <= maml10,
            f'`{cmd}`: `loss_by_shots["10"]` (events served with exactly 10 examples)',
        )
    )
    lf = stationary["full"]["adapt_latency_ms_p50"]
    lm = stationary["maml"]["adapt_latency_ms_p50"]
    section.checks.append(
        Check(
            t_lat,
            f"p50 full {lf:.3f} ms vs MAML {lm:.3f} ms: {lm / lf:.0f}x lower",
            lm >= REPLAY_MAML_LATENCY_RATIO * lf,
            f"`{cmd}`: `adapt_latency_ms_p50` (one task of the replay at a time, one thread: "
            "5-example support set adapted, one point predicted)",
        )
    )


def _speed_check(ctx: Context, section: Section, tmp: Path, t_speed: str) -> None:
    """Replay speed of a recording of the stationary scenario, at two batch sizes."""
    n = REPLAY_SPEED_EVENTS if not ctx.quick else 20_000
    log = tmp / "speed-recording"
    rec_cmd = _record(log, "sinusoid-stationary", n)
    speeds: dict[str, tuple[float, float, str]] = {}
    for label, extra in (
        ("as served (engine.micro_batch)", []),
        ("--batch-size 4096", ["--batch-size", "4096"]),
    ):
        result, seconds, cmd = cli_json(
            [
                "replay",
                rel(log),
                "--family",
                "sinusoid",
                "--strategy",
                "full",
                "--report",
                rel(tmp / f"speed-{len(speeds)}"),
                *extra,
                "--json",
                "-q",
            ]
        )
        speeds[label] = (result["strategies"]["full"]["events_per_s"], seconds, cmd)
    (v0, s0, c0), (v1, _s1, c1) = speeds.values()
    section.checks.append(
        Check(
            t_speed,
            f"{v0:,.0f} events/s with the served batch size; {v1:,.0f} with 4,096-event batches "
            f"(the command took {s0:.0f} s in all, start-up and report included)",
            max(v0, v1) >= REPLAY_SPEED_TARGET,
            f"`{rec_cmd}`, then `{c0}` and `{c1}`: `events_per_s` (strategy `full`)",
        )
    )
    section.raw["speed"] = {
        k: {"events_per_s": v, "seconds": sec, "command": c} for k, (v, sec, c) in speeds.items()
    }
