"""Bandits (issue 16 item 4): section ``bandits``. Cumulative regret on new users of the bandit
simulator (``stream-meta bandit-eval``) of the meta-model's Thompson sampling against per-task
linear Thompson sampling from scratch, one pooled linear bandit and random choice; and
off-policy estimates (``stream-meta replay --off-policy``) of each target policy on logged
decision streams of the simulator, against the true value of the target on the same
decisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench.common import (
    ROOT,
    Check,
    Context,
    Section,
    cached_cli,
    cli_json,
    need_checkpoint,
    rel,
    say,
)

EARLY = 20  # decisions of a new user...
EARLY_VS_TS = 0.5  # ...where meta's mean cumulative regret is at most this x per-task TS's
EARLY_VS_POOLED = 0.75  # ...and at most this x the pooled bandit's
LATE = 200  # decisions where meta is no worse than per-task TS
OPE_SE = 3.0  # an estimate within this many standard errors of the truth is consistent
#: logging policies of the off-policy logs: name -> epsilon of the epsilon-greedy logger
LOGGERS = {"uniform": 1.0, "epsilon-greedy (0.3)": 0.3}
NOISE_STD = 0.5  # the simulator's default reward noise, told to per-task-ts
VAGUE_PRIOR = 10.0  # the prior std of a context run of per-task-ts
#: harder populations of the simulator, measured as context rows (no targets), each with its own
#: meta-trained model: name -> (the family's --family-arg values, per-task-ts's prior std). The
#: prior is matched to the population as the default's is: sqrt(1 + spread^2), the marginal std
#: of a taste coefficient (archetype entries N(0, 1) plus the spread); 1.01 ~ 1 at spread 0.15.
POPULATIONS: dict[str, tuple[dict[str, float | int], float]] = {
    # little cluster structure: 16 archetypes, a spread of 0.6 per coordinate
    "diffuse": ({"archetypes": 16, "spread": 0.6}, 1.17),
    # no shared nonlinearity: a per-task linear model is well specified
    "linear": ({"quality": 0.0}, 1.0),
    # both: the least shared structure (no cluster to find, no shared nonlinearity to know)
    "diffuse-linear": ({"archetypes": 16, "spread": 0.6, "quality": 0.0}, 1.17),
}
#: where the populations' models are kept between bench runs (git-ignored; not shipped)
POPULATION_DIR = ROOT / "build" / "bench-bandit-populations"


# -- pure helpers ------------------------------------------------------------------------------
def regret_checks(out: dict[str, Any], targets: dict[str, str]) -> list[Check]:
    """The three regret targets from a ``bandit-eval --json`` result (unmeasured when the
    horizon or a strategy is missing)."""
    s = out["strategies"]

    def mean(name: str, t: int) -> float | None:
        v = s.get(name, {}).get(str(t))
        return None if v is None else float(v["mean"])

    def check(target: str, t: int, other: str, bound: float) -> Check:
        m, o = mean("meta", t), mean(other, t)
        if m is None or o is None:
            return Check(target, f"not measured (no {t}-decision result)", None, "-")
        ratio = m / o
        return Check(
            target,
            f"{m:.2f} vs {o:.2f} ({ratio:.2f}x: "
            + (f"{1 - ratio:.0%} below)" if ratio <= 1 else f"{ratio - 1:.0%} above)"),
            ratio <= bound,
            "bandit-eval",
        )

    return [
        check(targets["ts"], EARLY, "per-task-ts", EARLY_VS_TS),
        check(targets["pooled"], EARLY, "pooled", EARLY_VS_POOLED),
        check(targets["late"], LATE, "per-task-ts", 1.0),
    ]


def regret_table(out: dict[str, Any]) -> str:
    """A row per strategy: mean cumulative regret +- its standard error at each horizon."""
    ts = sorted({int(t) for v in out["strategies"].values() for t in v})
    rows = [
        "| strategy | " + " | ".join(f"cumulative regret after {t} decisions" for t in ts) + " |",
        "|---" * (len(ts) + 1) + "|",
    ]
    for name, by_t in out["strategies"].items():
        cells = [
            f"{by_t[str(t)]['mean']:.2f} ± {by_t[str(t)]['se']:.2f}" if str(t) in by_t else "-"
            for t in ts
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def curve_note(curves: dict[str, list[float]]) -> str:
    """Where each strategy's regret comes from, read off its mean cumulative regret curve: the
    first decision, the first 20, and the last half of the horizon (per decision)."""
    parts = []
    for name, c in curves.items():
        if not c:
            continue
        n, half = len(c), len(c) // 2
        early = min(EARLY, n)
        late = (c[-1] - c[half - 1]) / (n - half) if half >= 1 else float("nan")
        parts.append(f"{name} {c[0]:.2f} / {c[early - 1] / early:.3f} / {late:.4f}")
    return (
        "Mean regret of the first decision / per decision over the first "
        f"{EARLY} / per decision over the last half of the horizon: " + "; ".join(parts) + "."
    )


def family_arg_flags(args: dict[str, Any]) -> list[str]:
    """``{"spread": 0.6}`` -> ``["--family-arg", "spread=0.6"]``."""
    return [a for k, v in args.items() for a in ("--family-arg", f"{k}={v}")]


def population_check(name: str, args: dict[str, Any], prior: float, out: dict[str, Any]) -> Check:
    """A context row of one harder population's ``bandit-eval --json`` result: meta against
    per-task TS and pooled after ``EARLY`` decisions, against per-task TS after ``LATE``."""
    s = out["strategies"]

    def vs(t: int, other: str) -> str:
        m, o = s.get("meta", {}).get(str(t)), s.get(other, {}).get(str(t))
        if m is None or o is None:
            return f"(no {t}-decision result)"
        ratio = m["mean"] / o["mean"]
        return f"{m['mean']:.2f} vs {other} {o['mean']:.2f} ({ratio:.2f}x: " + (
            f"{1 - ratio:.0%} below)" if ratio <= 1 else f"{ratio - 1:.0%} above)"
        )

    desc = ", ".join(f"{k}={v}" for k, v in args.items())
    return Check(
        f"context: population '{name}' ({desc}; per-task-ts prior N(0, {prior:g}^2)), "
        "meta's regret",
        f"after {EARLY}: {vs(EARLY, 'per-task-ts')}, {vs(EARLY, 'pooled')}; "
        f"after {LATE}: {vs(LATE, 'per-task-ts')}",
        None,
        "bandit-eval",
    )


def ope_rows(logger: str, report: dict[str, Any]) -> list[str]:
    """Table rows of one ``replay --off-policy`` report: truth, IPS and DR per target."""
    rows = []
    for name, r in report["off_policy"].items():
        truth = r.get("truth")
        cells = []
        for est in ("ips", "dr"):
            e = r[est]
            z = "" if truth is None else f" ({abs(e['value'] - truth) / e['se']:.1f} SE off)"
            cells.append(f"{e['value']:.3f} ± {e['se']:.3f}{z}")
        rows.append(
            f"| {logger} | {name} | {'-' if truth is None else f'{truth:.3f}'} | "
            + " | ".join(cells)
            + " |"
        )
    return rows


def ope_consistent(report: dict[str, Any], within: float = OPE_SE) -> bool:
    """Every IPS and DR estimate within ``within`` standard errors of its truth."""
    for r in report["off_policy"].values():
        truth = r.get("truth")
        for est in ("ips", "dr"):
            e = r[est]
            if truth is None or abs(e["value"] - truth) > within * e["se"]:
                return False
    return True


def write_log(path: Path, users: int, decisions: int, epsilon: float, seed: int) -> int:
    """A logged decision stream of the simulator (``logged_stream``) as JSON lines."""
    from stream_meta.tasks import BanditFamily, logged_stream

    family = BanditFamily()
    rng = np.random.default_rng(seed)
    params = family.sample_params(users, rng)
    n = 0
    with path.open("w") as fh:
        for event in logged_stream(family, params, decisions, rng, epsilon=epsilon):
            fh.write(json.dumps(event) + "\n")
            n += 1
    return n


# -- the measurement ---------------------------------------------------------------------------
def measure_bandits(ctx: Context, section: Section) -> None:
    targets = {
        "ts": f"first {EARLY} decisions of a new user: mean cumulative regret >= "
        f"{1 - EARLY_VS_TS:.0%} below per-task Thompson sampling from scratch",
        "pooled": f"first {EARLY} decisions: >= {1 - EARLY_VS_POOLED:.0%} below the pooled bandit",
        "late": f"first {LATE} decisions: no worse than per-task Thompson sampling",
    }
    t_ope = (
        f"off-policy IPS and DR estimates within {OPE_SE:.0f} standard errors of the target's "
        "true value (a consistency check, no issue target)"
    )
    if not need_checkpoint(ctx, section, "bandit", [*targets.values(), t_ope]):
        return
    ck = ctx.checkpoint("bandit")
    assert ck is not None
    users, decisions = ctx.sizes.bandit_users, ctx.sizes.bandit_decisions
    args = [
        "bandit-eval",
        "--checkpoint",
        rel(ck),
        "--users",
        str(users),
        "--decisions",
        str(decisions),
        "--at",
        str(EARLY),
        str(LATE),
        "--json",
        "-q",
    ]
    out, cmd = cached_cli(ctx, args)
    section.checks += regret_checks(out, targets)
    section.tables.append(regret_table(out))
    section.raw["regret"] = {k: v for k, v in out.items() if k != "curves"}
    section.raw["regret_curves"] = out.get("curves", {})
    section.notes.append(curve_note(out.get("curves", {})))
    section.notes.append(
        f"`{cmd}`: {users} new users of the simulator (`BanditFamily()`, seed 0: 4 taste "
        "archetypes in 5 item features, within-archetype spread 0.15, a shared nonlinear item "
        "quality, reward noise std 0.5), each facing "
        f"{decisions} decisions of 10 candidate items; users interleaved round by round, all "
        "strategies on the same users, candidates and reward noise. Regret of a decision = the "
        "best expected reward among its candidates minus the chosen one's; the table gives the "
        "mean over users of the cumulative regret ± its standard error. **meta**: the shipped "
        "bandit model on an engine with default settings, Thompson sampling on "
        "`Engine.action_values` (one seeded posterior draw), each reward learned with "
        "`engine.process` (support of the 64 most recent rewards). **per-task-ts**: Bayesian "
        "linear regression per user on the raw features plus a bias, prior N(0, 1) per "
        "coefficient (the population's scale: a favourable choice for it), the true noise "
        "variance. **pooled**: one such model learning from every user's rewards. "
        "**random**: a uniform candidate."
    )
    vague, vague_cmd = cached_cli(
        ctx,
        [*args[:-2], "--strategy", "per-task-ts", "--prior-std", str(VAGUE_PRIOR), "--json", "-q"],
    )
    v = vague["strategies"]["per-task-ts"]
    section.checks.append(
        Check(
            f"context: per-task-ts with a vague prior N(0, {VAGUE_PRIOR:g}^2)",
            " / ".join(
                f"{v[str(t)]['mean']:.2f} ± {v[str(t)]['se']:.2f} after {t}"
                for t in (EARLY, LATE)
                if str(t) in v
            ),
            None,
            "bandit-eval",
        )
    )
    section.raw["regret_vague_prior"] = vague["strategies"]
    section.notes.append(f"Context row: `{vague_cmd}` (same users, candidates and noise).")
    _measure_populations(ctx, section, args)
    _measure_ope(ctx, section, ck, t_ope)


def population_model(
    ctx: Context, name: str, args: dict[str, Any]
) -> tuple[Path, str, float, bool]:
    """The meta-model of population ``name``, trained with the shipped model's recipe and
    ``ctx.sizes.bandit_population_steps`` steps, kept under :data:`POPULATION_DIR` and reused
    when its manifest (family args, steps) matches: ``(path, train command, training seconds,
    whether it was kept from an earlier run)``."""
    from stream_meta.model_checkpoint import read_manifest

    steps = ctx.sizes.bandit_population_steps
    path = POPULATION_DIR / f"{name}-{steps}.safetensors"
    cmd = [
        "train",
        "--family",
        "bandit",
        "--steps",
        str(steps),
        "--threads",
        "1",
        "--set",
        "train.max_shots=40",
        *family_arg_flags(args),
        "--eval-tasks",
        "0",
        "--out",
        rel(path),
        "--json",
        "-q",
    ]
    display = "stream-meta " + " ".join(cmd)
    if path.is_file():
        manifest = read_manifest(path)
        if manifest.get("family_args") == args and manifest["training"].get("steps") == steps:
            say(f"reusing {rel(path)}")
            seconds = float(manifest["metrics"]["train"]["seconds"])
            return path, display, seconds, True
    POPULATION_DIR.mkdir(parents=True, exist_ok=True)
    result, _seconds, display = cli_json(cmd)
    return path, display, float(result["train"]["seconds"]), False


def _measure_populations(ctx: Context, section: Section, eval_args: list[str]) -> None:
    """Context rows: the regret comparison on harder populations, each with its own model."""
    rows = [
        "| population | strategy | "
        + " | ".join(f"cumulative regret after {t} decisions" for t in (EARLY, LATE))
        + " |",
        "|---|---|---|---|",
    ]
    raw: dict[str, Any] = {}
    notes = []
    for name, (args, prior) in POPULATIONS.items():
        ck, train_cmd, seconds, kept = population_model(ctx, name, args)
        i = eval_args.index("--checkpoint")
        cmd = [
            *eval_args[:i],
            "--checkpoint",
            rel(ck),
            *eval_args[i + 2 : -2],
            "--prior-std",
            str(prior),
            *family_arg_flags(args),
            "--json",
            "-q",
        ]
        out, eval_cmd = cached_cli(ctx, cmd)
        section.checks.append(population_check(name, args, prior, out))
        for strategy, by_t in out["strategies"].items():
            cells = [
                f"{by_t[str(t)]['mean']:.2f} ± {by_t[str(t)]['se']:.2f}" if str(t) in by_t else "-"
                for t in (EARLY, LATE)
            ]
            rows.append(f"| {name} | {strategy} | " + " | ".join(cells) + " |")
        raw[name] = {
            "family_args": args,
            "prior_std": prior,
            "train": {"command": train_cmd, "seconds": seconds, "kept": kept},
            "regret": out["strategies"],
            "curves": out.get("curves", {}),
        }
        how = "kept from an earlier run, trained in" if kept else "trained by this run in"
        notes.append(f"{name}: `{train_cmd}` ({how} {seconds:.0f} s), then `{eval_cmd}`")
    section.tables.append("\n".join(rows))
    section.raw["populations"] = raw
    section.notes.append(
        "Harder populations (context, no targets; docs/BANDITS.md): each its own meta-model, "
        "trained with the shipped model's recipe on that population (kept under "
        f"`{rel(POPULATION_DIR)}`, not shipped), and per-task-ts's prior std matched to the "
        "population's taste scale, sqrt(1 + spread^2). " + "; ".join(notes) + "."
    )


def _measure_ope(ctx: Context, section: Section, ck: Path, target: str) -> None:
    tmp = Path(ROOT / "build" / "bench-bandits")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = [
        "| logging policy | target policy | true value | IPS (± SE) | DR (± SE) |",
        "|---|---|---|---|---|",
    ]
    consistent = True
    commands = []
    raw: dict[str, Any] = {}
    for i, (logger, epsilon) in enumerate(LOGGERS.items()):
        log = tmp / f"decisions-{i}.jsonl"
        n = write_log(log, ctx.sizes.bandit_log_users, ctx.sizes.bandit_log_decisions, epsilon, i)
        report, cmd = cached_cli(
            ctx,
            [
                "replay",
                rel(log),
                "--off-policy",
                "--checkpoint",
                rel(ck),
                "--noise-std",
                str(NOISE_STD),
                "--report",
                rel(tmp / f"report-{i}"),
                "--json",
                "-q",
            ],
        )
        commands.append(f"`{cmd}` ({n:,} decisions)")
        lp = report["logged_policy"]
        rows += ope_rows(logger, report)
        rows.append(
            f"| {logger} | (the logging policy's own rewards) | - | {lp['value']:.3f} | - |"
        )
        consistent = consistent and ope_consistent(report)
        raw[logger] = report
    section.tables.append("\n".join(rows))
    section.checks.append(
        Check(target, "all within" if consistent else "some outside", consistent, "replay")
    )
    section.raw["off_policy"] = raw
    section.notes.append(
        "Off-policy evaluation: logged decision streams of "
        f"{ctx.sizes.bandit_log_users} new users x {ctx.sizes.bandit_log_decisions} decisions "
        "(`stream_meta.tasks.logged_stream`, users interleaved), logged by a uniform policy "
        "and by an epsilon-greedy one (0.3) around the population mean taste's best item, "
        "exact propensities; then "
        + "; ".join(commands)
        + ". Each target assesses a decision from what it learned of the log so far (its "
        "probabilities of each candidate, Thompson sampling's from 256 seeded posterior draws, "
        "and its predicted rewards), then learns the logged reward. True value = the mean over "
        "the decisions of the target's expected reward under the simulator, on the same "
        "decisions with the same learned state."
    )
