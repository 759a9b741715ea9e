"""What several commands share: the common option groups, settings, logging, output, and the
CLI-only pieces a command builds its run from (model, engine, metrics endpoint, recorder,
progress bar, SIGTERM)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

#: every command logs as ``stream_meta`` (the name its log lines show)
log = logging.getLogger("stream_meta")

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed as one message, exit code 2."""


# -- options -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """The option groups several commands share, as parent parsers (``parents=[...]``)."""

    common: argparse.ArgumentParser
    kafka: argparse.ArgumentParser


#: how a command module registers one command: ``add(subparsers, options)``
AddParser: TypeAlias = Callable[["Subparsers", Options], None]


def shared_options() -> Options:
    """``--config``, ``--set``, ``--log-level``, ``-q``, ``--json`` (every command) and the
    Kafka connection (the commands that talk to Kafka)."""
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
    kafka = argparse.ArgumentParser(add_help=False)
    kafka.add_argument("--bootstrap-servers", help="host:port[,host:port...]")
    kafka.add_argument("--topic-prefix", help="topic name prefix (default stream-meta)")
    return Options(common=common, kafka=kafka)


def configure_logging(level: str) -> None:
    """Log to stderr at ``--log-level``; quiet FAISS's loader and kafka-python."""
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


# -- settings ----------------------------------------------------------------------------------
def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set engine.k_neighbours=0`` items -> a nested overrides dict (values as TOML).

    >>> parse_set(["engine.k_neighbours=0", "model.family=digits", "kafka.group_id=g1"])
    {'engine': {'k_neighbours': 0}, 'model': {'family': 'digits'}, 'kafka': {'group_id': 'g1'}}
    """
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


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, nested dicts merged.

    >>> merge({"engine": {"k_neighbours": 0, "threads": 1}}, {"engine": {"threads": 2}})
    {'engine': {'k_neighbours': 0, 'threads': 2}}
    """
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def settings_from(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The settings: ``--config``, the environment, then ``overrides`` under ``--set``."""
    from stream_meta.config import load_settings

    return load_settings(
        args.config,
        env=os.environ,
        overrides=merge(parse_set(args.set or []), overrides),
    )


def kafka_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``kafka`` settings given as options (``--bootstrap-servers``, ``--group``, ...)."""
    names = {
        "bootstrap_servers": "bootstrap_servers",
        "group": "group_id",
        "topic_prefix": "topic_prefix",
    }
    return {v: getattr(args, k) for k, v in names.items() if getattr(args, k, None) is not None}


# -- output ------------------------------------------------------------------------------------
def emit(summary: dict[str, Any], as_json: bool) -> None:
    """Print a result: one JSON object, or one aligned line per key."""
    if as_json:
        print(json.dumps(summary, sort_keys=False))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
            print(f"{key:<{width}}  {inner}")
        else:
            print(f"{key:<{width}}  {fmt(value)}")


def fmt(v: Any) -> str:
    """One value as a human reads it.

    >>> fmt(12345.6), fmt(0.012345), fmt(20000), fmt(True), fmt([{"a": 1}])
    ('12,346', '0.01235', '20,000', 'True', '1 records (--json shows them)')
    """
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return f"{len(v)} records (--json shows them)"  # windows, alarms, meta-updates
    return str(v)


# -- what a command builds ---------------------------------------------------------------------
def load_model(checkpoint: Path | None, family: str, device: str = "cpu") -> tuple[Any, dict]:
    """The model at ``checkpoint`` (default: the shipped one of ``family``) and its manifest,
    with the path it was read from as ``manifest["path"]``."""
    from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint

    path = checkpoint if checkpoint is not None else shipped_checkpoint(family)
    model, manifest = load_checkpoint(path, device=device)
    manifest["path"] = str(path)
    return model, manifest


def add_family_arg_option(parser: argparse.ArgumentParser) -> None:
    """``--family-arg KEY=VALUE`` (repeatable): one constructor argument of the family."""
    parser.add_argument(
        "--family-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one argument of the family's constructor (repeatable), e.g. "
        "--family-arg archetypes=16 --family-arg spread=0.6 (see docs/BANDITS.md)",
    )


#: family constructor arguments the CLI sets itself (not a --family-arg)
_CLI_FAMILY_ARGS = frozenset({"split"})


def parse_family_args(name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """``--family-arg KEY=VALUE`` pairs -> the constructor kwargs of family ``name``, each
    value converted to the type of that argument's default; an unknown key, a repeated key or
    a value of the wrong type is a :class:`UsageError`. (The family's own checks, e.g. a
    negative spread, are applied by :func:`family_for`.)

    >>> parse_family_args("bandit", ["archetypes=16", "spread=0.6"])
    {'archetypes': 16, 'spread': 0.6}
    """
    import inspect

    from stream_meta.tasks import FAMILIES, get_family_class

    if name not in FAMILIES:
        raise UsageError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}")
    params = {
        p.name: p
        for p in inspect.signature(get_family_class(name)).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.name not in _CLI_FAMILY_ARGS
        and p.default is not p.empty
    }
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or not key or not text:
            raise UsageError(f"--family-arg {pair!r}: expected KEY=VALUE")
        if key not in params:
            known = ", ".join(params) or "none"
            raise UsageError(
                f"--family-arg {pair!r}: family {name} has no argument {key!r}; known: {known}"
            )
        if key in out:
            raise UsageError(f"--family-arg {key} given twice")
        default = params[key].default
        kind = type(default)
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value: Any = text.lower() in ("true", "1")
            elif kind in (int, float, str):
                value = kind(text)
            else:
                raise UsageError(f"--family-arg {key}: not settable from the command line")
        except ValueError:
            raise UsageError(
                f"--family-arg {pair!r}: {key} must be a{'n' if kind is int else ''} "
                f"{kind.__name__}, got {text!r}"
            ) from None
        out[key] = value
    return out


def family_for(name: str, *, split: str, args: dict[str, Any] | None = None) -> Any:
    """The task family ``name`` (digits: its ``train`` or ``test`` split) with constructor
    ``args`` (from :func:`parse_family_args`); a value the family refuses is a
    :class:`UsageError`."""
    from stream_meta.tasks import get_family

    kwargs = dict(args or {})
    if name == "digits":
        kwargs["split"] = split
    try:
        return get_family(name, **kwargs)
    except ValueError as e:
        if not args:
            raise
        raise UsageError(f"--family-arg: {e}") from None


def check_device(name: str) -> str:
    """``--device``, refused when it names CUDA on a machine without it."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return name


def new_registry() -> Any:
    """A fresh Prometheus registry (without the ``*_created`` series, which add nothing)."""
    from prometheus_client import CollectorRegistry, disable_created_metrics

    disable_created_metrics()
    return CollectorRegistry()


def serving_engine(settings: Any) -> tuple[Any, dict[str, Any], Any, Any]:
    """The engine a process (``run``, ``serve``, ``trainer``) serves with, its threads set:
    ``(engine, checkpoint manifest, metrics registry, engine metrics)``."""
    import faiss
    import torch

    from stream_meta.app import build_engine
    from stream_meta.metrics import EngineMetrics

    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    # one batched search per micro-batch is small: OpenMP regions only add wake-up stalls
    faiss.omp_set_num_threads(1)
    model, manifest = load_model(settings.model.checkpoint, settings.model.family)
    registry = new_registry()
    metrics = EngineMetrics(registry)
    metrics.set_build_info(family=manifest["family"])
    engine = build_engine(
        model, settings, metrics=metrics, model_version=int(manifest.get("model_version", 1))
    )
    return engine, manifest, registry, metrics


def metrics_server(settings: Any, registry: Any, **probes: Any) -> Any:
    """The read-only scrape port: ``/metrics``, ``/healthz`` and ``/readyz`` on
    ``[metrics]`` host:port (None if port 0). Control routes go to :func:`admin_server`."""
    if not settings.metrics.port:
        return None
    from stream_meta.http_server import MetricsServer

    host, port = settings.metrics.host, settings.metrics.port
    try:
        server = MetricsServer(registry, host=host, port=port, **probes)
    except OSError as exc:
        raise UsageError(
            f"cannot serve metrics on {host}:{port}: {exc} "
            "(choose another with --metrics-port, or 0 to turn it off)"
        ) from exc
    log.info("metrics on http://%s:%d/metrics (/healthz, /readyz)", host, port)
    return server


def admin_server(settings: Any, registry: Any, routes: Any) -> Any:
    """The admin port with ``routes`` (e.g. ``POST /meta-update``) on ``[admin]`` host:port;
    None when there are no routes or the port is 0.

    The token (``admin.token_file`` or ``admin.token``) is read here, once: a missing or empty
    file is a :class:`UsageError`, and so is a host beyond loopback without a token (the
    settings refuse it already). Requests are counted in ``stream_meta_admin_requests_total``
    on ``registry``.
    """
    admin = settings.admin
    if not routes or not admin.port:
        return None
    from stream_meta.config import is_loopback
    from stream_meta.http_server import AdminServer
    from stream_meta.metrics import AdminMetrics

    try:
        token = admin.read_token()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if token is None and not is_loopback(admin.host):  # the settings refuse it already
        raise UsageError(f"admin.host {admin.host} is beyond loopback: it needs a token")
    host, port = admin.host, admin.port
    try:
        server = AdminServer(
            routes, host=host, port=port, token=token, metrics=AdminMetrics(registry)
        )
    except OSError as exc:
        raise UsageError(
            f"cannot serve the admin port on {host}:{port}: {exc} "
            "(choose another with --admin-port, or 0 to turn it off)"
        ) from exc
    log.info(
        "admin on http://%s:%d (%s; %s)",
        host,
        port,
        ", ".join(f"{m} {p}" for m, p in sorted(routes)),
        "bearer token required" if token else "no token: loopback only",
    )
    return server


def open_recorder(path: Path, file_format: str) -> Any:
    """An ``EventRecorder`` writing ``path`` (``--record``, ``export --out``)."""
    from stream_meta.recording import EventRecorder

    try:
        return EventRecorder(path, format=file_format)
    except RuntimeError as exc:  # Parquet without pyarrow
        raise UsageError(str(exc)) from exc


def progress_bar(args: argparse.Namespace, total: int | None, desc: str) -> Any:
    """A progress bar on a terminal, else None (logs report progress instead)."""
    if args.quiet or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, desc=desc, dynamic_ncols=True)


def stop_on_sigterm() -> Any:
    """An event set by SIGTERM (SIGINT stays KeyboardInterrupt)."""
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def close(*resources: Any) -> None:
    """Close what was opened (None: never opened), in order."""
    for resource in resources:
        if resource is not None:
            resource.close()
