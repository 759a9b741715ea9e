"""Experts (issue 15 item 3): section ``experts``. Meta-updates that add a candidate as an
expert beside the served model (``meta_update.max_experts``, 4 by default) against no update
and against the single-model behaviour (``meta_update.max_experts=1``: a candidate overwrites
the model), on the same events of three drift scenarios (``stream-meta run --scenario``): the
loss after the first promotion, the old family's loss served by the last set of experts, how
soon a returning family is routed back to its old expert, and the cost in events/s."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.bench.common import (
    ROOT,
    Check,
    Context,
    Section,
    cached_cli,
    need_checkpoint,
    rel,
    scenario_run,
)

EXPERTS_WINDOW = 10_000  # events after the first promotion of the experts strategy...
EXPERTS_LOSS_CUT = 0.25  # ...where its loss is at least this much below no update's
EXPERTS_FORGETTING = 0.02  # old family's loss (served by the last set) may rise by this much
FORGETTING_EVENTS = 20_000  # events of the stationary (old family) stream for that loss
FORGETTING_SCENARIO = "sinusoid-stationary"
RETURN_SCENARIO = "sinusoid-recurring"
RETURN_PREFIX = "base:"  # task ids of the returning (old) family
OLD_EXPERT = 1  # the shipped model's expert id
RETURN_WINDOW = 250  # windows of this many events of the returning family...
RETURN_SHARE = 0.5  # ...where at least this share is served by the old expert...
RETURN_DELAY = 1_000  # ...from at most this many events after the return on
EXPERTS_SCENARIOS = ("sinusoid-amplitude-shift", "sinusoid-new-family", RETURN_SCENARIO)
EXPERTS_STRATEGIES = {
    "none": ["--no-meta-update"],
    "experts": [],
    "single": ["--set", "meta_update.max_experts=1"],
}
#: support-size bins of the table: (low, high) inclusive, None = no upper bound
SHOT_BINS: tuple[tuple[int, int | None], ...] = ((0, 0), (1, 2), (3, 5), (6, None))


# -- pure helpers ------------------------------------------------------------------------------
@dataclass
class Predictions:
    """What a run wrote with ``--output``, in stream order (position = ``event_id`` ``e<i>``)."""

    pos: list[int] = field(default_factory=list)
    task: list[str] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    expert: list[int | None] = field(default_factory=list)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> Predictions:
        rows = []
        for line in lines:
            if not line.strip():
                continue
            p = json.loads(line)
            eid = str(p.get("event_id", ""))
            if not eid.startswith("e"):
                continue
            expert = p.get("expert")
            if expert is None:  # one model served: its id is its version's (1: the shipped one)
                expert = p.get("model_version")
            loss = p.get("loss")
            rows.append(
                (
                    int(eid[1:]),
                    str(p["task_id"]),
                    int(p["shots"]),
                    None if loss is None else float(loss),
                    None if expert is None else int(expert),
                )
            )
        rows.sort(key=lambda r: r[0])
        out = cls()
        for pos, task, shots, loss, expert in rows:
            out.pos.append(pos)
            out.task.append(task)
            out.shots.append(shots)
            out.loss.append(loss)
            out.expert.append(expert)
        return out

    @classmethod
    def read(cls, path: Path) -> Predictions:
        with path.open() as fh:
            return cls.from_lines(fh)

    def losses(self, lo: int, hi: int, shots: tuple[int, int | None] = (0, None)) -> list[float]:
        """The losses of the labelled events at positions ``[lo, hi)`` whose support size lies
        in ``shots`` (inclusive; None: no upper bound)."""
        s_lo, s_hi = shots
        return [
            loss
            for p, s, loss in zip(self.pos, self.shots, self.loss, strict=True)
            if loss is not None and lo <= p < hi and s >= s_lo and (s_hi is None or s <= s_hi)
        ]

    def window_loss(self, lo: int, hi: int, shots: tuple[int, int | None] = (0, None)) -> float:
        vals = self.losses(lo, hi, shots)
        return sum(vals) / len(vals) if vals else float("nan")

    def experts_from(self, start: int, prefix: str) -> list[tuple[int, int | None]]:
        """``(position, top expert)`` of the events at or after ``start`` of the tasks whose id
        starts with ``prefix``."""
        return [
            (p, e)
            for p, t, e in zip(self.pos, self.task, self.expert, strict=True)
            if p >= start and t.startswith(prefix)
        ]


def return_delay(
    rows: Sequence[tuple[int, int | None]],
    start: int,
    expert: int = OLD_EXPERT,
    window: int = RETURN_WINDOW,
    share: float = RETURN_SHARE,
) -> tuple[int | None, list[float]]:
    """How many events after ``start`` the returning family is served by ``expert``: ``rows``
    (its events' ``(position, top expert)`` in stream order) cut into consecutive windows of
    ``window`` events (a last, incomplete window is left out); the delay is from ``start`` to
    the first event of the first window from which on every window has at least ``share`` of
    its events served by ``expert``. ``(delay or None if there is none, each window's share)``.
    """
    shares = []
    for k in range(len(rows) // window):
        chunk = rows[k * window : (k + 1) * window]
        shares.append(sum(e == expert for _, e in chunk) / window)
    first = None
    for k in range(len(shares) - 1, -1, -1):
        if shares[k] < share:
            break
        first = k
    if first is None:
        return None, shares
    return rows[first * window][0] - start, shares


def update_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Meta-update outcomes; promoted ones split by what they did to the set (``add`` /
    ``replace``; ``overwrite``: no expert record, the single-model behaviour)."""
    counts = dict.fromkeys(("add", "replace", "overwrite", "rejected", "rolled_back", "failed"), 0)
    for r in records:
        if r["outcome"] == "promoted":
            action = (r.get("experts") or {}).get("action", "overwrite")
            counts[action] = counts.get(action, 0) + 1
        elif r["outcome"] in counts:
            counts[r["outcome"]] += 1
    return counts


def first_promotion(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    promoted = [r for r in records if r["outcome"] == "promoted"]
    return min(promoted, key=lambda r: r["event_index"]) if promoted else None


def experts_served(records: Sequence[dict[str, Any]], version: int) -> list[int]:
    """The expert ids of the served ``version`` (after rollbacks: the summary's
    ``model_version``), from the promoted records' ``experts.members``; one model when it
    carries none (the shipped version 1, or a model that overwrote it)."""
    for r in records:
        if r["outcome"] == "promoted" and r["version"] == version and r.get("experts"):
            return list(r["experts"]["members"])
    return [version]


def added_before(records: Sequence[dict[str, Any]], index: int) -> bool:
    """Whether a promoted update before stream position ``index`` added an expert."""
    return any(
        r["outcome"] == "promoted"
        and (r.get("experts") or {}).get("action") == "add"
        and r["event_index"] < index
        for r in records
    )


def saved_model(models: Path, version: int) -> Path | None:
    """The saved checkpoint of ``version`` in ``--models-dir`` (else the highest saved)."""
    exact = models / f"model-v{version}.safetensors"
    if exact.is_file():
        return exact
    saved = sorted(models.glob("model-v*.safetensors"), key=lambda p: int(p.stem.split("-v")[1]))
    return saved[-1] if saved else None


def _fmt_bin(b: tuple[int, int | None]) -> str:
    lo, hi = b
    if hi is None:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


# -- the measurement ---------------------------------------------------------------------------
@dataclass
class Run:
    result: dict[str, Any]
    command: str
    preds: Predictions
    models: Path

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.result.get("meta_updates", [])


def _drift_points(name: str) -> tuple[int, ...]:
    from stream_meta.tasks.scenarios import get_scenario

    return tuple(get_scenario(name).drift_points)


def measure_experts(ctx: Context, section: Section) -> None:
    cut = f"{EXPERTS_LOSS_CUT:.0%}"
    t_loss = (
        f"loss over the {EXPERTS_WINDOW:,} events after the first promotion of `experts` >= "
        f"{cut} below no update on the same events"
    )
    t_forget = (
        f"old family's loss served by the last set of experts within +{EXPERTS_FORGETTING:.0%} "
        "of the shipped model's"
    )
    t_return = (
        f"`{RETURN_SCENARIO}`: the returning family is served by its old expert (id "
        f"{OLD_EXPERT}) within {RETURN_DELAY:,} events of its return"
    )
    t_cost = "engine events/s of `experts` vs no update; experts served at the end (no target)"
    if not need_checkpoint(ctx, section, "sinusoid", [t_loss, t_forget, t_return, t_cost]):
        return
    tmp = Path(ROOT / "build" / "bench-experts")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = [
        "| scenario | strategy | updates: promoted add / replace / overwrite; rejected / "
        "rolled back | experts at the end | first promotion | loss, "
        f"{EXPERTS_WINDOW:,} events after `experts`' first promotion | loss, drift to the end | "
        + " | ".join(f"same window, {_fmt_bin(b)} shots (events)" for b in SHOT_BINS)
        + " | same window: share of the summed loss on 0-2-shot events |",
        "|---" * (8 + len(SHOT_BINS)) + "|",
    ]
    all_runs: dict[str, dict[str, Run]] = {}
    for name in EXPERTS_SCENARIOS:
        runs = _strategy_runs(ctx, section, name, tmp)
        all_runs[name] = runs
        drift = _drift_points(name)[0]
        first = first_promotion(runs["experts"].records)
        swap = None if first is None else int(first["event_index"])
        rows += _scenario_rows(name, runs, drift, swap, ctx.sizes.meta_events)
        _loss_check(section, name, runs, swap, t_loss)
    section.tables.append("\n".join(rows))
    _forgetting_checks(ctx, section, all_runs, t_forget)
    _return_check(section, all_runs[RETURN_SCENARIO], t_return)
    _cost_check(section, all_runs, t_cost)
    section.notes.append(
        "Strategies on the same events (`stream-meta run --scenario`, default settings, updates "
        "trained inline: the stream waits, so every strategy sees the same events): **none** "
        "(`--no-meta-update`), **experts** (the default, `meta_update.max_experts=4`: a "
        "promoted candidate is added as an expert beside the served ones or replaces its "
        "parent expert, and each task is routed among the experts by its prequential "
        "evidence), **single** (`--set meta_update.max_experts=1`: a promoted candidate "
        "overwrites the model, the behaviour before experts). The window of the loss columns is "
        f"the {EXPERTS_WINDOW:,} events after the *experts* strategy's first promotion, for "
        "every strategy. The old family's loss is the prequential loss of "
        f"`stream-meta run --scenario {FORGETTING_SCENARIO} --events {FORGETTING_EVENTS:,}` "
        "(same default seed: the same events) served by a run's last served version (its "
        "`model-v<version>.safetensors` in `--models-dir`, a set of experts being one "
        "checkpoint) against the shipped checkpoint; not `stream-meta evaluate`, which scores "
        "only a set's primary expert. Loss = squared error of labelled events, predicted "
        "before they are learnt (0 shots: the task's first labelled event, predicted from no "
        "example of it)."
    )
    section.notes.append(_shots_note(all_runs))
    same = _same_events_note(all_runs)
    if same:
        section.notes.append(same)


def same_events(a: Predictions, b: Predictions, hi: int) -> bool:
    """Whether two runs saw the same events (positions, tasks, support sizes) before ``hi``."""

    def key(p: Predictions) -> list[tuple[int, str, int]]:
        return [(i, t, s) for i, t, s in zip(p.pos, p.task, p.shots, strict=True) if i < hi]

    return key(a) == key(b)


def _same_events_note(all_runs: dict[str, dict[str, Run]]) -> str | None:
    """Says so when ``sinusoid-recurring`` repeats another scenario's events until its
    return (then the loss check and the table repeat that scenario's numbers)."""
    if RETURN_SCENARIO not in all_runs:
        return None
    back = _drift_points(RETURN_SCENARIO)[-1]
    rec = all_runs[RETURN_SCENARIO]["none"].preds
    for name, runs in all_runs.items():
        if name != RETURN_SCENARIO and same_events(runs["none"].preds, rec, back):
            return (
                f"`{RETURN_SCENARIO}` is `{name}` (the same events: tasks and support sizes) "
                f"until its return at {back:,}; its numbers up to there repeat those of "
                f"`{name}` (up to the last batch before {back:,}, which also holds returning "
                "events), and differ only from the return on."
            )
    return None


def _few_shot_share(preds: Predictions, lo: int, hi: int) -> float:
    """The share of the summed loss of ``[lo, hi)`` carried by its 0- to 2-shot events."""
    total = sum(preds.losses(lo, hi))
    return sum(preds.losses(lo, hi, (0, 2))) / total if total > 0 else float("nan")


def _shots_note(all_runs: dict[str, dict[str, Run]]) -> str:
    parts = []
    for name, runs in all_runs.items():
        first = first_promotion(runs["experts"].records)
        if first is None:
            continue
        lo = int(first["event_index"])
        hi = lo + EXPERTS_WINDOW
        shares = " / ".join(
            f"{_few_shot_share(runs[k].preds, lo, hi):.1%}" for k in ("none", "experts")
        )
        gains = []
        for b in SHOT_BINS:
            a, n = (
                runs["experts"].preds.window_loss(lo, hi, b),
                runs["none"].preds.window_loss(lo, hi, b),
            )
            gains.append(f"{_fmt_bin(b)}: {a / n - 1:+.0%}")
        parts.append(f"`{name}` {shares} (experts vs none by shots: {', '.join(gains)})")
    return (
        "A window's loss is a mean over its labelled events, and its 0- to 2-shot events (a "
        "task's first events) carry a large part of it: their share of the summed loss of the "
        "window after the first promotion (none / experts) is "
        + "; ".join(parts)
        + ". Their error is mostly irreducible: one or two points of a task do not determine "
        "its function (after the amplitude shift, its amplitude), whichever model serves them; "
        f"where they carry nearly all the loss, a {EXPERTS_LOSS_CUT:.0%} cut of the window's "
        "loss needs that cut of their error, and the 3+-shot columns show the tasks once "
        "adapted."
    )


def _strategy_runs(ctx: Context, section: Section, name: str, tmp: Path) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    for strategy, extra in EXPERTS_STRATEGIES.items():
        result, cmd, out, models = scenario_run(ctx, name, strategy, tmp, *extra)
        runs[strategy] = Run(result, cmd, Predictions.read(out), models)
        section.raw[f"{name}/{strategy}"] = {
            "command": cmd,
            "model_version": result.get("model_version"),
            "prequential_loss": result.get("prequential_loss"),
            "engine_events_per_s": result.get("engine_events_per_s"),
            "meta_updates": [
                {k: v for k, v in r.items() if k not in ("validation", "train")}
                for r in result.get("meta_updates", [])
            ],
            "loss_windows": result.get("loss_windows"),
        }
    return runs


def _scenario_rows(
    name: str, runs: dict[str, Run], drift: int, swap: int | None, events: int
) -> list[str]:
    rows = []
    for strategy, run in runs.items():
        c = update_counts(run.records)
        if strategy == "none":
            counts, served = "-", "1 (the shipped model)"
        else:
            counts = (
                f"{c['add']} / {c['replace']} / {c['overwrite']}; {c['rejected']} / "
                f"{c['rolled_back']}" + (f" ({c['failed']} failed)" if c["failed"] else "")
            )
            ids = experts_served(run.records, int(run.result.get("model_version", 1)))
            served = f"{len(ids)} ({', '.join(map(str, ids))})"
        first = first_promotion(run.records)
        first_txt = "-" if first is None else f"{first['event_index']:,}"
        cells = ["-"] * (2 + len(SHOT_BINS))
        if swap is not None:
            lo, hi = swap, swap + EXPERTS_WINDOW
            cells[0] = f"{run.preds.window_loss(lo, hi):.4f}"
            for j, b in enumerate(SHOT_BINS):
                n = len(run.preds.losses(lo, hi, b))
                cells[1 + j] = f"{run.preds.window_loss(lo, hi, b):.4f} ({n:,})"
            cells[-1] = f"{_few_shot_share(run.preds, lo, hi):.1%}"
        tail = run.preds.window_loss(drift, events)
        rows.append(
            f"| `{name}` | {strategy} | {counts} | {served} | {first_txt} | {cells[0]} | "
            f"{tail:.4f} | " + " | ".join(cells[1:]) + " |"
        )
    return rows


def _loss_check(
    section: Section, name: str, runs: dict[str, Run], swap: int | None, target: str
) -> None:
    ex, none, single = runs["experts"], runs["none"], runs["single"]
    how = f"`{ex.command}`, `{none.command}` and `{single.command}`: losses of `--output`"
    if swap is None:
        section.checks.append(
            Check(f"{target} (`{name}`)", "no update of `experts` was promoted", False, how)
        )
        return
    first = first_promotion(ex.records)
    assert first is not None
    action = (first.get("experts") or {}).get("action", "overwrite")
    lo, hi = swap, swap + EXPERTS_WINDOW
    a, b, s = (r.preds.window_loss(lo, hi) for r in (ex, none, single))
    measured = (
        f"{a:.4f} vs {b:.4f} without an update ({a / b - 1:+.1%}; events {lo:,}-{hi:,}, first "
        f"promotion: {action} at {lo:,}); `single` on the same events {s:.4f} ({s / b - 1:+.1%})"
    )
    sf = first_promotion(single.records)
    if sf is None:
        measured += "; `single` promoted no update"
    else:
        q = int(sf["event_index"])
        s2 = single.preds.window_loss(q, q + EXPERTS_WINDOW)
        b2 = none.preds.window_loss(q, q + EXPERTS_WINDOW)
        measured += (
            f"; after its own first promotion (at {q:,}) {s2:.4f} vs {b2:.4f} ({s2 / b2 - 1:+.1%})"
        )
    section.checks.append(
        Check(f"{target} (`{name}`)", measured, a <= (1 - EXPERTS_LOSS_CUT) * b, how)
    )


def _stationary(ctx: Context, checkpoint: Path) -> tuple[dict[str, Any], str]:
    args = [
        "run",
        "--checkpoint",
        rel(checkpoint),
        "--scenario",
        FORGETTING_SCENARIO,
        "--events",
        str(FORGETTING_EVENTS),
        "--no-meta-update",
        "--json",
        "-q",
        "--metrics-port",
        "0",
    ]
    return cached_cli(ctx, args)


def _forgetting_checks(
    ctx: Context, section: Section, all_runs: dict[str, dict[str, Run]], target: str
) -> None:
    ck = ctx.checkpoint("sinusoid")
    assert ck is not None
    base, cmd_b = _stationary(ctx, ck)
    lb = float(base["prequential_loss"])
    raw: dict[str, Any] = {"shipped": {"command": cmd_b, "prequential_loss": lb}}
    context = []
    for name, runs in all_runs.items():
        for strategy in ("experts", "single"):
            run = runs[strategy]
            version = int(run.result.get("model_version", 1))
            path = saved_model(run.models, version) if version > 1 else None
            label = f"{target} (`{name}`)"
            if path is None:
                if strategy == "experts":
                    section.checks.append(
                        Check(
                            label,
                            "not measured: no update was promoted (the shipped model serves)",
                            None,
                            f"`{run.command}`",
                        )
                    )
                else:
                    context.append(f"`{name}`: no update promoted")
                continue
            res, cmd = _stationary(ctx, path)
            la = float(res["prequential_loss"])
            raw[f"{name}/{strategy}"] = {
                "command": cmd,
                "checkpoint": rel(path),
                "prequential_loss": la,
                "ratio": la / lb,
            }
            if strategy == "single":
                context.append(f"`{name}` {path.stem}: {la:.4f} ({la / lb - 1:+.1%})")
                continue
            ids = experts_served(run.records, version)
            section.checks.append(
                Check(
                    label,
                    f"{path.stem} ({len(ids)} experts: {', '.join(map(str, ids))}): {la:.4f} vs "
                    f"{lb:.4f} shipped = {la / lb:.3f}x ({la / lb - 1:+.1%})",
                    la <= (1 + EXPERTS_FORGETTING) * lb,
                    f"`{cmd}` and `{cmd_b}`: `prequential_loss`",
                )
            )
    section.checks.append(
        Check(
            "same for `single`'s last model (no target)",
            f"shipped {lb:.4f}; " + "; ".join(context),
            None,
            f"`stream-meta run --checkpoint <last model> --scenario {FORGETTING_SCENARIO} "
            f"--events {FORGETTING_EVENTS} --no-meta-update` (`prequential_loss`)",
        )
    )
    section.raw["forgetting"] = raw


def _return_check(section: Section, runs: dict[str, Run], target: str) -> None:
    ex = runs["experts"]
    points = _drift_points(RETURN_SCENARIO)
    back = points[1] if len(points) > 1 else points[0]
    how = (
        f"`{ex.command}`: `expert` of `--output`, events of `{RETURN_PREFIX}*` tasks from "
        f"{back:,} in windows of {RETURN_WINDOW}; the delay to the first window from which on "
        f"every window has >= {RETURN_SHARE:.0%} served by expert {OLD_EXPERT}"
    )
    if not added_before(ex.records, back):
        section.checks.append(
            Check(target, f"no expert was added before the return at {back:,}", False, how)
        )
        section.raw["return"] = {"return_index": back, "added_before": False}
        return
    rows = ex.preds.experts_from(back, RETURN_PREFIX)
    delay, shares = return_delay(rows, back)
    first = ", ".join(f"{s:.0%}" for s in shares[:8])
    section.raw["return"] = {
        "return_index": back,
        "events": len(rows),
        "window": RETURN_WINDOW,
        "shares": shares,
        "delay": delay,
    }
    if delay is None:
        measured = (
            f"never: of {len(shares)} windows of {RETURN_WINDOW} returning-family events the "
            f"last is below {RETURN_SHARE:.0%} (shares {first}, ...; last {shares[-1]:.0%})"
            if shares
            else "no event of the returning family"
        )
        section.checks.append(Check(target, measured, False, how))
        return
    loss_old = ex.preds.window_loss(back, back + RETURN_DELAY)
    loss_none = runs["none"].preds.window_loss(back, back + RETURN_DELAY)
    measured = (
        f"{delay:,} events (shares of expert {OLD_EXPERT} in the first windows: {first}; "
        f"lowest from then on {min(shares[len(shares) - _tail_len(shares) :]):.0%}); "
        f"loss over the {RETURN_DELAY:,} events after the return {loss_old:.4f} vs "
        f"{loss_none:.4f} without an update"
    )
    section.checks.append(Check(target, measured, delay <= RETURN_DELAY, how))


def _tail_len(shares: Sequence[float]) -> int:
    """How many windows at the end all reach the share."""
    n = 0
    for s in reversed(shares):
        if s < RETURN_SHARE:
            break
        n += 1
    return n


def _cost_check(section: Section, all_runs: dict[str, dict[str, Run]], target: str) -> None:
    parts = []
    for name, runs in all_runs.items():
        e, n = runs["experts"].result, runs["none"].result
        ee, en = float(e["engine_events_per_s"]), float(n["engine_events_per_s"])
        ids = experts_served(runs["experts"].records, int(e.get("model_version", 1)))
        parts.append(f"`{name}`: {ee:,.0f} vs {en:,.0f} ({ee / en:.2f}x), {len(ids)} experts")
    section.checks.append(
        Check(
            target,
            "; ".join(parts),
            None,
            "`engine_events_per_s` of the run summaries (events over the engine's time: "
            "serving and learning, not training updates); experts: the `meta_updates` "
            "records of the served version",
        )
    )


__all__ = ["measure_experts"]
