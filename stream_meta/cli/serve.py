"""The long-running Kafka processes and their admin endpoint: ``stream-meta serve`` (a replica
of the engine in a consumer group), ``stream-meta trainer`` (central meta-updates for every
replica) and ``stream-meta meta-update`` (asks a running process for one)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_meta.cli.common import (
    Options,
    UsageError,
    admin_server,
    close,
    emit,
    kafka_overrides,
    log,
    metrics_server,
    open_recorder,
    serving_engine,
    settings_from,
    stop_on_sigterm,
)

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers


def _process_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings overrides from the options ``serve`` and ``trainer`` share."""
    overrides: dict[str, Any] = {"kafka": kafka_overrides(args)}
    if args.metrics_port is not None:
        overrides["metrics"] = {"port": args.metrics_port}
    if args.admin_port is not None:
        overrides["admin"] = {"port": args.admin_port}
    if args.checkpoint:
        overrides["model"] = {"checkpoint": str(args.checkpoint)}
    return overrides


# -- serve -------------------------------------------------------------------------------------
def add_serve_parser(sub: Subparsers, options: Options) -> None:
    sv = sub.add_parser(
        "serve",
        parents=[options.common, options.kafka],
        help="serve the engine from Kafka (consumer group)",
    )
    sv.add_argument("--group", help="consumer group id (default stream-meta)")
    sv.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    sv.add_argument("--metrics-port", type=int, help="Prometheus port on 127.0.0.1 (0 = off)")
    sv.add_argument(
        "--admin-port", type=int, help="admin port on 127.0.0.1 (meta-update requests; 0 = off)"
    )
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


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = _process_overrides(args)
    if args.state_dir:
        overrides["service"] = {"state_dir": str(args.state_dir)}
    settings = settings_from(args, overrides)

    from stream_meta.app import build_decider, build_drift_watch, build_meta_updater
    from stream_meta.kafka.clients import ServiceError
    from stream_meta.kafka.service import KafkaService, state_dir_ok
    from stream_meta.metrics import ServiceMetrics
    from stream_meta.state_checkpoint import StateError

    engine, manifest, registry, metrics = serving_engine(settings)
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
        recorder = open_recorder(args.record, args.record_format)
        recorder.model_change(engine.model_version, index=0, outcome="start")
    service = KafkaService(
        engine,
        settings,
        ServiceMetrics(registry),
        watch=watch,
        updater=updater,
        recorder=recorder,
        decider=build_decider(settings, engine),
    )
    server = metrics_server(settings, registry, health=service.health, ready=service.ready)
    admin = admin_server(settings, registry, None if updater is None else updater.routes())
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
        close(admin, server, updater, watch, recorder)
    emit(summary, args.json)
    return 0


# -- trainer -----------------------------------------------------------------------------------
def add_trainer_parser(sub: Subparsers, options: Options) -> None:
    tr = sub.add_parser(
        "trainer",
        parents=[options.common, options.kafka],
        help="central meta-updates for all serve replicas, published as model versions",
    )
    tr.add_argument("--group", help="consumer group of the replicas (default stream-meta)")
    tr.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    tr.add_argument("--metrics-port", type=int, help="Prometheus port (0 = off)")
    tr.add_argument(
        "--admin-port", type=int, help="admin port on 127.0.0.1 (meta-update requests; 0 = off)"
    )
    tr.add_argument("--timeout", type=float, help="stop after this many seconds")
    tr.set_defaults(func=cmd_trainer)


def cmd_trainer(args: argparse.Namespace) -> int:
    """The trainer service: one active trainer publishes meta-updates for every replica."""
    settings = settings_from(args, _process_overrides(args))

    from stream_meta.app import build_drift_watch, build_meta_updater
    from stream_meta.kafka.clients import ServiceError
    from stream_meta.kafka.trainer import TrainerService

    if not settings.meta_update.enabled:
        raise UsageError("the trainer runs meta-updates: meta_update.enabled must be true")
    engine, manifest, registry, metrics = serving_engine(settings)
    watch = build_drift_watch(settings, engine, metrics, None)
    updater = build_meta_updater(
        settings, engine, metrics, watch, manifest["family"], worker="process"
    )
    trainer = TrainerService(engine, settings, metrics, watch=watch, updater=updater)
    server = metrics_server(settings, registry, health=trainer.health, ready=trainer.ready)
    admin = admin_server(settings, registry, None if updater is None else updater.routes())
    stop = stop_on_sigterm()

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
        close(admin, server, updater, watch)
    emit(summary, args.json)
    return 0


