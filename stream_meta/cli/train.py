"""``stream-meta train`` (meta-train a model) and ``stream-meta train-baseline`` (a MAML or
pre-trained initialisation on the meta-model's training budget: a built-in family's, or with
``--data LOG --checkpoint CKPT`` on the training tasks of the log a ``train --data`` checkpoint
was trained on, see :func:`stream_meta.cli.data.train_baseline_from_log`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_meta.cli.common import (
    Options,
    UsageError,
    add_family_arg_option,
    check_device,
    emit,
    family_for,
    load_model,
    log,
    parse_family_args,
    settings_from,
)

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers


# -- train -------------------------------------------------------------------------------------
def add_train_parser(sub: Subparsers, options: Options) -> None:
    t = sub.add_parser(
        "train", parents=[options.common], help="meta-train a model and save a checkpoint"
    )
    what = t.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--family", choices=["sinusoid", "digits", "bandit"], help="a built-in family"
    )
    what.add_argument(
        "--data",
        type=Path,
        metavar="LOG",
        help="your recorded tasks: JSON lines (.jsonl[.gz]), a recording dir, Parquet",
    )
    t.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    t.add_argument("--schema", type=Path, help="--data: a TOML file with a [schema] table")
    t.add_argument(
        "--time-ordered",
        action="store_true",
        help="--data: a task's support always precedes its queries in event time",
    )
    t.add_argument(
        "--skip-invalid", action="store_true", help="--data: train on the events that fit"
    )
    t.add_argument("--name", help="--data: the model's name in its manifest (default: LOG's)")
    t.add_argument(
        "--model-size",
        choices=["auto", "small", "medium", "large"],
        help="--data: the architecture (default auto: from the number of training tasks)",
    )
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
    add_family_arg_option(t)
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.data is not None:
        from stream_meta.cli.data import train_from_log

        if args.family_arg:
            raise UsageError("--family-arg goes with --family")
        settings_from(args, {})  # a bad --config or --set is refused the same way
        return train_from_log(args)
    for flag in ("schema", "time_ordered", "skip_invalid", "name", "model_size"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} goes with --data")
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
    family_args = parse_family_args(args.family, args.family_arg)
    settings = settings_from(args, {"train": train_over} if train_over else {})
    import torch

    from stream_meta.evaluation.fewshot import evaluate
    from stream_meta.meta_training import (
        TrainConfig,
        calibrate_variance,
        family_draws,
        meta_train,
    )
    from stream_meta.model import PRESETS, MetaModel, ModelConfig
    from stream_meta.model_checkpoint import save_checkpoint

    ts = settings.train
    device = check_device(ts.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    family = family_for(args.family, split="train", args=family_args)
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
    log.info("meta-training %s for %d steps on %s", family, tc.steps, device)
    result = meta_train(model, family, tc, device=device, progress=not args.quiet)
    model.to("cpu").eval()
    metrics: dict[str, Any] = {"train": result.to_dict()}
    if config.kind == "regression":
        # the predictive variance's calibration, on held-out points of fresh episodes
        metrics["calibration"] = calibrate_variance(
            model, family_draws(family, tc), tc.k_neighbours
        )
    if args.eval_tasks:
        shots = [1, 5] if family.kind == "classification" else [1, 5, 10, 20]
        report = evaluate(
            model,
            family_for(args.family, split="test", args=family_args),
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
        # the population a non-default family was built with (bandit-eval reads it)
        extra={"family_args": family_args} if family_args else None,
    )
    summary = {"out": str(args.out), "family": args.family, **manifest["metrics"]}
    emit(summary, args.json)
    return 0


# -- train-baseline ----------------------------------------------------------------------------
def add_train_baseline_parser(sub: Subparsers, options: Options) -> None:
    tb = sub.add_parser(
        "train-baseline",
        parents=[options.common],
        help="train a MAML or pre-trained initialisation on the meta-model's training budget",
    )
    what = tb.add_mutually_exclusive_group(required=True)
    what.add_argument("--family", choices=["sinusoid", "digits"], help="a built-in family")
    what.add_argument(
        "--data",
        type=Path,
        metavar="LOG",
        help="the log a train --data checkpoint was trained on (needs --checkpoint): train on "
        "its training tasks, in the checkpoint's units; save as DIR/<name>-<method>.safetensors "
        "for evaluate --data --baseline-dir DIR",
    )
    tb.add_argument("--method", choices=["maml", "pretrained"], required=True)
    tb.add_argument("--out", type=Path, required=True, help="output path (.safetensors)")
    tb.add_argument(
        "--checkpoint",
        type=Path,
        help="the meta-model whose architecture and budget to match (default: shipped)",
    )
    tb.add_argument(
        "--steps",
        type=int,
        help="override the budget's steps (default: the meta-model's; --data: the steps its "
        "training ran)",
    )
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
    tb.add_argument(
        "--eval-tasks", type=int, default=500, help="held-out tasks scored (--family only)"
    )
    tb.set_defaults(func=cmd_train_baseline)


def cmd_train_baseline(args: argparse.Namespace) -> int:
    """Train a baseline initialisation (MAML or pre-trained) on the meta-model's budget."""
    settings_from(args, {})
    if args.data is not None:
        from stream_meta.cli.data import train_baseline_from_log

        return train_baseline_from_log(args)
    import torch

    from stream_meta.evaluation.baselines import DEFAULT_INNER_LR, InnerLoop, save_init, train_init

    if args.threads:
        torch.set_num_threads(args.threads)
    model, manifest = load_model(args.checkpoint, args.family)
    if manifest["family"] != args.family:
        raise UsageError(f"checkpoint {manifest['path']} is for family {manifest['family']!r}")
    tc = _budget(args, manifest)
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
        family_for(args.family, split="train"),
        model.config,
        tc,
        train_loop,
        first_order=args.first_order,
        progress=not args.quiet,
    )
    serve_loop = InnerLoop(steps=args.serve_steps, lr=lr, clip=args.serve_clip)
    tuning: dict[str, Any] = {}
    if args.method == "pretrained" and args.inner_lr is None:
        serve_loop, tuning = _tuned_serve_loop(args, model.config, theta, serve_loop)
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
        metrics["eval"] = _evaluate_baseline(args, model.config, theta, serve_loop, metrics)
    emit({"out": str(args.out), "family": args.family, "method": args.method, **metrics}, args.json)
    return 0


