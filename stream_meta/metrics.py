"""Every Prometheus metric of the engine, defined once against an injected registry.

Names carry the ``stream_meta_`` prefix and base units (``_seconds``, ``_total`` on counters);
no label ever carries a task id (unbounded cardinality). Tests build a fresh
``CollectorRegistry`` per engine; the CLI passes the registry it serves.
"""

from __future__ import annotations

import math
import platform
import threading
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from stream_meta import __version__
from stream_meta.events import RejectReason

#: outcomes of a meta-update (label values of ``stream_meta_meta_updates_total``)
META_UPDATE_OUTCOMES = ("promoted", "rejected", "failed", "rolled_back", "skipped")
#: outcomes of an admin-port request (label values of ``stream_meta_admin_requests_total``)
ADMIN_OUTCOMES = ("ok", "unauthorized", "forbidden", "not_found", "bad_request", "error")
#: per-event prediction latency buckets (seconds); 1 ms and 50 ms are targets
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
#: per-event loss buckets (squared error or cross-entropy)
LOSS_BUCKETS = (0.0001, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
#: event timestamp -> prediction produced (seconds); 50 ms at 2,000 events/s is a target
END_TO_END_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BatchHistogram(Collector):
    """A Prometheus histogram fed a whole batch at a time (numpy), for per-event values.

    ``prometheus_client.Histogram.observe`` costs about a microsecond and a lock per value; the
    engine produces tens of thousands of values a second, a batch at a time, so this collector
    bins a batch with one ``searchsorted`` + ``bincount`` and exposes the standard
    ``_bucket`` / ``_sum`` / ``_count`` series.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = np.array([*sorted(buckets), math.inf], dtype=np.float64)
        self._counts = np.zeros(len(self._bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        """Count every value of ``values`` (NaN values are ignored)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[~np.isnan(v)]
        if not len(v):
            return
        counts = np.bincount(np.searchsorted(self._bounds, v), minlength=len(self._bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(v.sum())

    def observe(self, value: float, count: int = 1) -> None:
        """Count ``value`` ``count`` times (e.g. one batch latency for each of its events)."""
        if count <= 0 or value != value:
            return
        i = int(np.searchsorted(self._bounds, value))
        with self._lock:
            self._counts[i] += count
            self._sum += value * count

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [
            ("+Inf" if math.isinf(b) else repr(float(b)), c)
            for b, c in zip(self._bounds.tolist(), cumulative, strict=True)
        ]
        return [
            HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)
        ]


class EngineMetrics:
    """The engine's metrics. ``registry=None`` gives a private, unexported registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "stream_meta_events_total",
            "Events processed, by kind (labelled, query, invalid) and outcome.",
            ["kind", "outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "stream_meta_rejections_total",
            "Events rejected (dead-lettered), by reason.",
            ["reason"],
            registry=r,
        )
        self.latency = BatchHistogram(
            "stream_meta_prediction_latency_seconds",
            "Time from an event entering the engine to its prediction.",
            LATENCY_BUCKETS,
            r,
        )
        self.loss = BatchHistogram(
            "stream_meta_prequential_loss",
            "Per-event prequential loss of labelled events (scored before learning them); "
            "rate(_sum)/rate(_count) is the windowed mean.",
            LOSS_BUCKETS,
            r,
        )
        self.loss_mean = Gauge(
            "stream_meta_prequential_loss_mean",
            "Mean prequential loss since start.",
            registry=r,
        )
        self.interval_labels = Counter(
            "stream_meta_interval_labels_total",
            "Labelled regression events predicted with a standard deviation (scored against "
            "their central 90% interval, mean +- 1.645 std).",
            registry=r,
        )
        self.interval_hits = Counter(
            "stream_meta_interval_hits_total",
            "Labelled regression events whose label fell inside their central 90% interval; "
            "rate(hits)/rate(labels) is the served coverage (calibrated: about 0.9).",
            registry=r,
        )
        self.adaptations = Counter(
            "stream_meta_adaptations_total",
            "Task adaptations (weights generated from support set and neighbours).",
            registry=r,
        )
        self.adapt_batch = Histogram(
            "stream_meta_adapt_batch_size",
            "Tasks adapted together in one batched forward pass.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.tasks = Gauge("stream_meta_tasks", "Live task states in memory.", registry=r)
        self.tasks_evicted = Counter(
            "stream_meta_tasks_evicted_total",
            "Idle task states evicted from memory (their embeddings stay in the index).",
            registry=r,
        )
        self.index_size = Gauge(
            "stream_meta_index_vectors", "Task embeddings in the FAISS index.", registry=r
        )
        self.bank_entries = Gauge(
            "stream_meta_retrieval_bank_entries",
            "Entries of the retrieval bank (experienced tasks' pooled examples).",
            registry=r,
        )
        self.bank_changes = Counter(
            "stream_meta_retrieval_bank_changes_total",
            "Experienced tasks offered to the retrieval bank, by outcome: merged into an "
            "entry, added as a new entry, or an entry retired to make room.",
            ["outcome"],
            registry=r,
        )
        self.borrowed = Counter(
            "stream_meta_retrieval_borrowed_total",
            "Few-shot adaptations that borrowed examples from the retrieval bank.",
            registry=r,
        )
        self.experts = Gauge(
            "stream_meta_experts",
            "Experts in the served model set (1: a single model).",
            registry=r,
        )
        self.expert_share = Gauge(
            "stream_meta_expert_share",
            "Each served expert's share of the routing posterior over recent labelled events "
            "(the prior of a task with no example).",
            ["expert"],
            registry=r,
        )
        self.experts_skipped = Counter(
            "stream_meta_experts_skipped_total",
            "Adaptations of an expert skipped for a task whose evidence rules it out (its "
            "routing weight would be negligible).",
            registry=r,
        )
        self.expert_changes = Counter(
            "stream_meta_expert_changes_total",
            "Changes of the served expert set by meta-updates, by action: added, replaced, "
            "retired.",
            ["action"],
            registry=r,
        )
        self.label_requests = Counter(
            "stream_meta_label_requests_total",
            "Label requests emitted, by policy (uncertainty, random, first-k).",
            ["policy"],
            registry=r,
        )
        self.label_refused = Counter(
            "stream_meta_label_requests_refused_total",
            "Events the label policy picked that a budget refused, by budget: share (the "
            "fraction of eligible events), rate (overall per second), task_rate (per task).",
            ["budget"],
            registry=r,
        )
        self.label_answers = Counter(
            "stream_meta_label_answers_total",
            "Labelled events whose label had been requested (answers to label requests).",
            registry=r,
        )
        self.label_threshold = Gauge(
            "stream_meta_label_request_threshold",
            "The uncertainty policy's current threshold: the worth (expected loss reduction) "
            "an unlabelled event's label must reach to be requested.",
            registry=r,
        )
        self.model_version = Gauge(
            "stream_meta_model_version", "Version of the model being served.", registry=r
        )
        self.duplicates = Counter(
            "stream_meta_duplicates_total",
            "Labelled events whose event id was already learned (redeliveries): predicted, "
            "not learned again.",
            registry=r,
        )
        # drift alarms come from the drift monitor (stream_meta.drift), meta-updates from the
        # meta-updater (stream_meta.continual)
        self.drift_alarms = Counter(
            "stream_meta_drift_alarms_total",
            "Drift alarms raised, by detector.",
            ["detector"],
            registry=r,
        )
        self.drift_statistic = Gauge(
            "stream_meta_drift_statistic",
            "Current statistic of each drift detector (per-cluster detectors are not exported).",
            ["detector"],
            registry=r,
        )
        self.meta_updates = Counter(
            "stream_meta_meta_updates_total",
            "Meta-updates by outcome: promoted (hot-swapped), rejected (by the validation "
            "gate), failed (error or non-finite loss), rolled_back (worse in serving after "
            "promotion), skipped (update budget spent).",
            ["outcome"],
            registry=r,
        )
        self.meta_update_duration = Histogram(
            "stream_meta_meta_update_duration_seconds",
            "Wall time of a meta-update job (training and validation of a candidate).",
            buckets=(1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=r,
        )
        self.meta_update_running = Gauge(
            "stream_meta_meta_update_running",
            "1 while a meta-update is collecting data or training, else 0.",
            registry=r,
        )
        self.meta_update_validation_loss = Gauge(
            "stream_meta_meta_update_validation_loss",
            "Held-out replay loss of the last meta-update, by task group (new, old) and model "
            "(served, candidate).",
            ["group", "model"],
            registry=r,
        )
        self.replay_tasks = Gauge(
            "stream_meta_replay_tasks",
            "Tasks held by the replay buffer, by population (recent, reservoir).",
            ["population"],
            registry=r,
        )
        self.build = Info("stream_meta_build", "Build information.", registry=r)
        # every known label value exists from the start at 0, so rate()/increase() see the
        # first increment (a series that appears at 1 hides its first event)
        for reason in RejectReason:
            self.rejections.labels(reason.value)
        for outcome in META_UPDATE_OUTCOMES:
            self.meta_updates.labels(outcome)

    def set_build_info(self, **extra: str) -> None:
        import faiss
        import torch

        self.build.info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "faiss": getattr(faiss, "__version__", "unknown"),
                **extra,
            }
        )


#: Thompson-sampling propensities: small ones make off-policy estimates noisy
PROPENSITY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class DecisionMetrics:
    """Decisions and rewards (:class:`~stream_meta.decider.Decider`), on the engine's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            "stream_meta_decisions_total",
            "Decisions made (an action chosen), by policy (thompson, ucb); redeliveries excluded.",
            ["policy"],
            registry=r,
        )
        self.redelivered = Counter(
            "stream_meta_decisions_redelivered_total",
            "Decision events whose decision id was already held: the same choice output again, "
            "nothing new held.",
            registry=r,
        )
        self.rewards = Counter(
            "stream_meta_rewards_total",
            "Reward events by outcome: learned (once per decision), duplicate (the decision's "
            "reward was learned already: predicted, not learned), late (after reward_ttl_s: "
            "dead-lettered), unknown (no such decision held: dead-lettered).",
            ["outcome"],
            registry=r,
        )
        self.propensity = Histogram(
            "stream_meta_decision_propensity",
            "Probability that the policy plays the action it played (1 for UCB).",
            buckets=PROPENSITY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "stream_meta_pending_decisions",
            "Decisions held awaiting their reward.",
            registry=r,
        )
        self.unrewarded = Counter(
            "stream_meta_decisions_unrewarded_total",
            "Held decisions evicted (decisions.max_pending) before their reward came.",
            registry=r,
        )
        for policy in ("thompson", "ucb"):
            self.decisions.labels(policy)
        for outcome in ("learned", "duplicate", "late", "unknown"):
            self.rewards.labels(outcome)


class ServiceMetrics:
    """Metrics of the Kafka-fed service (``stream-meta serve``), beside the engine's.

    Partition labels are bounded by the topic's partition count; nothing is labelled by task.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = self.registry = registry
        self.consumed = Counter(
            "stream_meta_records_consumed_total",
            "Records consumed from the events topic.",
            registry=r,
        )
        self.predictions = Counter(
            "stream_meta_predictions_produced_total",
            "Prediction records produced and acknowledged (acks=all).",
            registry=r,
        )
        self.dead_letters = Counter(
            "stream_meta_dead_letters_total",
            "Dead-letter records produced and acknowledged, by rejection reason.",
            ["reason"],
            registry=r,
        )
        self.end_to_end = BatchHistogram(
            "stream_meta_end_to_end_latency_seconds",
            "From the event's Kafka timestamp to its output being acknowledged by the broker.",
            END_TO_END_BUCKETS,
            r,
        )
        self.batch_records = Histogram(
            "stream_meta_consumer_batch_records",
            "Records handled per consumer poll.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "stream_meta_consumer_lag_records",
            "Records in the partition not yet consumed (high watermark minus position).",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned = Gauge(
            "stream_meta_assigned_partitions", "Partitions assigned to this consumer.", registry=r
        )
        self.commits = Counter(
            "stream_meta_commits_total", "Successful offset commits.", registry=r
        )
        self.commit_failures = Counter(
            "stream_meta_commit_failures_total",
            "Offset commits that failed (retried with the next commit).",
            registry=r,
        )
        self.produce_failures = Counter(
            "stream_meta_produce_failures_total",
            "Output records the broker did not acknowledge (re-sent before committing).",
            registry=r,
        )
        self.rebalances = Counter(
            "stream_meta_rebalances_total",
            "Consumer-group rebalance callbacks, by event (assigned, revoked).",
            ["event"],
            registry=r,
        )
        self.checkpoints = Counter(
            "stream_meta_checkpoints_total", "State checkpoints written.", registry=r
        )
        self.checkpoint_failures = Counter(
            "stream_meta_checkpoint_failures_total",
            "State checkpoints that failed (offsets are then not committed).",
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "stream_meta_checkpoint_duration_seconds",
            "Time to write one state checkpoint.",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_bytes = Gauge(
            "stream_meta_checkpoint_bytes", "Size of the last state checkpoint.", registry=r
        )
        self.last_checkpoint = Gauge(
            "stream_meta_last_checkpoint_timestamp_seconds",
            "Unix time of the last successful state checkpoint.",
            registry=r,
        )
        self.broker_up = Gauge(
            "stream_meta_broker_up",
            "1 while the broker answers the consumer and producer, 0 while it is unreachable.",
            registry=r,
        )
        self.embeddings_published = Counter(
            "stream_meta_embeddings_published_total",
            "Task embeddings this replica published to the shared embeddings topic.",
            registry=r,
        )
        self.embeddings_merged = Counter(
            "stream_meta_embeddings_merged_total",
            "Other replicas' task embeddings added to this replica's index.",
            registry=r,
        )
        self.embeddings_skipped = Counter(
            "stream_meta_embeddings_skipped_total",
            "Shared-embedding records skipped: malformed, non-finite or from another model "
            "version.",
            registry=r,
        )
        self.changelog_restored = Counter(
            "stream_meta_changelog_tasks_restored_total",
            "Task support sets loaded from the task-state changelog on partition assignment.",
            registry=r,
        )
        self.changelog_failures = Counter(
            "stream_meta_changelog_restore_failures_total",
            "Partition assignments whose task-state changelog could not be read (served from "
            "this replica's own state).",
            registry=r,
        )
        self.changelog_skipped = Counter(
            "stream_meta_changelog_records_skipped_total",
            "Task-state changelog records that did not parse (skipped).",
            registry=r,
        )
        self.models_refused = Counter(
            "stream_meta_model_messages_refused_total",
            "Published model versions refused (the model in use stays), by reason: malformed, "
            "oversized, sha256, unsigned, unknown_key, bad_signature, stale (a replay of a "
            "version not newer than one already read), invalid (not a loadable checkpoint), "
            "architecture.",
            ["reason"],
            registry=r,
        )
        for reason in (
            "malformed",
            "oversized",
            "sha256",
            "unsigned",
            "unknown_key",
            "bad_signature",
            "stale",
            "invalid",
            "architecture",
        ):
            self.models_refused.labels(reason)
        for reason in RejectReason:
            self.dead_letters.labels(reason.value)
        for event in ("assigned", "revoked"):
            self.rebalances.labels(event)
        self.ready = Gauge(
            "stream_meta_ready",
            "1 once state is restored and partitions are assigned (what /readyz reports).",
            registry=r,
        )


class TrainerMetrics:
    """What only ``stream-meta trainer`` exports, beside its engine metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.active = Gauge(
            "stream_meta_trainer_active",
            "1 while this process is the active trainer (it holds the trainer lock), 0 on standby.",
            registry=registry,
        )


class AdminMetrics:
    """Requests to the admin port (:class:`stream_meta.http_server.AdminServer`), by outcome:
    ``ok`` (a route answered), ``unauthorized`` (no bearer token: 401), ``forbidden`` (a wrong
    one: 403), ``not_found``, ``bad_request`` (body or length), ``error`` (the route raised).
    Never a label with the token, the path or the client."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "stream_meta_admin_requests_total",
            "Requests to the admin port, by outcome (unauthorized: no token, forbidden: a "
            "wrong one).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ADMIN_OUTCOMES:
            self.requests.labels(outcome)
