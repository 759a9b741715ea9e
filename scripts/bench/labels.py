"""Label requests (issue 16 items 1-2): section ``labels``. ``stream-meta replay LOG
--label-budget 0.1`` teaches only the labels a policy requested (every label still scores);
the uncertainty policy against random requests and first-k at the same budget, on a sinusoid
stream with the shipped model and on real data sets with a model trained on their training
tasks (``train --data``; the replay holds the other tasks only, which the model never saw).

A label requested in a batch is learned with the next batch, so the batch size is the labels'
turnaround: ``BATCH`` events on the sinusoid stream and digits (the service's default
micro-batch, 512, as context), ``REAL_BATCH`` on the small real logs (sleepstudy has 70
events: at 128 every label would come back after the last event)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

from scripts.bench.common import ROOT, Check, Context, Section, cli_json, need_checkpoint, rel
from stream_meta.tasklog import assign_splits
from stream_meta.tasks.scenarios import get_scenario

BUDGET = 0.1
LOSS_CUT = 0.30  # uncertainty's prequential loss at least this much below random's
BATCH = 128
SLOW_BATCH = 512
REAL_BATCH = 8  # the real logs are small (70 to 7,185 events): a turnaround of 8 events
SINUSOID_EVENTS = 20_000
REAL = ROOT / "tests" / "data" / "real"
REAL_SETS = ("wages", "mathachieve", "exam", "radon", "spruce", "sleepstudy", "contraception")
POLICIES = ("uncertainty", "random", "first-k")


def measure_labels(ctx: Context, section: Section) -> None:
    tmp = ROOT / "build" / "bench-labels"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = f"uncertainty >= {LOSS_CUT:.0%} below random at a {BUDGET:.0%} budget"
    if not need_checkpoint(ctx, section, "sinusoid", [target]):
        return
    ckpt = ctx.checkpoint("sinusoid")
    assert ckpt is not None
    events = SINUSOID_EVENTS // (4 if ctx.quick else 1)
    log = tmp / "sinusoid-stationary.jsonl"
    get_scenario("sinusoid-stationary").stream(seed=11).to_jsonl(log, events)
    rows = [
        "| data | turnaround (events) | labels used | uncertainty | random | first-k "
        "| every label | no label | uncertainty vs random |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    met: list[str] = []
    for batch in (BATCH, SLOW_BATCH):
        runs, cmd = _replay(log, tmp / f"sinusoid-{batch}", batch, "--checkpoint", rel(ckpt))
        cut = _row(rows, f"sinusoid-stationary, {events:,} events", batch, runs)
        section.raw[f"sinusoid/{batch}"] = _raw(runs, cmd)
        if batch == BATCH:
            section.checks.append(_check("sinusoid stream (shipped model)", cut, cmd))
            if cut <= -LOSS_CUT:
                met.append("sinusoid")
    for name in REAL_SETS[: 3 if ctx.quick else None]:
        ckpt_out = tmp / f"{name}.safetensors"
        cli_json(
            [
                "train",
                "--data",
                rel(REAL / f"{name}.jsonl.gz"),
                "--schema",
                rel(REAL / f"{name}.toml"),
                "--out",
                rel(ckpt_out),
                "--json",
                "-q",
            ]
        )
        held_out = _held_out(name, tmp / f"{name}-held-out.jsonl")
        runs, cmd = _replay(
            held_out, tmp / f"{name}-{REAL_BATCH}", REAL_BATCH, "--checkpoint", rel(ckpt_out)
        )
        n = runs["uncertainty"]["labelled"]
        cut = _row(rows, f"{name} (held-out tasks, {n:,} labelled events)", REAL_BATCH, runs)
        section.raw[f"{name}/{REAL_BATCH}"] = _raw(runs, cmd)
        section.checks.append(_check(f"real set {name} (trained on its training tasks)", cut, cmd))
        if cut <= -LOSS_CUT:
            met.append(name)
    digits = ROOT / "tests" / "data" / "logs" / "digits-new-transform"
    runs, cmd = _replay(digits, tmp / f"digits-{BATCH}", BATCH, "--family", "digits")
    n = runs["uncertainty"]["labelled"]
    what = f"digits-new-transform (scikit-learn's digits, {n:,} labelled)"
    cut = _row(rows, what, BATCH, runs)
    section.raw[f"digits/{BATCH}"] = _raw(runs, cmd)
    section.checks.append(_check("real set digits (shipped digits model)", cut, cmd))
    if cut <= -LOSS_CUT:
        met.append("digits")
    section.tables.append("\n".join(rows))
    real_met = [m for m in met if m != "sinusoid"]
    section.checks.append(
        Check(
            f"uncertainty >= {LOSS_CUT:.0%} below random at a {BUDGET:.0%} budget on the "
            "sinusoid stream and at least one real set",
            f"sinusoid: {'met' if 'sinusoid' in met else 'missed'}; real sets met: "
            f"{', '.join(real_met) or 'none'}",
            "sinusoid" in met and bool(real_met),
            "the rows above",
        )
    )
    section.notes.append(
        "Loss is the prequential loss over every labelled event (each scored before any label "
        "of it could be learned); a policy learns only the labels it requested, at most "
        f"{BUDGET:.0%} of the labelled events seen so far, each arriving with the next batch "
        "(the turnaround). The real sets' replays hold only the validation and test tasks of "
        "`train --data`'s split (by a hash of the task id), in log order."
    )


def _replay(log: Path, report: Path, batch: int, *extra: str) -> tuple[dict[str, Any], str]:
    """The three policies at the budget (by policy), and the bounds: every label learned
    (``full``) and none (``global``, the prior alone), on the same events."""
    common = ["--batch-size", str(batch), "--json", "-q", *extra]
    budgeted = ["--strategy", "full", "--label-budget", str(BUDGET)]
    result, _, cmd = cli_json(["replay", rel(log), *budgeted, "--report", rel(report), *common])
    runs = {k.split("@", 1)[1]: v for k, v in result["strategies"].items()}
    bounds = ["--strategy", "full", "--strategy", "global", "--report", rel(report) + "-bounds"]
    result, _, _ = cli_json(["replay", rel(log), *bounds, *common])
    runs["every label"] = result["strategies"]["full"]
    runs["no label"] = result["strategies"]["global"]
    return runs, cmd


def _held_out(name: str, out: Path) -> Path:
    """The events of the tasks ``train --data`` did not train on (its validation and test
    splits), in log order, as JSON lines."""
    with gzip.open(REAL / f"{name}.jsonl.gz", "rt") as f:
        events = [json.loads(line) for line in f if line.strip()]
    ids = list(dict.fromkeys(str(e["task_id"]) for e in events))
    splits = dict(zip(ids, assign_splits(ids).tolist(), strict=True))
    with out.open("w") as f:
        for e in events:
            if splits[str(e["task_id"])] != "train":
                f.write(json.dumps(e) + "\n")
    return out


def _row(rows: list[str], what: str, batch: int, runs: dict[str, Any]) -> float:
    loss = {p: runs[p]["prequential_loss"] for p in (*POLICIES, "every label", "no label")}
    used = runs["uncertainty"]["labels"]["labels_used"]
    n = runs["uncertainty"]["labels"]["labelled_scored"]
    cut = loss["uncertainty"] / loss["random"] - 1.0
    cells = " | ".join(f"{loss[p]:.4g}" for p in (*POLICIES, "every label", "no label"))
    rows.append(f"| {what} | {batch} | {used:,} of {n:,} ({used / n:.1%}) | {cells} | {cut:+.1%} |")
    return cut


def _check(what: str, cut: float, cmd: str) -> Check:
    return Check(
        f"{what}: uncertainty >= {LOSS_CUT:.0%} below random at {BUDGET:.0%} labels",
        f"{cut:+.1%}",
        cut <= -LOSS_CUT,
        f"`{cmd}`",
    )


def _raw(runs: dict[str, Any], cmd: str) -> dict[str, Any]:
    out: dict[str, Any] = {"command": cmd}
    for p, r in runs.items():
        out[p] = {"prequential_loss": r["prequential_loss"], "labelled": r["labelled"]}
        if "labels" in r:
            out[p]["labels"] = {k: v for k, v in r["labels"].items() if k != "curve"}
            out[p]["curve"] = r["labels"]["curve"]
    return out
