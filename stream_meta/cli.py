"""The ``stream-meta`` command: ``run``, ``train``, ``evaluate``, ``serve``, ``produce``, ``tail``.

This is the application entry point: the only place that reads the environment
(``STREAM_META_*``), configures logging, starts the metrics endpoint and prints. Exit codes:
0 success, 1 runtime failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("stream_meta")

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed as one message, exit code 2."""


# -- helpers ---------------------------------------------------------------------------------
def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set engine.k_neighbours=0`` items -> a nested overrides dict (values as TOML)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UsageError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        section, field = key.split(".", 1)
        out.setdefault(section, {})[field] = parsed
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _settings(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from stream_meta.config import load_settings

    return load_settings(
        args.config,
        env=os.environ,
        overrides=_merge(_parse_set(args.set or []), overrides),
    )


def _load_model(checkpoint: Path | None, family: str, device: str = "cpu") -> tuple[Any, dict]:
    from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint

    path = checkpoint if checkpoint is not None else shipped_checkpoint(family)
    model, manifest = load_checkpoint(path, device=device)
    manifest["path"] = str(path)
    return model, manifest


def _family_for(name: str, *, split: str) -> Any:
    from stream_meta.tasks import get_family

    return get_family(name, split=split) if name == "digits" else get_family(name)


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return name


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=False))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
            print(f"{key:<{width}}  {inner}")
        else:
            print(f"{key:<{width}}  {_fmt(value)}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return f"{len(v)} records (--json shows them)"  # windows, alarms, meta-updates
    return str(v)


# -- run -------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.family:
        overrides.setdefault("model", {})["family"] = args.family
    if args.checkpoint:
        overrides.setdefault("model", {})["checkpoint"] = str(args.checkpoint)
    if args.metrics_port is not None:
        overrides.setdefault("metrics", {})["port"] = args.metrics_port
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
    settings = _settings(args, overrides)

    import faiss
    import torch

    from stream_meta.app import build_drift_watch, build_engine, build_meta_updater, run_stream
    from stream_meta.metrics import EngineMetrics
    from stream_meta.recording import is_recording, recorded_events
    from stream_meta.sources import JsonlSink, jsonl_source, synthetic_source

    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    # one batched search per micro-batch is small: OpenMP regions only add wake-up stalls
    faiss.omp_set_num_threads(1)
    model, manifest = _load_model(settings.model.checkpoint, settings.model.family)
    family_name = manifest["family"]
    registry = _registry()
    metrics = EngineMetrics(registry)
    metrics.set_build_info(family=family_name)
    engine = build_engine(
        model, settings, metrics=metrics, model_version=int(manifest.get("model_version", 1))
    )
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
        source = synthetic_source(_family_for(family_name, split="test"), **st.model_dump())
        what = f"synthetic {family_name} stream ({st.tasks} tasks, {st.clusters} clusters)"
    watch = build_drift_watch(settings, engine, metrics, args.drift_log)
    updater = build_meta_updater(
        settings, engine, metrics, watch, family_name, worker="inline", models_dir=args.models_dir
    )
    server = _admin_server(settings, registry, routes=None if updater is None else updater.routes())
    events = args.events
    log.info("model %s (version %s); input: %s", manifest["path"], engine.model_version, what)
    sinks = [JsonlSink(p) if p else None for p in (args.output, args.rejects)]
    recorder = _recorder(args.record, args.record_format) if args.record else None
    if recorder is not None:
        recorder.model_change(engine.model_version, index=0, outcome="start")
    bar = _progress(args, events, "run")
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
        )
    except KeyboardInterrupt:
        log.warning("interrupted")
        summary = engine.summary()
    finally:
        if bar is not None:
            bar.close()
        for sink in sinks:
            if sink is not None:
                sink.close()
        if server is not None:
            server.close()
        if updater is not None:
            updater.close()
        if recorder is not None:
            recorder.close()
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
    _emit(summary, args.json)
    return 0


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


