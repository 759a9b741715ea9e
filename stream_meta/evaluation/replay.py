"""Replay-based offline evaluation: re-run a recorded stream under a strategy, test then train.

A *log* is a recording (``--record DIR``) or a JSON-lines file of events. The replay feeds its
events, in order, to a strategy exactly as production would: each event is predicted with what
the strategy knew when it arrived; a labelled event is scored against its label (prequential)
and then learned. With ``label_delay = N`` a label reaches the strategy only ``N`` events after
its event: the event is predicted (and scored) on arrival as a query, and its label is learned
``N`` events later (the strategy's own drift monitor sees that late loss, as it would live).

The strategies (the system, its ablations and the baselines it is compared with) are
described in :mod:`stream_meta.evaluation.strategies`.

Everything is computed here from the predictions, not from the strategy's own counters, so
every strategy is scored the same way on the same events. That includes the uncertainty: a
regression strategy that gives a standard deviation is scored on the coverage of its central
90% interval (``mean +- 1.645 std``; calibrated: 0.9) and its calibration error (mean
``|empirical - nominal|`` coverage over the central levels 0.1..0.9); a classifier on the
expected calibration error of its top-class probability (15 bins)
(:mod:`stream_meta.uncertainty`). The predictions file holds no wall
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

from stream_meta.evaluation.families import FamilyProbes, matrix_summary
from stream_meta.evaluation.fewshot import latency_summary
from stream_meta.evaluation.strategies import (
    NO_LEARNING,
    StrategyOptions,
    adapter,
    build_strategy_engine,
    strategy_settings,
)
from stream_meta.pipeline import Pipeline
from stream_meta.uncertainty import (
    central_coverage,
    expected_calibration_error,
    regression_calibration_error,
)

__all__ = ["ReplayConfig", "replay_strategy"]


@dataclass(frozen=True)
class ReplayConfig:
    label_delay: int = 0
    window: int = 1000
    batch_size: int = 512
    latency_tasks: int = 200
    #: teach only the labels a label policy requests, at most this share of the labelled
    #: events (None: every label is learned); see :func:`_budgeted`
    label_budget: float | None = None
    label_policy: str = "uncertainty"


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


class _Budgeted:
    """The stream under a labelling budget: every labelled event is fed as a query and scored
    against its label on arrival (every label scores); its label is learned only when the
    label policy (:class:`~stream_meta.labels.LabelRequester`) requested it after seeing the
    event's prediction, and then at the start of the next batch, as a label that was asked for
    arrives live. Only labelled events are eligible: a request for an event the log has no
    label for could not be answered. ``curve`` records, after each batch, the labels used, the
    labelled events scored and their summed loss (the report's loss against labels used)."""

    def __init__(self, raws: list[Any], requester: Any) -> None:
        self.raws, self.requester = raws, requester
        self.hidden: dict[str, dict[str, Any]] = {}  # event id -> the labelled event
        self.due: list[dict[str, Any]] = []  # requested labels, fed with the next batch
        self.used = self.scored = 0
        self.loss_sum = 0.0
        self.curve: list[tuple[int, int, float]] = []

    def batches(self, size: int) -> Iterator[list[tuple[Any, int, Any]]]:
        for lo in range(0, len(self.raws), size):
            fed: list[tuple[Any, int, Any]] = [(ev, -1, None) for ev in self.due]
            self.due = []
            for i in range(lo, min(lo + size, len(self.raws))):
                event = _parse(self.raws[i])
                if event is not None and event.get("y") is not None:
                    query = {k: v for k, v in event.items() if k != "y"}
                    self.hidden[str(event["event_id"])] = event
                    fed.append((query, i, event["y"]))
                else:
                    fed.append((self.raws[i], i, None))
            yield fed

    def after(self, fed: list[tuple[Any, int, Any]], result: Any, losses: list[Any]) -> None:
        """Ask the policy about the batch's hidden labels; queue the requested ones."""
        o = result.outputs
        pairs = [
            (ref, label is not None)
            for (_, pos, label), ref in zip(fed, result.order, strict=True)
            if pos >= 0 and ref >= 0 and o is not None
        ]
        if pairs and o is not None:
            rows = [r for r, _ in pairs]
            scores = None if o.label_scores is None else o.label_scores[rows]
            requests = self.requester.select(
                [o.event_ids[r] for r in rows],
                [o.task_ids[r] for r in rows],
                scores,
                eligible=[hidden for _, hidden in pairs],
                model_version=o.model_version,
            )
            self.due = [self.hidden[r.event_id] for r in requests]
            self.used += len(requests)
        self.hidden.clear()
        self.scored += len(losses)
        self.loss_sum += float(sum(losses))
        self.curve.append((self.used, self.scored, self.loss_sum))

    def summary(self) -> dict[str, Any]:
        """Labels used against the loss: per batch, ``[labels used, labelled events scored,
        prequential loss so far]``, thinned to at most 200 points."""
        step = max(1, len(self.curve) // 200)
        points = self.curve[step - 1 :: step]
        if self.curve and (not points or points[-1] != self.curve[-1]):
            points.append(self.curve[-1])
        return {
            **self.requester.summary(),
            "labels_used": self.used,
            "labelled_scored": self.scored,
            "curve": [[u, n, round(s / n, 6) if n else None] for u, n, s in points],
        }


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
    options: StrategyOptions | None = None,
    probes: FamilyProbes | None = None,
) -> dict[str, Any]:
    """Replay ``raws`` under strategy ``name``; write its predictions; return its summary.

    ``probes`` (from :func:`~stream_meta.evaluation.families.build_probes`) adds the per-family
    matrix, probed at the end of each of its phases."""
    from prometheus_client import CollectorRegistry

    from stream_meta.app import build_drift_watch, build_meta_updater
    from stream_meta.metrics import EngineMetrics

    s = strategy_settings(settings, name)
    metrics = EngineMetrics(CollectorRegistry())
    engine = build_strategy_engine(name, model, s, metrics, family, options or StrategyOptions())
    watch = build_drift_watch(s, engine, metrics, None)
    updater = build_meta_updater(s, engine, metrics, watch, family, worker="inline")
    pipeline = Pipeline(engine, watch=watch, updater=updater)
    budget = _budget(config, name, raws, engine, metrics, s.engine.seed)
    if budget is None:
        feed = _delayed(raws, config.label_delay, learn=name not in NO_LEARNING)
        chunks: Iterator[list[tuple[Any, int, Any]]] = iter(
            lambda: list(itertools.islice(feed, config.batch_size)), []
        )
    else:
        chunks = budget.batches(config.batch_size)
    phases = _PhaseProbes(engine, s.engine.k_neighbours, name in NO_LEARNING, probes)
    start = time.perf_counter()
    with _PredictionLog(predictions_path, engine.kind) as log:
        for chunk in chunks:
            scored = len(log.losses)
            result = pipeline.step([c[0] for c in chunk]).result
            phases.after(max(c[1] for c in chunk) + 1)
            log.write([(pos, label) for _, pos, label in chunk], result)
            if budget is not None:
                budget.after(chunk, result, [v for _, _, v in log.losses[scored:]])
    seconds = time.perf_counter() - start - phases.seconds
    pipeline.close()
    summary = _metrics(log.losses, config.window)
    summary.update(log.uncertainty())
    if probes is not None:
        summary["families"] = matrix_summary(probes, phases.finish())
    if budget is not None:
        summary["labels"] = budget.summary()
    summary.update(
        strategy=name,
        events=len(raws),
        rejected=log.rejected,
        non_finite_predictions=log.non_finite,
        diverged_fits=getattr(engine.adapter, "diverged", None),
        seconds=round(seconds, 3),
        events_per_s=round(len(raws) / seconds, 1) if seconds > 0 else math.inf,
        model_version=engine.model_version,
        **{"meta_updates": [], "alarms": [], **pipeline.summary()},
        predictions=str(predictions_path),
        predictions_sha256=log.digest.hexdigest(),
        **_adapt_latency(engine, s.engine.k_neighbours, config.latency_tasks),
    )
    return summary


def _budget(
    config: ReplayConfig, name: str, raws: list[Any], engine: Any, metrics: Any, seed: int
) -> _Budgeted | None:
    """The labelling budget's feed, when the replay has one: at most ``label_budget`` of the
    labelled events seen so far are ever requested (the unspent share carries over)."""
    if config.label_budget is None:
        return None
    from stream_meta.labels import LabelPolicy, LabelRequester

    if name in NO_LEARNING:
        raise ValueError(f"strategy {name} learns no label: a labelling budget means nothing")
    if config.label_delay:
        raise ValueError("a labelling budget and a label delay cannot be combined")
    policy = LabelPolicy(
        policy=config.label_policy,  # type: ignore[arg-type]
        fraction=config.label_budget,
        burst=math.inf,
        seed=seed,
    )
    engine.label_scores = True
    return _Budgeted(raws, LabelRequester(policy, metrics))


class _PredictionLog:
    """The replay's predictions file, and the scores computed from it: every event's
    prediction in stream order (one JSON line each, no wall time: the same inputs give the
    same bytes), the labelled losses, and the rejected and non-finite counts."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind
        self.losses: list[tuple[int, int, float]] = []  # (position, shots, loss)
        #: regression: each scored label's (y - mean) / std; classification: (top p, hit)
        self.calibration: list[Any] = []
        self.digest = hashlib.sha256()
        self.rejected = self.non_finite = 0
        self._out: Any = None

    def __enter__(self) -> _PredictionLog:
        self._out = self.path.open("w", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        self._out.close()

    def write(self, fed: list[tuple[int, Any]], result: Any) -> None:
        """One batch: ``fed[i]`` is input ``i``'s ``(stream position, late label)``."""
        o = result.outputs
        lines = []
        for (pos, late_label), ref in zip(fed, result.order, strict=True):
            if pos < 0:
                continue  # a delayed label: learned, not a prediction to report
            if ref < 0 or o is None:
                self.rejected += 1
                continue
            loss = o.losses[ref]
            label = late_label if late_label is not None else (o.y[ref] if o.y else None)
            if late_label is not None:
                loss = _loss(self.kind, o, ref, late_label)
            rec = {
                "i": pos,
                "event_id": o.event_ids[ref],
                "task_id": o.task_ids[ref],
                "prediction": o.values[ref],
                "shots": o.shots[ref],
                "loss": None if loss != loss else loss,
                "model_version": o.model_version,
            }
            if o.stds is not None:
                rec["std"] = o.stds[ref]
            if o.probabilities is not None:
                rec["probabilities"] = o.probabilities[ref]
            if loss == loss:
                self.losses.append((pos, o.shots[ref], loss))
                if label is not None:
                    self._calibration(o, ref, label)
            elif o.labelled[ref] or late_label is not None:
                self.non_finite += 1  # a labelled event predicted NaN: counted, never hidden
            lines.append(json.dumps(rec, separators=(",", ":")))
        if lines:
            text = "\n".join(lines) + "\n"
            self._out.write(text)
            self.digest.update(text.encode())

    def _calibration(self, o: Any, ref: int, label: Any) -> None:
        if self.kind == "regression":
            std = o.stds[ref] if o.stds is not None else None
            if std is not None and std > 0:
                self.calibration.append((float(label) - float(o.values[ref])) / std)
            return
        probs = o.probabilities[ref]
        top = max(range(len(probs)), key=probs.__getitem__)
        self.calibration.append((float(probs[top]), float(top == int(label))))

    def uncertainty(self) -> dict[str, Any]:
        """The report's uncertainty fields (None where the strategy gives no uncertainty)."""
        if self.kind == "regression":
            z = np.array(self.calibration, dtype=np.float64)
            return {
                "coverage_90": central_coverage(z, 0.9),
                "calibration_error": regression_calibration_error(z),
                "calibration_metric": "central interval coverage error",
            }
        both = np.array(self.calibration, dtype=np.float64).reshape(-1, 2)
        return {
            "coverage_90": None,
            "calibration_error": expected_calibration_error(both[:, 0], both[:, 1]),
            "calibration_metric": "ECE of the top-class probability (15 bins)",
        }


class _PhaseProbes:
    """Scores every family's probes with the strategy's current state at the end of each
    phase (a strategy that never learns gets no example: its prior). Probes read the state,
    never change it, and are not timed (``seconds`` is what they took)."""

    def __init__(self, engine: Any, k: int, prior_only: bool, probes: FamilyProbes | None):
        self.probes, self.prior_only = probes, prior_only
        self.adapt = adapter(engine, k) if probes is not None else None
        self.rows: list[dict[str, float]] = []
        self.seconds = 0.0

    def after(self, consumed: int) -> None:
        """``consumed`` events of the log were fed: probe every phase that ended."""
        if self.probes is None:
            return
        t0 = time.perf_counter()
        phases = self.probes.phases
        while len(self.rows) < len(phases) and consumed >= phases[len(self.rows)]["end"]:
            self.rows.append(self._probe())
        self.seconds += time.perf_counter() - t0

    def finish(self) -> list[dict[str, float]]:
        """The rows of every phase (those the log ended in are probed now)."""
        while self.probes is not None and len(self.rows) < len(self.probes.phases):
            self.rows.append(self._probe())
        return self.rows

    def _probe(self) -> dict[str, float]:
        assert self.probes is not None and self.adapt is not None
        adapt = self.adapt

        def run(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, ids: list[str]) -> Any:
            if self.prior_only:
                xs, ys = xs[:, :0], ys[:, :0]
            return adapt(xs, ys, xq, ids)

        return self.probes.score(run)


def _loss(kind: str, o: Any, ref: int, label: Any) -> float:
    if kind == "regression":
        return float((float(o.values[ref]) - float(label)) ** 2)
    probs = o.probabilities[ref]
    return float(-math.log(max(float(probs[int(label)]), 1e-12)))


def _metrics(losses: list[tuple[int, int, float]], window: int) -> dict[str, Any]:
    if not losses:
        return {
            "labelled": 0,
            "prequential_loss": None,
            "loss_by_shots": {},
            "cold_start_loss": None,
            "loss_windows": [],
        }
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
        {
            "start": int(k * window),
            "labelled": int((w == k).sum()),
            "loss": float(loss[w == k].mean()),
        }
        for k in sorted(set(w.tolist()))
    ]
    return {
        "labelled": len(loss),
        "prequential_loss": float(loss.mean()),
        "loss_by_shots": by_shots,
        "cold_start_loss": float(loss[shots == 0].mean()) if (shots == 0).any() else None,
        "loss_windows": windows,
    }


def _adapt_latency(engine: Any, k: int, samples: int) -> dict[str, Any]:
    """One task at a time on one thread, as ``stream-meta evaluate`` measures it: the strategy's
    whole adaptation of a 5-example support set (for the system: embed, k-NN, generate, solve
    the head; for a gradient baseline: its steps) and one prediction, for tasks of the replay
    with >= 6 examples."""
    tasks = [s for s in engine.store if s.n >= 6][:samples]
    if not tasks:
        return {"adapt_latency_ms_p50": None, "adapt_latency_ms_p99": None, "adapt_latency_ms": []}
    adapt = adapter(engine, k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for s in tasks:
            xs = s.xs[None, :5].astype(np.float32)
            ys = s.ys[None, :5]
            xq = s.xs[None, 5:6].astype(np.float32)
            t0 = time.perf_counter()
            adapt(xs, ys, xq)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    ms = [round(v * 1e3, 4) for v in (times[5:] or times)]
    return {**latency_summary(times, warmup=5), "adapt_latency_ms": ms}
