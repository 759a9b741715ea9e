"""A user's own tasks: ``stream-meta schema LOG`` (infer and print a schema), and the ``--data``
forms of ``train``, ``train-baseline`` and ``evaluate`` (meta-train on a recorded stream; train
the MAML and pre-trained initialisations on the same training tasks; evaluate against the
baselines a statistician fits first and the replay strategies)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_meta.cli.common import Options, UsageError, emit, load_model, log

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers


# -- schema ------------------------------------------------------------------------------------
def add_schema_parser(sub: Subparsers, options: Options) -> None:
    s = sub.add_parser(
        "schema",
        parents=[options.common],
        help="infer the task schema of a log and print it (TOML) with the log's counts",
    )
    s.add_argument("log", type=Path, help="JSON lines (.jsonl[.gz]), a recording dir, Parquet")
    s.add_argument("--max-events", type=int, help="read at most this many events")
    s.set_defaults(func=cmd_schema)


def cmd_schema(args: argparse.Namespace) -> int:
    from stream_meta.tasklog import infer_schema

    schema, summary = _checked(lambda: infer_schema(args.log, max_events=args.max_events))
    if args.json:
        print(json.dumps({"schema": schema.to_dict(), **summary.to_dict()}))
        return 0
    print(schema.to_toml())
    for key, value in summary.to_dict().items():
        print(f"# {key}: {json.dumps(value)}")
    return 0


def _checked(fn: Any) -> Any:
    """Run ``fn``; a schema or data problem becomes one usage message (exit 2)."""
    from stream_meta.schema import SchemaError

    try:
        return fn()
    except SchemaError as exc:
        raise UsageError(str(exc)) from None


def open_table(
    log_path: Path,
    schema_file: Path | None,
    seed: int,
    skip_invalid: bool,
    known: dict[str, Any] | None = None,
    progress: bool = False,
) -> Any:
    """The log's tasks, read with the schema of ``--schema``, else ``known`` (a checkpoint's),
    else the one inferred from the log; with a line about them (``progress``: a bar)."""
    from stream_meta.schema import TaskSchema, load_schema
    from stream_meta.tasklog import infer_schema, read_tasks

    def read() -> Any:
        if schema_file is not None:
            schema = load_schema(schema_file)
        elif known is not None:
            schema = TaskSchema(**known)
        else:
            schema, _ = infer_schema(log_path)
            log.info("inferred schema: %s", schema.to_dict())
        return read_tasks(log_path, schema, seed=seed, skip_invalid=skip_invalid, progress=progress)

    table = _checked(read)
    log.info(
        "%s: %d labelled events of %d tasks (%s train / %s validation / %s test)",
        log_path,
        table.summary.labelled,
        table.n_tasks,
        *(len(table.tasks_in(s)) for s in ("train", "validation", "test")),
    )
    return table


# -- train --data --------------------------------------------------------------------------------
def train_from_log(args: argparse.Namespace) -> int:
    """``train --data LOG``: meta-train on the log's training tasks, evaluate on its test tasks,
    write the checkpoint with its manifest."""
    import torch

    from stream_meta.evaluation.prequential import evaluate_table
    from stream_meta.log_training import LogTrainConfig, train_on_log
    from stream_meta.model_checkpoint import save_checkpoint
    from stream_meta.tasklog import fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    seed = args.seed if args.seed is not None else 0
    overrides: dict[str, Any] = {"seed": seed}
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    if args.time_ordered:
        overrides["time_ordered"] = True
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.batch_tasks is not None:
        overrides["batch_tasks"] = args.batch_tasks
    if args.model_size is not None:
        overrides["model_size"] = args.model_size
    config = LogTrainConfig(**overrides)
    bar = not args.quiet and sys.stderr.isatty()
    with open_table(args.data, args.schema, seed, args.skip_invalid, progress=bar) as table:
        try:
            model, report = train_on_log(table, config, progress=not args.quiet)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        metrics: dict[str, Any] = {"train": report["train"]}
        if report.get("calibration"):
            metrics["calibration"] = report["calibration"]
        if len(table.tasks_in("test")):
            log.info("prequential evaluation on the %d test tasks", len(table.tasks_in("test")))
            metrics["test"] = evaluate_table(model, table, "test")
        manifest = save_checkpoint(
            args.out,
            model,
            family=args.name or _name_of(args.data),
            training={**report["settings"], "model_size": report["model_size"]},
            metrics=metrics,
            extra={
                "schema": table.schema.to_dict(),
                "scaling": model.scaling.to_dict(),
                "data": {
                    "path": str(args.data),
                    "fingerprint": fingerprint(args.data),
                    "split_seed": seed,
                    "splits": report["splits"],
                    "summary": table.summary.to_dict(),
                },
                "validation": {
                    "best_step": report["train"].get("best_step"),
                    "loss": report["train"].get("best_validation_loss"),
                    "pooled_loss": report.get("validation_pooled_loss"),
                    "checks": report["validation_checks"],
                },
            },
        )
    summary: dict[str, Any] = {
        "out": str(args.out),
        "family": manifest["family"],
        "model_size": report["model_size"],
        "splits": {k: v["tasks"] for k, v in report["splits"].items()},
        "train": report["train"],
    }
    if "test" in metrics:
        summary["test"] = _headline(metrics["test"])
    emit(summary, args.json)
    return 0


def _name_of(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return name or "custom"


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers a user looks at first: our loss, the best baseline's, the ratios."""
    ours = report["strategies"]["stream-meta"]
    best = report["best_baseline"]
    out = {
        "tasks": report["tasks"],
        "events": report["events"],
        report["metric"]: ours["loss"],
        "best_baseline": best,
        f"best_baseline_{report['metric']}": report["strategies"][best]["loss"],
        "ratio_to_best_baseline": report["ratio_to_best_baseline"],
        "ratio_0shot_to_pooled": report["ratio_0shot_to_pooled"],
    }
    if "accuracy" in ours:
        out["accuracy"] = ours["accuracy"]
    return out


