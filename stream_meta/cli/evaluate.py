"""``stream-meta evaluate``: few-shot evaluation of a checkpoint on held-out tasks."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from stream_meta.cli.common import (
    Options,
    UsageError,
    check_device,
    emit,
    family_for,
    load_model,
    settings_from,
)

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers

log = logging.getLogger(__name__)


def add_evaluate_parser(sub: Subparsers, options: Options) -> None:
    e = sub.add_parser(
        "evaluate", parents=[options.common], help="few-shot evaluation on held-out tasks"
    )
    e.add_argument("--family", choices=["sinusoid", "digits", "bandit"], default="sinusoid")
    e.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    e.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 20])
    e.add_argument("--tasks", type=int, default=1000)
    e.add_argument("--queries", type=int, default=100, help="query points per task")
    e.add_argument("--bank-tasks", type=int, default=1000, help="held-out tasks in the index")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-neighbours", action="store_true", help="switch retrieval off")
    e.add_argument("--device", help="cpu (default) or cuda[:N]")
    e.add_argument(
        "--data",
        type=Path,
        metavar="LOG",
        help="prequential evaluation on a log's held-out tasks against simple baselines",
    )
    e.add_argument("--schema", type=Path, help="--data: a TOML file with a [schema] table")
    e.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="--data: which held-out tasks (the split of train --data)",
    )
    e.add_argument(
        "--strategy",
        action="append",
        metavar="NAME",
        help="--data: a replay strategy to compare too: maml, finetune, scratch, nearest-task "
        "(repeatable; default: maml and finetune where --baseline-dir holds their "
        "initialisations, then scratch and nearest-task)",
    )
    e.add_argument(
        "--baseline-dir",
        type=Path,
        metavar="DIR",
        help="--data: where <name>-maml.safetensors and <name>-pretrained.safetensors are "
        "(stream-meta train-baseline --data; <name>: the checkpoint's family)",
    )
    e.add_argument("--out", type=Path, help="--data: write the report as JSON")
    e.add_argument("--html", type=Path, help="--data: write the report as HTML")
    e.add_argument(
        "--no-warm-start",
        action="store_true",
        help="--data: do not serve the training tasks first (the index starts empty)",
    )
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = settings_from(args, {})
    if args.data is not None:
        from stream_meta.cli.data import evaluate_log

        return evaluate_log(args)
    if args.strategy or args.baseline_dir:
        raise UsageError("--strategy and --baseline-dir go with --data")
    from stream_meta.evaluation.fewshot import evaluate

    device = check_device(args.device or "cpu")
    model, manifest = load_model(args.checkpoint, args.family, device=device)
    if manifest["family"] != args.family:
        raise UsageError(
            f"checkpoint {manifest['path']} is for family {manifest['family']!r}, "
            f"not {args.family!r}"
        )
    if manifest.get("experts"):
        log.warning(
            "checkpoint %s is a set of %d experts: evaluate scores its primary (expert %s) "
            "alone; `run`/`replay` with this checkpoint serve the routed set",
            manifest["path"],
            1 + len(manifest["experts"]),
            manifest.get("expert_id"),
        )
    k = 0 if args.no_neighbours else settings.engine.k_neighbours
    report = evaluate(
        model,
        family_for(args.family, split="test"),
        shots=args.shots,
        tasks=args.tasks,
        queries=args.queries,
        k_neighbours=k,
        bank_tasks=args.bank_tasks,
        seed=args.seed,
    )
    report["checkpoint"] = manifest["path"]
    emit(report, args.json)
    return 0
