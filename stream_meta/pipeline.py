"""One batch step, the same for every loop: decide -> process -> drift watch -> meta-updater ->
recorder.

``stream-meta run`` (:func:`stream_meta.app.run_stream`), ``serve``
(:class:`~stream_meta.kafka.service.KafkaService`), the ``trainer``
(:class:`~stream_meta.kafka.trainer.TrainerService`) and ``replay``
(:func:`~stream_meta.evaluation.replay.replay_strategy`) all push their micro-batches through
:meth:`Pipeline.step`; they differ only in where events come from and where the outputs go.

A step, for a batch of raw events at stream position ``position``:

0. the decider, if any (:class:`~stream_meta.decider.Decider`), takes the batch's decision
   events (an action chosen for each, with every task's state before this batch's learning),
   turns its rewards into the labelled events they teach and refuses bad ones; the engine
   gets the rest, in order (``Step.positions``);
1. the :class:`~stream_meta.engine.Engine` serves and learns the batch (every event with the
   examples its task had when it arrived);
2. the recorder, if any, writes the raw events as they arrived (stream positions
   ``position .. position + n``);
3. the drift watch, if any, sees the batch's losses and embeddings and may raise alarms;
4. the meta-updater, if any, sees the batch and the alarms, and may start a job, or promote or
   roll back a model: a swap takes effect between this batch and the next, and the recorder
   notes which model serves from the next position on.

Between batches of an idle stream, :meth:`Pipeline.idle` lets a requested update start and a
finished job land; :meth:`Pipeline.adopt` serves a model trained elsewhere (a published
version). Collaborators are typed by the small protocols below, not by their classes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from stream_meta.drift.monitor import Alarm
from stream_meta.engine import BatchResult, Engine
from stream_meta.events import Rejection
from stream_meta.labels import LabelRequest, LabelRequester
from stream_meta.model import MetaModel

if TYPE_CHECKING:
    from stream_meta.decider import Intake

__all__ = ["Decisions", "DriftWatcher", "MetaUpdates", "Pipeline", "Recorder", "Step"]

#: meta-update outcomes that change the served model (the recording notes them)
MODEL_CHANGES = frozenset({"promoted", "rolled_back"})


class DriftWatcher(Protocol):
    """What the pipeline needs of the drift watch (:class:`~stream_meta.drift.watch.DriftWatch`)."""

    def observe(self, result: BatchResult) -> list[Alarm]: ...

    def summary(self) -> dict[str, Any]: ...


class MetaUpdates(Protocol):
    """What the pipeline needs of the meta-updater
    (:class:`~stream_meta.continual.updater.MetaUpdater`): its outcome records."""

    @property
    def training(self) -> bool: ...

    def observe(self, result: BatchResult, alarms: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def poll(self) -> list[dict[str, Any]]: ...

    def adopt(
        self, model: MetaModel, reason: str = "adopted", version: int | None = None
    ) -> dict[str, Any]: ...

    def summary(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class Decisions(Protocol):
    """What the pipeline needs of the decider (:class:`~stream_meta.decider.Decider`)."""

    def intake(
        self, raws: Sequence[Any], *, received_at: float, learned: Sequence[bool] | None = None
    ) -> Intake | None: ...

    def summary(self) -> dict[str, Any]: ...


class Recorder(Protocol):
    """What the pipeline needs of a recording (:class:`~stream_meta.recording.EventRecorder`)."""

    def events(
        self, raws: Sequence[Any], start: int, meta: Sequence[Mapping[str, Any]] | None = None
    ) -> None: ...

    def model_change(self, version: int, *, index: int, outcome: str = "") -> None: ...


@dataclass
class Step:
    """What one batch produced: the engine's result, the drift alarms it raised and the
    meta-update outcome records that came with it; with a decider, the decision records and
    the decider's refusals, each with its input position, and the input positions of the
    engine's inputs (``result.order[j]`` is input ``positions[j]``'s; None: every input went
    to the engine, in order)."""

    result: BatchResult
    #: the version of the model that served this batch (an outcome may have swapped it since)
    model_version: int
    #: wall time of the engine's part of the step (serving and learning), in seconds
    engine_seconds: float
    alarms: list[Alarm] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    #: the label requests of this batch's unlabelled events (with a label requester)
    label_requests: list[LabelRequest] = field(default_factory=list)
    positions: list[int] | None = None
    decisions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    refused: list[tuple[int, Rejection]] = field(default_factory=list)

    def engine_items(self, items: Sequence[Any]) -> list[Any]:
        """``items`` (one per input) for the engine's inputs only, in ``result.order``'s order."""
        return list(items) if self.positions is None else [items[p] for p in self.positions]

    def alarm_records(self) -> list[dict[str, Any]]:
        """The alarms as the drift topic carries them."""
        return [
            {"type": "drift_alarm", **a.to_dict(), "model_version": self.model_version}
            for a in self.alarms
        ]


class Pipeline:
    """Push micro-batches through the engine and its watchers; see the module docstring.

    ``position`` counts the events stepped so far (the stream position of the next batch's
    first event); a loop that starts mid-stream passes its own.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        watch: DriftWatcher | None = None,
        updater: MetaUpdates | None = None,
        recorder: Recorder | None = None,
        labels: LabelRequester | None = None,
        decider: Decisions | None = None,
        position: int = 0,
    ) -> None:
        self.engine = engine
        self.decider = decider
        self.watch = watch
        self.updater = updater
        self.recorder = recorder
        self.labels = labels
        if labels is not None:
            engine.label_scores = True
        self.position = position

    def step(
        self,
        raws: Sequence[Any],
        *,
        received_at: float | None = None,
        learned: list[bool] | None = None,
        meta: Sequence[Mapping[str, Any]] | None = None,
        record: Sequence[Any] | None = None,
    ) -> Step:
        """One batch of raw events (bytes, text or dicts). ``received_at`` and ``learned`` go
        to :meth:`Engine.process`; ``meta[i]`` adds fields to event ``i``'s recording, and
        ``record`` replaces what is recorded (the raw bytes as consumed)."""
        t0 = time.perf_counter()
        intake = None
        if self.decider is not None:
            intake = self.decider.intake(
                raws, received_at=t0 if received_at is None else received_at, learned=learned
            )
        if intake is None:
            result = self.engine.process(raws, received_at=received_at, learned=learned)
        else:
            result = self.engine.process(
                intake.raws, received_at=received_at, learned=intake.learned
            )
        step = Step(result, self.engine.model_version, time.perf_counter() - t0)
        if self.labels is not None and result.outputs is not None:
            step.label_requests = self._label_requests(result)
        if intake is not None:
            step.positions, step.decisions, step.refused = (
                intake.positions,
                intake.decisions,
                intake.refused,
            )
        if self.recorder is not None:
            self.recorder.events(raws if record is None else record, self.position, meta)
        if self.watch is not None:
            step.alarms = self.watch.observe(result)
        self.position += len(raws)
        if self.updater is not None:
            step.outcomes = self._noted(self.updater.observe(result, step.alarms))
        return step

    def _label_requests(self, result: BatchResult) -> list[LabelRequest]:
        """The batch's label requests: among its unlabelled events (a labelled event already
        learned, a duplicate, is not one), those the label policy picks within its budgets."""
        assert self.labels is not None and result.outputs is not None
        o = result.outputs
        eligible = [not lab for lab in o.labelled]
        if o.duplicates is not None:
            eligible = [e and not d for e, d in zip(eligible, o.duplicates, strict=True)]
        self.labels.answered([i for i, lab in zip(o.event_ids, o.labelled, strict=True) if lab])
        if not any(eligible):
            return []
        return self.labels.select(
            o.event_ids,
            o.task_ids,
            o.label_scores,
            eligible=eligible,
            model_version=o.model_version,
            now=time.time(),
        )

    def idle(self) -> list[dict[str, Any]]:
        """Between batches when nothing arrives: a due request starts, a finished job lands."""
        return [] if self.updater is None else self._noted(self.updater.poll())

    def adopt(self, model: MetaModel, version: int, reason: str) -> list[dict[str, Any]]:
        """Serve ``model`` as ``version`` from the next batch (a model trained elsewhere): on
        probation through the meta-updater when there is one, else swapped in directly."""
        if self.updater is None:
            self.engine.swap_model(model, version)
            return []
        return self._noted([self.updater.adopt(model, reason, version=version)])

    def summary(self) -> dict[str, Any]:
        """The watchers' part of a run summary: alarms and meta-update records."""
        out: dict[str, Any] = {}
        if self.decider is not None:
            out["decisions"] = self.decider.summary()
        if self.watch is not None:
            out["alarms"] = self.watch.summary()["alarms"]
        if self.updater is not None:
            out["meta_updates"] = self.updater.summary()
        if self.labels is not None:
            out["label_requests"] = self.labels.summary()
        return out

    def close(self) -> None:
        if self.updater is not None:
            self.updater.close()

    def _noted(self, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The recording notes each model change: the new model serves from ``position``."""
        if self.recorder is not None:
            for rec in outcomes:
                if rec.get("outcome") in MODEL_CHANGES:
                    self.recorder.model_change(
                        rec["version"], index=self.position, outcome=rec["outcome"]
                    )
        return outcomes
