"""``stream-meta bandit-eval``: cumulative regret of the meta-model's Thompson sampling on new
users of the bandit simulator, against per-task linear Thompson sampling from scratch, one
pooled linear bandit and random choice (:mod:`stream_meta.evaluation.bandit`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_meta.cli.common import (
    Options,
    UsageError,
    add_family_arg_option,
    emit,
    family_for,
    load_model,
    log,
    parse_family_args,
    progress_bar,
    settings_from,
)

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers


def add_bandit_eval_parser(sub: Subparsers, options: Options) -> None:
    b = sub.add_parser(
        "bandit-eval",
        parents=[options.common],
        help="cumulative regret on new users of the bandit simulator, against baselines",
    )
    b.add_argument("--checkpoint", type=Path, help="bandit model (default: the shipped one)")
    b.add_argument("--users", type=int, default=200, help="new users (default 200)")
    b.add_argument("--decisions", type=int, default=200, help="decisions per user (default 200)")
    b.add_argument("--k", type=int, default=10, help="candidate items per decision (default 10)")
    b.add_argument("--seed", type=int, default=0, help="seeds the users, items and noise")
    b.add_argument(
        "--at",
        type=int,
        nargs="+",
        default=[20, 200],
        help="report the cumulative regret after these many decisions (default 20 200)",
    )
    b.add_argument(
        "--strategy",
        action="append",
        help="meta, per-task-ts, pooled, random (repeatable; default: all)",
    )
    b.add_argument(
        "--prior-std",
        type=float,
        default=1.0,
        help="prior std of the linear baselines' coefficients (default 1)",
    )
    add_family_arg_option(b)
    b.set_defaults(func=cmd_bandit_eval)


def cmd_bandit_eval(args: argparse.Namespace) -> int:
    family_args = parse_family_args("bandit", args.family_arg)
    settings = settings_from(args, {"metrics": {"port": 0}})
    import torch

    from stream_meta.app import build_engine
    from stream_meta.evaluation.bandit import STRATEGIES, evaluate_regret

    names = list(dict.fromkeys(args.strategy or STRATEGIES))
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise UsageError(f"unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGIES)}")
    if args.users < 2 or args.decisions < 1 or args.k < 2:
        raise UsageError("need --users >= 2, --decisions >= 1 and --k >= 2")
    if not args.prior_std > 0:
        raise UsageError("--prior-std must be > 0")
    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    model: Any = None
    manifest: dict[str, Any] = {}
    if "meta" in names:
        model, manifest = load_model(args.checkpoint, "bandit")
    family = family_for("bandit", split="test", args=family_args)
    trained_on = manifest.get("family_args", {}) if manifest.get("family") == "bandit" else None
    if trained_on is not None and trained_on != family_args:
        log.warning(
            "the model was trained on the bandit population %s, evaluated on %s",
            trained_on or "(default)",
            family_args or "(default)",
        )
    # any regression model of the items' features will do (the shipped one, or train --data
    # of a logged decision stream of the simulator)
    if model is not None and (
        model.config.kind != "regression" or model.config.x_dim != family.x_dim
    ):
        raise UsageError(
            f"checkpoint {manifest['path']} is a {model.config.kind} model of "
            f"{model.config.x_dim} features; the items have {family.x_dim}"
        )
    bar = progress_bar(args, len(names) * args.decisions * args.users, "bandit-eval")
    log.info(
        "%d new users x %d decisions of %d candidates: %s",
        args.users,
        args.decisions,
        args.k,
        ", ".join(names),
    )

    def tick(name: str, t: int) -> None:
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(args.users)

    try:
        out = evaluate_regret(
            family,
            users=args.users,
            decisions=args.decisions,
            k=args.k,
            seed=args.seed,
            strategies=names,
            at=args.at,
            engine_factory=lambda: build_engine(model, settings),
            prior_std=args.prior_std,
            on_round=tick,
        )
    finally:
        if bar is not None:
            bar.close()
    out["checkpoint"] = manifest.get("path")
    out["family_args"] = family_args
    out["ratios"] = regret_ratios(out["strategies"])
    if args.json:
        emit(out, True)
    else:
        print(regret_table(out))
    return 0


def regret_ratios(strategies: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """``meta``'s mean cumulative regret over each other strategy's, at each reported ``t``.

    >>> regret_ratios({"meta": {"20": {"mean": 2.0}}, "random": {"20": {"mean": 8.0}}})
    {'random': {'20': 0.25}}
    """
    meta = strategies.get("meta")
    if meta is None:
        return {}
    out: dict[str, Any] = {}
    for name, by_t in strategies.items():
        if name != "meta":
            out[name] = {
                t: meta[t]["mean"] / v["mean"] if v["mean"] > 0 else None
                for t, v in by_t.items()
                if t in meta
            }
    return out


def regret_table(out: dict[str, Any]) -> str:
    """A markdown table: a row per strategy, the mean cumulative regret +- its standard error
    after each reported number of decisions (and meta's ratio to it)."""
    ts = list(next(iter(out["strategies"].values())))
    head = "| strategy | " + " | ".join(f"regret after {t}" for t in ts) + " |"
    rows = [head, "|---" * (len(ts) + 1) + "|"]
    ratios = out.get("ratios", {})
    for name, by_t in out["strategies"].items():
        cells = []
        for t in ts:
            cell = f"{by_t[t]['mean']:.2f} +- {by_t[t]['se']:.2f}"
            r = ratios.get(name, {}).get(t)
            if r is not None:
                cell += f" (meta {r:.2f}x)"
            cells.append(cell)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
