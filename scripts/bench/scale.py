"""Replicas (issue 6): section ``scale``. 1 -> 2 ``serve`` replicas on a pre-loaded topic,
kill-and-restart cycles under a steady stream (nothing may be lost), and a soak at 2,000
events/s (memory, lag, errors); the mechanics are in :mod:`scripts.bench.scale_runs`.

Also a command of its own, JSON on stdout:

    python -m scripts.bench.scale                      # all three at small sizes
    python -m scripts.bench.scale soak SECONDS [SERVE OPTION ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.bench import scale_runs
from scripts.bench.common import Check, Context, MeasurementError, Section, need_checkpoint, rel
from scripts.bench.harness import SERVE_TASKS, tansu
from scripts.bench.scale_stats import cores_in
from scripts.bench.sizes import Sizes
from stream_meta.testing.kafka import FAST_GROUP_SETS

SCALE_RATIO_TARGET = 1.7  # throughput of 2 replicas / 1 replica
SOAK_RSS_GROWTH = 0.05  # resident memory growth after warm-up
SOAK_RATE = 2000.0
SCALE_TASKS = 2000  # tasks of the kill-and-restart and soak streams
KILL_RATE = 1000.0


def measure_scale(ctx: Context, section: Section) -> None:
    """Issue 6: 1 -> 2 replicas, kill-and-restart cycles, a soak; mechanics in scale_runs."""
    sz = ctx.sizes
    t_scale = (
        f"throughput 1 -> 2 replicas >= {SCALE_RATIO_TARGET:g}x, or per-replica "
        "CPU-bound throughput shown with lag bounded where the machine is the limit"
    )
    t_kill = f"nothing lost in {sz.scale_cycles} kill-and-restart cycles"
    t_soak = (
        f"soak: {sz.soak_s / 60:g} min at {SOAK_RATE:,.0f} events/s, memory flat after "
        f"warm-up (RSS growth <= {SOAK_RSS_GROWTH:.0%}), lag bounded, no error"
    )
    if not need_checkpoint(ctx, section, "sinusoid", [t_scale, t_kill, t_soak]):
        return
    ck = ctx.checkpoint("sinusoid")
    assert ck is not None
    raw = section.raw
    scale_runs.measure(
        raw,
        scale_events=sz.scale_events,
        scale_tasks=SERVE_TASKS,
        cycles=sz.scale_cycles,
        kill_rate=KILL_RATE,
        soak_s=sz.soak_s,
        soak_rate=SOAK_RATE,
        tasks=SCALE_TASKS,
        checkpoint=rel(ck),
    )
    _scale_out_check(section, sz, t_scale)
    _kill_restart_check(section, t_kill)
    _soak_check(section, t_soak)
    section.notes += _notes(raw["soak"])


def _soak_lag(soak: dict[str, Any]) -> tuple[int, bool]:
    """The soak's largest backlog at the end of a minute, and whether the lag was bounded."""
    max_backlog = max((w["backlog_at_end"] for w in soak["windows"]), default=0)
    return max_backlog, max_backlog <= 5 * SOAK_RATE and soak["events_without_prediction"] == 0