# -- meta-update -------------------------------------------------------------------------------
def add_meta_update_parser(sub: Subparsers, options: Options) -> None:
    mu = sub.add_parser(
        "meta-update",
        parents=[options.common],
        help="ask a running `serve` (or `run`) for a meta-update, through its admin endpoint",
    )
    mu.add_argument("--url", help="admin endpoint (default: http://127.0.0.1:<admin.port>)")
    mu.add_argument(
        "--token-file",
        type=Path,
        help="file holding the admin bearer token (default: admin.token_file, or "
        "STREAM_META_ADMIN__TOKEN)",
    )
    mu.add_argument("--reason", default="requested by stream-meta meta-update")
    mu.add_argument(
        "--wait", type=float, default=0.0, help="wait up to S seconds for the outcome (0: no)"
    )
    mu.add_argument("--status", action="store_true", help="only print the meta-update status")
    mu.set_defaults(func=cmd_meta_update)


def cmd_meta_update(args: argparse.Namespace) -> int:
    """POST /meta-update to a running process's admin port; with --wait, poll /meta-updates
    for the outcome. The bearer token (--token-file, else the ``[admin]`` settings) is sent
    when there is one."""
    # --token-file wins over admin.token (STREAM_META_ADMIN__TOKEN) and admin.token_file
    overrides = (
        {"admin": {"token_file": str(args.token_file), "token": None}} if args.token_file else {}
    )
    settings = settings_from(args, overrides)
    if not args.url and not settings.admin.port:
        raise UsageError("admin.port is 0 (off): give the endpoint with --url")
    base = (args.url or f"http://127.0.0.1:{settings.admin.port}").rstrip("/")
    try:
        token = settings.admin.read_token()
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return _admin_call(base, method, path, body, token=token)

    if args.status:
        emit(call("GET", "/meta-updates"), True)
        return 0
    before = call("POST", "/meta-update", {"reason": args.reason})
    log.info("meta-update requested from %s (serving version %s)", base, before["model_version"])
    if args.wait <= 0:
        emit(before, args.json)
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(0.5)
        status = call("GET", "/meta-updates")
        fresh = status["total_records"] - before["records"]
        if fresh > 0:  # the outcome of this request (or of the update it joined)
            outcome = status["records"][-min(fresh, len(status["records"]))]
            emit(outcome, args.json)
            return 0 if outcome["outcome"] in ("promoted", "rejected") else 1
    print(f"stream-meta: error: no outcome within {args.wait:g} s", file=sys.stderr)
    return 1


def _admin_call(
    base: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
) -> Any:
    """One JSON request to the admin endpoint at ``base`` (with ``Authorization: Bearer
    <token>`` when given); its errors as ``UsageError``."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UsageError(
                f"{base} wants an admin token: give --token-file (or admin.token_file, "
                "STREAM_META_ADMIN__TOKEN)"
            ) from None
        if exc.code == 403:
            raise UsageError(f"{base} refused the admin token (a different one?)") from None
        if exc.code == 405:
            raise UsageError(
                f"{base} is read-only (the metrics port?): meta-update requests go to the "
                "admin port (admin.port, --url)"
            ) from None
        if exc.code == 404:
            raise UsageError(
                f"{base} has no meta-updater (meta_update.enabled is off, or is it the "
                "metrics port? requests go to the admin port)"
            ) from exc
        raise UsageError(f"{base}{path}: HTTP {exc.code}: {exc.read().decode()[:200]}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(
            f"cannot reach {base} ({exc}); is `stream-meta serve` running "
            "with its admin port there? (--url)"
        ) from exc
