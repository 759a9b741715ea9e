"""The in-process application loop: source -> micro-batches -> engine -> sinks.

``run_stream`` is what ``stream-meta run`` does: it cuts the source into micro-batches, hands
them to the :class:`~stream_meta.engine.Engine`, writes predictions and rejections, scores
unlabelled queries when the source knows their truth, reports progress and returns the run
summary. ``events=N`` / ``timeout_s`` stop it deterministically (tests, debugging).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from stream_meta.adapters import Adapter
from stream_meta.engine import Engine
from stream_meta.index import TaskIndex
from stream_meta.labels import LabelRequester
from stream_meta.metrics import EngineMetrics
from stream_meta.model import MetaModel
from stream_meta.pipeline import Decisions, DriftWatcher, MetaUpdates, Pipeline, Recorder, Step
from stream_meta.sources import Item, JsonlSink

log = logging.getLogger(__name__)


def build_engine(
    model: MetaModel,
    settings: Any,
    *,
    metrics: EngineMetrics | None = None,
    model_version: int = 1,
    adapter: Adapter | None = None,
) -> Engine:
    """The engine and its task index, configured from a :class:`~stream_meta.config.Settings`;
    ``adapter`` (default: the meta-model's one-forward-pass adaptation) turns support sets
    into weights (:mod:`stream_meta.adapters`)."""
    ix = settings.index
    index = TaskIndex(
        model.config.embed_dim,
        kind=ix.kind,
        nlist=ix.nlist,
        nprobe=ix.nprobe,
        train_size=ix.train_size,
        seed=settings.engine.seed,
    )
    return Engine(
        model,
        settings.engine.config(),
        index=index,
        metrics=metrics,
        model_version=model_version,
        adapter=adapter,
    )


class QueryScorer:
    """Scores predictions of unlabelled events against the truth a synthetic source knows."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.count = 0
        self.loss_sum = 0.0
        self.correct = 0

    def add(self, predictions: list[Any], truths: list[Any]) -> None:
        if not truths:
            return
        p = np.asarray(predictions, dtype=np.float64)
        t = np.asarray(truths, dtype=np.float64)
        self.count += len(t)
        if self.kind == "regression":
            self.loss_sum += float(((p - t) ** 2).sum())
        else:
            self.correct += int((p == t).sum())

    def add_queries(self, step: Step, truths: list[Any]) -> None:
        """Score the batch's unlabelled events whose truth the source knows (``truths`` in
        input order, None where unknown)."""
        out = step.result.outputs
        if out is None:
            return
        qp, qt = [], []
        for truth, ref in zip(step.engine_items(truths), step.result.order, strict=True):
            if truth is not None and ref >= 0 and not out.labelled[ref]:
                qp.append(out.values[ref])
                qt.append(truth)
        self.add(qp, qt)

    def summary(self) -> dict[str, Any]:
        if not self.count:
            return {}
        if self.kind == "regression":
            return {"query_loss": self.loss_sum / self.count, "queries_scored": self.count}
        return {"query_accuracy": self.correct / self.count, "queries_scored": self.count}


def run_stream(
    engine: Engine,
    source: Iterable[Item],
    *,
    events: int | None = None,
    batch_size: int = 512,
    timeout_s: float | None = None,
    predictions: JsonlSink | None = None,
    rejects: JsonlSink | None = None,
    on_batch: Callable[[int, dict[str, Any]], None] | None = None,
    watch: DriftWatcher | None = None,
    updater: MetaUpdates | None = None,
    recorder: Recorder | None = None,
    labels: LabelRequester | None = None,
    label_requests: JsonlSink | None = None,
    decider: Decisions | None = None,
) -> dict[str, Any]:
    """Run ``engine`` over ``source`` until it ends, ``events`` were read or ``timeout_s``.

    Every micro-batch goes through one :class:`~stream_meta.pipeline.Pipeline` step:
    ``watch`` (a :class:`~stream_meta.drift.watch.DriftWatch`) sees every batch, then
    ``updater`` (a :class:`~stream_meta.continual.updater.MetaUpdater`) with the watch's alarms;
    ``recorder`` (an :class:`~stream_meta.recording.EventRecorder`) records every raw event and
    each change of the served model; ``labels`` (a :class:`~stream_meta.labels.LabelRequester`)
    picks the label requests of the unlabelled events, written to ``label_requests``;
    ``decider`` (a :class:`~stream_meta.decider.Decider`) answers decision events (their
    records go to ``predictions`` too, told apart by their ``decision_id``; refused ones to
    ``rejects``) and turns rewards into labelled events.
    """
    it = iter(source) if events is None else itertools.islice(source, events)
    pipeline = Pipeline(
        engine, watch=watch, updater=updater, recorder=recorder, labels=labels, decider=decider
    )
    scorer = QueryScorer(engine.kind)
    timing = _BatchTiming()
    start = time.perf_counter()
    done = 0
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            break
        t0 = time.perf_counter()
        # is a job training while this batch is served? (one latency sample per batch)
        training = updater is not None and updater.training
        step = pipeline.step([raw for raw, _ in chunk], received_at=t0)
        timing.add(step.engine_seconds, time.perf_counter() - t0, training, done)
        done = pipeline.position
        scorer.add_queries(step, [truth for _, truth in chunk])
        if predictions is not None:
            predictions.write_lines([p.to_json() for p in step.result.predictions])
            if step.decisions:
                predictions.write_lines([json.dumps(d) for _, d in step.decisions])
        if rejects is not None:
            rejects.write_lines([_reject_json(r) for r in step.result.rejections])
            if step.refused:
                rejects.write_lines([_reject_json(r) for _, r in step.refused])
        if label_requests is not None and step.label_requests:
            label_requests.write_lines([r.to_json() for r in step.label_requests])
        if on_batch is not None:
            on_batch(len(chunk), engine.summary())
        if timeout_s is not None and time.perf_counter() - start > timeout_s:
            log.info("stopping after %.1f s (timeout)", timeout_s)
            break
    elapsed = time.perf_counter() - start
    summary = engine.summary()
    summary.update(scorer.summary())
    if labels is not None:
        summary["label_requests"] = labels.summary()
    summary["seconds"] = round(elapsed, 3)
    summary["events_per_s"] = round(done / elapsed, 1) if elapsed > 0 else math.inf
    summary["engine_events_per_s"] = round(done / timing.busy, 1) if timing.busy > 0 else math.inf
    if decider is not None:
        summary["decisions"] = decider.summary()
    if updater is not None:
        summary["batch_latency_ms"] = _latency_split(timing.samples)
        summary["update_spans"] = timing.spans(done)
    return summary


class _BatchTiming:
    """Engine time per batch, split by whether a meta-update job was training meanwhile, and
    the stream spans ``[start, end)`` during which one was."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.samples: list[tuple[float, bool]] = []
        self._spans: list[list[int | None]] = []

    def add(self, engine_s: float, batch_s: float, training: bool, position: int) -> None:
        """A batch that started at stream ``position``: ``engine_s`` of serving and learning,
        ``batch_s`` for the whole step (watchers included)."""
        self.busy += engine_s
        self.samples.append((batch_s, training))
        open_span = bool(self._spans) and self._spans[-1][1] is None
        if training and not open_span:
            self._spans.append([position, None])
        elif not training and open_span:
            self._spans[-1][1] = position

    def spans(self, end: int) -> list[list[int]]:
        return [[int(a or 0), end if b is None else b] for a, b in self._spans]


def _latency_split(samples: list[tuple[float, bool]]) -> dict[str, Any]:
    """Batch latency percentiles while a meta-update job was training and otherwise."""
    out: dict[str, Any] = {}
    for name, flag in (("outside_update", False), ("during_update", True)):
        ms = np.array([s for s, f in samples if f == flag]) * 1e3
        if len(ms):
            out[name] = {
                "batches": len(ms),
                "p50": round(float(np.percentile(ms, 50)), 3),
                "p99": round(float(np.percentile(ms, 99)), 3),
            }
    return out


def build_label_requester(settings: Any, metrics: Any) -> LabelRequester | None:
    """The label requester of ``settings.labels`` (None when label requests are off)."""
    if not settings.labels.enabled:
        return None
    policy = settings.labels.policy_config(settings.engine.max_live_tasks)
    return LabelRequester(policy, metrics)


def build_decider(settings: Any, engine: Engine) -> Any:
    """The decider for decision and reward events, its metrics on the engine's registry (None
    when ``decisions.enabled`` is off)."""
    if not settings.decisions.enabled:
        return None
    from stream_meta.decider import Decider
    from stream_meta.metrics import DecisionMetrics

    return Decider(
        engine,
        settings.decisions.config(),
        metrics=DecisionMetrics(engine.metrics.registry),
        seed=settings.engine.seed,
    )


def build_drift_watch(settings: Any, engine: Any, metrics: Any, log_path: str | None) -> Any:
    """The drift monitor over the engine's batches (None when ``drift.enabled`` is off)."""
    d = settings.drift
    if not d.enabled:
        return None
    from stream_meta.drift.monitor import DriftMonitor
    from stream_meta.drift.watch import DriftWatch

    return DriftWatch(
        engine,
        DriftMonitor(d.config(), seed=settings.engine.seed),
        clusters=d.clusters,
        warmup_events=d.warmup_events,
        window=d.loss_window,
        metrics=metrics,
        log_path=log_path,
        seed=settings.engine.seed,
    )


def build_meta_updater(
    settings: Any,
    engine: Any,
    metrics: Any,
    watch: Any,
    family: str,
    *,
    worker: str,
    models_dir: Any = None,
) -> Any:
    """The meta-updater (None when ``meta_update.enabled`` is off)."""
    mu = settings.meta_update
    if not mu.enabled:
        return None
    from stream_meta.continual.updater import MetaUpdater

    config = mu.configs(
        worker, seed=settings.engine.seed, k_neighbours=settings.engine.k_neighbours
    )
    if config.on_drift and watch is None and not config.every_events:
        log.warning(
            "meta-updates are on but the drift monitor is off and there is no "
            "schedule: only `stream-meta meta-update` requests will start one"
        )
    return MetaUpdater(
        engine,
        config,
        watch=watch,
        metrics=metrics,
        emit=None if watch is None else watch.log_record,
        models_dir=models_dir,
        family=family,
        seed=settings.engine.seed,
    )


def _reject_json(rejection: Any) -> str:
    return json.dumps(rejection.to_record())
