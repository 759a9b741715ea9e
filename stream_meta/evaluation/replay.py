"""Replay-based offline evaluation: re-run a recorded stream under a strategy, test then train.

A *log* is a recording (``--record DIR``) or a JSON-lines file of events. The replay feeds its
events, in order, to a strategy exactly as production would: each event is predicted with what
the strategy knew when it arrived; a labelled event is scored against its label (prequential)
and then learned. With ``label_delay = N`` a label reaches the strategy only ``N`` events after
its event: the event is predicted (and scored) on arrival as a query, and its label is learned
``N`` events later (the strategy's own drift monitor sees that late loss, as it would live).

Strategies built so far are the engine's own configurations:

* ``full``: the whole system (neighbours, drift monitor, meta-updates trained inline, so the
  replay is deterministic);
* ``no-neighbours``: the hypernetwork without retrieved neighbours (``k = 0``);
* ``no-meta-update``: no meta-updates (the drift monitor still runs);
* ``global``: no adaptation at all: the labels are scored but never taught, so every event is
  predicted by the meta-model with no example and no neighbour, one function for every task
  (the model's prior).

Everything is computed here from the predictions, not from the strategy's own counters, so
every strategy is scored the same way on the same events. The predictions file holds no wall
time: the same log, checkpoint, settings and seed give byte-identical predictions
(``predictions_sha256`` in the summary).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_meta.evaluation.fewshot import _predict, adapt_batch

__all__ = ["STRATEGIES", "ReplayConfig", "replay_strategy", "strategy_settings"]

#: strategy name -> settings overrides (on top of the user's settings)
STRATEGIES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"meta_update": {"worker": "inline"}},
    "no-neighbours": {"engine": {"k_neighbours": 0}, "meta_update": {"worker": "inline"}},
    "no-meta-update": {"meta_update": {"enabled": False}},
    "global": {"engine": {"k_neighbours": 0}, "meta_update": {"enabled": False},
               "drift": {"enabled": False}},
}  # fmt: skip
#: strategies that never learn a label (scored only)
NO_LEARNING = frozenset({"global"})
#: named by issue 5, not built yet
PLANNED = ("scratch", "finetune", "maml", "nearest-task")


@dataclass(frozen=True)
class ReplayConfig:
    label_delay: int = 0
    window: int = 1000
    batch_size: int = 512
    latency_tasks: int = 200


def strategy_settings(settings: Any, name: str) -> Any:
    """``settings`` with strategy ``name``'s overrides; ``ValueError`` for an unknown name."""
    if name not in STRATEGIES:
        planned = f" ({name} is planned, not built yet)" if name in PLANNED else ""
        raise ValueError(f"unknown strategy {name!r}{planned}; available: {', '.join(STRATEGIES)}")
    data = settings.model_dump()
    for section, values in STRATEGIES[name].items():
        data[section] = {**data[section], **values}
    return type(settings).model_validate(data)


# -- the stream as the strategy sees it ------------------------------------------------------
def _delayed(raws: Iterable[Any], delay: int, learn: bool = True) -> Iterator[tuple[Any, int, Any]]:
    """``(raw to feed, stream position, label to score or None)``; position -1 marks a delayed
    label (learned, not reported). Without delay labelled events are fed as they are; with
    ``learn=False`` labels are scored and never fed."""
    pending: deque[tuple[int, dict[str, Any]]] = deque()  # (due position, labelled event)
    for i, raw in enumerate(raws):
        while pending and pending[0][0] <= i:
            yield pending.popleft()[1], -1, None
        event = _parse(raw)
        if (delay or not learn) and event is not None and event.get("y") is not None:
            query = {k: v for k, v in event.items() if k != "y"}
            if learn:
                pending.append((i + delay, {**event, "event_id": f"{event['event_id']}#label"}))
            yield query, i, event["y"]
        else:
            yield raw, i, None
    for _, event in pending:
        yield event, -1, None


def _parse(raw: Any) -> dict[str, Any] | None:
    if isinstance(raw, dict):
        return raw
    try:
        event = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return event if isinstance(event, dict) and "event_id" in event else None


