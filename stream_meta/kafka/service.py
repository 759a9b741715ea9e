"""The Kafka-fed service behind ``stream-meta serve``.

Consumes ``<prefix>.events`` in a consumer group and runs every polled batch through the
:class:`~stream_meta.engine.Engine`. Each consumed record yields exactly one output: a
prediction on ``<prefix>.predictions`` (key: task id), a decision record on
``<prefix>.decisions`` (key: task id; a decision event, with a decider:
:mod:`stream_meta.decider`) or a dead letter on ``<prefix>.dead-letter`` (reason, detail, the
original bytes base64-encoded, source topic, partition and offset). A reward event is a
labelled event: its prediction (or its dead letter) is its output.

Delivery, per batch:

1. poll a bounded batch (fewer records when batches run long, so that processing plus a
   checkpoint stays well inside ``max_poll_interval_ms``);
2. push it through the :class:`~stream_meta.pipeline.Pipeline` (predict, score, learn; drift
   watch; meta-updater; recording);
3. send its outputs (predictions, dead letters, changelog and embedding records, drift and
   meta-update records) and wait until the broker acknowledged every one (``acks=all``); an
   output the broker refused is sent again, with backoff, until it is acknowledged: the loop
   does not move on while outputs are pending;
4. hand the batch's offsets to the :class:`~stream_meta.kafka.checkpointing.Checkpointer`,
   which commits them and writes state checkpoints in the order its module docstring lists
   (every ``checkpoint_every_s``, when partitions are revoked, when the service stops: support
   sets, index, de-duplication window *and* the offsets they reflect, then exactly those
   offsets committed). The offsets and the changelog restore's bookkeeping live in
   :mod:`stream_meta.kafka.offsets`.

Replicas (several processes in one group) share two compacted topics: task embeddings
(:mod:`stream_meta.kafka.embedding_sync`: every replica indexes every task) and the task-state
changelog (:mod:`stream_meta.kafka.changelog`: a replica assigned a partition pauses it, loads its
tasks' support sets, then serves it, never learning an event twice). Model versions published
on ``<prefix>.models`` (:mod:`stream_meta.kafka.model_topic`) are verified and adopted.

On restart the newest checkpoint is restored and each partition is read again from the
checkpoint's offset, so the state and the stream resume from the same point: events after the
checkpoint are learned once, by the restored state; their outputs may be produced a second
time (at-least-once output, exactly-once learning). A labelled event whose id the restored
de-duplication window already holds is predicted again but never learned twice. With the
changelog on (the default), offsets are also committed after every batch (its changelog
records are acknowledged with its outputs), and a partition resumes at the later of the
checkpoint's offset and the group's committed one: a replica that dies between batches leaves
no event to be served twice, one that dies within a batch leaves that batch (outputs stay
at-least-once; exactly-once outputs need Kafka transactions: docs/KAFKA_TEST_BROKER.md).
Without a state directory offsets are committed after every batch and a restart starts cold.

While the broker is away the kafka-python clients reconnect with exponential backoff
(``reconnect_backoff_ms`` .. ``reconnect_backoff_max_ms``); at start-up the service waits for
the broker up to ``startup_timeout_s`` and then fails with a clear error.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_meta.app import build_label_requester
from stream_meta.engine import BatchResult, Engine
from stream_meta.kafka.checkpointing import Checkpointer
from stream_meta.kafka.clients import ServiceError, backoff
from stream_meta.kafka.offsets import Offsets, Recovery
from stream_meta.kafka.topics import Topics, ensure_topics, partition_count
from stream_meta.metrics import ServiceMetrics
from stream_meta.pipeline import DriftWatcher, Pipeline, Recorder, Step

if TYPE_CHECKING:
    from stream_meta.continual.updater import MetaUpdater
    from stream_meta.decider import Decider
from stream_meta.state_checkpoint import StateDir

log = logging.getLogger(__name__)

#: share of ``max_poll_interval_ms`` one batch (processing + a checkpoint) may take
_POLL_BUDGET = 0.25


class KafkaService:
    """Consume, adapt, produce, checkpoint, commit; see the module docstring.

    ``settings`` is the whole :class:`~stream_meta.config.Settings` (its ``kafka``,
    ``service`` and ``engine`` sections are read). Call :meth:`start`, then :meth:`run`.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Any,
        metrics: ServiceMetrics,
        *,
        watch: DriftWatcher | None = None,
        updater: MetaUpdater | None = None,
        recorder: Recorder | None = None,
        decider: Decider | None = None,
    ) -> None:
        self.engine, self.metrics = engine, metrics
        self.recorder = recorder  # an EventRecorder: every consumed record, as it arrived
        self.watch = watch  # a DriftWatch: its alarms go to the drift topic
        self.updater = updater  # a MetaUpdater: its outcomes go to the drift topic too
        self.decider = decider  # a Decider: decision records, held decisions checkpointed
        # label requests go to <prefix>.label-requests (with [labels] enabled)
        self.labels = build_label_requester(settings, engine.metrics)
        self.pipeline = Pipeline(
            engine,
            watch=watch,
            updater=updater,
            recorder=recorder,
            labels=self.labels,
            decider=decider,
        )
        self.kafka, self.cfg = settings.kafka, settings.service
        self.models_cfg = settings.models  # trusted keys of published model versions
        self.batch_size = settings.engine.micro_batch
        self.topics = Topics.for_prefix(self.kafka.topic_prefix)
        self.state = (
            StateDir(self.cfg.state_dir, keep=self.cfg.keep_checkpoints)
            if self.cfg.state_dir is not None
            else None
        )
        self.stop_event = threading.Event()
        self.offsets = Offsets()
        self.recovery = Recovery()
        self.checkpoints = Checkpointer(
            engine,
            self.offsets,
            metrics,
            state=self.state,
            changelog=self.cfg.state_changelog,
            group=self.kafka.group_id,
            parts=self._updater_state,
        )
        self.consumer: Any = None
        self.producer: Any = None
        self.sync: Any = None  # an EmbeddingSync (other replicas' task embeddings)
        self.models: Any = None  # a ModelFollower (published model versions)
        self.consumed = self.predicted = self.decided = self.dead_lettered = 0
        self.restored: dict[str, Any] | None = None
        self._max_records = self.batch_size
        self._per_record_s = 0.0
        self._last_lag = 0.0
        self._heartbeat = time.monotonic()
        self._first_record: float | None = None
        self._joined = False
        self._serving = False
        self._broker_up = False

    def _set_broker_up(self, up: bool) -> None:
        self._broker_up = up
        self.metrics.broker_up.set(1 if up else 0)

    # -- lifecycle ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT: finish the batch, deliver its outputs, checkpoint, commit, stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def start(self) -> None:
        """Restore state, wait for the broker (up to ``startup_timeout_s``), create missing
        topics, and subscribe. Raises :class:`ServiceError` or
        :class:`~stream_meta.state_checkpoint.StateError`."""
        if self.state is not None:
            restorers: dict[str, Callable[[dict[str, np.ndarray]], None]] = {}
            if self.updater is not None:
                restorers["meta_update"] = self.updater.restore_state
            if self.decider is not None:
                restorers["decisions"] = self.decider.restore_state
            self.restored = self.state.load(self.engine, restorers)
            if self.restored is None:
                log.info("no state checkpoint in %s: starting without state", self.state.path)
            else:
                saved = self.restored["extra"].get("offsets", {})
                self.offsets.resume = Offsets.from_checkpoint(saved, make=_tp).resume
                log.info(
                    "restored %s: %d tasks, %d indexed, offsets %s",
                    self.restored["path"],
                    len(self.engine.store),
                    len(self.engine.index),
                    self.restored["extra"].get("offsets"),
                )
        else:
            log.warning("no state directory: task state will not survive a restart")
        self._wait_for_broker()
        self._open_clients()
        self._serving = True
        self.metrics.ready.set(1)

    def _client_config(self) -> dict[str, Any]:
        return dict(self.kafka.client_config())

    def _wait_for_broker(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.cfg.startup_timeout_s
        attempt = 0
        while True:
            left_ms = int(max(1.0, deadline - time.monotonic()) * 1000)
            try:
                admin = KafkaAdminClient(
                    **self._client_config(), bootstrap_timeout_ms=min(left_ms, 10_000)
                )
                break
            except (KafkaError, OSError) as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self.stop_event.is_set():
                    raise ServiceError(
                        f"Kafka at {self.kafka.bootstrap_servers} stayed unreachable for "
                        f"{self.cfg.startup_timeout_s:g} s ({type(exc).__name__}: {exc}); check "
                        "--bootstrap-servers and that the broker is up"
                    ) from exc
                wait = min(left, backoff(attempt, 0.5, 5.0))
                log.warning(
                    "waiting for Kafka at %s (%s); retry in %.1f s",
                    self.kafka.bootstrap_servers,
                    exc,
                    wait,
                )
                self._heartbeat = time.monotonic()
                self.stop_event.wait(wait)
                attempt += 1
        try:
            if self.cfg.create_topics:
                self._create_topics(admin)
        finally:
            admin.close()
        self._set_broker_up(True)

    def _create_topics(self, admin: Any) -> None:
        t = self.topics
        others = tuple(n for n in t.all() if n not in (t.task_state, t.models))
        ensure_topics(
            admin, others, self.cfg.partitions, self.cfg.replication_factor, compacted=t.compacted
        )
        ensure_topics(admin, (t.models,), 1, self.cfg.replication_factor)  # chunks in order
        if self.cfg.state_changelog:  # co-partitioned: as many partitions as the events topic
            events = partition_count(admin, t.events) or self.cfg.partitions
            ensure_topics(
                admin, (t.task_state,), events, self.cfg.replication_factor, compacted=t.compacted
            )
            state = partition_count(admin, t.task_state)
            if state is not None and state < events:
                raise ServiceError(
                    f"{t.task_state} has {state} partitions, fewer than {t.events} ({events}): "
                    "the task-state changelog must be co-partitioned with the events topic"
                )

    def _open_clients(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener

        service = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                service._on_revoked(list(revoked))

            def on_partitions_assigned(self, assigned: Any) -> None:
                service._on_assigned(list(assigned))

        k = self.kafka
        self.producer = KafkaProducer(
            **self._client_config(),
            acks="all",
            linger_ms=5,
            delivery_timeout_ms=max(k.request_timeout_ms + 5000, 30_000),
        )
        self.consumer = KafkaConsumer(
            **self._client_config(),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=self.batch_size,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
        )
        self.checkpoints.consumer = self.consumer
        self.consumer.subscribe([self.topics.events], listener=Listener())
        if self.cfg.state_changelog:
            self.engine.track_changes()
        if self.cfg.follow_models:
            from stream_meta.kafka.model_signing import SigningError, verifier_from_settings
            from stream_meta.kafka.model_topic import ModelFollower

            try:
                verifier = verifier_from_settings(self.models_cfg)
            except SigningError as exc:
                raise ServiceError(str(exc)) from exc
            reader = KafkaConsumer(
                **self._client_config(),
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=2 << 20,
            )
            self.models = ModelFollower(reader, self.topics.models, self.metrics, verifier=verifier)
        if self.cfg.share_embeddings:
            from stream_meta.kafka.embedding_sync import EmbeddingSync

            reader = KafkaConsumer(
                **self._client_config(), enable_auto_commit=False, auto_offset_reset="earliest"
            )
            self.sync = EmbeddingSync(
                self.engine, self.topics.task_embeddings, reader, self.metrics
            )

    # -- health -------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """Liveness: the loop (or its delivery retries) turned recently."""
        idle = time.monotonic() - self._heartbeat
        if idle > self.cfg.stall_timeout_s:
            return False, f"loop stalled for {idle:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Readiness: state restored, group joined, broker answering."""
        if not self._serving:
            return False, "starting" if not self.stop_event.is_set() else "stopping"
        if not self._joined:
            return False, "waiting for the consumer-group assignment"
        if not self._broker_up:
            return False, "broker unreachable"
        return True, "ok"

    # -- the loop -----------------------------------------------------------------------------
    def run(self, *, events: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Serve until stopped, ``events`` records were consumed, or ``timeout_s`` passed."""
        if self.consumer is None:
            self.start()
        start = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if events is not None and self.consumed >= events:
                    break
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    break
                self._heartbeat = time.monotonic()
                if self.recovery.pending:
                    self._restore_assigned()
                if self.sync is not None and self.sync.poll():
                    self.checkpoints.dirty = True  # the index changed: the next one keeps it
                if self.models is not None:
                    self._adopt_published()
                limit = self._max_records
                if events is not None:
                    limit = max(1, min(limit, events - self.consumed))
                polled = self.consumer.poll(
                    timeout_ms=self.kafka.poll_timeout_ms, max_records=limit
                )
                if self.recovery.pending:  # a rebalance in this poll: nothing of theirs is served
                    polled = {
                        tp: rs for tp, rs in polled.items() if tp not in self.recovery.pending
                    }
                    self._restore_assigned()
                if any(polled.values()):
                    if self._first_record is None:
                        self._first_record = time.monotonic()
                    self._handle(polled)
                else:  # idle: requests still start, jobs still land
                    self._publish_meta(self.pipeline.idle())
                self.checkpoints.finish(block=False)
                now = time.monotonic()
                if now - self.checkpoints.last >= self.cfg.checkpoint_every_s:
                    self.checkpoints.checkpoint("periodic", wait=False)
                if now - self._last_lag >= 1.0:
                    self._update_lag()
        finally:
            self._shutdown()
        busy = time.monotonic() - self._first_record if self._first_record else 0.0
        return {
            "consumed": self.consumed,
            "predicted": self.predicted,
            "decided": self.decided,
            "dead_lettered": self.dead_lettered,
            # from the first record polled to the end (start-up and group join excluded)
            "seconds": round(busy, 3),
            "events_per_s": round(self.consumed / busy, 1) if busy else None,
            **self.engine.summary(),
            **self.pipeline.summary(),
        }

    def _handle(self, polled: dict[Any, list[Any]]) -> None:
        """One polled batch (records by partition, in offset order)."""
        t0 = time.perf_counter()
        records = [r for batch in polled.values() for r in batch]
        learned = self._already_applied(records) if self.recovery.active else None
        step = self.pipeline.step(
            [r.value for r in records],
            received_at=t0,
            learned=learned,
            record=[r.value or b"" for r in records] if self.recorder is not None else None,
            meta=[_where(r) for r in records] if self.recorder is not None else None,
        )
        result = step.result
        engine_records = step.engine_items(records)
        outputs, reasons = self._outputs(engine_records, result)
        outputs += self._decision_outputs(records, step, reasons)
        outputs += [
            (self.topics.label_requests, r.task_id.encode(), r.to_json().encode())
            for r in step.label_requests
        ]
        if self.cfg.state_changelog:
            outputs += self._changelog(engine_records, result)
        if self.sync is not None:
            outputs += self.sync.outgoing()
        for alarm, record in zip(step.alarms, step.alarm_records(), strict=True):
            outputs.append(
                (self.topics.drift, alarm.detector.encode(), json.dumps(record).encode())
            )
        # a promotion swapped the model in the step: it serves from the next batch
        outputs += self._meta_outputs(step.outcomes)
        self._deliver(outputs)
        acked = time.time()
        stamps = [r.timestamp for r in records if r.timestamp is not None and r.timestamp >= 0]
        ts = np.array(stamps, dtype=np.float64)
        if len(ts):
            self.metrics.end_to_end.observe_many(acked - ts / 1000.0)
        n_dead, n_decided = len(reasons), len(step.decisions)
        self.consumed += len(records)
        self.predicted += len(records) - n_dead - n_decided
        self.decided += n_decided
        self.dead_lettered += n_dead
        m = self.metrics
        m.consumed.inc(len(records))
        m.predictions.inc(len(records) - n_dead - n_decided)
        for reason in reasons:
            m.dead_letters.labels(reason).inc()
        m.batch_records.observe(len(records))
        for tp, batch in polled.items():
            if batch:
                self.offsets.advanced(tp, batch[-1].offset)
                self.recovery.passed(tp.partition, batch[-1].offset)
        self.checkpoints.batch_done()
        took = time.perf_counter() - t0
        self._bound_batches(len(records), took)
        if log.isEnabledFor(logging.DEBUG) and len(ts):
            log.debug(
                "batch of %d: oldest event waited %.1f ms before the poll returned, "
                "handled in %.1f ms",
                len(records),
                (acked - took - ts.min() / 1000) * 1000,
                took * 1000,
            )

    def _changelog(self, records: list[Any], result: BatchResult) -> list[Any]:
        """The new support set of every task this batch taught, on its events' partition."""
        from stream_meta.kafka.changelog import encode

        changed = self.engine.drain_changes()
        out = result.outputs
        if not changed or out is None:
            return []
        where: dict[str, tuple[int, int]] = {}  # task id -> (partition, last offset)
        for record, ref in zip(records, result.order, strict=True):
            if ref >= 0:
                where[out.task_ids[ref]] = (record.partition, record.offset)
        sends = []
        for state in changed:
            if state.task_id not in where or state.xs is None or state.ys is None:
                continue
            partition, offset = where[state.task_id]
            value = encode(state.seen, offset, state.xs[: state.n], state.ys[: state.n])
            sends.append((self.topics.task_state, state.task_id.encode(), value, partition))
        return sends

    def _already_applied(self, records: list[Any]) -> list[bool]:
        """Which records the restored changelog already reflects (by task key and offset)."""
        return self.recovery.already_applied((r.partition, _key(r), r.offset) for r in records)

    def _adopt_published(self) -> None:
        """Serve the newest verified published model, if newer than the one served."""
        found = self.models.newer(self.engine.model, self.engine.model_version)
        if found is None:
            return
        version, model = found
        reason = f"published model version {version}"
        # on probation through the meta-updater, like a promoted update, when there is one
        self._publish_meta(self.pipeline.adopt(model, version, reason))
        self.checkpoints.dirty = True
        log.info("serving %s", reason)

    def _restore_assigned(self) -> None:
        """Restore the changelog of the partitions assigned since, then serve them."""
        owned = self.consumer.assignment()
        tps = [tp for tp in self.recovery.pending if tp in owned]
        self.recovery.pending.clear()
        self._restore_changelog(sorted({tp.partition for tp in tps}))
        for tp in tps:
            self._resume_from_checkpoint(tp)
        if tps:
            self.consumer.resume(*tps)

    def _resume_from_checkpoint(self, tp: Any) -> None:
        """Start ``tp`` at the later of the restored checkpoint's offset and the group's
        committed one: the changelog (already loaded) holds what the events before it taught,
        so nothing before that point needs serving again."""
        from kafka.errors import KafkaError

        if tp not in self.offsets.resume_at:
            return
        try:
            committed = self.consumer.committed(tp)
        except (KafkaError, OSError) as exc:
            log.warning(
                "committed offset of %s unknown (%s): resuming at the checkpoint's",
                _names([tp]),
                exc,
            )
            committed = None
        start = self.offsets.resume_point(tp, committed)
        if start is not None:
            self.consumer.seek(tp, start)

    def _restore_changelog(self, partitions: list[int]) -> None:
        """Load the changelog's tasks of newly assigned ``partitions`` (see
        :mod:`stream_meta.kafka.changelog`); a task this replica holds with as many examples keeps
        its own state."""
        from kafka import KafkaConsumer

        from stream_meta.kafka.changelog import read_partitions

        if not partitions:
            return
        from kafka.errors import KafkaError

        t0 = time.perf_counter()
        try:
            reader = KafkaConsumer(**self._client_config(), enable_auto_commit=False)
            try:
                latest, skipped = read_partitions(
                    reader, self.topics.task_state, partitions, x_dim=self.engine.store.x_dim
                )
            finally:
                reader.close()
        except (KafkaError, OSError, TimeoutError) as exc:
            # serving goes on: these tasks start from what this replica holds (if anything)
            self.metrics.changelog_failures.inc()
            log.error(
                "changelog of partitions %s could not be read (%s): their tasks start "
                "from this replica's own state",
                sorted(partitions),
                exc,
            )
            return
        loaded = self.engine.restore_tasks(
            [(tid, rec.seen, rec.xs, rec.ys) for (_p, tid), rec in latest.items()]
        )
        self.recovery.restored(partitions, {key: rec.applied_offset for key, rec in latest.items()})
        self.metrics.changelog_restored.inc(loaded)
        if skipped:
            self.metrics.changelog_skipped.inc(skipped)
        log.info(
            "changelog: %d tasks of partitions %s read, %d loaded, %d records skipped, in %.2f s",
            len(latest),
            sorted(partitions),
            loaded,
            skipped,
            time.perf_counter() - t0,
        )

    def _meta_outputs(self, records: list[dict[str, Any]]) -> list[tuple[str, bytes, bytes]]:
        """Meta-update outcome records for the drift topic."""
        return [
            (self.topics.drift, b"meta_update", json.dumps(r, default=str).encode())
            for r in records
        ]

    def _publish_meta(self, records: list[dict[str, Any]]) -> None:
        if records:
            self._deliver(self._meta_outputs(records))

    def _outputs(
        self, records: list[Any], result: BatchResult
    ) -> tuple[list[tuple[str, bytes | None, bytes]], list[str]]:
        out = result.outputs
        sends: list[tuple[str, bytes | None, bytes]] = []
        reasons: list[str] = []
        for record, ref in zip(records, result.order, strict=True):
            if ref >= 0 and out is not None:
                value = out.record(ref).to_json().encode()
                sends.append((self.topics.predictions, out.task_ids[ref].encode(), value))
            else:
                rejection = result.rejections[-1 - ref]
                sends.append(self._dead_letter(record, rejection))
                reasons.append(rejection.reason.value)
        return sends, reasons

    def _decision_outputs(
        self, records: list[Any], step: Step, reasons: list[str]
    ) -> list[tuple[str, bytes | None, bytes]]:
        """The step's decision records and the decider's dead letters (their reasons appended
        to ``reasons``)."""
        sends: list[tuple[str, bytes | None, bytes]] = [
            (self.topics.decisions, d["task_id"].encode(), json.dumps(d).encode())
            for _, d in step.decisions
        ]
        for pos, rejection in step.refused:
            sends.append(self._dead_letter(records[pos], rejection))
            reasons.append(rejection.reason.value)
        return sends

    def _dead_letter(self, record: Any, rejection: Any) -> tuple[str, bytes | None, bytes]:
        letter = {
            **rejection.to_record(),
            # the whole original bytes (the rejection keeps only the first 4 KiB)
            "raw_b64": base64.b64encode(record.value or b"").decode("ascii"),
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
        }
        return (self.topics.dead_letter, record.key, json.dumps(letter).encode())

    def _deliver(self, sends: list[Any]) -> None:
        """Send and wait for every acknowledgement; re-send what the broker refused."""
        from kafka.errors import KafkaTimeoutError

        pending, attempt = sends, 0
        deadline: float | None = None
        while pending:
            # (topic, key, value) or (topic, key, value, partition)
            futures = [
                self.producer.send(
                    s[0], key=s[1], value=s[2], partition=s[3] if len(s) > 3 else None
                )
                for s in pending
            ]
            while True:
                try:
                    self.producer.flush(timeout=5.0)
                    break
                except KafkaTimeoutError:  # still retrying inside the client: keep waiting
                    self._heartbeat = time.monotonic()
                    self._set_broker_up(False)
                    log.warning("outputs not acknowledged yet; broker unreachable?")
            failed = [p for p, f in zip(pending, futures, strict=True) if f.failed()]
            if not failed:
                break
            self.metrics.produce_failures.inc(len(failed))
            self._set_broker_up(False)
            exc = next(f.exception for f in futures if f.failed())
            if self.stop_event.is_set():
                deadline = deadline or time.monotonic() + self.cfg.shutdown_timeout_s
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{len(failed)} outputs still unacknowledged after "
                        f"{self.cfg.shutdown_timeout_s:g} s of shutdown ({exc}); their events "
                        "will be re-delivered"
                    )
            wait = backoff(attempt, 0.2, 5.0)
            log.warning("%d outputs refused (%s); re-sending in %.1f s", len(failed), exc, wait)
            self._heartbeat = time.monotonic()
            time.sleep(wait)
            pending, attempt = failed, attempt + 1
        self._set_broker_up(True)

    def _bound_batches(self, n: int, seconds: float) -> None:
        """Keep one batch's processing (plus a checkpoint) within a share of the poll budget."""
        per = seconds / n
        self._per_record_s = per if not self._per_record_s else 0.8 * self._per_record_s + 0.2 * per
        budget = _POLL_BUDGET * self.kafka.max_poll_interval_ms / 1000.0
        fit = int(budget / max(self._per_record_s, 1e-9))
        self._max_records = max(1, min(self.batch_size, fit))

    def _updater_state(self) -> dict[str, Any]:
        """The other components' parts of a state checkpoint: the meta-updater's, the held
        decisions."""
        parts = {} if self.updater is None else {"meta_update": self.updater.state_arrays()}
        if self.decider is not None:
            parts["decisions"] = self.decider.state_arrays()
        return parts

    def _on_revoked(self, revoked: list[Any]) -> None:
        self.metrics.rebalances.labels("revoked").inc()
        if revoked:
            self.checkpoints.checkpoint("revoked", blocking_commit=False)
        for tp in revoked:
            with contextlib.suppress(KeyError):  # KeyError: no lag reported for it yet
                self.metrics.lag.remove(tp.topic, str(tp.partition))
        log.info("partitions revoked: %s", _names(revoked))

    def _on_assigned(self, assigned: list[Any]) -> None:
        self.metrics.rebalances.labels("assigned").inc()
        owned = self.consumer.assignment()
        self.metrics.assigned.set(len(owned))
        self.offsets.keep_only(owned)
        # the state checkpoint's point of the stream (with a changelog: after the restore)
        seek = self.offsets.assigned(assigned, wait_for_restore=self.cfg.state_changelog)
        for tp, offset in seek.items():
            self.consumer.seek(tp, offset)
        if self.cfg.state_changelog and assigned:
            # the restore reads a topic (blocking), which the client's IO thread that runs
            # this callback must not do: the partitions wait, paused, for the loop to do it
            self.consumer.pause(*assigned)
            self.recovery.pending.update(assigned)
        self._joined = True
        log.info("partitions assigned: %s", _names(assigned))

    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        try:  # the consumer's own view of its broker connections
            connections = self.consumer.metrics()["consumer-metrics"]["connection-count"]
        except (KeyError, TypeError):
            connections = None
        if connections is not None:
            self._set_broker_up(connections > 0)
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            pos = self.offsets.positions.get(tp)
            if high is None or pos is None:
                continue
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - pos))

    def _shutdown(self) -> None:
        self._serving = False
        self.metrics.ready.set(0)
        try:
            if self.consumer is not None:
                self.checkpoints.checkpoint("shutdown")
        finally:
            self.checkpoints.close()
            for reader in (self.sync, self.models):
                if reader is not None:
                    reader.close()
            for client in (self.producer, self.consumer):
                if client is None:
                    continue
                try:
                    client.close()
                except Exception as exc:  # closing must not hide the reason we stopped
                    log.warning("closing %s: %s", type(client).__name__, exc)


def _where(record: Any) -> dict[str, Any]:
    """Where a consumed record came from, as the recording keeps it."""
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "ts": record.timestamp,
    }


def _key(record: Any) -> str:
    """A record's key as a task id ("" when absent or not UTF-8)."""
    try:
        return record.key.decode("utf-8") if record.key is not None else ""
    except UnicodeDecodeError:
        return ""


def _tp(topic: str, partition: int) -> Any:
    from kafka import TopicPartition

    return TopicPartition(topic, partition)


def _names(tps: list[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"


def state_dir_ok(path: Path) -> None:
    """Fail early, with a clear message, when the state directory cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ServiceError(f"state directory {path} is not writable: {exc}") from exc
