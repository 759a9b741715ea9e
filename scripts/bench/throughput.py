"""Engine throughput with 10,000 live tasks (issue 2): section ``throughput``, through
``stream-meta run`` and the library's ``run_stream`` timed once every task is live."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from scripts.bench.common import (
    Check,
    Context,
    MeasurementError,
    Section,
    need_checkpoint,
    run_cli,
    say,
)
from scripts.bench.library import build_engine, default_settings, family_for, serving_threads
from scripts.bench.sizes import Sizes

THROUGHPUT_TARGET = 20_000.0
LIVE_TASKS_TARGET = 10_000

#: the steady-state throughput is timed in this many consecutive windows (median reported)
STEADY_WINDOWS = 3


def throughput_stream(sizes: Sizes) -> dict[str, Any]:
    """Stream settings for throughput: 10,000 tasks, arriving fast enough that all are live
    after about ``1 / new_task_rate * 10,000`` events (the default rate, 0.05, is slower)."""
    return {
        "stream.tasks": LIVE_TASKS_TARGET,
        "stream.new_task_rate": sizes.throughput_new_task_rate,
    }


def measure_throughput(ctx: Context, section: Section) -> None:
    target = f">= {THROUGHPUT_TARGET:,.0f} events/s with {LIVE_TASKS_TARGET:,} live tasks"
    if not need_checkpoint(ctx, section, "sinusoid", [target]):
        return
    n = ctx.sizes.throughput_cli_events
    stream = throughput_stream(ctx.sizes)
    sets = [a for k, v in stream.items() for a in ("--set", f"{k}={v}")]
    summary, cmd = run_cli(ctx, n, *sets)
    section.raw["cli"] = {"command": cmd, "summary": summary}
    reached = summary["tasks"] >= LIVE_TASKS_TARGET
    eps, eng = summary["events_per_s"], summary["engine_events_per_s"]
    section.checks.append(
        Check(
            f"{target} (CLI, whole run incl. the ramp-up)",
            f"{eps:,.0f} events/s wall, {eng:,.0f} in the engine; {summary['tasks']:,} tasks "
            f"at the end",
            (eps >= THROUGHPUT_TARGET) if reached else None,
            f"`{cmd}`: `events_per_s`, `engine_events_per_s`",
        )
    )
    if not reached:
        section.notes.append(
            f"The CLI run ended with {summary['tasks']:,} tasks, short of {LIVE_TASKS_TARGET:,}: "
            "its throughput is shown but not judged."
        )
    ck = ctx.checkpoint("sinusoid")
    assert ck is not None
    steady = steady_throughput(ck, ctx.sizes.throughput_timed_events, stream)
    section.raw["steady"] = steady
    _steady_check(section, target, steady, stream)


def _steady_check(
    section: Section, target: str, steady: dict[str, Any], stream: dict[str, Any]
) -> None:
    """The library row (judged) and the notes on both runs."""
    rates = ", ".join(f"{w['events_per_s']:,.0f}" for w in steady["windows"])
    section.checks.append(
        Check(
            f"{target} (library, timed after {LIVE_TASKS_TARGET:,} tasks are live)",
            f"{steady['events_per_s_median']:,.0f} events/s wall (median of {rates}), "
            f"{steady['engine_events_per_s_median']:,.0f} in the engine; "
            f"{steady['tasks']:,} tasks",
            steady["events_per_s_median"] >= THROUGHPUT_TARGET,
            "`scripts.bench.throughput.steady_throughput` (Engine built as `cmd_run` does, "
            f"warmed on the synthetic stream until {LIVE_TASKS_TARGET:,} tasks are live, then "
            f"{len(steady['windows'])} x `run_stream(engine, source, "
            f"events={steady['events'] // len(steady['windows'])})`)",
        )
    )
    cfg = steady["settings"]
    section.notes.append(
        "Stream settings: "
        + ", ".join(f"`{k}={v}`" for k, v in stream.items())
        + f", the rest default (micro-batch {cfg['micro_batch']}, {cfg['k_neighbours']} "
        f"neighbours, {cfg['index_kind']} index, weights cache {cfg['weights_cache_size']:,} "
        f"rows); torch {cfg['torch_threads']} threads, FAISS {cfg['faiss_threads']}, as "
        "`stream-meta run` sets them. `events_per_s` is wall time including the synthetic "
        "source's event generation; `engine_events_per_s` counts only the time inside "
        f"`Engine.process`. Library run: {steady['warm_events']:,} warm-up events "
        f"({steady['warm_seconds']:.1f} s) before the timed {steady['events']:,}, timed in "
        f"{len(steady['windows'])} consecutive windows (their median is judged, so that one "
        "window disturbed by other work on the machine does not decide); prequential loss over "
        f"the timed part {steady['prequential_loss_timed']:.4g}."
    )


def steady_throughput(checkpoint: Path, events: int, stream: dict[str, Any]) -> dict[str, Any]:
    """Throughput of ``run_stream`` once ``LIVE_TASKS_TARGET`` tasks are live (this process)."""
    import faiss
    import torch

    from stream_meta.app import run_stream
    from stream_meta.model_checkpoint import load_checkpoint
    from stream_meta.sources import synthetic_source

    serving_threads()
    overrides: dict[str, Any] = {}
    for key, value in stream.items():
        sec, name = key.split(".")
        overrides.setdefault(sec, {})[name] = value
    settings = default_settings(overrides)
    model, manifest = load_checkpoint(checkpoint)
    engine = build_engine(model, settings, manifest)
    st = settings.stream
    source = synthetic_source(family_for(manifest["family"]), **st.model_dump())
    batch = settings.engine.micro_batch
    warm, warm_s = _warm_up(engine, source, batch)
    before = engine.summary()
    say(f"library: {len(engine.store):,} tasks live after {warm:,} events; timing {events:,}")
    windows = []
    per_window = events // STEADY_WINDOWS
    for _ in range(STEADY_WINDOWS):
        summary = run_stream(engine, source, events=per_window, batch_size=batch)
        windows.append(
            {k: summary[k] for k in ("seconds", "events_per_s", "engine_events_per_s", "tasks")}
        )
        say(f"library: window of {per_window:,} events: {summary['events_per_s']:,.0f} events/s")
    after = engine.summary()
    labelled = after["labelled"] - before["labelled"]
    loss_sum = (after["prequential_loss"] or 0) * after["labelled"] - (
        before["prequential_loss"] or 0
    ) * before["labelled"]
    seconds = sum(w["seconds"] for w in windows)
    rates = sorted(w["events_per_s"] for w in windows)
    engine_rates = sorted(w["engine_events_per_s"] for w in windows)
    return {
        "events": per_window * STEADY_WINDOWS,
        "windows": windows,
        "warm_events": warm,
        "warm_seconds": round(warm_s, 2),
        "tasks": after["tasks"],
        "seconds": round(seconds, 3),
        "events_per_s_overall": round(per_window * STEADY_WINDOWS / seconds, 1),
        "events_per_s_median": rates[len(rates) // 2],
        "engine_events_per_s_median": engine_rates[len(engine_rates) // 2],
        "prequential_loss_timed": loss_sum / labelled if labelled else float("nan"),
        "settings": {
            "micro_batch": batch,
            "k_neighbours": settings.engine.k_neighbours,
            "index_kind": settings.index.kind,
            "weights_cache_size": engine.weights_cache_rows,
            "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(),
        },
    }


def _warm_up(engine: Any, source: Any, batch: int) -> tuple[int, float]:
    """Feed the engine until ``LIVE_TASKS_TARGET`` tasks are live; ``(events, seconds)``."""
    say(f"library: warming the engine until {LIVE_TASKS_TARGET:,} tasks are live")
    t0, warm = time.perf_counter(), 0
    while len(engine.store) < LIVE_TASKS_TARGET:
        chunk = [raw for raw, _ in itertools.islice(source, batch)]
        engine.process(chunk)
        warm += len(chunk)
        if warm > 50 * LIVE_TASKS_TARGET:
            raise MeasurementError(f"{warm} warm-up events did not make 10,000 tasks live")
    return warm, time.perf_counter() - t0