# -- train-baseline --data ---------------------------------------------------------------------
def train_baseline_from_log(args: argparse.Namespace) -> int:
    """``train-baseline --data LOG --checkpoint CKPT --method maml|pretrained --out FILE``.

    The initialisation of a gradient baseline for the model of ``CKPT`` (trained by
    ``train --data`` on ``LOG``), trained as the meta-model was:

    * on the *training* tasks of the log read with the checkpoint's schema and split seed,
      with the very episodes the meta-model was trained on
      (:func:`~stream_meta.log_training.training_episodes` with the checkpoint's training
      settings: same ``max_shots``, queries, tasks per step, learning rate, schedule, seed);
    * for the steps the meta-model's training ran (its manifest's ``metrics.train.steps``,
      early stopping's patience included; ``training.max_steps`` where absent; ``--steps``
      overrides), keeping the best of checks every ``validate_every`` steps on the fixed
      episodes of the *validation* tasks the meta-model was checked on;
    * in the model's units: inputs standardised and regression targets the residuals over the
      checkpoint's pooled linear fit (classification: logits over its pooled logistic model),
      so MAML and fine-tuning start from the population's fit as the meta-model does. The
      scaling is saved with the initialisation and applied when it serves.

    Fine-tuning's serving step size (``pretrained`` without ``--inner-lr``) is tuned on the
    fixed episodes of the *validation* tasks, not on the training tasks the family baselines
    use: pre-training has fitted every point of the training tasks, so they would flatter a
    small step. The test tasks are never looked at.
    """
    import dataclasses

    import torch

    from stream_meta.evaluation.baselines import (
        DEFAULT_INNER_LR,
        GradientInit,
        InnerLoop,
        save_init,
        target_for,
        train_init,
        tune_lr_on,
    )
    from stream_meta.log_training import LogTrainConfig, training_episodes, validation_episodes
    from stream_meta.tasklog import fingerprint
    from stream_meta.tasks.logged import describe

    if args.checkpoint is None:
        raise UsageError(
            "train-baseline --data needs --checkpoint (the model train --data trained on LOG)"
        )
    if args.inner_steps < 1 or args.serve_steps < 0:
        raise UsageError("--inner-steps must be >= 1 and --serve-steps >= 0")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, manifest = load_model(args.checkpoint, "")
    if "schema" not in manifest or "data" not in manifest:
        raise UsageError(
            f"checkpoint {manifest['path']} was not trained on a log (train --data): "
            "use train-baseline --family for a built-in family's"
        )
    fields = LogTrainConfig.__dataclass_fields__
    config = LogTrainConfig(
        **{k: v for k, v in manifest.get("training", {}).items() if k in fields}
    )
    data = manifest["data"]
    if data.get("fingerprint") not in (None, fingerprint(args.data)):
        log.warning(
            "%s is not the log %s was trained on (%s): the training tasks may differ",
            args.data,
            manifest["path"],
            data.get("path"),
        )
    steps, budget = _baseline_steps(args.steps, manifest, config)
    family, kind = manifest["family"], model.config.kind
    lr = args.inner_lr or DEFAULT_INNER_LR[kind]
    with open_table(args.data, None, data.get("split_seed", 0), False, manifest["schema"]) as table:
        _check_fits(table.schema, model, manifest)
        try:
            sampler, tc = training_episodes(table, config)
            _, validation = validation_episodes(
                table, config, sampler.max_shots, sampler.time_ordered
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        tc = dataclasses.replace(tc, steps=steps)
        log.info(
            "training the %s initialisation for %s on %d training tasks for %d steps (%s), "
            "%d tasks per step, in the checkpoint's units",
            args.method,
            family,
            len(sampler.tasks),
            steps,
            budget,
            tc.batch_tasks,
        )
        theta, result = train_init(
            args.method,
            None,
            model.config,
            tc,
            InnerLoop(steps=args.inner_steps, lr=lr),
            first_order=args.first_order,
            progress=not args.quiet,
            sampler=sampler,
            scaling=model.scaling,
            validation=validation,
            validate_every=config.validate_every,
        )
    serve_loop = InnerLoop(steps=args.serve_steps, lr=lr, clip=args.serve_clip)
    tuning: dict[str, Any] = {}
    if args.method == "pretrained" and args.inner_lr is None and validation is not None:
        probe = GradientInit(
            args.method,
            family,
            kind,
            theta,
            target_for(model.config),
            serve_loop,
            {},
            model.scaling,
        )
        best, tried = tune_lr_on(probe, _chunks(validation, 1024))
        serve_loop = dataclasses.replace(serve_loop, lr=best)
        tuning = {"serve_lr_tuned_on_validation_tasks": tried, "serve_lr": best}
    save_init(
        args.out,
        theta,
        method=args.method,
        family=family,
        model_config=model.config,
        loop=serve_loop,
        training={
            **tc.__dict__,
            "budget": budget,
            "episodes": describe(sampler),
            "inner_steps": args.inner_steps,
            "first_order": args.first_order,
            **tuning,
        },
        metrics={"train": result},
        first_order=args.first_order,
        scaling=model.scaling,
        extra={
            "checkpoint": manifest["path"],
            "data": {
                "path": str(args.data),
                "fingerprint": fingerprint(args.data),
                "split_seed": data.get("split_seed", 0),
            },
        },
    )
    summary = {
        "out": str(args.out),
        "family": family,
        "method": args.method,
        "steps": steps,
        "budget": budget,
        "inner_loop": dataclasses.asdict(serve_loop),
        "train": result,
    }
    emit(summary, args.json)
    return 0


def _baseline_steps(steps: int | None, manifest: dict[str, Any], config: Any) -> tuple[int, str]:
    """The baselines' training steps and where they come from: ``--steps``, else the steps the
    meta-model's training ran (``metrics.train.steps``), else its ``max_steps``."""
    if steps is not None:
        return steps, "--steps"
    ran = manifest.get("metrics", {}).get("train", {}).get("steps")
    if isinstance(ran, int) and ran > 0:
        return ran, "the meta-model's steps (metrics.train.steps)"
    return config.max_steps, "the meta-model's max_steps (training.max_steps)"


def _chunks(episodes: dict[str, Any], size: int) -> list[dict[str, Any]]:
    n = len(episodes["xs"])
    return [{k: v[i : i + size] for k, v in episodes.items()} for i in range(0, n, size)]


# -- evaluate --data ---------------------------------------------------------------------------
def evaluate_log(args: argparse.Namespace) -> int:
    """``evaluate --data LOG --checkpoint CKPT``: the prequential report on the log's held-out
    tasks (the split of ``train --data``; the log read with ``--schema``, else the checkpoint's
    schema, else an inferred one), against the baselines fitted on its training tasks
    and the replay strategies of ``--strategy`` (default: :func:`_data_strategies`'s)."""
    from stream_meta.evaluation.prequential import evaluate_table
    from stream_meta.evaluation.strategies import StrategyOptions

    if args.checkpoint is None:
        raise UsageError("evaluate --data needs --checkpoint (a model trained with train --data)")
    model, manifest = load_model(args.checkpoint, "")
    options = StrategyOptions(baseline_dir=args.baseline_dir)
    names = _data_strategies(args.strategy, model, manifest, options)
    schema_file = args.schema
    with open_table(
        args.data,
        schema_file,
        manifest.get("data", {}).get("split_seed", 0),
        False,
        manifest.get("schema"),
    ) as table:
        _check_fits(table.schema, model, manifest)
        if names:
            log.info("replaying the %s tasks with %s too", args.split, ", ".join(names))
        try:
            report = evaluate_table(
                model,
                table,
                args.split,
                strategies=names,
                family=manifest["family"],
                options=options,
                warm_start=not args.no_warm_start,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if names:
        report["replay"] = {
            "strategies": names,
            "baseline_dir": None if args.baseline_dir is None else str(args.baseline_dir),
            "inner_steps": options.inner_steps,
            "scratch_steps": options.scratch_steps,
        }
    report["checkpoint"] = manifest["path"]
    report["data"] = str(args.data)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    if args.html:
        from stream_meta.evaluation.report import write_data_html

        write_data_html(report, args.html)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _data_strategies(
    requested: list[str] | None, model: Any, manifest: dict[str, Any], options: Any
) -> list[str]:
    """The replay strategies ``evaluate --data`` runs, each checked before any replay.

    ``--strategy`` as given; by default ``maml`` and ``finetune`` where ``--baseline-dir``
    holds ``<family>-maml.safetensors`` / ``<family>-pretrained.safetensors``, then
    ``scratch`` and ``nearest-task`` (they need no training). A missing or unfit
    initialisation is a usage error; one trained for another scaling (another checkpoint) is
    used with a warning."""
    from stream_meta.evaluation.prequential import DATA_STRATEGIES
    from stream_meta.evaluation.strategies import load_gradient_init
    from stream_meta.model_checkpoint import CheckpointError

    family = manifest["family"]
    if requested:
        names = list(dict.fromkeys(requested))
        for name in names:
            if name not in DATA_STRATEGIES:
                raise UsageError(
                    f"unknown strategy {name!r} for evaluate --data; one of "
                    f"{', '.join(DATA_STRATEGIES)}"
                )
    else:
        trained = {"maml": "maml", "finetune": "pretrained"}
        d = options.baseline_dir
        names = [
            name
            for name, method in trained.items()
            if d is not None and (d / f"{family}-{method}.safetensors").is_file()
        ]
        names += ["scratch", "nearest-task"]
    for name in names:
        if name not in ("maml", "finetune"):
            continue
        if options.baseline_dir is None:
            raise UsageError(
                f"strategy {name} needs --baseline-dir DIR holding its initialisation "
                f"(stream-meta train-baseline --data LOG --checkpoint {manifest['path']} "
                f"--method {'maml' if name == 'maml' else 'pretrained'} --out DIR/"
                f"{family}-{'maml' if name == 'maml' else 'pretrained'}.safetensors)"
            )
        try:
            init = load_gradient_init(name, model, family, options)
        except (CheckpointError, ValueError) as exc:
            raise UsageError(f"strategy {name}: {exc}") from exc
        theirs = None if init.scaling is None else init.scaling.to_dict()
        ours = None if model.scaling.is_identity else model.scaling.to_dict()
        if theirs != ours:
            log.warning(
                "strategy %s: its initialisation was trained in another checkpoint's units "
                "(%s); retrain it with train-baseline --data --checkpoint %s",
                name,
                init.manifest.get("checkpoint", "unknown"),
                manifest["path"],
            )
    return names


def _check_fits(schema: Any, model: Any, manifest: dict[str, Any]) -> None:
    c = model.config
    if schema.x_dim != c.x_dim or schema.target != c.kind or schema.n_classes != c.n_classes:
        raise UsageError(
            f"the log's schema (x_dim {schema.x_dim}, {schema.target}) does not fit the "
            f"checkpoint {manifest['path']} (x_dim {c.x_dim}, {c.kind})"
        )


def _print_table(report: dict[str, Any]) -> None:
    from stream_meta.evaluation.prequential import BUCKETS

    labels = [b[0] for b in BUCKETS]
    print(
        f"{report['split']} tasks: {report['tasks']}, events: {report['events']}, "
        f"metric: {report['metric']} (prequential, in stream order)"
    )
    counts = report["events_by_bucket"]
    print(f"{'shots':<18}{'all':>9}" + "".join(f"{b:>9}" for b in labels))
    print(f"{'events':<18}{report['events']:>9}" + "".join(f"{counts[b]:>9}" for b in labels))
    for name, s in report["strategies"].items():
        cells = "".join(
            f"{v:>9.4g}" if v is not None else f"{'-':>9}" for v in s["buckets"].values()
        )
        print(f"{name:<18}{s['loss']:>9.4g}{cells}")
    print(
        f"best baseline: {report['best_baseline']}; stream-meta / best: "
        f"{report['ratio_to_best_baseline']:.3f}"
    )
    if (
        "replay" in report
        or report.get("best_strategy", report["best_baseline"]) != report["best_baseline"]
    ):
        print(
            f"best of all: {report['best_strategy']}; stream-meta / best: "
            f"{report['ratio_to_best_strategy']:.3f}"
        )