def _scale_out_check(section: Section, sz: Sizes, t_scale: str) -> None:
    """1. scale-out: the table and the judged row (which looks at the soak's lag)."""
    raw = section.raw
    cores = os.cpu_count() or 1
    one, two = raw["scale_out"]["1"], raw["scale_out"]["2"]
    e1, e2 = one["throughput"]["events_per_s"], two["throughput"]["events_per_s"]
    if e1 is None or e2 is None:  # a replica finished before the other started serving
        raise MeasurementError(
            f"no window with every replica serving ({sz.scale_events:,} events are too few)"
        )
    ratio = e2 / e1
    used = [sum(r["replica_cores"] or [0.0]) + (r["broker_cores"] or 0.0) for r in (one, two)]
    rows = [
        "| replicas | events/s | span (s) | cores: each replica | cores: broker | "
        "events consumed by each |",
        "|---|---|---|---|---|---|",
    ]
    for r in (one, two):
        rows.append(
            f"| {r['replicas']} | {r['throughput']['events_per_s']:,.0f} | "
            f"{r['throughput']['span_s']:.1f} | "
            + ", ".join(f"{c:.2f}" for c in r["replica_cores"] or [])
            + f" | {r['broker_cores'] or 0:.2f} | "
            + ", ".join(f"{s['consumed']:,}" for s in r["summaries"])
            + " |"
        )
    section.tables.append(
        f"Scale-out: {sz.scale_events:,} events pre-loaded on 6 partitions, consumed by 1 or 2 "
        "replicas launched together:\n\n" + "\n".join(rows)
    )
    max_backlog, lag_bounded = _soak_lag(raw["soak"])
    cpu_bound = used[1] >= 0.9 * cores
    measured = (
        f"{e1:,.0f} -> {e2:,.0f} events/s ({ratio:.2f}x); the 2 replicas and the broker "
        f"used {used[1]:.2f} of the {cores} cores (1 replica: {used[0]:.2f})"
    )
    if ratio < SCALE_RATIO_TARGET:
        measured += (
            f"; CPU-bound: {e2 / max(sum(two['replica_cores'] or [1.0]), 1e-9):,.0f} events "
            "per replica CPU-second; with 2 replicas at "
            f"{SOAK_RATE:,.0f} events/s the backlog stayed <= {max_backlog:,} events "
            f"({max_backlog / SOAK_RATE:.2f} s) for {sz.soak_s / 60:g} min (soak below)"
            if cpu_bound
            else "; not CPU-bound: the scaling fell short on its own"
        )
    section.checks.append(
        Check(
            t_scale,
            measured,
            ratio >= SCALE_RATIO_TARGET or (cpu_bound and lag_bounded),
            f"`{one['produce']['command']}`, then {one['replicas']} and {two['replicas']} x "
            f"`{two['serve_commands'][0]}` (same group): predictions (record timestamps) while "
            "every replica was serving (from the latest of their first predictions to the earliest "
            "of their last ones) / that window; cores = CPU seconds (`/proc/<pid>/stat`) / wall "
            "seconds over it",
        )
    )


def _kill_restart_check(section: Section, t_kill: str) -> None:
    """2. kill and restart: nothing lost."""
    k = section.raw["kill_restart"]
    ch = k["changelog"]
    lost = (
        k["events_without_prediction"]
        + ch["tasks_missing"]
        + ch["seen_mismatch"]
        + ch["support_set_mismatch"]
    )
    backs = [c["back_after_s"] for c in k["timeline"]]
    section.checks.append(
        Check(
            t_kill,
            f"{k['events']:,} events at {k['rate']:,.0f}/s, {k['cycles']} SIGKILLs: "
            f"{k['events_without_prediction']} events without a prediction; on the changelog, "
            f"{ch['labelled_tasks']:,} tasks / {ch['labelled_events']:,} labelled events: "
            f"{ch['tasks_missing']} tasks missing, {ch['seen_mismatch']} with a wrong example "
            f"count, {ch['support_set_mismatch']} with a wrong support set; "
            f"{k['duplicate_predictions']:,} predictions written twice "
            f"({k['duplicate_predictions'] / k['cycles']:.0f} per kill: the batches in flight); "
            f"a restarted replica was assigned again after {min(backs):.1f}-{max(backs):.1f} s",
            lost == 0,
            f"two replicas (`{k['serve_commands'][0]}`, same group, own state directories) "
            f"under `{k['produce']['command']}`; every 1-4 s one is "
            "SIGKILLed (alternating) and started again on its state directory; then the events, "
            "predictions and the `task-state` changelog are read back",
        )
    )


