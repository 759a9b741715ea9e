"""Meta-updates (issue 4): section ``meta_update``. The drift scenarios with meta-updates
(``stream-meta run --scenario``): the prequential loss after the promoted update against the
pre-drift level, beside no update and blind periodic retraining on the same events; the old
family's held-out loss before and after; batch latency while a background update trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from scripts.bench.common import (
    ROOT,
    Check,
    Context,
    Section,
    cli_json,
    evaluate_cli,
    need_checkpoint,
    rel,
    run_cli,
    scenario_run,
)

META_RECOVERY_FACTOR = 1.5  # post-update loss within this x the pre-drift level...
META_RECOVERY_EVENTS = 5000  # ...over this many events after the promotion
META_FORGETTING = 0.10  # old family's held-out loss may rise by at most this fraction
META_LATENCY_FACTOR = 2.0  # p99 batch latency during an update <= this x outside one
META_PERIODIC = 10_000  # blind periodic retraining: an update every this many events
META_SCENARIOS = ("sinusoid-amplitude-shift", "sinusoid-new-family")
META_STRATEGIES = {
    "none": ["--no-meta-update"],
    "drift": [],
    "periodic": [
        "--set",
        "meta_update.on_drift=false",
        "--set",
        f"meta_update.every_events={META_PERIODIC}",
        "--set",
        "meta_update.promote=always",
        "--set",
        "meta_update.probation_events=0",
        "--set",
        "meta_update.cooldown_events=0",
        "--set",
        "meta_update.collect_events=0",
        "--set",
        "meta_update.budget=1000",
    ],
}
#: the shots of the old family's held-out loss
FORGETTING_SHOTS = [1, 5, 10, 20]

#: per strategy: (``run`` summary, command, scored predictions, ``--models-dir``)
Runs = dict[str, tuple[dict[str, Any], str, list[tuple[int, int, float]], Path]]


def _window_loss(rows: list[tuple[int, int, float]], lo: int, hi: int, min_shots: int = 0) -> float:
    """Mean prequential loss of the labelled events at stream positions ``[lo, hi)``."""
    vals = [loss for i, shots, loss in rows if lo <= i < hi and shots >= min_shots]
    return sum(vals) / len(vals) if vals else float("nan")


def _scored(path: Path) -> list[tuple[int, int, float]]:
    """``(stream position, support size, loss)`` of every labelled prediction a run wrote."""
    out = []
    with path.open() as fh:
        for line in fh:
            p = json.loads(line)
            if p.get("loss") is not None:
                out.append((int(p["event_id"][1:]), int(p["shots"]), float(p["loss"])))
    return out


def _latencies(path: Path) -> dict[int, float]:
    """Stream position -> prediction latency (ms) of every prediction a run wrote."""
    out = {}
    with path.open() as fh:
        for line in fh:
            p = json.loads(line)
            out[int(p["event_id"][1:])] = float(p["latency_s"]) * 1e3
    return out


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def get_drift_point(name: str) -> int:
    from stream_meta.tasks.scenarios import get_scenario

    return get_scenario(name).drift_points[0]


def measure_meta_update(ctx: Context, section: Section) -> None:
    t_rec = (
        f"post-drift loss within {META_RECOVERY_FACTOR:g}x the pre-drift level within "
        f"{META_RECOVERY_EVENTS:,} events of the promoted update"
    )
    t_forget = f"old family's held-out loss rises by <= {META_FORGETTING:.0%} after the update"
    t_lat = f"p99 latency during a meta-update <= {META_LATENCY_FACTOR:g}x outside one"
    if not need_checkpoint(ctx, section, "sinusoid", [t_rec, t_forget, t_lat]):
        return
    rows = [
        "| scenario | strategy | updates (promoted / rejected / rolled back / failed) | "
        f"pre-drift loss (10,000 events; >= 1 example) | loss over {META_RECOVERY_EVENTS:,} "
        "events after the promotion | same, events with >= 1 example | loss from the drift to "
        "the end |",
        "|---|---|---|---|---|---|---|",
    ]
    tmp = Path(ROOT / "build" / "bench-meta")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in META_SCENARIOS:
        results = _strategy_runs(ctx, section, name, tmp)
        drift = get_drift_point(name)
        promoted = [
            r for r in results["drift"][0].get("meta_updates", []) if r["outcome"] == "promoted"
        ]
        swap = promoted[0]["event_index"] if promoted else None
        rows += _scenario_rows(name, results, drift, swap, ctx.sizes.meta_events)
        d_cmd = results["drift"][1]
        if swap is None:
            section.checks.append(
                Check(
                    f"{t_rec} (`{name}`)",
                    "no update was promoted",
                    False,
                    f"`{d_cmd}`: `meta_updates`",
                )
            )
            continue
        pre = _window_loss(results["none"][2], drift - 10_000, drift)
        post = _window_loss(results["drift"][2], swap, swap + META_RECOVERY_EVENTS)
        none_post = _window_loss(results["none"][2], swap, swap + META_RECOVERY_EVENTS)
        section.checks.append(
            Check(
                f"{t_rec} (`{name}`)",
                f"{post:.3f} = {post / pre:.2f}x the pre-drift {pre:.3f} (update promoted at event "
                f"{swap:,}, trigger at {promoted[0]['trigger_index']:,}); without an update "
                f"{none_post:.3f} ({post / none_post - 1:+.1%} with it)",
                post <= META_RECOVERY_FACTOR * pre,
                f"`{d_cmd}` and `{results['none'][1]}`: losses of `--output` by stream position",
            )
        )
        _forgetting_checks(ctx, section, name, results, t_forget)
    section.tables.append("\n".join(rows))
    _latency_check(ctx, section, tmp, t_lat)
    section.notes.append(
        "Strategies on the same events (`stream-meta run --scenario`, default settings, "
        "updates trained inline: the stream waits, so every strategy sees the same events at "
        f"the same model versions): **none** (`--no-meta-update`), **drift** (the default: an "
        "alarm requests an update, which collects 5,000 events, trains 400 steps on the replay "
        "buffer and is promoted only through the validation gate; a promoted one is followed "
        "up 10,000 events later until a candidate is not promoted), **periodic** (blind "
        f"retraining every {META_PERIODIC:,} events, promoted without the gate or probation). "
        "Post-update losses are over the events after the *drift* strategy's first promotion, "
        "for every strategy. The old family's held-out loss is `stream-meta evaluate` (1,000 "
        "fresh sinusoid tasks, shots 1/5/10/20) of the shipped model and of the promoted one."
    )


def _strategy_runs(ctx: Context, section: Section, name: str, tmp: Path) -> Runs:
    """Every strategy on the scenario ``name``, its predictions written to ``tmp``."""
    results: Runs = {}
    for strategy, extra in META_STRATEGIES.items():
        result, cmd, out, models = scenario_run(ctx, name, strategy, tmp, *extra)
        results[strategy] = (result, cmd, _scored(out), models)
        section.raw[f"{name}/{strategy}"] = {
            "command": cmd,
            "meta_updates": result.get("meta_updates", []),
            "loss_windows": result["loss_windows"],
        }
    return results


def _scenario_rows(
    name: str, results: Runs, drift: int, swap: int | None, events: int
) -> list[str]:
    """The table's rows of one scenario, a row per strategy."""
    pre = _window_loss(results["none"][2], drift - 10_000, drift)
    pre1 = _window_loss(results["none"][2], drift - 10_000, drift, min_shots=1)
    rows = []
    for strategy, (result, _cmd, scored, _m) in results.items():
        recs = result.get("meta_updates", [])
        outcomes = ("promoted", "rejected", "rolled_back", "failed")
        counts = " / ".join(str(sum(r["outcome"] == o for r in recs)) for o in outcomes)
        post = post1 = float("nan")
        if swap is not None:
            post = _window_loss(scored, swap, swap + META_RECOVERY_EVENTS)
            post1 = _window_loss(scored, swap, swap + META_RECOVERY_EVENTS, min_shots=1)
        tail = _window_loss(scored, drift, events)
        shown = counts if recs or strategy != "none" else "-"
        rows.append(
            f"| `{name}` | {strategy} | {shown} | {pre:.3f}; {pre1:.3f} | "
            f"{post:.3f} | {post1:.3f} | {tail:.3f} |"
        )
    return rows


