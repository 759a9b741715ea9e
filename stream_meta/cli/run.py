"""``stream-meta run`` (the engine on a stream, in this process) and ``stream-meta scenarios``."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_meta.cli.common import (
    Options,
    UsageError,
    admin_server,
    close,
    emit,
    family_for,
    log,
    metrics_server,
    open_recorder,
    progress_bar,
    serving_engine,
    settings_from,
)

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers


# -- run ---------------------------------------------------------------------------------------
def add_run_parser(sub: Subparsers, options: Options) -> None:
    r = sub.add_parser(
        "run", parents=[options.common], help="run the adaptation engine on a stream"
    )
    r.add_argument(
        "--input",
        help="JSON-lines file of events, '-' for stdin, or a recording "
        "directory (--record) (default: the synthetic stream)",
    )
    r.add_argument("--events", type=int, help="stop after N events (default: 20000 synthetic)")
    r.add_argument(
        "--output",
        help="write predictions (and decision records, with a decision_id) as JSON lines "
        "('-' = stdout)",
    )
    r.add_argument("--rejects", help="write rejected events (dead letters) as JSON lines")
    r.add_argument(
        "--label-requests",
        help="request labels for the unlabelled events worth most, within the [labels] "
        "budgets, and write the requests here as JSON lines",
    )
    r.add_argument("--family", choices=["sinusoid", "digits"], help="task family (shipped model)")
    r.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    r.add_argument("--metrics-port", type=int, help="Prometheus port on 127.0.0.1 (0 = off)")
    r.add_argument("--admin-port", type=int, help="admin port (meta-update requests; 0 = off)")
    r.add_argument("--k-neighbours", type=int, help="neighbours retrieved per task (0 = off)")
    r.add_argument("--timeout", type=float, help="stop after this many seconds")
    r.add_argument(
        "--scenario",
        help="a drift scenario instead of the stationary stream (see `stream-meta scenarios`)",
    )
    r.add_argument("--drift-log", help="append drift alarms to this JSON-lines file")
    r.add_argument("--no-drift", action="store_true", help="switch the drift monitor off")
    r.add_argument("--no-meta-update", action="store_true", help="switch meta-updates off")
    r.add_argument("--models-dir", type=Path, help="save promoted models here (default: not)")
    r.add_argument("--record", type=Path, help="record the consumed events to this directory")
    r.add_argument(
        "--record-format",
        choices=["jsonl", "parquet"],
        default="jsonl",
        help="gzipped JSON lines (default, crash-safe) or Parquet (needs pyarrow)",
    )
    r.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    overrides, scenario = _run_overrides(args)
    settings = settings_from(args, overrides)

    from stream_meta.app import (
        build_decider,
        build_drift_watch,
        build_label_requester,
        build_meta_updater,
        run_stream,
    )
    from stream_meta.sources import JsonlSink

    engine, manifest, registry, metrics = serving_engine(settings)
    family_name = manifest["family"]
    source, what = _run_source(args, settings, scenario, family_name)
    watch = build_drift_watch(settings, engine, metrics, args.drift_log)
    updater = build_meta_updater(
        settings, engine, metrics, watch, family_name, worker="inline", models_dir=args.models_dir
    )
    server = metrics_server(settings, registry)
    admin = admin_server(settings, registry, None if updater is None else updater.routes())
    events = args.events
    log.info("model %s (version %s); input: %s", manifest["path"], engine.model_version, what)
    labels = build_label_requester(settings, metrics)
    if labels is not None and not args.label_requests:
        log.warning("label requests are on but go nowhere: counted only (--label-requests FILE)")
    sinks = [JsonlSink(p) if p else None for p in (args.output, args.rejects, args.label_requests)]
    recorder = open_recorder(args.record, args.record_format) if args.record else None
    if recorder is not None:
        recorder.model_change(engine.model_version, index=0, outcome="start")
    bar = progress_bar(args, events, "run")
    on_batch = _progress_reporter(args, bar)
    try:
        summary = run_stream(
            engine,
            source,
            events=events,
            batch_size=settings.engine.micro_batch,
            timeout_s=args.timeout,
            predictions=sinks[0],
            rejects=sinks[1],
            on_batch=on_batch,
            watch=watch,
            updater=updater,
            recorder=recorder,
            labels=labels,
            label_requests=sinks[2],
            decider=build_decider(settings, engine),
        )
    except KeyboardInterrupt:
        log.warning("interrupted")
        summary = engine.summary()
    finally:
        close(bar, *sinks, admin, server, updater, recorder)
    emit(_run_summary(summary, family_name, scenario, watch, updater), args.json)
    return 0


def _run_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Settings overrides from ``run``'s options and the scenario to run (None: none); fills in
    the default ``--events``."""
    overrides: dict[str, Any] = {}
    if args.family:
        overrides.setdefault("model", {})["family"] = args.family
    if args.checkpoint:
        overrides.setdefault("model", {})["checkpoint"] = str(args.checkpoint)
    if args.metrics_port is not None:
        overrides.setdefault("metrics", {})["port"] = args.metrics_port
    if args.admin_port is not None:
        overrides.setdefault("admin", {})["port"] = args.admin_port
    if args.k_neighbours is not None:
        overrides.setdefault("engine", {})["k_neighbours"] = args.k_neighbours
    scenario = None
    if args.scenario:
        from stream_meta.tasks.scenarios import get_scenario

        if args.input:
            raise UsageError("--scenario and --input are exclusive")
        try:
            scenario = get_scenario(args.scenario)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if args.family and args.family != scenario.model_family:
            raise UsageError(
                f"scenario {scenario.name} is served by the "
                f"{scenario.model_family} model, not {args.family}"
            )
        overrides.setdefault("model", {})["family"] = scenario.model_family
        if args.events is None:
            args.events = scenario.default_events
    if args.events is None and not args.input:
        args.events = 20_000
    if args.no_drift:
        overrides.setdefault("drift", {})["enabled"] = False
    if args.no_meta_update:
        overrides.setdefault("meta_update", {})["enabled"] = False
    if args.label_requests:
        overrides.setdefault("labels", {})["enabled"] = True
    return overrides, scenario