# -- one strategy over the log ---------------------------------------------------------------
def replay_strategy(
    name: str,
    raws: list[Any],
    model: Any,
    settings: Any,
    config: ReplayConfig,
    predictions_path: Path,
    *,
    family: str = "",
) -> dict[str, Any]:
    """Replay ``raws`` under strategy ``name``; write its predictions; return its summary."""
    from prometheus_client import CollectorRegistry

    from stream_meta.app import build_drift_watch, build_engine, build_meta_updater
    from stream_meta.metrics import EngineMetrics

    s = strategy_settings(settings, name)
    metrics = EngineMetrics(CollectorRegistry())
    engine = build_engine(model, s, metrics=metrics)
    watch = build_drift_watch(s, engine, metrics, None)
    updater = build_meta_updater(s, engine, metrics, watch, family, worker="inline")
    losses: list[tuple[int, int, float]] = []  # (position, shots, loss)
    digest = hashlib.sha256()
    rejected = 0
    start = time.perf_counter()
    feed = _delayed(raws, config.label_delay, learn=name not in NO_LEARNING)
    with predictions_path.open("w", encoding="utf-8") as out:
        while True:
            chunk = list(itertools.islice(feed, config.batch_size))
            if not chunk:
                break
            result = engine.process([c[0] for c in chunk])
            alarms = watch.observe(result) if watch is not None else []
            if updater is not None:
                updater.observe(result, alarms)
            o = result.outputs
            lines = []
            for (_raw, pos, late_label), ref in zip(chunk, result.order, strict=True):
                if pos < 0:
                    continue  # a delayed label: learned, not a prediction to report
                if ref < 0 or o is None:
                    rejected += 1
                    continue
                loss = o.losses[ref]
                if late_label is not None:
                    loss = _loss(engine.kind, o, ref, late_label)
                rec = {"i": pos, "event_id": o.event_ids[ref], "task_id": o.task_ids[ref],
                       "prediction": o.values[ref], "shots": o.shots[ref],
                       "loss": None if loss != loss else loss,
                       "model_version": o.model_version}  # fmt: skip
                if loss == loss:
                    losses.append((pos, o.shots[ref], loss))
                lines.append(json.dumps(rec, separators=(",", ":")))
            if lines:
                text = "\n".join(lines) + "\n"
                out.write(text)
                digest.update(text.encode())
    seconds = time.perf_counter() - start
    if updater is not None:
        updater.close()
    summary = _metrics(losses, config.window)
    summary.update(
        strategy=name,
        events=len(raws),
        rejected=rejected,
        seconds=round(seconds, 3),
        events_per_s=round(len(raws) / seconds, 1) if seconds > 0 else math.inf,
        model_version=engine.model_version,
        meta_updates=[] if updater is None else updater.summary(),
        alarms=[] if watch is None else watch.summary()["alarms"],
        predictions=str(predictions_path),
        predictions_sha256=digest.hexdigest(),
        **_adapt_latency(engine, s.engine.k_neighbours, config.latency_tasks),
    )
    return summary


def _loss(kind: str, o: Any, ref: int, label: Any) -> float:
    if kind == "regression":
        return float((float(o.values[ref]) - float(label)) ** 2)
    probs = o.probabilities[ref]
    return float(-math.log(max(float(probs[int(label)]), 1e-12)))


def _metrics(losses: list[tuple[int, int, float]], window: int) -> dict[str, Any]:
    if not losses:
        return {"labelled": 0, "prequential_loss": None, "loss_by_shots": {},
                "cold_start_loss": None, "loss_windows": []}  # fmt: skip
    pos = np.array([p for p, _, _ in losses])
    shots = np.array([s for _, s, _ in losses])
    loss = np.array([v for _, _, v in losses])
    by_shots = {}
    for s in sorted(set(shots.tolist())):
        if s <= 20:
            by_shots[str(s)] = float(loss[shots == s].mean())
    for lo, hi, label in ((21, 50, "21-50"), (51, 10**9, "51+")):
        sel = (shots >= lo) & (shots <= hi)
        if sel.any():
            by_shots[label] = float(loss[sel].mean())
    w = pos // window
    windows = [
        {"start": int(k * window), "labelled": int((w == k).sum()),
         "loss": float(loss[w == k].mean())}
        for k in sorted(set(w.tolist()))
    ]  # fmt: skip
    return {
        "labelled": len(loss),
        "prequential_loss": float(loss.mean()),
        "loss_by_shots": by_shots,
        "cold_start_loss": float(loss[shots == 0].mean()) if (shots == 0).any() else None,
        "loss_windows": windows,
    }


def _adapt_latency(engine: Any, k: int, samples: int) -> dict[str, Any]:
    """One task at a time on one thread, as ``stream-meta evaluate`` measures it: embed, k-NN,
    generate, predict one point, for tasks of the replay with >= 6 examples (5 as support)."""
    tasks = [s for s in engine.store if s.n >= 6][:samples]
    if not tasks:
        return {"adapt_latency_ms_p50": None, "adapt_latency_ms_p99": None, "adapt_latency_ms": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        with torch.inference_mode():
            for s in tasks:
                xs = s.xs[None, :5].astype(np.float32)
                ys = s.ys[None, :5]
                t0 = time.perf_counter()
                w = adapt_batch(engine.model, engine.index, xs, ys, k)
                _predict(engine.model, s.xs[None, 5:6].astype(np.float32), w)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    ms = np.array(times[5:] or times) * 1e3
    return {
        "adapt_latency_ms_p50": round(float(np.percentile(ms, 50)), 4),
        "adapt_latency_ms_p99": round(float(np.percentile(ms, 99)), 4),
        "adapt_latency_ms": [round(float(v), 4) for v in ms],
    }