def _forgetting_checks(
    ctx: Context, section: Section, name: str, results: Runs, t_forget: str
) -> None:
    """The old family's held-out loss of the shipped model against the last saved model of the
    drift strategy (judged) and of blind periodic retraining (context)."""
    shots = FORGETTING_SHOTS
    tasks = ctx.sizes.eval_tasks
    before, cmd_b = evaluate_cli(ctx, "sinusoid", shots, tasks)
    mb = sum(before["shots"][str(k)]["mean"] for k in shots) / len(shots)
    for strategy in ("drift", "periodic"):
        saved = sorted(
            results[strategy][3].glob("model-v*.safetensors"),
            key=lambda p: int(p.stem.split("-v")[1]),
        )
        if not saved:
            continue
        after, _seconds, cmd_a = cli_json(
            [
                "evaluate",
                "--family",
                "sinusoid",
                "--checkpoint",
                rel(saved[-1]),
                "--shots",
                *map(str, shots),
                "--tasks",
                str(tasks),
                "--json",
                "-q",
            ]
        )
        ma = sum(after["shots"][str(k)]["mean"] for k in shots) / len(shots)
        per = ", ".join(
            f"{k}: {before['shots'][str(k)]['mean']:.4f} -> {after['shots'][str(k)]['mean']:.4f}"
            for k in shots
        )
        label = (
            f"{t_forget} (`{name}`)"
            if strategy == "drift"
            else f"same for blind periodic retraining, last model (`{name}`; no target)"
        )
        section.checks.append(
            Check(
                label,
                f"{saved[-1].stem}: mean over shots {mb:.4f} -> {ma:.4f} ({ma / mb - 1:+.1%}); "
                f"per shot MSE {per}",
                ma <= (1 + META_FORGETTING) * mb if strategy == "drift" else None,
                f"`{cmd_b}` and `{cmd_a}`",
            )
        )


