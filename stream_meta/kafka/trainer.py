"""The trainer service (``stream-meta trainer``): meta-updates trained once, for every replica.

With several ``serve`` replicas, each would otherwise detect drift and train on its own share
of the tasks. The trainer does it centrally:

* **one active trainer**: every trainer joins the consumer group ``<group>.trainer`` on the
  one-partition topic ``<prefix>.trainer-lock``; the member that is assigned the partition is
  active, the others stand by and take over when it leaves or dies (Kafka's group
  membership, nothing home-made);
* the active trainer reads a sample of the tasks of ``<prefix>.events`` (``trainer.sample``
  of the task ids, every event of a sampled task; every partition, manual assignment, no
  group: the replicas' consumption is untouched) through an engine of its own, with the drift
  monitor and the meta-updater exactly as ``serve`` runs them (a worker process trains, the
  validation gate decides);
* a promoted model is published on ``<prefix>.models`` (:mod:`stream_meta.kafka.model_topic`),
  signed with ``models.signing_key_file`` (:mod:`stream_meta.kafka.model_signing`; without a
  key it is not published, unless ``models.accept_unsigned`` allows unsigned versions), which
  every replica verifies and adopts; the outcome records go to ``<prefix>.drift``. The
  trainer starts from the newest version already published, so versions keep increasing.

Replicas should then run with ``meta_update.enabled = false`` (they still follow the models
topic). A manual update is requested from the trainer's admin endpoint
(``stream-meta meta-update --url``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from typing import Any

import numpy as np

from stream_meta.kafka.clients import ServiceError
from stream_meta.kafka.topics import Topics, ensure_topics
from stream_meta.metrics import TrainerMetrics
from stream_meta.pipeline import Pipeline

__all__ = ["TrainerService"]

log = logging.getLogger(__name__)


class TrainerService:
    """See the module docstring. ``settings`` is the whole Settings tree."""

    def __init__(
        self, engine: Any, settings: Any, metrics: Any, *, watch: Any, updater: Any
    ) -> None:
        self.engine, self.watch, self.updater, self.metrics = engine, watch, updater, metrics
        self.pipeline = Pipeline(engine, watch=watch, updater=updater)
        self.lock_metrics = TrainerMetrics(metrics.registry)
        self.kafka, self.cfg = settings.kafka, settings.trainer
        self.models_cfg = settings.models  # the signing key and the trusted keys
        self.signer: Any = None
        self.topics = Topics.for_prefix(self.kafka.topic_prefix)
        self.lock_topic = f"{self.kafka.topic_prefix}.trainer-lock"
        self.stop_event = threading.Event()
        self.active = False
        self._announced = False  # the first state is logged, whichever it is
        self._rng = np.random.default_rng(self.cfg.seed)
        self.sampled = self.published = 0
        self._clients: list[Any] = []
        self._heartbeat = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

        from stream_meta.kafka.model_signing import (
            SigningError,
            signer_from_settings,
            verifier_from_settings,
        )
        from stream_meta.kafka.model_topic import ModelFollower

        try:
            self.signer = signer_from_settings(self.models_cfg)
            verifier = verifier_from_settings(self.models_cfg)
        except SigningError as exc:
            raise ServiceError(str(exc)) from exc
        if self.signer is not None:
            log.info("promoted versions are signed with key %s", self.signer.key_id.hex())
        elif self.models_cfg.accept_unsigned:
            log.warning(
                "no models.signing_key_file: promoted versions are published UNSIGNED "
                "(models.accept_unsigned is on; development only)"
            )
        else:
            log.warning(
                "no models.signing_key_file (and models.accept_unsigned is off): promoted "
                "versions will NOT be published; the replicas keep their model"
            )
        cfg = self.kafka.client_config()
        try:
            admin = KafkaAdminClient(**cfg)
        except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
            where = self.kafka.bootstrap_servers
            raise ServiceError(f"cannot reach Kafka at {where}: {exc}") from exc
        try:
            ensure_topics(admin, (self.lock_topic, self.topics.models), 1, 1)
            ensure_topics(admin, (self.topics.drift,), 1, 1)
        finally:
            admin.close()
        self.producer = KafkaProducer(**cfg, acks="all", max_request_size=2 << 20)
        k = self.kafka
        self.lock = KafkaConsumer(
            **cfg,
            group_id=f"{k.group_id}.trainer",
            enable_auto_commit=False,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
        )
        self.lock.subscribe([self.lock_topic])
        self.events = KafkaConsumer(
            **cfg, enable_auto_commit=False, max_poll_records=self.cfg.batch
        )
        self.models = ModelFollower(
            KafkaConsumer(**cfg, enable_auto_commit=False, max_partition_fetch_bytes=2 << 20),
            self.topics.models,
            verifier=verifier,
        )
        self._clients = [self.producer, self.lock, self.events, self.models]

    def health(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._heartbeat
        return (idle < 120, "ok" if idle < 120 else f"loop stalled for {idle:.0f} s")

    def ready(self) -> tuple[bool, str]:
        return (True, "active" if self.active else "standby")

    def run(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Stand by or train until stopped (or ``timeout_s``); returns a summary."""
        start = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    break
                self._heartbeat = time.monotonic()
                self.lock.poll(timeout_ms=100)  # membership: heartbeats and rebalances
                self._follow_published()
                active = any(tp.partition == 0 for tp in self.lock.assignment())
                if active != self.active or not self._announced:
                    self._switch(active)
                if not active:
                    continue
                self._train_step()
        finally:
            self.close()
        return {
            "active": self.active,
            "sampled": self.sampled,
            "published": self.published,
            "model_version": self.engine.model_version,
            "meta_updates": self.updater.summary() if self.updater else [],
        }

    def close(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception as exc:  # closing must not hide why we stopped
                log.warning("closing %s: %s", type(client).__name__, exc)
        self._clients = []

    # -- work -------------------------------------------------------------------------------------
    def _switch(self, active: bool) -> None:
        from kafka import TopicPartition

        self.active, self._announced = active, True
        self.lock_metrics.active.set(1 if active else 0)
        if active:
            parts = self.events.partitions_for_topic(self.topics.events) or set()
            tps = [TopicPartition(self.topics.events, p) for p in sorted(parts)]
            self.events.assign(tps)
            self.events.seek_to_end(*tps)  # train on what comes from now on
            log.info(
                "trainer active: sampling %s of the tasks of %s (model v%d)",
                f"{self.cfg.sample:.0%}",
                self.topics.events,
                self.engine.model_version,
            )
        else:
            self.events.assign([])
            log.info("trainer on standby (another trainer holds %s)", self.lock_topic)

    def _follow_published(self) -> None:
        """Start from (and keep up with) the newest published version."""
        found = self.models.newer(self.engine.model, self.engine.model_version)
        if found is not None:
            version, model = found
            self.engine.swap_model(model, version)
            log.info("trainer follows published model version %d", version)

    def _train_step(self) -> None:
        polled = self.events.poll(timeout_ms=self.kafka.poll_timeout_ms, max_records=self.cfg.batch)
        records = [r for batch in polled.values() for r in batch]
        raws = [r.value for r in records if r.value and self._sampled(r.key)]
        if raws:
            self.sampled += len(raws)
            step = self.pipeline.step(raws)
            for alarm, record in zip(step.alarms, step.alarm_records(), strict=True):
                self._send(self.topics.drift, alarm.detector, record)
            outcomes = step.outcomes
        else:
            outcomes = self.pipeline.idle()
        for rec in outcomes:
            self._send(self.topics.drift, "meta_update", rec)
            if rec.get("outcome") == "promoted":
                try:
                    self._publish(rec["version"])
                except Exception as exc:  # the broker refused it: the trainer keeps going
                    log.error(
                        "model version %d could not be published (%s); the replicas "
                        "keep their model until the next promotion",
                        rec["version"],
                        exc,
                    )
        self.producer.flush()

    def _sampled(self, key: bytes | None) -> bool:
        """Whole tasks are sampled (by a hash of the key, the task id), so the tasks the
        trainer learns have every example; an event without a key is drawn at random."""
        if key is None:
            return bool(self._rng.random() < self.cfg.sample)
        return zlib.crc32(key) % 10_000 < self.cfg.sample * 10_000

    def _send(self, topic: str, key: str, record: dict[str, Any]) -> None:
        self.producer.send(topic, key=key.encode(), value=json.dumps(record, default=str).encode())

    def _publish(self, version: int) -> None:
        import tempfile
        from pathlib import Path

        from stream_meta.kafka.model_topic import publish_model
        from stream_meta.model_checkpoint import save_checkpoint

        if self.signer is None and not self.models_cfg.accept_unsigned:
            raise RuntimeError(
                "no signing key (models.signing_key_file), and models.accept_unsigned is off"
            )
        with tempfile.TemporaryDirectory(prefix="stream-meta-trainer-") as tmp:
            path = Path(tmp) / "model.safetensors"
            save_checkpoint(
                path, self.engine.model, family=self.updater.family, model_version=version
            )
            digest = publish_model(
                self.producer,
                self.topics.models,
                path.read_bytes(),
                version=version,
                signer=self.signer,
            )
        self.published += 1
        log.info(
            "published model version %d (sha256 %s) on %s", version, digest[:12], self.topics.models
        )