# -- replay -----------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    """Re-run a recorded stream under one or more strategies; write predictions and a report."""
    overrides: dict[str, Any] = {"metrics": {"port": 0}}
    if args.family:
        overrides.setdefault("model", {})["family"] = args.family
    if args.checkpoint:
        overrides.setdefault("model", {})["checkpoint"] = str(args.checkpoint)
    settings = _settings(args, overrides)
    import torch

    from stream_meta.evaluation.replay import ReplayConfig, replay_strategy
    from stream_meta.evaluation.strategies import (
        STRATEGIES,
        StrategyOptions,
        load_gradient_init,
        strategy_settings,
    )
    from stream_meta.model_checkpoint import CheckpointError
    from stream_meta.recording import is_recording, recorded_events
    from stream_meta.sources import jsonl_source

    names = list(STRATEGIES) if "all" in args.strategy else list(dict.fromkeys(args.strategy))
    for name in names:
        try:
            strategy_settings(settings, name)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if args.label_delay < 0:
        raise UsageError("--label-delay must be >= 0")
    if args.inner_steps < 0 or args.scratch_steps < 0:
        raise UsageError("--inner-steps and --scratch-steps must be >= 0")
    options = StrategyOptions(
        baseline_dir=args.baseline_dir,
        inner_steps=args.inner_steps,
        scratch_steps=args.scratch_steps,
    )
    model, manifest = _load_model(settings.model.checkpoint, settings.model.family)
    for name in names:  # a missing or unfit baseline initialisation fails before any replay
        if name in ("scratch", "finetune", "maml"):
            try:
                load_gradient_init(name, model, manifest["family"], options)
            except (CheckpointError, ValueError) as exc:
                raise UsageError(f"strategy {name}: {exc}") from exc
    log_path = Path(args.log)
    if not (is_recording(log_path) or log_path.is_file()):
        raise UsageError(f"{log_path} is neither a recording directory nor a JSON-lines file")
    source = recorded_events(log_path) if is_recording(log_path) else jsonl_source(log_path)
    raws = [raw for raw, _ in source]
    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    config = ReplayConfig(
        label_delay=args.label_delay, batch_size=args.batch_size or settings.engine.micro_batch
    )
    from stream_meta.evaluation.families import build_probes, parse_events

    probes = build_probes(parse_events(raws), model.config.kind, window=config.window)
    results = {}
    for name in names:
        # a fresh copy of the model per strategy: meta-updates must not leak between them
        model, manifest = _load_model(settings.model.checkpoint, settings.model.family)
        log.info("replaying %d events of %s with strategy %s", len(raws), log_path, name)
        results[name] = replay_strategy(
            name,
            raws,
            model,
            settings,
            config,
            report_dir / f"predictions-{name}.jsonl",
            family=manifest["family"],
            options=options,
            probes=probes,
        )
    report = {
        "log": str(log_path),
        "events": len(raws),
        "label_delay": args.label_delay,
        "batch_size": config.batch_size,
        "baselines": {
            "dir": str(options.baseline_dir or "shipped"),
            "inner_steps": options.inner_steps,
            "scratch_steps": options.scratch_steps,
        },
        "checkpoint": manifest["path"],
        "strategies": results,
    }
    from stream_meta.evaluation.report import write_html

    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_html(report, report_dir / "report.html")
    if args.json:
        _emit(report, True)
    else:
        for name, r in results.items():
            loss = r["prequential_loss"]
            print(
                f"{name:<16} prequential loss {'-' if loss is None else f'{loss:.4g}'}  "
                f"{r['events_per_s']:>9,.0f} events/s  model v{r['model_version']}  "
                f"sha256 {r['predictions_sha256'][:12]}"
            )
        print(f"report: {report_dir / 'report.json'}, {report_dir / 'report.html'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Markdown table of B against A; exit 1 when B regresses past the threshold."""
    from stream_meta.evaluation.report import compare, load_report

    try:
        a, b = load_report(args.a), load_report(args.b)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    table, regressions = compare(a, b, threshold=args.threshold)
    print(table)
    if regressions:
        print("\nregressions:\n" + "\n".join(f"- {r}" for r in regressions))
        return 1
    print(f"\nno strategy regresses by more than {args.threshold:.0%}")
    return 0


# -- train -----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    train_over: dict[str, Any] = {
        k: v
        for k, v in {
            "steps": args.steps,
            "seed": args.seed,
            "batch_tasks": args.batch_tasks,
            "lr": args.lr,
            "device": args.device,
        }.items()
        if v is not None
    }
    settings = _settings(args, {"train": train_over} if train_over else {})
    import torch

    from stream_meta.evaluation.fewshot import evaluate
    from stream_meta.meta_training import TrainConfig, meta_train
    from stream_meta.model import PRESETS, MetaModel, ModelConfig
    from stream_meta.model_checkpoint import save_checkpoint

    ts = settings.train
    device = _device(ts.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    family = _family_for(args.family, split="train")
    config = ModelConfig(
        x_dim=family.x_dim,
        kind=family.kind,
        n_classes=family.n_classes,
        **PRESETS[args.family],
    )
    torch.manual_seed(ts.seed)
    model = MetaModel(config)
    names = TrainConfig.__dataclass_fields__
    tc = TrainConfig(**{k: v for k, v in ts.model_dump().items() if k in names})
    log.info("meta-training %s for %d steps on %s", args.family, tc.steps, device)
    result = meta_train(model, family, tc, device=device, progress=not args.quiet)
    model.to("cpu").eval()
    metrics: dict[str, Any] = {"train": result.to_dict()}
    if args.eval_tasks:
        shots = [1, 5] if family.kind == "classification" else [1, 5, 10, 20]
        report = evaluate(
            model,
            _family_for(args.family, split="test"),
            shots=shots,
            tasks=args.eval_tasks,
            latency_samples=50,
        )
        metrics["eval"] = {"tasks": args.eval_tasks, "metric": report["metric"], **report["shots"]}
    manifest = save_checkpoint(
        args.out,
        model,
        family=args.family,
        training={**tc.__dict__, "device": device},
        metrics=metrics,
    )
    summary = {"out": str(args.out), "family": args.family, **manifest["metrics"]}
    _emit(summary, args.json)
    return 0


def cmd_train_baseline(args: argparse.Namespace) -> int:
    """Train a baseline initialisation (MAML or pre-trained) on the meta-model's budget."""
    _settings(args, {})
    import torch

    from stream_meta.evaluation.baselines import (
        DEFAULT_INNER_LR,
        InnerLoop,
        evaluate_init,
        load_init,
        save_init,
        train_init,
    )
    from stream_meta.meta_training import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model, manifest = _load_model(args.checkpoint, args.family)
    if manifest["family"] != args.family:
        raise UsageError(f"checkpoint {manifest['path']} is for family {manifest['family']!r}")
    names = TrainConfig.__dataclass_fields__
    budget = {k: v for k, v in manifest.get("training", {}).items() if k in names}
    if args.steps is not None:
        budget["steps"] = args.steps
    tc = TrainConfig(**budget)
    if args.inner_steps < 1 or args.serve_steps < 0:
        raise UsageError("--inner-steps must be >= 1 and --serve-steps >= 0")
    lr = args.inner_lr or DEFAULT_INNER_LR[model.config.kind]
    train_loop = InnerLoop(steps=args.inner_steps, lr=lr)
    log.info(
        "training the %s initialisation of %s for %d steps (the meta-model's budget: %d "
        "tasks per step)",
        args.method,
        args.family,
        tc.steps,
        tc.batch_tasks,
    )
    theta, result = train_init(
        args.method,
        _family_for(args.family, split="train"),
        model.config,
        tc,
        train_loop,
        first_order=args.first_order,
        progress=not args.quiet,
    )
    serve_loop = InnerLoop(steps=args.serve_steps, lr=lr, clip=args.serve_clip)
    tuning = {}
    if args.method == "pretrained" and args.inner_lr is None:
        # fine-tuning's step size is free: pick it on training tasks (MAML's is meta-learned)
        from stream_meta.evaluation.baselines import GradientInit, target_for, tune_lr

        probe = GradientInit(
            args.method,
            args.family,
            model.config.kind,
            theta,
            target_for(model.config),
            serve_loop,
            {},
        )
        best, tried = tune_lr(probe, _family_for(args.family, split="train"))
        serve_loop = InnerLoop(steps=args.serve_steps, lr=best, clip=args.serve_clip)
        tuning = {"serve_lr_tuned_on_training_tasks": tried, "serve_lr": best}
    save_init(
        args.out,
        theta,
        method=args.method,
        family=args.family,
        model_config=model.config,
        loop=serve_loop,
        training={
            **tc.__dict__,
            "inner_steps": args.inner_steps,
            "first_order": args.first_order,
            **tuning,
        },
        metrics={"train": result},
        first_order=args.first_order,
    )
    metrics: dict[str, Any] = {"train": result}
    if args.eval_tasks:
        init = load_init(args.out)
        shots = [1, 5] if model.config.kind == "classification" else [1, 5, 10, 20]
        metrics["eval"] = evaluate_init(
            init, _family_for(args.family, split="test"), shots=shots, tasks=args.eval_tasks
        )
        save_init(
            args.out,
            theta,
            method=args.method,
            family=args.family,
            model_config=model.config,
            loop=serve_loop,
            training=init.manifest["training"],
            metrics=metrics,
            first_order=args.first_order,
        )
    _emit(
        {"out": str(args.out), "family": args.family, "method": args.method, **metrics}, args.json
    )
    return 0


# -- evaluate --------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = _settings(args, {})
    from stream_meta.evaluation.fewshot import evaluate

    device = _device(args.device or "cpu")
    model, manifest = _load_model(args.checkpoint, args.family, device=device)
    if manifest["family"] != args.family:
        raise UsageError(
            f"checkpoint {manifest['path']} is for family {manifest['family']!r}, "
            f"not {args.family!r}"
        )
    k = 0 if args.no_neighbours else settings.engine.k_neighbours
    report = evaluate(
        model,
        _family_for(args.family, split="test"),
        shots=args.shots,
        tasks=args.tasks,
        queries=args.queries,
        k_neighbours=k,
        bank_tasks=args.bank_tasks,
        seed=args.seed,
    )
    report["checkpoint"] = manifest["path"]
    _emit(report, args.json)
    return 0


# -- serve / produce (Kafka) -------------------------------------------------------------------
def _kafka_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {
        "bootstrap_servers": "bootstrap_servers",
        "group": "group_id",
        "topic_prefix": "topic_prefix",
    }
    return {v: getattr(args, k) for k, v in names.items() if getattr(args, k, None) is not None}


def _registry() -> Any:
    """A fresh Prometheus registry (without the ``*_created`` series, which add nothing)."""
    from prometheus_client import CollectorRegistry, disable_created_metrics

    disable_created_metrics()
    return CollectorRegistry()


def _admin_server(settings: Any, registry: Any, **probes: Any) -> Any:
    """``/metrics``, ``/healthz`` and ``/readyz`` on the configured port (None if port 0)."""
    if not settings.metrics.port:
        return None
    from stream_meta.http_server import AdminServer

    host, port = settings.metrics.host, settings.metrics.port
    try:
        server = AdminServer(registry, host=host, port=port, **probes)
    except OSError as exc:
        raise UsageError(
            f"cannot serve metrics on {host}:{port}: {exc} "
            "(choose another with --metrics-port, or 0 to turn it off)"
        ) from exc
    log.info("metrics on http://%s:%d/metrics (/healthz, /readyz)", host, port)
    return server


def cmd_meta_update(args: argparse.Namespace) -> int:
    """POST /meta-update to a running process; with --wait, poll /meta-updates for the outcome."""
    import urllib.error
    import urllib.request

    settings = _settings(args, {})
    base = (args.url or f"http://127.0.0.1:{settings.metrics.port}").rstrip("/")

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise UsageError(
                    f"{base} has no meta-updater (meta_update.enabled is off?)"
                ) from exc
            raise UsageError(f"{base}{path}: HTTP {exc.code}: {exc.read().decode()[:200]}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise UsageError(
                f"cannot reach {base} ({exc}); is `stream-meta serve` running "
                "with its metrics port there? (--url)"
            ) from exc

    if args.status:
        _emit(call("GET", "/meta-updates"), True)
        return 0
    before = call("POST", "/meta-update", {"reason": args.reason})
    log.info("meta-update requested from %s (serving version %s)", base, before["model_version"])
    if args.wait <= 0:
        _emit(before, args.json)
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(0.5)
        status = call("GET", "/meta-updates")
        fresh = status["total_records"] - before["records"]
        if fresh > 0:  # the outcome of this request (or of the update it joined)
            outcome = status["records"][-min(fresh, len(status["records"]))]
            _emit(outcome, args.json)
            return 0 if outcome["outcome"] in ("promoted", "rejected") else 1
    print(f"stream-meta: error: no outcome within {args.wait:g} s", file=sys.stderr)
    return 1


def _close(*resources: Any) -> None:
    """Close what was opened (None: never opened), in order."""
    for resource in resources:
        if resource is not None:
            resource.close()


def _process_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings overrides from the options ``serve`` and ``trainer`` share."""
    overrides: dict[str, Any] = {"kafka": _kafka_overrides(args)}
    if args.metrics_port is not None:
        overrides["metrics"] = {"port": args.metrics_port}
    if args.checkpoint:
        overrides["model"] = {"checkpoint": str(args.checkpoint)}
    return overrides


def _service_engine(settings: Any) -> tuple[Any, dict[str, Any], Any, Any]:
    """The engine a long-running process (``serve``, ``trainer``) serves with, its threads set:
    ``(engine, checkpoint manifest, metrics registry, engine metrics)``."""
    import faiss
    import torch

    from stream_meta.app import build_engine
    from stream_meta.metrics import EngineMetrics

    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    # one batched search per micro-batch is small: OpenMP regions only add wake-up stalls
    faiss.omp_set_num_threads(1)
    model, manifest = _load_model(settings.model.checkpoint, settings.model.family)
    registry = _registry()
    metrics = EngineMetrics(registry)
    metrics.set_build_info(family=manifest["family"])
    engine = build_engine(
        model, settings, metrics=metrics, model_version=int(manifest.get("model_version", 1))
    )
    return engine, manifest, registry, metrics


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = _process_overrides(args)
    if args.state_dir:
        overrides["service"] = {"state_dir": str(args.state_dir)}
    settings = _settings(args, overrides)

    from stream_meta.app import build_drift_watch, build_meta_updater
    from stream_meta.kafka.clients import ServiceError
    from stream_meta.kafka.service import KafkaService, state_dir_ok
    from stream_meta.metrics import ServiceMetrics
    from stream_meta.state_checkpoint import StateError

    engine, manifest, registry, metrics = _service_engine(settings)
    watch = build_drift_watch(settings, engine, metrics, args.drift_log)
    state_dir = settings.service.state_dir
    updater = build_meta_updater(
        settings,
        engine,
        metrics,
        watch,
        manifest["family"],
        worker="process",
        models_dir=None if state_dir is None else Path(state_dir) / "models",
    )
    recorder = None
    if args.record:
        recorder = _recorder(args.record, args.record_format)
        recorder.model_change(engine.model_version, index=0, outcome="start")
    service = KafkaService(
        engine, settings, ServiceMetrics(registry), watch=watch, updater=updater, recorder=recorder
    )
    server = _admin_server(
        settings,
        registry,
        health=service.health,
        ready=service.ready,
        routes=None if updater is None else updater.routes(),
    )
    service.install_signal_handlers()
    try:
        if settings.service.state_dir is not None:
            state_dir_ok(settings.service.state_dir)
        log.info(
            "serving %s (model version %d) from %s, group %s, on %s",
            manifest["family"],
            engine.model_version,
            service.topics.events,
            settings.kafka.group_id,
            settings.kafka.bootstrap_servers,
        )
        service.start()
        summary = service.run(events=args.events, timeout_s=args.timeout)
    except (ServiceError, StateError) as exc:
        print(f"stream-meta: error: {exc}", file=sys.stderr)
        return 1
    finally:
        _close(server, updater, watch, recorder)
    _emit(summary, args.json)
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    """The trainer service: one active trainer publishes meta-updates for every replica."""
    settings = _settings(args, _process_overrides(args))

    from stream_meta.app import build_drift_watch, build_meta_updater
    from stream_meta.kafka.clients import ServiceError
    from stream_meta.kafka.trainer import TrainerService

    if not settings.meta_update.enabled:
        raise UsageError("the trainer runs meta-updates: meta_update.enabled must be true")
    engine, manifest, registry, metrics = _service_engine(settings)
    watch = build_drift_watch(settings, engine, metrics, None)
    updater = build_meta_updater(
        settings, engine, metrics, watch, manifest["family"], worker="process"
    )
    trainer = TrainerService(engine, settings, metrics, watch=watch, updater=updater)
    server = _admin_server(
        settings,
        registry,
        health=trainer.health,
        ready=trainer.ready,
        routes=updater.routes() if updater is not None else None,
    )
    stop = _stop_on_sigterm()

    def relay() -> None:  # SIGTERM -> the trainer's loop stops after its step
        stop.wait()
        trainer.stop_event.set()

    threading.Thread(target=relay, daemon=True).start()
    try:
        trainer.start()
        summary = trainer.run(timeout_s=args.timeout)
    except ServiceError as exc:
        print(f"stream-meta: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        summary = {"interrupted": True}
    finally:
        _close(server, updater, watch)
    _emit(summary, args.json)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    settings = _settings(args, {"kafka": _kafka_overrides(args)})
    import numpy as np
    from kafka import KafkaAdminClient, KafkaProducer

    from stream_meta.kafka.topics import Topics, ensure_topics
    from stream_meta.sources import bad_event, synthetic_source

    stream_kwargs = {**settings.stream.model_dump(), "tasks": args.tasks, "seed": args.seed}
    if args.scenario:
        from stream_meta.tasks.scenarios import get_scenario

        try:
            scenario = get_scenario(args.scenario)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        seed = stream_kwargs.pop("seed")
        stream = scenario.stream(seed=seed, **stream_kwargs)
        family = stream.streams[0].family  # every regime has the same x_dim and kind
        source: Any = ((e.event, e.truth) for e in stream)
    else:
        family = _family_for(args.family, split="test")
        source = synthetic_source(family, **stream_kwargs)
    rng = np.random.default_rng(args.seed)
    topics = Topics.for_prefix(settings.kafka.topic_prefix)
    try:
        if settings.service.create_topics:
            admin = KafkaAdminClient(**settings.kafka.client_config())
            try:
                ensure_topics(
                    admin,
                    topics.all(),
                    settings.service.partitions,
                    settings.service.replication_factor,
                    compacted=topics.compacted,
                )
            finally:
                admin.close()
        producer = KafkaProducer(**settings.kafka.client_config(), acks="all", linger_ms=5)
    except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
        raise UsageError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc
    topic = topics.events
    # event ids must stay unique across producer runs (the service de-duplicates by id)
    run_id = args.run_id or os.urandom(4).hex()
    stop = _stop_on_sigterm()
    total = args.events or None  # 0: until interrupted
    bar = _progress(args, total, "produce")
    bad = sent = 0
    start = last_log = time.perf_counter()
    try:
        for event, _truth in source:
            if (total is not None and sent >= total) or stop.is_set():
                break
            event["event_id"] = f"{run_id}-{event['event_id']}"
            if rng.random() < args.bad_fraction:
                value, bad = bad_event(event, rng, family.x_dim), bad + 1
            else:
                value = json.dumps(event).encode()
            producer.send(topic, key=event["task_id"].encode(), value=value)
            sent += 1
            if bar is not None:
                bar.update(1)
            elif not args.quiet and time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log.info("%d events sent (%.0f/s)", sent, sent / (last_log - start))
            if args.rate:
                delay = start + sent / args.rate - time.perf_counter()
                if delay > 0:
                    stop.wait(delay)
    except KeyboardInterrupt:
        log.warning("interrupted")
    finally:
        producer.flush()
        elapsed = time.perf_counter() - start
        producer.close()
        if bar is not None:
            bar.close()
    _emit(
        {
            "topic": topic,
            "run_id": run_id,
            "events": sent,
            "bad": bad,
            "seconds": round(elapsed, 3),
            "events_per_s": round(sent / elapsed, 1) if elapsed else None,
        },
        args.json,
    )
    return 0


def _stop_on_sigterm() -> Any:
    """An event set by SIGTERM (SIGINT stays KeyboardInterrupt)."""
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _progress(args: argparse.Namespace, total: int | None, desc: str) -> Any:
    """A progress bar on a terminal, else None (logs report progress instead)."""
    if args.quiet or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, desc=desc, dynamic_ncols=True)


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the records of the predictions (or dead-letter) topic as JSON lines."""
    settings = _settings(args, {"kafka": _kafka_overrides(args)})
    from kafka import TopicPartition

    from stream_meta.kafka.topics import Topics

    topics = Topics.for_prefix(settings.kafka.topic_prefix)
    topic = topics.dead_letter if args.dead_letter else topics.predictions
    consumer = _reader(settings)
    stop = _stop_on_sigterm()
    shown = 0
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise UsageError(
                f"topic {topic} does not exist (yet) on {settings.kafka.bootstrap_servers}"
            )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)  # manual assignment: instant, no group join
        if args.from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        idle_since = time.monotonic()
        while not stop.is_set() and (args.max is None or shown < args.max):
            polled = consumer.poll(timeout_ms=200)
            records = [r for batch in polled.values() for r in batch]
            if not records:
                if args.timeout is not None and time.monotonic() - idle_since > args.timeout:
                    break
                continue
            idle_since = time.monotonic()
            for r in records:
                if args.max is not None and shown >= args.max:
                    break
                value = r.value.decode("utf-8", errors="replace")
                if args.meta:
                    obj = {
                        "partition": r.partition,
                        "offset": r.offset,
                        "timestamp_ms": r.timestamp,
                        "value": json.loads(value),
                    }
                    value = json.dumps(obj)
                print(value, flush=True)
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _recorder(path: Path, fmt: str) -> Any:
    from stream_meta.recording import EventRecorder

    try:
        return EventRecorder(path, format=fmt)
    except RuntimeError as exc:  # Parquet without pyarrow
        raise UsageError(str(exc)) from exc