def _budget(args: argparse.Namespace, manifest: dict[str, Any]) -> Any:
    """The meta-model's training budget (from its manifest) as a ``TrainConfig``; ``--steps``
    overrides its steps."""
    from stream_meta.meta_training import TrainConfig

    names = TrainConfig.__dataclass_fields__
    budget = {k: v for k, v in manifest.get("training", {}).items() if k in names}
    if args.steps is not None:
        budget["steps"] = args.steps
    return TrainConfig(**budget)


def _tuned_serve_loop(
    args: argparse.Namespace, model_config: Any, theta: Any, serve_loop: Any
) -> tuple[Any, dict[str, Any]]:
    """Fine-tuning's step size is free: pick it on training tasks (MAML's is meta-learned).
    Returns the serving loop with it, and what the manifest records of the tuning."""
    from stream_meta.evaluation.baselines import GradientInit, InnerLoop, target_for, tune_lr

    probe = GradientInit(
        args.method,
        args.family,
        model_config.kind,
        theta,
        target_for(model_config),
        serve_loop,
        {},
    )
    best, tried = tune_lr(probe, family_for(args.family, split="train"))
    serve_loop = InnerLoop(steps=args.serve_steps, lr=best, clip=args.serve_clip)
    return serve_loop, {"serve_lr_tuned_on_training_tasks": tried, "serve_lr": best}


def _evaluate_baseline(
    args: argparse.Namespace,
    model_config: Any,
    theta: Any,
    serve_loop: Any,
    metrics: dict[str, Any],
) -> Any:
    """Score the saved initialisation on ``--eval-tasks`` held-out tasks and save it again with
    the scores in its manifest; returns the scores."""
    from stream_meta.evaluation.baselines import evaluate_init, load_init, save_init

    init = load_init(args.out)
    shots = [1, 5] if model_config.kind == "classification" else [1, 5, 10, 20]
    scores = evaluate_init(
        init, family_for(args.family, split="test"), shots=shots, tasks=args.eval_tasks
    )
    save_init(
        args.out,
        theta,
        method=args.method,
        family=args.family,
        model_config=model_config,
        loop=serve_loop,
        training=init.manifest["training"],
        metrics={**metrics, "eval": scores},
        first_order=args.first_order,
    )
    return scores
