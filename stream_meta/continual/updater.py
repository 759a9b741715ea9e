"""The meta-updater: when to update the served model, where the work runs, and the hot-swap.

Called once per processed batch (:meth:`MetaUpdater.observe`, from the serving thread), it

1. feeds the batch's labelled examples to the
   :class:`~stream_meta.continual.replay_buffer.ReplayBuffer`;
2. turns *triggers* into a pending request: a drift alarm (``on_drift``), the schedule
   (``every_events``) or a request from elsewhere (:meth:`request`: the ``meta-update``
   command through the admin endpoint; thread-safe);
3. starts the request's job once ``collect_events`` events have passed since the trigger (so the
   replay buffer holds tasks of the new regime), no other job is running or on probation, the
   ``cooldown_events`` since the last job have passed and the budget (``budget`` jobs per
   ``budget_window_events``) allows; a request the budget refuses is dropped (``skipped``);
4. collects a finished job and acts on its outcome: *promoted* candidates are hot-swapped into
   the engine between two batches as version ``max + 1`` (the engine re-encodes every live task
   and rebuilds its index, the drift monitor recalibrates); *rejected* and *failed* ones are
   dropped (a failure also raises an alarm). A promoted drift update is *followed up*
   ``follow_up_events`` later by another on the same drift (the recalibrated monitor will not
   alarm again, but new tasks keep arriving and the replay buffer keeps growing), until a
   candidate is not promoted, a rollback, or the budget ends the chain;
5. watches a promoted model on *probation*: its first ``probation_events`` scored events (tasks
   with ``>= min_shots`` examples) against as many before the swap; if their mean loss exceeds
   ``rollback_factor`` times the earlier one, or a prediction is not finite, the previous
   model is swapped back (``rolled_back``, with an alarm). This is a guard against gross
   failures, not a quality test: the two windows hold different events of a changing stream
   (on ``sinusoid-amplitude-shift`` the loss of the unchanged model rose by 23% from one
   1,000-event window to the next after the shift: ``loss_windows`` 25,000 and 26,000 of
   ``stream-meta run --scenario sinusoid-amplitude-shift --no-meta-update --json``), so the
   factor must be loose; the
   validation gate, which compares both models on the same held-out episodes, judges quality.

Jobs (:func:`~stream_meta.continual.update_job.run_job`) run ``inline`` (the stream waits: exact,
reproducible; what ``stream-meta run`` does by default), in a ``thread``, or in a worker
``process`` (``serve``'s default: training uses its own core and never holds the serving
thread's interpreter lock). Only the payload (weights and a replay snapshot) crosses over;
serving never waits for a job.

Every outcome is a record (:attr:`MetaUpdater.records`; JSON-ready) given to ``emit`` (the
JSON-lines log, the Kafka drift topic) and counted in Prometheus.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_meta.continual.replay_buffer import ReplayBuffer
from stream_meta.continual.update_job import (
    UpdateConfig,
    model_arrays,
    model_from_arrays,
    run_job,
    shot_weights,
)
from stream_meta.engine import BatchResult, Engine
from stream_meta.experts import members, with_experts
from stream_meta.metrics import EngineMetrics
from stream_meta.model import MetaModel

log = logging.getLogger(__name__)

__all__ = ["MetaUpdateConfig", "MetaUpdater"]


@dataclass(frozen=True)
class MetaUpdateConfig:
    """When and how meta-updates run (the ``[meta_update]`` settings fill it)."""

    enabled: bool = True
    on_drift: bool = True
    every_events: int = 0
    collect_events: int = 5000
    follow_up_events: int = 10_000
    new_lookback_events: int = 500
    cooldown_events: int = 10_000
    budget: int = 5
    budget_window_events: int = 500_000
    worker: str = "inline"
    promote: Literal["gate", "always"] = "gate"
    probation_events: int = 5000
    rollback_factor: float = 2.0
    min_shots: int = 1
    reservoir_tasks: int = 2000
    recent_tasks: int = 500
    max_examples: int = 32
    max_experts: int = 4
    update: UpdateConfig = field(default_factory=UpdateConfig)

    def __post_init__(self) -> None:
        if self.worker not in ("inline", "thread", "process"):
            raise ValueError(f"meta_update.worker must be inline, thread or process: {self.worker}")
        if self.promote not in ("gate", "always"):
            raise ValueError(f"meta_update.promote must be gate or always: {self.promote}")
        if self.max_experts < 1:
            raise ValueError(f"meta_update.max_experts must be >= 1: {self.max_experts}")


@dataclass
class _Request:
    trigger: str  # drift, schedule, manual
    index: int  # stream position of the trigger
    detail: str = ""
    start_at: int = 0


class _Probation:
    """The scored losses after a swap, against the same number before it."""

    def __init__(self, previous: tuple[MetaModel, int], before: float, events: int) -> None:
        self.previous, self.before, self.events = previous, before, events
        self.total, self.count, self.non_finite = 0.0, 0, 0


class MetaUpdater:
    """Runs meta-updates for ``engine``; see the module docstring.

    Parameters
    ----------
    engine:
        The engine whose model is updated (swaps happen in :meth:`observe`, between batches).
    config:
        :class:`MetaUpdateConfig`.
    watch:
        The :class:`~stream_meta.drift.watch.DriftWatch` whose alarms trigger updates; it is
        told when the model changes.
    metrics:
        The engine's Prometheus metrics (meta-update counters live there).
    emit:
        Called with each outcome record (JSON-ready dict).
    models_dir:
        Where promoted models are saved (``model-v<version>.safetensors``); None: not saved.
    family:
        The model family name written into saved checkpoints.
    """

    def __init__(
        self,
        engine: Engine,
        config: MetaUpdateConfig | None = None,
        *,
        watch: Any = None,
        metrics: EngineMetrics | None = None,
        emit: Callable[[dict[str, Any]], None] | None = None,
        models_dir: str | Path | None = None,
        family: str = "",
        seed: int = 0,
    ) -> None:
        self.engine = engine
        self.config = config = config or MetaUpdateConfig()
        self.watch, self.metrics, self.emit = watch, metrics, emit
        self.models_dir = Path(models_dir) if models_dir else None
        self.family = family
        mc = engine.model.config
        self.replay = ReplayBuffer(
            mc.x_dim,
            y_dtype=engine.store.y_dtype,
            reservoir_tasks=config.reservoir_tasks,
            recent_tasks=config.recent_tasks,
            max_examples=config.max_examples,
            seed=seed,
        )
        self.records: list[dict[str, Any]] = []
        self.seen = 0  # stream position: events observed
        self._lock = threading.Lock()
        self._manual: list[_Request] = []
        self._pending: _Request | None = None
        self._job: tuple[_Request, Future[dict[str, Any]] | dict[str, Any], int] | None = None
        self._executor: Executor | None = None
        self._started: deque[int] = deque()  # stream positions of job starts (the budget)
        self._last_finished = -(10**18)
        self._next_scheduled = config.every_events or 0
        self._probation: _Probation | None = None
        self._recent_losses: deque[float] = deque(maxlen=max(1, config.probation_events))
        self._max_version = engine.model_version
        # first drift alarm that no promotion has answered yet: tasks arrived since are new
        self._drift_since: int | None = None

    # -- triggers -----------------------------------------------------------------------------
    def request(self, trigger: str = "manual", detail: str = "") -> None:
        """Ask for an update from any thread (it starts at the next batch, if allowed)."""
        with self._lock:
            self._manual.append(_Request(trigger, -1, detail))

    def status(self) -> dict[str, Any]:
        """What an operator asks: served version, what is going on, recent outcomes."""
        return {
            "model_version": self.engine.model_version,
            "events": self.seen,
            "pending": None if self._pending is None else self._pending.trigger,
            "training": self._job is not None,
            "probation": self._probation is not None,
            "replay": self.replay.stats(),
            "total_records": len(self.records),
            "records": [
                {k: v for k, v in r.items() if k != "validation"} for r in self.records[-20:]
            ],
        }

    def routes(self) -> dict[tuple[str, str], Any]:
        """Admin endpoint routes: ``POST /meta-update`` (request one), ``GET /meta-updates``."""

        def post(body: dict[str, Any]) -> tuple[int, Any]:
            detail = str(body.get("reason", "requested through the admin endpoint"))[:200]
            self.request("manual", detail)
            return 202, {
                "accepted": True,
                "model_version": self.engine.model_version,
                "records": len(self.records),
            }

        return {
            ("POST", "/meta-update"): post,
            ("GET", "/meta-updates"): lambda _b: (200, self.status()),
        }

    @property
    def training(self) -> bool:
        return self._job is not None

    # -- per batch ----------------------------------------------------------------------------
    def observe(self, result: BatchResult, alarms: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """One processed batch (and the drift alarms it raised); returns new outcome records."""
        start = self.seen
        self.seen += len(result.order)
        end = self.seen
        self.replay.observe(result, start)
        new: list[dict[str, Any]] = []
        self._track_losses(result, new)
        self._collect_triggers(alarms, end)
        self._maybe_start(end, new)
        self._maybe_finish(end, new, block=False)
        self._report_gauges()
        return new

    def poll(self) -> list[dict[str, Any]]:
        """Between batches when the stream is idle: start a due request, collect a finished
        job (a manual request must not wait for the next event to start)."""
        new: list[dict[str, Any]] = []
        self._collect_triggers((), self.seen)
        self._maybe_start(self.seen, new)
        self._maybe_finish(self.seen, new, block=False)
        self._report_gauges()
        return new

    def finish(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Wait for a running job (at most ``timeout`` s) and act on it; new records."""
        new: list[dict[str, Any]] = []
        self._maybe_finish(self.seen, new, block=True, timeout=timeout)
        return new

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _collect_triggers(self, alarms: Sequence[Any], end: int) -> None:
        c = self.config
        with self._lock:
            manual, self._manual = self._manual, []
        candidates = [_Request(r.trigger, end, r.detail, end) for r in manual]
        if alarms and self._drift_since is None:
            self._drift_since = min(a.event_index for a in alarms)
        if c.on_drift:
            candidates += [
                _Request("drift", a.event_index, a.detector, a.event_index + c.collect_events)
                for a in alarms
            ]
        if c.every_events and end >= self._next_scheduled:
            self._next_scheduled = end + c.every_events
            candidates.append(_Request("schedule", end, f"every {c.every_events} events", end))
        for req in candidates:
            if self._pending is None and self._job is None:
                self._pending = req
                log.info(
                    "meta-update requested (%s %s at event %d)", req.trigger, req.detail, req.index
                )
            elif req.trigger == "manual" and self._pending is not None:
                # an operator asks now: the pending update stops collecting and starts
                self._pending.start_at = min(self._pending.start_at, end)
                log.info(
                    "meta-update requested (manual): the pending %s update starts now",
                    self._pending.trigger,
                )
            else:
                log.info("meta-update request (%s) joins the update in progress", req.trigger)

    def _maybe_start(self, end: int, new: list[dict[str, Any]]) -> None:
        req, c = self._pending, self.config
        if req is None or self._job is not None or self._probation is not None:
            return
        if end < req.start_at or end < self._last_finished + c.cooldown_events:
            return
        while self._started and self._started[0] <= end - c.budget_window_events:
            self._started.popleft()
        self._pending = None
        if len(self._started) >= c.budget:
            why = f"update budget spent ({c.budget} per {c.budget_window_events} events)"
            new.append(self._record(req, end, {"outcome": "skipped", "reason": why}))
            return
        self._started.append(end)
        if req.trigger in ("drift", "follow_up"):
            since = req.index if self._drift_since is None else self._drift_since
            new_from = max(0, since - c.new_lookback_events)
        else:  # the recent window is what is new
            recent = self.replay.recent_first_seen()
            new_from = recent if recent is not None else end
        payload = {
            "model": self.engine.model.config.to_dict(),
            "weights": model_arrays(self.engine.model),
            "replay": self.replay.snapshot(min_examples=2).to_arrays(),
            "new_from": new_from,
            "config": c.update.to_dict(),
            "shot_weights": shot_weights(self.engine.stats.shot_count, c.update.val_shots),
            "keep_rejected": c.promote == "always",
        }
        if c.max_experts > 1:
            payload.update(self._experts_payload())
        log.info(
            "meta-update started at event %d (%s, new tasks from event %d, %d replay tasks)",
            end,
            req.trigger,
            new_from,
            len(self.replay),
        )
        if c.worker == "inline":
            self._job = (req, run_job(payload), end)
        else:
            self._job = (req, self._executor_for(c.worker).submit(run_job, payload), end)

    def _experts_payload(self) -> dict[str, Any]:
        """The served experts, the one the candidate starts from (``parent``: the largest
        population share) and, at capacity, the one an added expert would retire (the
        smallest share, never the primary nor the parent)."""
        engine, c = self.engine, self.config
        served = members(engine.model, engine.model_version)
        shares = engine.router.shares() if engine.router is not None else {}
        share = [shares.get(i, 0.0) for i, _ in served]
        parent = int(np.argmax(share)) if len(served) > 1 else 0
        retire = None
        if len(served) >= c.max_experts:
            spare = [j for j in range(1, len(served)) if j != parent]
            retire = min(spare, key=lambda j: share[j]) if spare else None
        return {
            "experts": [{"id": i, "weights": model_arrays(m)} for i, m in served],
            "max_experts": c.max_experts,
            "parent": parent,
            "retire": retire,
            "share_floor": engine.config.expert_share_floor,  # validation routes as serving
        }

    def _expert_set(self, result: dict[str, Any], version: int) -> tuple[MetaModel, dict[str, Any]]:
        """The served set after a promoted expert candidate (``result["action"]``: it
        replaces its parent, or joins the set, retiring ``result["retire"]``), with the
        candidate's id ``version``; and what changed (for the record)."""
        engine = self.engine
        served = members(engine.model, engine.model_version)
        judged = result.get("expert_ids")
        if judged is not None and judged != [i for i, _ in served]:
            raise _SetChanged(
                f"the served experts changed while the candidate trained ({judged} -> "
                f"{[i for i, _ in served]}): its validation no longer applies"
            )
        cand = model_from_arrays(engine.model.config.to_dict(), result["weights"])
        parent, retire = int(result.get("parent", 0)), result.get("retire")
        info: dict[str, Any] = {"action": result["action"], "expert": version}
        if result["action"] == "replace":
            new = [(version, cand) if j == parent else e for j, e in enumerate(served)]
            info["replaced"] = served[parent][0]
        else:
            new = [e for j, e in enumerate(served) if j != retire] + [(version, cand)]
            if retire is not None:
                info["retired"] = served[int(retire)][0]
        info["members"] = [i for i, _ in new]
        return with_experts(new[0][1], new[0][0], new[1:]), info

    def _executor_for(self, kind: str) -> Executor:
        if self._executor is None:
            if kind == "thread":
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(1, thread_name_prefix="meta-update")
            else:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                self._executor = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
                )
        return self._executor

    def _maybe_finish(
        self, end: int, new: list[dict[str, Any]], *, block: bool, timeout: float | None = None
    ) -> None:
        if self._job is None:
            return
        req, job, started = self._job
        if isinstance(job, Future):
            if not block and not job.done():
                return
            try:
                result = job.result(timeout=timeout)
            except TimeoutError:
                return  # still training
            except Exception as exc:
                result = {"outcome": "failed", "reason": f"worker: {type(exc).__name__}: {exc}"}
        else:
            result = job
        self._job = None
        self._last_finished = end
        outcome = result.get("outcome", "failed")
        if outcome == "rejected" and result.get("weights") is not None:  # promote = always
            outcome = "promoted"
            result["reason"] = f"promoted without the gate (promote = always); {result['reason']}"
        version = None
        if outcome == "promoted" and result.get("action"):
            version = self._next_version()
            try:
                candidate, result["experts"] = self._expert_set(result, version)
            except _SetChanged as exc:
                outcome, result["reason"] = "rejected", str(exc)
            except ValueError as exc:
                outcome, result["reason"] = "failed", f"the expert set does not fit: {exc}"
            else:
                if _finite(candidate):
                    self._swap_in(candidate, result, version)
                    self._count_experts(result["experts"])
                else:
                    outcome, result["reason"] = "failed", "the candidate has non-finite weights"
            if outcome != "promoted":
                version = None
        elif outcome == "promoted":
            candidate = model_from_arrays(self.engine.model.config.to_dict(), result["weights"])
            if _finite(candidate):
                version = self._swap_in(candidate, result)
            else:
                outcome, result["reason"] = "failed", "the candidate has non-finite weights"
        rec = self._record(
            req, end, {**result, "outcome": outcome, "version": version, "started_index": started}
        )
        new.append(rec)
        if outcome == "failed":
            self._alarm(rec)
        self._follow_up(req, outcome, version, end)

    def _count_experts(self, info: dict[str, Any]) -> None:
        m = self.metrics
        if m is None:
            return
        m.expert_changes.labels("added" if info["action"] == "add" else "replaced").inc()
        if "retired" in info:
            m.expert_changes.labels("retired").inc()

    def _follow_up(self, req: _Request, outcome: str, version: int | None, end: int) -> None:
        """After a promoted drift update, another one on the same drift (new tasks keep coming
        and the buffer keeps growing) once ``follow_up_events`` have passed; the chain ends at
        the first candidate that is not promoted (no more to gain) or a rollback."""
        if req.trigger not in ("drift", "follow_up"):
            return
        every = self.config.follow_up_events
        if outcome == "promoted" and every:
            self._pending = _Request(
                "follow_up", req.index, f"after version {version}", end + every
            )
        else:
            self._drift_since = None  # the drift is answered as well as it can be

    # -- swaps --------------------------------------------------------------------------------
    def adopt(
        self, model: MetaModel, reason: str = "adopted", version: int | None = None
    ) -> dict[str, Any]:
        """Serve ``model`` from the next batch as ``version`` (default: the next one), on
        probation like a promoted candidate (a model trained elsewhere); non-finite weights
        are refused. Call it from the serving thread, between batches. Returns the outcome
        record."""
        req = _Request("adopt", self.seen, reason)
        if not _finite(model):
            why = "the model has non-finite weights"
            rec = self._record(req, self.seen, {"outcome": "failed", "reason": why})
            self._alarm(rec)
            return rec
        version = self._swap_in(model, {"reason": reason}, version)
        return self._record(
            req, self.seen, {"outcome": "promoted", "reason": reason, "version": version}
        )

    def _swap_in(
        self, candidate: MetaModel, result: dict[str, Any], version: int | None = None
    ) -> int:
        engine = self.engine
        previous = (engine.model, engine.model_version)
        before = float(np.mean(self._recent_losses)) if self._recent_losses else math.nan
        if version is None:
            version = self._next_version()
        else:
            self._max_version = max(self._max_version, version)
        engine.swap_model(candidate, version)
        if self.watch is not None:
            self.watch.model_changed()
        self._recent_losses.clear()
        if self.config.probation_events and math.isfinite(before):
            self._probation = _Probation(previous, before, self.config.probation_events)
        if self.models_dir is not None:
            try:
                self._save(candidate, version, result)
            except OSError as exc:  # serving goes on; a restart re-encodes with the base model
                log.error(
                    "cannot save promoted model version %d in %s: %s", version, self.models_dir, exc
                )
        log.warning(
            "meta-update promoted: serving model version %d from event %d (%s)",
            version,
            self.seen,
            result.get("reason", ""),
        )
        return version

    def _next_version(self) -> int:
        """One above every version served or saved (a rolled-back number is never reused)."""
        saved = [0]
        if self.models_dir is not None and self.models_dir.is_dir():
            for p in self.models_dir.glob("model-v*.safetensors"):
                digits = p.name[len("model-v") : -len(".safetensors")]
                if digits.isdigit():
                    saved.append(int(digits))
        self._max_version = max(self._max_version, self.engine.model_version, *saved) + 1
        return self._max_version

    def _save(self, model: MetaModel, version: int, result: dict[str, Any]) -> None:
        from stream_meta.model_checkpoint import save_checkpoint

        assert self.models_dir is not None
        self.models_dir.mkdir(parents=True, exist_ok=True)
        path = self.models_dir / f"model-v{version}.safetensors"
        save_checkpoint(
            path,
            model,
            family=self.family,
            model_version=version,
            training={"meta_update": self.config.update.to_dict()},
            metrics={"validation": result.get("validation"), "train": result.get("train")},
        )

    def _track_losses(self, result: BatchResult, new: list[dict[str, Any]]) -> None:
        out = result.outputs
        if out is None or not len(out):
            return
        values = np.asarray(out.values, dtype=np.float64)
        losses = np.asarray(out.losses, dtype=np.float64)
        shots = np.asarray(out.shots)
        scored = np.asarray(out.labelled, dtype=bool) & (shots >= self.config.min_shots)
        p = self._probation
        if p is None:
            self._recent_losses.extend(losses[scored & np.isfinite(losses)].tolist())
            return
        p.non_finite += int((~np.isfinite(values)).sum())
        take = losses[scored]
        p.non_finite += int((~np.isfinite(take)).sum())
        take = take[np.isfinite(take)]
        p.total += float(take.sum())
        p.count += len(take)
        if p.non_finite or p.count >= p.events:
            self._end_probation(p, new)

    def _end_probation(self, p: _Probation, new: list[dict[str, Any]]) -> None:
        self._probation = None
        after = p.total / p.count if p.count else math.nan
        worse = after > p.before * self.config.rollback_factor
        if not (p.non_finite or worse):
            log.info(
                "meta-update: version %d passed probation (loss %.4g, %.4g before)",
                self.engine.model_version,
                after,
                p.before,
            )
            return
        bad_version = self.engine.model_version
        model, version = p.previous
        if self._pending is not None and self._pending.trigger == "follow_up":
            self._pending = None  # no follow-up on a model that had to go
        self._drift_since = None
        self.engine.swap_model(model, version)
        if self.watch is not None:
            self.watch.model_changed()
        reason = (
            f"{p.non_finite} non-finite predictions or losses"
            if p.non_finite
            else f"serving loss {after:.4g} over {p.count} events exceeds "
            f"{self.config.rollback_factor}"
            f" x the {p.before:.4g} before the swap"
        )
        rec = self._record(
            _Request("probation", self.seen),
            self.seen,
            {
                "outcome": "rolled_back",
                "reason": reason,
                "version": version,
                "rolled_back_version": bad_version,
                "loss_before": p.before,
                "loss_after": after,
            },
        )
        new.append(rec)
        self._alarm(rec)

    # -- records ------------------------------------------------------------------------------
    def _record(self, req: _Request, end: int, result: dict[str, Any]) -> dict[str, Any]:
        rec = {
            "type": "meta_update",
            "event_index": end,
            "trigger": req.trigger,
            "trigger_index": req.index,
            "detail": req.detail,
            "outcome": result["outcome"],
            "reason": result.get("reason", ""),
            "version": result.get("version") or self.engine.model_version,
            **{
                k: result[k]
                for k in (
                    "started_index",
                    "validation",
                    "train",
                    "split",
                    "seconds",
                    "rolled_back_version",
                    "loss_before",
                    "loss_after",
                    "experts",
                )
                if result.get(k) is not None
            },
        }
        if rec.get("train"):
            rec["train"] = {k: v for k, v in rec["train"].items() if k != "history"}
        self.records.append(rec)
        level = logging.WARNING if rec["outcome"] in ("failed", "rolled_back") else logging.INFO
        log.log(level, "meta-update %s at event %d: %s", rec["outcome"], end, rec["reason"])
        m = self.metrics
        if m is not None:
            m.meta_updates.labels(rec["outcome"]).inc()
            if "seconds" in rec:
                m.meta_update_duration.observe(rec["seconds"])
            for model_name, groups in (rec.get("validation") or {}).items():
                for group, v in groups.items():
                    if v.get("loss") is not None:
                        m.meta_update_validation_loss.labels(group, model_name).set(v["loss"])
        if self.emit is not None:
            self.emit(rec)
        return rec

    def _alarm(self, rec: dict[str, Any]) -> None:
        """A failed or rolled-back update needs a human: an error in the log, the record marked
        (``alarm: true``; the meta-update alert rules fire on its counter)."""
        rec["alarm"] = True
        log.error("meta-update %s: %s", rec["outcome"], rec["reason"])

    def _report_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.meta_update_running.set(1.0 if self._pending or self._job else 0.0)
        st = self.replay.stats()
        m.replay_tasks.labels("recent").set(st["recent"])
        m.replay_tasks.labels("reservoir").set(st["reservoir"])

    # -- persistence (part of the service's state checkpoint) -------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The replay buffer and the stream position (copies: safe to write from a thread)."""
        return {
            **{f"replay_{k}": v for k, v in self.replay.to_arrays().items()},
            "position": np.array([self.seen, self._max_version], dtype=np.int64),
        }

    def restore_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`state_arrays` output (``ValueError`` if the replay does not fit)."""
        self.replay.restore(
            {k[len("replay_") :]: v for k, v in arrays.items() if k.startswith("replay_")}
        )
        seen, max_version = (int(v) for v in np.asarray(arrays["position"]))
        self.seen = seen
        self._max_version = max(self._max_version, max_version)
        if self.config.every_events:
            self._next_scheduled = seen + self.config.every_events

    def summary(self) -> list[dict[str, Any]]:
        """The outcome records, for the run summary."""
        return list(self.records)


class _SetChanged(Exception):
    """A candidate judged against a served set that has since changed (an adopted version, a
    rollback): it is not applied."""


def _finite(model: MetaModel) -> bool:
    """Every weight of the model, and of the experts it carries, is finite."""
    return all(
        bool(p.isfinite().all()) for _, m in members(model, 1) for p in m.state_dict().values()
    )


def _init_worker() -> None:
    """The worker process trains at a lower CPU priority than serving (on a busy machine the
    scheduler gives serving the cores first; training takes what is left)."""
    import contextlib
    import os

    with contextlib.suppress(AttributeError, OSError):  # not here / not permitted: as is
        os.nice(10)