def _reader(settings: Any) -> Any:
    """A ``KafkaConsumer`` outside any group (manual assignment: nothing committed, no join);
    exits 2 with the reason when the brokers cannot be reached."""
    from kafka import KafkaConsumer

    try:
        return KafkaConsumer(**settings.kafka.client_config(), enable_auto_commit=False)
    except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
        raise UsageError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc


def _time_ms(text: str | None) -> int | None:
    """``--since``/``--until``: epoch milliseconds, or an ISO-8601 time (UTC unless it says)."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    from datetime import UTC, datetime

    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"{text!r} is neither epoch milliseconds nor an ISO-8601 time") from exc
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


def cmd_export(args: argparse.Namespace) -> int:
    """Copy a Kafka topic, between offsets or times, into a recording for ``replay``."""
    settings = _settings(args, {"kafka": _kafka_overrides(args)})

    from stream_meta.kafka.export import ExportRange, export_topic
    from stream_meta.kafka.topics import Topics

    topic = args.topic or Topics.for_prefix(settings.kafka.topic_prefix).events
    try:
        bounds = ExportRange(
            args.from_offset, args.to_offset, _time_ms(args.since), _time_ms(args.until)
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    consumer = _reader(settings)
    try:
        with _recorder(args.out, args.format) as recorder:
            summary = export_topic(
                consumer,
                topic,
                recorder,
                bounds,
                idle_timeout_s=args.idle_timeout,
                max_events=args.max,
                stop=_stop_on_sigterm(),
            )
    except ValueError as exc:
        raise UsageError(f"{exc} on {settings.kafka.bootstrap_servers}") from exc
    finally:
        consumer.close()
    _emit({**summary, "out": str(args.out)}, args.json)
    return 0


def cmd_publish_model(args: argparse.Namespace) -> int:
    """Publish a checkpoint as model ``--version`` on ``<prefix>.models`` for every replica."""
    settings = _settings(args, {"kafka": _kafka_overrides(args)})
    from kafka import KafkaAdminClient, KafkaProducer

    from stream_meta.kafka.model_topic import chunk_messages, publish_model
    from stream_meta.kafka.topics import Topics, ensure_topics
    from stream_meta.model_checkpoint import CheckpointError, load_checkpoint

    if args.version < 1:
        raise UsageError("--version must be >= 1")
    try:
        load_checkpoint(args.checkpoint)  # never publish what a replica would refuse
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    blob = args.checkpoint.read_bytes()
    topic = Topics.for_prefix(settings.kafka.topic_prefix).models
    try:
        admin = KafkaAdminClient(**settings.kafka.client_config())
        try:
            ensure_topics(admin, (topic,), 1, settings.service.replication_factor)
        finally:
            admin.close()
        producer = KafkaProducer(
            **settings.kafka.client_config(), acks="all", max_request_size=2 << 20
        )
    except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
        raise UsageError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc
    try:
        digest = publish_model(producer, topic, blob, version=args.version)
    finally:
        producer.close()
    _emit(
        {
            "topic": topic,
            "version": args.version,
            "bytes": len(blob),
            "sha256": digest,
            "chunks": len(chunk_messages(blob, version=args.version)),
        },
        args.json,
    )
    return 0


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from stream_meta import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML settings file")
    common.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override one setting (repeatable), e.g. --set engine.support_size=32",
    )
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = argparse.ArgumentParser(
        prog="stream-meta",
        description="A well-adapted model for every task in a stream, from its first examples.",
    )
    p.add_argument("--version", action="version", version=f"stream-meta {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", parents=[common], help="run the adaptation engine on a stream")
    r.add_argument(
        "--input",
        help="JSON-lines file of events, '-' for stdin, or a recording "
        "directory (--record) (default: the synthetic stream)",
    )
    r.add_argument("--events", type=int, help="stop after N events (default: 20000 synthetic)")
    r.add_argument("--output", help="write predictions as JSON lines ('-' = stdout)")
    r.add_argument("--rejects", help="write rejected events (dead letters) as JSON lines")
    r.add_argument("--family", choices=["sinusoid", "digits"], help="task family (shipped model)")
    r.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    r.add_argument("--metrics-port", type=int, help="Prometheus port on 127.0.0.1 (0 = off)")
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

    sc = sub.add_parser("scenarios", parents=[common], help="list the drift scenarios")
    sc.set_defaults(func=cmd_scenarios)

    t = sub.add_parser("train", parents=[common], help="meta-train a model and save a checkpoint")
    t.add_argument("--family", choices=["sinusoid", "digits"], required=True)
    t.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--batch-tasks", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--device", help="cpu (default) or cuda[:N]")
    t.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0 = one per core)"
    )
    t.add_argument(
        "--eval-tasks", type=int, default=500, help="held-out tasks scored into the manifest"
    )
    t.set_defaults(func=cmd_train)

    tb = sub.add_parser(
        "train-baseline",
        parents=[common],
        help="train a MAML or pre-trained initialisation on the meta-model's training budget",
    )
    tb.add_argument("--family", choices=["sinusoid", "digits"], required=True)
    tb.add_argument("--method", choices=["maml", "pretrained"], required=True)
    tb.add_argument("--out", type=Path, required=True, help="output path (.safetensors)")
    tb.add_argument(
        "--checkpoint",
        type=Path,
        help="the meta-model whose architecture and budget to match (default: shipped)",
    )
    tb.add_argument("--steps", type=int, help="override the budget's steps")
    tb.add_argument(
        "--inner-steps",
        type=int,
        default=10,
        help="MAML inner SGD steps in training (default 10, as served)",
    )
    tb.add_argument(
        "--serve-steps",
        type=int,
        default=10,
        help="SGD steps per adaptation when serving (stored in the manifest)",
    )
    tb.add_argument(
        "--inner-lr",
        type=float,
        help="inner/fine-tuning SGD step size (default 0.01 regression, 0.1 classes)",
    )
    tb.add_argument(
        "--serve-clip",
        type=float,
        default=100.0,
        help="per-task gradient norm cap when serving (a single far-out example "
        "can make 10 uncapped steps diverge; default 100)",
    )
    tb.add_argument("--first-order", action="store_true", help="first-order MAML")
    tb.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    tb.add_argument("--eval-tasks", type=int, default=500, help="held-out tasks scored")
    tb.set_defaults(func=cmd_train_baseline)

    e = sub.add_parser("evaluate", parents=[common], help="few-shot evaluation on held-out tasks")
    e.add_argument("--family", choices=["sinusoid", "digits"], default="sinusoid")
    e.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    e.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 20])
    e.add_argument("--tasks", type=int, default=1000)
    e.add_argument("--queries", type=int, default=100, help="query points per task")
    e.add_argument("--bank-tasks", type=int, default=1000, help="held-out tasks in the index")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-neighbours", action="store_true", help="switch retrieval off")
    e.add_argument("--device", help="cpu (default) or cuda[:N]")
    e.set_defaults(func=cmd_evaluate)
    kafka = argparse.ArgumentParser(add_help=False)
    kafka.add_argument("--bootstrap-servers", help="host:port[,host:port...]")
    kafka.add_argument("--topic-prefix", help="topic name prefix (default stream-meta)")

    sv = sub.add_parser(
        "serve", parents=[common, kafka], help="serve the engine from Kafka (consumer group)"
    )
    sv.add_argument("--group", help="consumer group id (default stream-meta)")
    sv.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    sv.add_argument("--metrics-port", type=int, help="Prometheus port on 127.0.0.1 (0 = off)")
    sv.add_argument("--state-dir", type=Path, help="state checkpoints directory (default: none)")
    sv.add_argument("--events", type=int, help="stop after consuming N events")
    sv.add_argument("--timeout", type=float, help="stop after this many seconds")
    sv.add_argument(
        "--drift-log", help="append drift alarms and meta-updates to this JSON-lines file"
    )
    sv.add_argument("--record", type=Path, help="record the consumed events to this directory")
    sv.add_argument(
        "--record-format",
        choices=["jsonl", "parquet"],
        default="jsonl",
        help="gzipped JSON lines (default, crash-safe) or Parquet (needs pyarrow)",
    )
    sv.set_defaults(func=cmd_serve)

    rp = sub.add_parser(
        "replay", parents=[common], help="re-run a recorded stream under strategies and report"
    )
    rp.add_argument("log", help="a recording directory (--record) or a JSON-lines file of events")
    rp.add_argument(
        "--strategy",
        action="append",
        required=True,
        help="full, no-neighbours, no-meta-update, global, scratch, finetune, maml, "
        "nearest-task, or all (repeatable)",
    )
    rp.add_argument(
        "--baseline-dir",
        type=Path,
        help="directory of <family>-maml/-pretrained.safetensors (default: the shipped ones)",
    )
    rp.add_argument(
        "--batch-size",
        type=int,
        help="events per engine batch (default: engine.micro_batch, as served; larger batches "
        "replay faster, and only the index flushes, hence some neighbours, differ)",
    )
    rp.add_argument(
        "--inner-steps",
        type=int,
        default=10,
        help="SGD steps per adaptation of finetune and maml (default 10)",
    )
    rp.add_argument(
        "--scratch-steps",
        type=int,
        default=100,
        help="Adam steps per adaptation of scratch (default 100)",
    )
    rp.add_argument("--report", required=True, help="directory for report.json and predictions")
    rp.add_argument("--label-delay", type=int, default=0, help="labels arrive N events late")
    rp.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    rp.add_argument("--family", choices=["sinusoid", "digits"], help="shipped model to use")
    rp.set_defaults(func=cmd_replay)

    cp = sub.add_parser(
        "compare", parents=[common], help="compare two replay reports (exit 1 on a regression)"
    )
    cp.add_argument("a", help="the reference report (report.json or its directory)")
    cp.add_argument("b", help="the candidate report")
    cp.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="relative rise of a strategy's prequential loss that counts as a regression",
    )
    cp.set_defaults(func=cmd_compare)

    mu = sub.add_parser(
        "meta-update",
        parents=[common],
        help="ask a running `serve` (or `run`) for a meta-update, through its admin endpoint",
    )
    mu.add_argument("--url", help="admin endpoint (default: http://127.0.0.1:<metrics port>)")
    mu.add_argument("--reason", default="requested by stream-meta meta-update")
    mu.add_argument(
        "--wait", type=float, default=0.0, help="wait up to S seconds for the outcome (0: no)"
    )
    mu.add_argument("--status", action="store_true", help="only print the meta-update status")
    mu.set_defaults(func=cmd_meta_update)

    pr = sub.add_parser(
        "produce", parents=[common, kafka], help="write a synthetic task stream to Kafka"
    )
    pr.add_argument("--events", type=int, default=10_000, help="events to send (0 = until stopped)")
    pr.add_argument("--tasks", type=int, default=1000)
    pr.add_argument("--family", choices=["sinusoid", "digits"], default="sinusoid")
    pr.add_argument("--scenario", help="write a drift scenario (see `stream-meta scenarios`)")
    pr.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pr.add_argument("--bad-fraction", type=float, default=0.0, help="share of invalid events")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument(
        "--run-id", help="prefix of the event ids (default: random, so runs never collide)"
    )
    pr.set_defaults(func=cmd_produce)

    tl = sub.add_parser(
        "tail", parents=[common, kafka], help="print predictions (or dead letters) as JSON lines"
    )
    tl.add_argument("--dead-letter", action="store_true", help="read the dead-letter topic")
    tl.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    tl.add_argument("--max", type=int, help="stop after N records")
    tl.add_argument("--timeout", type=float, help="stop after S seconds without a new record")
    tl.add_argument("--meta", action="store_true", help="wrap each value with partition/offset")
    tl.set_defaults(func=cmd_tail)

    tr = sub.add_parser(
        "trainer",
        parents=[common, kafka],
        help="central meta-updates for all serve replicas, published as model versions",
    )
    tr.add_argument("--group", help="consumer group of the replicas (default stream-meta)")
    tr.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    tr.add_argument("--metrics-port", type=int, help="Prometheus/admin port (0 = off)")
    tr.add_argument("--timeout", type=float, help="stop after this many seconds")
    tr.set_defaults(func=cmd_trainer)

    pm = sub.add_parser(
        "publish-model",
        parents=[common, kafka],
        help="publish a checkpoint as a model version that every serve replica adopts",
    )
    pm.add_argument("--checkpoint", type=Path, required=True, help="the model to publish")
    pm.add_argument(
        "--version",
        type=int,
        required=True,
        help="its version (replicas serve it when it is newer than theirs)",
    )
    pm.set_defaults(func=cmd_publish_model)

    ex = sub.add_parser(
        "export",
        parents=[common, kafka],
        help="copy a Kafka topic (between offsets or times) into a recording for replay",
    )
    ex.add_argument("--out", type=Path, required=True, help="recording directory to write")
    ex.add_argument("--topic", help="topic to export (default: <prefix>.events)")
    ex.add_argument("--from-offset", type=int, help="first offset of every partition")
    ex.add_argument("--to-offset", type=int, help="end offset (exclusive) of every partition")
    ex.add_argument("--since", help="first record time: epoch ms or ISO-8601 (UTC by default)")
    ex.add_argument("--until", help="last record time (inclusive): epoch ms or ISO-8601")
    ex.add_argument(
        "--idle-timeout",
        type=float,
        default=5.0,
        help="a partition is at its end after S seconds without a record (5)",
    )
    ex.add_argument("--max", type=int, help="stop after N events")
    ex.add_argument(
        "--format",
        choices=["jsonl", "parquet"],
        default="jsonl",
        help="gzipped JSON lines (default) or Parquet (needs pyarrow)",
    )
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning. With spinning (the default), torch's
    # and FAISS's thread pools were seen to stall runs by an order of magnitude while other
    # processes kept the 2 cores busy; passive waits cost nothing measurable on an idle
    # machine. Must be set before torch loads; an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    from stream_meta.config import ConfigError
    from stream_meta.model_checkpoint import CheckpointError

    for name in ("events", "tasks", "steps", "batch_tasks", "eval_tasks"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    try:
        return int(args.func(args))
    except (ConfigError, UsageError, CheckpointError, FileNotFoundError) as exc:
        print(f"stream-meta: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