def _run_source(
    args: argparse.Namespace, settings: Any, scenario: Any, family_name: str
) -> tuple[Iterable[tuple[Any, Any]], str]:
    """The ``(event, truth)`` stream ``run`` consumes, and what it is (for the log)."""
    from stream_meta.recording import is_recording, recorded_events
    from stream_meta.sources import jsonl_source, synthetic_source

    st = settings.stream
    source: Iterable[tuple[Any, Any]]
    if args.input and is_recording(args.input):
        source = recorded_events(args.input)
        what = f"recording {args.input}"
    elif args.input:
        source = jsonl_source(args.input)
        what = "stdin" if args.input == "-" else args.input
    elif scenario is not None:
        kwargs = st.model_dump()
        seed = kwargs.pop("seed")
        source = ((e.event, e.truth) for e in scenario.stream(seed=seed, **kwargs))
        what = f"scenario {scenario.name} (drift at {list(scenario.drift_points)})"
    else:
        source = synthetic_source(family_for(family_name, split="test"), **st.model_dump())
        what = f"synthetic {family_name} stream ({st.tasks} tasks, {st.clusters} clusters)"
    return source, what


def _progress_reporter(args: argparse.Namespace, bar: Any) -> Callable[[int, dict[str, Any]], None]:
    """``run_stream``'s ``on_batch`` callback: it moves the bar (None: no bar) and reports the
    progress."""
    start = last = time.perf_counter()
    seen = 0

    def on_batch(n: int, summary: dict[str, Any]) -> None:
        nonlocal last, seen
        seen += n
        if bar is not None:
            bar.update(n)
        now = time.perf_counter()
        # a terminal gets a live bar; a log (not a TTY) gets a progress line every 10 s
        if now - last < (0.5 if bar is not None else 10.0) or args.quiet:
            return
        last = now
        loss = summary.get("prequential_loss")
        loss_s = "-" if loss is None else f"{loss:.4g}"
        if bar is not None:
            bar.set_postfix(tasks=summary["tasks"], loss=loss_s, rejected=summary["rejected"])
        else:
            log.info(
                "%d events, %.0f events/s, %d tasks, prequential loss %s, %d rejected",
                seen,
                seen / (now - start),
                summary["tasks"],
                loss_s,
                summary["rejected"],
            )

    return on_batch


def _run_summary(
    summary: dict[str, Any], family_name: str, scenario: Any, watch: Any, updater: Any
) -> dict[str, Any]:
    """``run``'s result: the engine's summary with the scenario, the drift watch's alarms (the
    watch is closed here) and the meta-updates."""
    summary = {"family": family_name, **summary}
    if scenario is not None:
        summary["scenario"] = scenario.name
        summary["drift_points"] = list(scenario.drift_points)
    if watch is not None:
        watch.close()
        summary.update(watch.summary())
        if scenario is not None:
            summary["detection"] = _detection(scenario.drift_points, summary["alarms"])
    if updater is not None:
        summary["meta_updates"] = updater.summary()
        summary["replay"] = updater.replay.stats()
    return summary


def _detection(points: Sequence[int], alarms: list[dict[str, Any]]) -> dict[str, Any]:
    """First alarm after each drift point (its delay in events) and the false alarms: those
    before the first drift point (every alarm when there is none)."""
    first = points[0] if points else None
    false = [a for a in alarms if first is None or a["event_index"] < first]
    found = []
    for i, p in enumerate(points):
        end = points[i + 1] if i + 1 < len(points) else None
        hits = [
            a for a in alarms if a["event_index"] >= p and (end is None or a["event_index"] < end)
        ]
        hit = hits[0] if hits else None
        found.append(
            {
                "drift_point": p,
                "first_alarm": None if hit is None else hit["event_index"],
                "delay": None if hit is None else hit["event_index"] - p,
                "detector": None if hit is None else hit["detector"],
            }
        )
    return {"drift_points": found, "false_alarms": len(false)}


# -- scenarios ---------------------------------------------------------------------------------
def add_scenarios_parser(sub: Subparsers, options: Options) -> None:
    sc = sub.add_parser("scenarios", parents=[options.common], help="list the drift scenarios")
    sc.set_defaults(func=cmd_scenarios)


def cmd_scenarios(args: argparse.Namespace) -> int:
    from stream_meta.tasks.scenarios import SCENARIOS

    rows = [
        {
            "name": s.name,
            "model_family": s.model_family,
            "drift_points": list(s.drift_points),
            "default_events": s.default_events,
            "description": s.description,
        }
        for s in SCENARIOS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['name']:<26} {r['model_family']:<9} drift at {r['drift_points']!s:<16} "
                f"{r['default_events']:>7,} events  {r['description']}"
            )
    return 0
