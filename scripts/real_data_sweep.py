"""Train and evaluate the default ``train --data`` model on every real data set, one line each.

    python -m scripts.real_data_sweep [--sets radon,exam] [--set lr=3e-4 --set patience=12]
        [--seeds 0] [--split-seeds 0,1,2] [--json-out results.jsonl] [--threads 1]

For each set in ``tests/data/real`` (or ``--sets``), each training seed and each split seed:
:func:`~stream_meta.tasklog.read_tasks` with its schema (split seed 0 is the split
``train --data`` uses), :func:`~stream_meta.log_training.train_on_log` (``LogTrainConfig``
with the ``--set`` overrides), :func:`~stream_meta.evaluation.prequential.evaluate_table` on
the test tasks. One line per run: the validation loss the model was chosen on (model units, 1.0
= the pooled linear fit's residual variance on the training tasks) and its ratio to the pooled
fit's on the same validation episodes (when the report has it), the test loss (MSE, or log
loss for classification), the best baseline and its loss, their ratio, the 0-shot ratio to the
pooled linear (logistic) model, the worst support-size bucket's ratio to the best baseline *in
that bucket*, the training seconds and the best step. The last line averages the ratios.

Choose settings on the validation losses or on averages over sets (and split seeds), never on
one set's test numbers: the test splits are small (radon: 13 tasks, sleepstudy: 4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_meta.evaluation.prequential import evaluate_table
from stream_meta.log_training import LogTrainConfig, train_on_log
from stream_meta.schema import load_schema
from stream_meta.tasklog import read_tasks

REAL = Path(__file__).resolve().parent.parent / "tests" / "data" / "real"
SETS = ("radon", "exam", "contraception", "wages", "sleepstudy", "spruce", "mathachieve")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "patience=12"]`` -> ``{"lr": 0.0003, "patience": 12}`` (LogTrainConfig
    fields only)."""
    names = {f.name for f in dataclasses.fields(LogTrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in names:
            raise SystemExit(f"unknown LogTrainConfig field {key!r} (one of {sorted(names)})")
        out[key] = _value(text)
    return out


def worst_bucket(report: dict[str, Any]) -> tuple[str | None, float | None]:
    """The support-size bucket where stream-meta is furthest above the best baseline of that
    bucket: ``(label, ratio)``."""
    ours = report["strategies"]["stream-meta"]["buckets"]
    worst: tuple[str | None, float | None] = (None, None)
    for label, loss in ours.items():
        if loss is None:
            continue
        best = min(
            s["buckets"][label]
            for name, s in report["strategies"].items()
            if name != "stream-meta" and s["buckets"][label] is not None
        )
        ratio = loss / best if best > 0 else float("inf")
        if worst[1] is None or ratio > worst[1]:
            worst = (label, ratio)
    return worst


def run_one(name: str, config: LogTrainConfig, split_seed: int = 0) -> dict[str, Any]:
    schema = load_schema(REAL / f"{name}.toml")
    with read_tasks(REAL / f"{name}.jsonl.gz", schema, seed=split_seed) as table:
        model, train_report = train_on_log(table, config, progress=False)
        report = evaluate_table(model, table, "test")
    ours = report["strategies"]["stream-meta"]
    best = report["best_baseline"]
    label, bucket_ratio = worst_bucket(report)
    train = train_report["train"]
    return {
        "set": name,
        "seed": config.seed,
        "split_seed": split_seed,
        "size": train_report["model_size"],
        "val": train.get("best_validation_loss"),
        "val_pooled": train_report.get("validation_pooled_loss"),
        "loss": ours["loss"],
        "best_baseline": best,
        "best_baseline_loss": report["strategies"][best]["loss"],
        "ratio": report["ratio_to_best_baseline"],
        "ratio_0shot": report["ratio_0shot_to_pooled"],
        "worst_bucket": label,
        "worst_bucket_ratio": bucket_ratio,
        "seconds": train["seconds"],
        "best_step": train.get("best_step"),
        "steps": train["steps"],
        "baselines": {k: v["loss"] for k, v in report["strategies"].items()},
        "buckets": {k: v["buckets"] for k, v in report["strategies"].items()},
        "events_by_bucket": report["events_by_bucket"],
        "validation_checks": train_report["validation_checks"],
    }


def line(r: dict[str, Any]) -> str:
    if "refused" in r:
        return f"{r['set']:<13} s{r['seed']}/{r['split_seed']} refused: {r['refused']}"
    zero = "   -  " if r["ratio_0shot"] is None else f"{r['ratio_0shot']:6.3f}"
    pooled = "      " if not r.get("val_pooled") else f"{r['val'] / r['val_pooled']:.4f}"
    return (
        f"{r['set']:<13} s{r['seed']}/{r['split_seed']} {r['size']:<6} val {r['val']:.4f} "
        f"/pooled {pooled}  "
        f"loss {r['loss']:8.4f}  best {r['best_baseline']:<16} {r['best_baseline_loss']:8.4f}  "
        f"ratio {r['ratio']:6.3f}  0shot {zero}  "
        f"worst[{r['worst_bucket']:>5}] {r['worst_bucket_ratio']:6.3f}  "
        f"{r['seconds']:6.1f}s  best@{r['best_step']}/{r['steps']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument(
        "--split-seeds",
        default="0",
        help="comma-separated seeds of the task split (0: the split train --data uses)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path, help="append one JSON line per run here")
    p.add_argument("--tag", default="", help="a label stored with each JSON line")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    extra = overrides(args.set)
    results = []
    runs = [
        (split, seed, name)
        for split in [int(s) for s in args.split_seeds.split(",")]
        for seed in [int(s) for s in args.seeds.split(",")]
        for name in args.sets.split(",")
    ]
    for split, seed, name in runs:
        config = LogTrainConfig(**{**extra, "seed": seed})
        try:
            r = run_one(name, config, split)
        except ValueError as exc:  # e.g. a split with too few tasks
            r = {"set": name, "seed": seed, "split_seed": split, "refused": str(exc)}
        else:
            results.append(r)
        print(line(r), flush=True)
        if args.json_out:
            with args.json_out.open("a") as f:
                f.write(json.dumps({"tag": args.tag, "settings": extra, **r}) + "\n")
    if len(results) > 1:
        ratios = np.array([r["ratio"] for r in results])
        vals = np.array([r["val"] / r["val_pooled"] for r in results if r.get("val_pooled")])
        val_text = (
            f"val/pooled {vals.mean():.4f} (geo-mean {np.exp(np.log(vals).mean()):.4f})  "
            if len(vals)
            else ""
        )
        print(
            f"{'mean':<13} {val_text}ratio {ratios.mean():.3f}  "
            f"geo-mean ratio {np.exp(np.log(ratios).mean()):.3f}  "
            f"worst ratio {ratios.max():.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