def _latency_check(ctx: Context, section: Section, tmp: Path, t_lat: str) -> None:
    """A background (worker process) update while the stream runs at full speed, against the
    same events without any update (same stream phase, same index size)."""
    name = META_SCENARIOS[0]
    runs = {}
    for label, extra in (
        ("update", ["--set", "meta_update.worker=process"]),
        ("none", ["--no-meta-update"]),
    ):
        out = tmp / f"latency-{label}.jsonl"
        result, cmd = run_cli(
            ctx, ctx.sizes.meta_latency_events, "--scenario", name, "--output", rel(out), *extra
        )
        runs[label] = (result, cmd, _latencies(out))
    spans = runs["update"][0].get("update_spans", [])
    section.raw["latency"] = {
        "commands": [runs[k][1] for k in runs],
        "update_spans": spans,
        "meta_updates": runs["update"][0].get("meta_updates", []),
    }
    if not spans:
        section.checks.append(
            Check(
                t_lat,
                "not measured: no update trained during the run",
                None,
                f"`{runs['update'][1]}`",
            )
        )
        return
    inside = [runs["update"][2], runs["none"][2]]
    ms = [[lat for i, lat in v.items() if any(a <= i < b for a, b in spans)] for v in inside]
    p99 = [_percentile(m, 99) for m in ms]
    p50 = [_percentile(m, 50) for m in ms]
    span_txt = ", ".join(f"{a:,}-{b:,}" for a, b in spans)
    section.checks.append(
        Check(
            t_lat,
            f"p99 {p99[0]:.1f} ms while a background update trained (events {span_txt}) vs "
            f"{p99[1]:.1f} ms for the same events without one ({p99[0] / p99[1]:.2f}x); p50 "
            f"{p50[0]:.1f} vs {p50[1]:.1f} ms",
            p99[0] <= META_LATENCY_FACTOR * p99[1],
            f"`{runs['update'][1]}` and `{runs['none'][1]}`: `latency_s` of `--output` "
            "(per event: its 512-event batch's engine time)",
        )
    )
