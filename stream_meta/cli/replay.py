"""``stream-meta replay`` (a recorded stream under strategies, with a report) and
``stream-meta compare`` (two reports; exit 1 on a regression)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_meta.cli.common import (
    Options,
    UsageError,
    emit,
    load_model,
    log,
    settings_from,
)

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers


# -- replay ------------------------------------------------------------------------------------
def add_replay_parser(sub: Subparsers, options: Options) -> None:
    rp = sub.add_parser(
        "replay",
        parents=[options.common],
        help="re-run a recorded stream under strategies and report",
    )
    rp.add_argument("log", help="a recording directory (--record) or a JSON-lines file of events")
    rp.add_argument(
        "--strategy",
        action="append",
        help="full, no-neighbours, no-meta-update, global, scratch, finetune, maml, "
        "nearest-task, or all (repeatable); with --off-policy: meta-ts, per-task-ts, random "
        "(default: all three)",
    )
    rp.add_argument(
        "--off-policy",
        action="store_true",
        help="the log's logged decisions (decision events with 'logged': action_id, "
        "propensity, reward): estimate each target policy's average reward by inverse "
        "propensity scoring and doubly robust (default model: the shipped bandit one)",
    )
    rp.add_argument(
        "--draws",
        type=int,
        default=256,
        help="--off-policy: posterior draws a Thompson-sampling target's probabilities are "
        "estimated from (default 256)",
    )
    rp.add_argument(
        "--noise-std",
        type=float,
        default=1.0,
        help="--off-policy: the reward noise std per-task-ts assumes (default 1)",
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
    rp.add_argument(
        "--label-budget",
        type=float,
        metavar="F",
        help="teach only the labels a label policy requests, at most this share of the labelled "
        "events (every label still scores); each strategy is replayed once per --label-policy",
    )
    rp.add_argument(
        "--label-policy",
        action="append",
        choices=["uncertainty", "random", "first-k"],
        help="which labels to request under --label-budget (repeatable; default: all three)",
    )
    rp.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    rp.add_argument("--family", choices=["sinusoid", "digits"], help="shipped model to use")
    rp.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-run a recorded stream under one or more strategies; write predictions and a report."""
    if args.off_policy:
        return cmd_off_policy(args)
    if not args.strategy:
        raise UsageError("replay needs --strategy (or --off-policy for logged decisions)")
    overrides: dict[str, Any] = {"metrics": {"port": 0}}
    if args.family:
        overrides.setdefault("model", {})["family"] = args.family
    if args.checkpoint:
        overrides.setdefault("model", {})["checkpoint"] = str(args.checkpoint)
    settings = settings_from(args, overrides)
    import torch

    from stream_meta.evaluation.replay import ReplayConfig
    from stream_meta.evaluation.strategies import StrategyOptions

    names = _strategy_names(args, settings)
    from stream_meta.evaluation.strategies import NO_LEARNING

    if args.label_budget is not None and (frozen := [n for n in names if n in NO_LEARNING]):
        raise UsageError(f"--label-budget: {', '.join(frozen)} learn no label")
    if args.label_delay < 0:
        raise UsageError("--label-delay must be >= 0")
    if args.inner_steps < 0 or args.scratch_steps < 0:
        raise UsageError("--inner-steps and --scratch-steps must be >= 0")
    options = StrategyOptions(
        baseline_dir=args.baseline_dir,
        inner_steps=args.inner_steps,
        scratch_steps=args.scratch_steps,
    )
    model, manifest = load_model(settings.model.checkpoint, settings.model.family)
    _check_baselines(names, model, manifest["family"], options)
    log_path = Path(args.log)
    raws = _recorded(log_path)
    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    policies = _label_policies(args)
    config = ReplayConfig(
        label_delay=args.label_delay, batch_size=args.batch_size or settings.engine.micro_batch
    )
    from stream_meta.evaluation.families import build_probes, parse_events

    parsed = parse_events(raws)
    _check_dimension(parsed, model.config.x_dim, manifest["path"])
    probes = build_probes(parsed, model.config.kind, window=config.window)
    if policies:
        results = {}
        for policy in policies:
            budgeted = replace(config, label_budget=args.label_budget, label_policy=policy)
            runs = _replay_all(
                names,
                raws,
                log_path,
                settings,
                budgeted,
                report_dir,
                f"@{policy}",
                options=options,
                probes=probes,
            )
            results.update({f"{name}@{policy}": r for name, r in runs.items()})
    else:
        results = _replay_all(
            names, raws, log_path, settings, config, report_dir, options=options, probes=probes
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
    if policies:
        report["label_budget"] = args.label_budget
    _write_report(report, report_dir, args.json)
    return 0


def _check_dimension(events: list[Any], x_dim: int, checkpoint: str) -> None:
    """A log whose events all have another input dimension than the model's is the wrong
    model (or the wrong log): say so instead of rejecting every event."""
    dims = {len(e["x"]) for e in events if e is not None and isinstance(e.get("x"), list)}
    if dims and x_dim not in dims:
        raise UsageError(
            f"the log's events have {', '.join(map(str, sorted(dims)))} inputs, the model "
            f"{checkpoint} takes {x_dim}: pass the model trained for this log (--checkpoint, "
            "or --family digits for a digits log)"
        )


def _label_policies(args: argparse.Namespace) -> list[str]:
    """The label policies to replay (none without ``--label-budget``), the budget checked."""
    if args.label_budget is None:
        if args.label_policy:
            raise UsageError("--label-policy needs --label-budget")
        return []
    if not 0.0 < args.label_budget <= 1.0:
        raise UsageError(f"--label-budget must be in (0, 1], got {args.label_budget}")
    if args.label_delay:
        raise UsageError("--label-budget and --label-delay cannot be combined")
    return list(dict.fromkeys(args.label_policy or ["uncertainty", "random", "first-k"]))


def cmd_off_policy(args: argparse.Namespace) -> int:
    """``replay --off-policy``: IPS and DR estimates of each target policy's average reward on
    the log's logged decisions (:mod:`stream_meta.evaluation.offpolicy`); ``report.json``."""
    overrides: dict[str, Any] = {"metrics": {"port": 0}}
    if args.checkpoint:
        overrides["model"] = {"checkpoint": str(args.checkpoint)}
    settings = settings_from(args, overrides)
    checkpoint = settings.model.checkpoint
    # the shipped bandit model unless a model is named (model.family knows no bandit)
    family = args.family or ("bandit" if checkpoint is None else settings.model.family)
    import torch

    from stream_meta.app import build_engine
    from stream_meta.evaluation.offpolicy import (
        OFF_POLICY_STRATEGIES,
        LinearTSTarget,
        MetaTSTarget,
        UniformTarget,
        evaluate_off_policy,
        logged_decisions,
        logged_value,
    )

    names = list(dict.fromkeys(args.strategy or OFF_POLICY_STRATEGIES))
    for name in names:
        if name not in OFF_POLICY_STRATEGIES:
            raise UsageError(
                f"--off-policy: unknown target {name!r}; known: {', '.join(OFF_POLICY_STRATEGIES)}"
            )
    if args.label_delay:
        raise UsageError("--label-delay does not apply to --off-policy (rewards are logged)")
    if args.label_budget is not None or args.label_policy:
        raise UsageError("--label-budget does not apply to --off-policy (rewards are logged)")
    if args.draws < 1 or not args.noise_std > 0:
        raise UsageError("--draws must be >= 1 and --noise-std > 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    log_path = Path(args.log)
    try:
        decisions = logged_decisions(_recorded(log_path))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{log_path}: {exc}") from exc
    if not decisions:
        raise UsageError(f"{log_path} holds no logged decisions (decision events with 'logged')")
    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    manifest: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for name in names:
        target: Any
        if name == "meta-ts":
            model, manifest = load_model(checkpoint, family)
            if model.config.kind != "regression" or model.config.x_dim != decisions[0].x.shape[1]:
                raise UsageError(
                    f"model {manifest['path']} ({model.config.kind}, {model.config.x_dim} "
                    f"features) cannot value actions of {decisions[0].x.shape[1]} features"
                )
            target = MetaTSTarget(build_engine(model, settings), draws=args.draws)
        elif name == "per-task-ts":
            target = LinearTSTarget(noise_std=args.noise_std, draws=args.draws)
        else:
            target = UniformTarget()
        log.info("off-policy: %s on %d logged decisions of %s", name, len(decisions), log_path)
        results[name] = evaluate_off_policy(target, decisions, batch_size=args.batch_size or 256)
    lp = logged_value(decisions)
    report = {
        "log": str(log_path),
        "decisions": len(decisions),
        "tasks": len({d.task_id for d in decisions}),
        "logged_policy": lp,
        "checkpoint": manifest.get("path"),
        "off_policy": results,
    }
    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        emit(report, True)
        return 0
    print(f"{'logged policy':<16} average reward {lp['value']:.4g} +- {lp['se']:.2g}")
    for name, r in results.items():
        truth = r.get("truth")
        print(
            f"{name:<16} IPS {r['ips']['value']:.4g} +- {r['ips']['se']:.2g}  "
            f"DR {r['dr']['value']:.4g} +- {r['dr']['se']:.2g}"
            + ("" if truth is None else f"  truth {truth:.4g}")
        )
    print(f"report: {report_dir / 'report.json'}")
    return 0


def _strategy_names(args: argparse.Namespace, settings: Any) -> list[str]:
    """``--strategy`` (repeatable; ``all``: every strategy) as a list, each name checked."""
    from stream_meta.evaluation.strategies import STRATEGIES, strategy_settings

    names = list(STRATEGIES) if "all" in args.strategy else list(dict.fromkeys(args.strategy))
    for name in names:
        try:
            strategy_settings(settings, name)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return names


def _check_baselines(names: list[str], model: Any, family: str, options: Any) -> None:
    """A missing or unfit baseline initialisation fails before any replay."""
    from stream_meta.evaluation.strategies import load_gradient_init
    from stream_meta.model_checkpoint import CheckpointError

    for name in names:
        if name in ("scratch", "finetune", "maml"):
            try:
                load_gradient_init(name, model, family, options)
            except (CheckpointError, ValueError) as exc:
                raise UsageError(f"strategy {name}: {exc}") from exc


def _recorded(log_path: Path) -> list[Any]:
    """The raw events of a recording directory or a JSON-lines file."""
    from stream_meta.recording import is_recording, recorded_events
    from stream_meta.sources import jsonl_source

    if not (is_recording(log_path) or log_path.is_file()):
        raise UsageError(f"{log_path} is neither a recording directory nor a JSON-lines file")
    source = recorded_events(log_path) if is_recording(log_path) else jsonl_source(log_path)
    return [raw for raw, _ in source]


def _replay_all(
    names: list[str],
    raws: list[Any],
    log_path: Path,
    settings: Any,
    config: Any,
    report_dir: Path,
    tag: str = "",
    **strategy_kwargs: Any,
) -> dict[str, Any]:
    """Replay ``raws`` under each strategy; the results by strategy (``predictions-<name><tag>
    .jsonl`` each)."""
    from stream_meta.evaluation.replay import replay_strategy

    results = {}
    for name in names:
        # a fresh copy of the model per strategy: meta-updates must not leak between them
        model, manifest = load_model(settings.model.checkpoint, settings.model.family)
        log.info("replaying %d events of %s with strategy %s", len(raws), log_path, name)
        results[name] = replay_strategy(
            name,
            raws,
            model,
            settings,
            config,
            report_dir / f"predictions-{name}{tag}.jsonl",
            family=manifest["family"],
            **strategy_kwargs,
        )
    return results


def _write_report(report: dict[str, Any], report_dir: Path, as_json: bool) -> None:
    """``report.json`` and ``report.html`` in ``report_dir``; print the report (``--json``) or
    a line per strategy."""
    from stream_meta.evaluation.report import write_html

    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_html(report, report_dir / "report.html")
    if as_json:
        emit(report, True)
        return
    for name, r in report["strategies"].items():
        loss = r["prequential_loss"]
        cover, cal = r.get("coverage_90"), r.get("calibration_error")
        print(
            f"{name:<16} prequential loss {'-' if loss is None else f'{loss:.4g}'}  "
            f"90% coverage {'-' if cover is None else f'{cover:.3f}'}  "
            f"calibration error {'-' if cal is None else f'{cal:.3f}'}  "
            f"{r['events_per_s']:>9,.0f} events/s  model v{r['model_version']}  "
            f"sha256 {r['predictions_sha256'][:12]}"
        )
    print(f"report: {report_dir / 'report.json'}, {report_dir / 'report.html'}")


# -- compare -----------------------------------------------------------------------------------
def add_compare_parser(sub: Subparsers, options: Options) -> None:
    cp = sub.add_parser(
        "compare",
        parents=[options.common],
        help="compare two replay reports (exit 1 on a regression)",
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
