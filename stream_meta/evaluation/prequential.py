"""Prequential evaluation of a model on a user's tasks, against the baselines a statistician
fits first (``stream-meta evaluate --data``).

The held-out tasks' labelled events are replayed in stream order through the serving engine
(:class:`~stream_meta.engine.Engine`, default settings: retrieval, bounded support sets,
micro-batches). Every event is predicted first, scored, then learned, so the loss of an event is
that of a prediction the service would have made at that point. The baselines of
:mod:`stream_meta.evaluation.population`, fitted on the *training* tasks, see the same events
in the same order. By default the engines first serve the *training* tasks' events (not scored):
the task index then holds the tasks the model was trained on, as it would in a service that
consumed the recorded stream, so retrieval has somewhere to look. Losses are reported overall
and by the task's support size when it was predicted, in buckets ``0, 1, 2, 3-4, 5-9, 10-19,
20+``, all in the user's units (squared error, or log loss and accuracy for classification).

The replay strategies of :mod:`stream_meta.evaluation.strategies` that fit a user's tasks
(``maml``, ``finetune``, ``scratch``, ``nearest-task``: :data:`DATA_STRATEGIES`) can be replayed
over the same events too, each through its own engine (same support sets, same scoring) with its
adapter: the gradient baselines in the checkpoint's units, with initialisations trained on the
same training tasks (``stream-meta train-baseline --data``). ``best_baseline`` and
``ratio_to_best_baseline`` compare with the simple baselines only; ``best_strategy`` and
``ratio_to_best_strategy`` with every other entry (simple baselines and replay strategies).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from stream_meta.tasklog import TaskTable
from stream_meta.uncertainty import central_coverage, regression_calibration_error

__all__ = [
    "BUCKETS",
    "DATA_STRATEGIES",
    "bucket_of",
    "evaluate_table",
    "strategy_losses",
    "summarise",
]

#: support-size buckets: (label, lowest, highest) shots, inclusive
BUCKETS = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-4", 3, 4),
    ("5-9", 5, 9),
    ("10-19", 10, 19),
    ("20+", 20, 1 << 62),
)


#: replay strategies that serve a user's tasks (``evaluate --data --strategy``)
DATA_STRATEGIES = ("maml", "finetune", "scratch", "nearest-task")


def bucket_of(shots: np.ndarray) -> np.ndarray:
    """The bucket index of each support size.

    >>> bucket_of(np.array([0, 1, 2, 3, 4, 5, 19, 20, 500])).tolist()
    [0, 1, 2, 3, 3, 4, 5, 6, 6]
    """
    edges = np.array([lo for _, lo, _ in BUCKETS[1:]])
    return np.searchsorted(edges, shots, side="right")


def stream_rows(table: TaskTable, split: str) -> np.ndarray:
    """The labelled rows of a split's tasks in stream order."""
    rows = table.split_rows(split)
    return rows[np.argsort(table.pos[rows], kind="stable")]


def _events(table: TaskTable, rows: np.ndarray) -> Iterator[dict[str, Any]]:
    kind_int = table.schema.target == "classification"
    for r in rows.tolist():
        y = table.y[r]
        yield {
            "event_id": f"e{int(table.pos[r])}",
            "task_id": table.task_ids[_task_of(table, r)],
            "x": table.x[r].astype(np.float64).tolist(),
            "y": int(y) if kind_int else float(y),
        }


def _task_of(table: TaskTable, row: int) -> int:
    return int(np.searchsorted(table.offsets, row, side="right") - 1)