def _soak_check(section: Section, t_soak: str) -> None:
    """3. soak: the judged row and the per-minute table."""
    soak = section.raw["soak"]
    after_warm = [w for w in soak["windows"] if w["from_s"] >= soak["rss"][0]["warm_s"]]
    max_backlog, lag_bounded = _soak_lag(soak)
    growth = [r["growth"] for r in soak["rss"]]
    errors = soak["log_error_count"]
    rate = soak["produce"]["summary"]["events_per_s"]
    p99s = [w["p99_ms"] for w in after_warm if "p99_ms" in w]
    measured = (
        f"{soak['produce']['summary']['events']:,} events at {rate:,.0f}/s over "
        f"{soak['distinct_tasks']:,} tasks, 2 replicas: RSS growth after "
        f"{soak['rss'][0]['warm_s']:.0f} s of warm-up "
        + ", ".join(f"{g:+.1%}" for g in growth)
        + " (process trees; main processes "
        + ", ".join(f"{r['growth']:+.1%}" for r in soak["rss_main_process"])
        + f"); backlog <= {max_backlog:,} events; p99 latency per minute after warm-up "
        + (f"{min(p99s):.0f}-{max(p99s):.0f} ms" if p99s else "?")
        + f"; {errors} error lines; {soak['events_without_prediction']} events without a "
        "prediction"
    )
    section.checks.append(
        Check(
            t_soak,
            measured,
            max(growth) <= SOAK_RSS_GROWTH
            and lag_bounded
            and errors == 0
            and rate >= 0.95 * SOAK_RATE,
            f"two replicas (`{soak['serve_commands'][0]}`, same group) under "
            f"`{soak['produce']['command']}`; resident memory of each replica's process tree "
            f"every {scale_runs.RSS_EVERY_S:g} s (`/proc/<pid>/status` VmRSS): the median of the "
            "30 s after warm-up against the median of the last 30 s",
        )
    )
    rows = [
        "| minute | events | p50 (ms) | p99 (ms) | max (ms) | backlog at its end | "
        "cores: replicas (process trees) / broker |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in soak["windows"]:
        cores_used = cores_in(
            soak.get("cpu_samples", []), w["from_s"], w["from_s"] + scale_runs.WINDOW_S
        )
        rows.append(
            f"| {w['from_s'] / 60:.0f} | {w['events']:,} | {w.get('p50_ms', 0):.0f} | "
            f"{w.get('p99_ms', 0):.0f} | {w.get('max_ms', 0):.0f} | "
            f"{w['backlog_at_end']:,} | {cores_used} |"
        )
    section.tables.append(
        "Soak, per minute (end-to-end latency of the events produced in it; backlog = events "
        "produced minus events predicted so far, from the record timestamps):\n\n" + "\n".join(rows)
    )


def _notes(soak: dict[str, Any]) -> list[str]:
    mib = [[r["after_warm_up_bytes"] / 2**20, r["end_bytes"] / 2**20] for r in soak["rss"]]
    return [
        "Replicas run `stream-meta serve` with the default settings (the replica topics on: "
        "task embeddings, the task-state changelog, model versions), a state directory each and "
        f"`{' '.join(FAST_GROUP_SETS)}`, against a Tansu broker (in-memory storage) "
        f"started for each measurement on the same {os.cpu_count() or 1} cores: the broker, the "
        "producer, this script and the replicas share them.",
        "Memory (MiB, after warm-up -> end, process tree): "
        + "; ".join(f"replica {i}: {a:.0f} -> {b:.0f}" for i, (a, b) in enumerate(mib))
        + ". The tree includes the meta-update worker process a replica starts for its first "
        "meta-update; warm-up = every task live and a fifth of the run (at most half); "
        f"the last new task arrived at {soak['last_new_task_s']:.0f} s.",
        "Outputs stay at-least-once across a kill: the batch a replica was serving when it "
        "was killed is served again by the next owner (learning is not repeated: the "
        "changelog's applied offsets mark those events as duplicates). Offsets are committed "
        "after every batch, so the duplicates are bounded by the batches in flight.",
    ]


def main(argv: Sequence[str]) -> None:
    """``python -m scripts.bench.scale [soak SECONDS [SERVE OPTION ...]]``: all three at small
    sizes, or only the soak (2,000 events/s, 2,000 tasks) for SECONDS; JSON on stdout."""
    out: dict[str, Any] = {}
    ck = "stream_meta/checkpoints/sinusoid.safetensors"
    try:
        if argv and argv[0] == "soak":
            with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, tansu(Path(tmp)) as b:
                out["soak"] = scale_runs.measure_soak(
                    b, Path(tmp), float(argv[1]), 2000.0, 2000, ck, extra=tuple(argv[2:])
                )
        else:
            scale_runs.measure(
                out,
                scale_events=20_000,
                scale_tasks=1000,
                cycles=2,
                kill_rate=500,
                soak_s=60,
                soak_rate=500,
                tasks=500,
                checkpoint=ck,
            )
    finally:
        json.dump(out, sys.stdout, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
    os._exit(0)
