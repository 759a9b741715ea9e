"""The ``stream-meta`` command: ``run``, ``train``, ``evaluate``, ``serve``, ``produce``, ``tail``.

This is the application entry point: the only place that reads the environment
(``STREAM_META_*``), configures logging, starts the metrics endpoint and prints. Exit codes:
0 success, 1 runtime failure, 2 bad usage or configuration.

A module per group of commands owns their subparsers and handlers (``run``: run, scenarios;
``train``: train, train-baseline; ``evaluate``; ``bandit``: bandit-eval; ``replay``: replay,
compare; ``serve``: serve, trainer, meta-update; ``topics``: produce, tail, export,
publish-model); ``common`` holds what several of them share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stream_meta.cli import bandit, data, evaluate, replay, run, serve, topics, train
from stream_meta.cli.common import EXIT_USAGE, UsageError, configure_logging, shared_options

if TYPE_CHECKING:
    from stream_meta.cli.common import AddParser

__all__ = ["build_parser", "main"]

#: every command, in the order ``stream-meta --help`` lists them
COMMANDS: tuple[AddParser, ...] = (
    run.add_run_parser,
    run.add_scenarios_parser,
    data.add_schema_parser,
    train.add_train_parser,
    train.add_train_baseline_parser,
    evaluate.add_evaluate_parser,
    bandit.add_bandit_eval_parser,
    serve.add_serve_parser,
    replay.add_replay_parser,
    replay.add_compare_parser,
    serve.add_meta_update_parser,
    topics.add_produce_parser,
    topics.add_tail_parser,
    serve.add_trainer_parser,
    topics.add_publish_model_parser,
    topics.add_keygen_parser,
    topics.add_export_parser,
)

#: options that must not be negative, checked for every command that has them
NON_NEGATIVE = ("events", "tasks", "steps", "batch_tasks", "eval_tasks")


def build_parser() -> argparse.ArgumentParser:
    from stream_meta import __version__

    p = argparse.ArgumentParser(
        prog="stream-meta",
        description="A well-adapted model for every task in a stream, from its first examples.",
    )
    p.add_argument("--version", action="version", version=f"stream-meta {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = shared_options()
    for add in COMMANDS:
        add(sub, options)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning. With spinning (the default), torch's
    # and FAISS's thread pools were seen to stall runs by an order of magnitude while other
    # processes kept the 2 cores busy; passive waits cost nothing measurable on an idle
    # machine. Must be set before torch loads; an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    from stream_meta.config import ConfigError
    from stream_meta.model_checkpoint import CheckpointError

    for name in NON_NEGATIVE:
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