def model_losses(
    model: Any,
    table: TaskTable,
    rows: np.ndarray,
    settings: Any = None,
    warm_rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Replay ``rows`` through a fresh engine serving ``model`` (micro-batches of the settings'
    size, as served): per-event loss, support size and (classification) whether the predicted
    class was right; ``warm_rows`` as in :func:`engine_losses`."""
    from stream_meta.app import build_engine
    from stream_meta.config import Settings

    settings = settings or Settings()
    engine = build_engine(model, settings)
    return engine_losses(engine, table, rows, settings.engine.micro_batch, warm_rows)


def strategy_losses(
    name: str,
    model: Any,
    table: TaskTable,
    rows: np.ndarray,
    family: str,
    options: Any = None,
    settings: Any = None,
    warm_rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """:func:`model_losses` of replay strategy ``name`` (one of :data:`DATA_STRATEGIES`):
    a fresh engine with the strategy's settings and adapter
    (:func:`~stream_meta.evaluation.strategies.build_strategy_engine`; ``options``: its
    :class:`~stream_meta.evaluation.strategies.StrategyOptions`, where the initialisations are)."""
    from stream_meta.config import Settings
    from stream_meta.evaluation.strategies import (
        StrategyOptions,
        build_strategy_engine,
        strategy_settings,
    )

    if name not in DATA_STRATEGIES:
        raise ValueError(f"strategy {name!r} does not replay a log; one of {DATA_STRATEGIES}")
    s = strategy_settings(settings or Settings(), name)
    engine = build_strategy_engine(name, model, s, None, family, options or StrategyOptions())
    return engine_losses(engine, table, rows, s.engine.micro_batch, warm_rows)


def engine_losses(
    engine: Any,
    table: TaskTable,
    rows: np.ndarray,
    batch: int = 512,
    warm_rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Replay ``rows`` in order through ``engine``, ``batch`` events per call: per-event loss,
    support size, (classification) whether the predicted class was right and (regression,
    when the engine gives standard deviations) the standardised residual ``z``.

    ``warm_rows`` (the training tasks' events, in stream order) are served first and not
    scored, when the engine's adapter embeds tasks: the index then holds the tasks the model
    was trained on, as a service that consumed the recorded stream would."""
    if warm_rows is not None and len(warm_rows) and engine.adapter.embeds:
        for part in _chunks(_events(table, warm_rows), batch):
            engine.process(part)
        engine.flush_index()
    losses: list[float] = []
    shots: list[int] = []
    correct: list[int] = []
    z: list[float] = []
    classes = table.schema.target == "classification"
    for part in _chunks(_events(table, rows), batch):
        result = engine.process(part)
        out = result.outputs
        if result.rejections or out is None:
            raise ValueError(f"the engine refused an event: {result.rejections[:1]}")
        losses += out.losses
        shots += out.shots
        if classes:
            correct += [int(v == e["y"]) for v, e in zip(out.values, part, strict=True)]
        elif out.stds is not None:
            z += [
                (e["y"] - v) / sd if sd > 0 else math.nan
                for v, sd, e in zip(out.values, out.stds, part, strict=True)
            ]
    res = {"loss": np.asarray(losses, dtype=np.float64), "shots": np.asarray(shots)}
    if classes:
        res["correct"] = np.asarray(correct, dtype=np.float64)
    if z:
        res["z"] = np.asarray(z, dtype=np.float64)
    return res


def _chunks(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while part := list(itertools.islice(items, size)):
        yield part


def baseline_losses(table: TaskTable, rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The population baselines, fitted on the training tasks, replayed over ``rows``."""
    from stream_meta.evaluation import population

    train_rows = table.split_rows("train")
    tasks = np.searchsorted(table.offsets, train_rows, side="right") - 1
    data = population.TrainingData(
        x=np.asarray(table.x[train_rows], dtype=np.float64),
        y=np.asarray(table.y[train_rows]),
        task=tasks,
        kind=table.schema.target,
        n_classes=table.schema.n_classes,
    )
    fitted = population.baselines(data)
    kind = table.schema.target
    losses: dict[str, list[float]] = {b.name: [] for b in fitted}
    correct: dict[str, list[float]] = {b.name: [] for b in fitted}
    for e in _events(table, rows):
        x, y = np.asarray(e["x"]), e["y"]
        for b in fitted:
            p = np.asarray(b.predict(e["task_id"], x))
            losses[b.name].append(population.loss(kind, p, y))
            if kind == "classification":
                correct[b.name].append(float(int(np.argmax(p)) == y))
            b.learn(e["task_id"], x, y)
    out: dict[str, dict[str, np.ndarray]] = {}
    for b in fitted:
        res = {"loss": np.asarray(losses[b.name], dtype=np.float64)}
        if kind == "classification":
            res["correct"] = np.asarray(correct[b.name], dtype=np.float64)
        out[b.name] = res
    return out


def summarise(res: dict[str, np.ndarray], shots: np.ndarray) -> dict[str, Any]:
    """Overall and per-bucket mean loss (and accuracy) of one strategy's per-event results."""
    b = bucket_of(shots)
    out: dict[str, Any] = {"loss": float(res["loss"].mean()) if len(shots) else None}
    if "correct" in res:
        out["accuracy"] = float(res["correct"].mean()) if len(shots) else None
    if "z" in res:  # the served standard deviations' calibration
        out["coverage_90"] = central_coverage(res["z"], 0.9)
        out["calibration_error"] = regression_calibration_error(res["z"])
    out["buckets"] = {
        label: (float(res["loss"][b == i].mean()) if (b == i).any() else None)
        for i, (label, _, _) in enumerate(BUCKETS)
    }
    return out


def evaluate_table(
    model: Any,
    table: TaskTable,
    split: str = "test",
    settings: Any = None,
    *,
    strategies: Sequence[str] = (),
    family: str = "",
    options: Any = None,
    warm_start: bool = True,
) -> dict[str, Any]:
    """The prequential report of ``model``, every simple baseline and the replay
    ``strategies`` (of :data:`DATA_STRATEGIES`; ``family`` and ``options`` find their
    initialisations) on one split's tasks.

    ``warm_start``: the engines that index tasks first serve the training tasks' events
    (unscored), so retrieval can find them, as in a service that consumed the recorded
    stream; the baselines are fitted on the same training tasks."""
    rows = stream_rows(table, split)
    if not len(rows):
        raise ValueError(f"the {split} split holds no labelled event")
    warm = stream_rows(table, "train") if warm_start else None
    ours = model_losses(model, table, rows, settings, warm)
    shots = ours["shots"]
    report = {"stream-meta": summarise(ours, shots)}
    simple = baseline_losses(table, rows)
    for name, res in simple.items():
        report[name] = summarise(res, shots)
    for name in strategies:
        res = strategy_losses(name, model, table, rows, family, options, settings, warm)
        if len(res["loss"]) != len(rows) or not np.array_equal(res["shots"], shots):
            raise RuntimeError(f"strategy {name} did not serve the same events")
        report[name] = summarise(res, shots)
    counts = {label: int((bucket_of(shots) == i).sum()) for i, (label, _, _) in enumerate(BUCKETS)}
    ours_loss = report["stream-meta"]["loss"]
    best = min(simple, key=lambda k: report[k]["loss"])
    others = [k for k in report if k != "stream-meta"]
    best_any = min(others, key=lambda k: report[k]["loss"])
    metric = "mse" if table.schema.target == "regression" else "log_loss"
    return {
        "split": split,
        "tasks": len(table.tasks_in(split)),
        "events": len(rows),
        "warm_start_events": 0 if warm is None else len(warm),
        "metric": metric,
        "events_by_bucket": counts,
        "strategies": report,
        "best_baseline": best,
        "ratio_to_best_baseline": ours_loss / report[best]["loss"],
        "best_strategy": best_any,
        "ratio_to_best_strategy": ours_loss / report[best_any]["loss"],
        "ratio_0shot_to_pooled": _zero_shot_ratio(report, table.schema.target),
    }


def _zero_shot_ratio(strategies: dict[str, Any], kind: str) -> float | None:
    pooled = "pooled-linear" if kind == "regression" else "pooled-logistic"
    ours = strategies["stream-meta"]["buckets"]["0"]
    ref = strategies.get(pooled, {}).get("buckets", {}).get("0")
    return None if ours is None or not ref else ours / ref
