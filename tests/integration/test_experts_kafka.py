"""A served set of experts (stream_meta.experts) travels as one model version against the
suite's real broker: a replica adopts a set published on the models topic and serves it, a
service restarted from its state directory serves the same set again with the tasks' routing
evidence, and the trainer follows (and republishes) a published set.

The services run in this process (a :class:`~stream_meta.kafka.service.KafkaService` on a
thread, built as ``stream-meta serve`` builds it), so the tests read their engines directly."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from stream_meta.app import build_engine, build_meta_updater
from stream_meta.config import load_settings
from stream_meta.engine import Engine
from stream_meta.experts import members, with_experts
from stream_meta.kafka.model_topic import ModelFollower, publish_model
from stream_meta.kafka.service import KafkaService
from stream_meta.metrics import EngineMetrics, ServiceMetrics
from stream_meta.model import MetaModel
from stream_meta.model_checkpoint import load_checkpoint, save_checkpoint, shipped_checkpoint
from stream_meta.testing.kafka import create_topics, new_prefix, read_topic
from stream_meta.testing.timeouts import scaled, wait_until
from tests.conftest import sinusoid_events

pytestmark = pytest.mark.kafka

#: the set: the shipped model (served as version 1) is expert 1, its noisy copy expert 2,
#: published together as version 2
PRIMARY, OTHER, SET_VERSION = 1, 2, 2


def _shipped() -> MetaModel:
    model, _ = load_checkpoint(shipped_checkpoint("sinusoid"))
    return model


def _noisy(model: MetaModel, scale: float = 0.5) -> MetaModel:
    """A copy of ``model`` with noise on its hypernetwork (the encoder kept equal)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.startswith("hyper.") and p.numel() > 1:
                p += scale * p.std() * torch.randn(p.shape, generator=gen)
    return out.eval()


def _set_bytes(tmp_path: Path) -> bytes:
    shipped = _shipped()
    served = with_experts(shipped, PRIMARY, [(OTHER, _noisy(shipped))])
    path = tmp_path / "set.safetensors"
    save_checkpoint(path, served, family="sinusoid", model_version=SET_VERSION)
    return path.read_bytes()


def _settings(bootstrap: str, prefix: str, keys: Any, **sections: dict[str, Any]) -> Any:
    """Settings against the suite's broker; versions signed with and verified against
    ``keys`` (the ``model_keys`` fixture)."""
    overrides: dict[str, Any] = {
        "models": {"signing_key_file": str(keys.private), "trusted_keys_dir": str(keys.dir)},
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic_prefix": prefix,
            "group_id": f"{prefix}-g",
            "session_timeout_ms": 6000,  # FAST_GROUP_SETS: joins in ~3 s on Tansu
            "heartbeat_interval_ms": 2000,
        },
        **sections,
    }
    return load_settings(None, env={}, overrides=overrides)


#: a meta-updater that only adopts (no drift watch, no schedule, trains inline if asked)
ADOPT_ONLY = {"worker": "inline", "on_drift": False, "every_events": 0}


class _Running:
    """A :class:`KafkaService` built like ``stream-meta serve`` (state restored, broker
    reached, topics created in :meth:`KafkaService.start`, here), run on a thread."""

    def __init__(self, settings: Any) -> None:
        registry = CollectorRegistry()
        metrics = EngineMetrics(registry)
        self.engine: Engine = build_engine(_shipped(), settings, metrics=metrics, model_version=1)
        state_dir = settings.service.state_dir
        self.updater = build_meta_updater(
            settings,
            self.engine,
            metrics,
            None,
            "sinusoid",
            worker="inline",
            models_dir=None if state_dir is None else Path(state_dir) / "models",
        )
        self.service = KafkaService(
            self.engine, settings, ServiceMetrics(registry), updater=self.updater
        )
        self.service.start()
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.service.run()
        except BaseException as exc:  # re-raised by stop()
            self.error = exc

    def alive(self) -> bool:
        if self.error is not None:
            raise AssertionError("the service stopped") from self.error
        return self.thread.is_alive()

    def stop(self) -> dict[str, Any]:
        self.service.stop_event.set()
        self.thread.join(scaled(120))
        if self.updater is not None:
            self.updater.close()
        assert not self.thread.is_alive(), "the service did not stop"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def _produce(bootstrap: str, prefix: str, events: list[dict[str, Any]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for ev in events:
            producer.send(
                f"{prefix}.events", key=ev["task_id"].encode(), value=json.dumps(ev).encode()
            )
        producer.flush()
    finally:
        producer.close()


def _publish(bootstrap: str, prefix: str, blob: bytes, version: int, keys: Any) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 << 20)
    try:
        publish_model(producer, f"{prefix}.models", blob, version=version, signer=keys.signer)
    finally:
        producer.close()


def _events(n: int, run: str, seed: int) -> list[dict[str, Any]]:
    out = sinusoid_events(n, tasks=12, seed=seed)
    for ev in out:
        ev["event_id"] = f"{run}-{ev['event_id']}"  # distinct ids: nothing is a duplicate
    return out


def _predictions(bootstrap: str, prefix: str, run: str, n: int) -> list[dict[str, Any]]:
    records = read_topic(
        bootstrap,
        f"{prefix}.predictions",
        until=lambda rs: (
            sum(json.loads(r.value)["event_id"].startswith(f"{run}-") for r in rs) >= n
        ),
    )
    values = [json.loads(r.value) for r in records]
    return [v for v in values if v["event_id"].startswith(f"{run}-")]


def _serves_set(running: _Running) -> bool:
    running.alive()
    return running.engine.model_version == SET_VERSION


def test_a_replica_adopts_a_published_set_and_its_predictions_name_the_expert(
    kafka_bootstrap: str, tmp_path: Path, model_keys: Any
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    settings = _settings(
        kafka_bootstrap,
        prefix,
        model_keys,
        meta_update={"enabled": False},
        engine={"micro_batch": 64},
    )
    replica = _Running(settings)
    try:
        assert replica.updater is None and replica.engine.expert_ids == [1]
        wait_until(lambda: replica.alive() and replica.service.ready()[0], timeout=60, what="join")
        _publish(kafka_bootstrap, prefix, _set_bytes(tmp_path), SET_VERSION, model_keys)
        wait_until(lambda: _serves_set(replica), timeout=60, what="the published set adopted")
        assert replica.engine.expert_ids == [PRIMARY, OTHER]
        _produce(kafka_bootstrap, prefix, _events(400, "a", seed=1))
        outputs = _predictions(kafka_bootstrap, prefix, "a", 400)
    finally:
        summary = replica.stop()
    assert summary["consumed"] == 400 and summary["model_version"] == SET_VERSION
    assert len({o["event_id"] for o in outputs}) == 400
    assert {o["model_version"] for o in outputs} == {SET_VERSION}
    experts = [o["expert"] for o in outputs]
    assert set(experts) <= {PRIMARY, OTHER} and None not in experts
    # the noisy expert explains the sinusoids worse: the tasks are mostly routed to the primary
    assert experts.count(PRIMARY) > experts.count(OTHER)
    shares = replica.engine.router.shares() if replica.engine.router else {}
    assert set(shares) == {PRIMARY, OTHER} and shares[PRIMARY] > shares[OTHER]


def test_a_restarted_service_serves_the_same_set_with_its_routing_evidence(
    kafka_bootstrap: str, tmp_path: Path, model_keys: Any
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    state_dir = tmp_path / "state"
    settings = _settings(
        kafka_bootstrap,
        prefix,
        model_keys,
        service={"state_dir": str(state_dir)},
        meta_update=ADOPT_ONLY,
        engine={"micro_batch": 64},
    )
    first = _Running(settings)
    try:
        wait_until(lambda: first.alive() and first.service.ready()[0], timeout=60, what="join")
        _publish(kafka_bootstrap, prefix, _set_bytes(tmp_path), SET_VERSION, model_keys)
        wait_until(lambda: _serves_set(first), timeout=60, what="the published set adopted")
        events = _events(400, "a", seed=2)
        _produce(kafka_bootstrap, prefix, events)
        _predictions(kafka_bootstrap, prefix, "a", 400)
    finally:
        first.stop()  # the shutdown checkpoint
    # the adopted set was kept beside the checkpoints, as one checkpoint
    saved, manifest = load_checkpoint(state_dir / "models" / f"model-v{SET_VERSION}.safetensors")
    assert [i for i, _ in members(saved, SET_VERSION)] == [PRIMARY, OTHER]
    assert manifest["expert_id"] == PRIMARY and manifest["experts"] == [OTHER]
    labelled = {ev["task_id"] for ev in events if "y" in ev}
    before = {s.task_id: s.evidence for s in first.engine.store}
    assert labelled and all(before[t] is not None for t in labelled)
    shares = first.engine.router.shares() if first.engine.router else {}

    second = _Running(settings)  # starts from the shipped model, version 1, like serve
    try:
        engine = second.engine
        assert second.service.restored is not None
        assert engine.model_version == SET_VERSION
        assert engine.expert_ids == [PRIMARY, OTHER]
        for (i, a), (j, b) in zip(
            members(engine.model, SET_VERSION), members(saved, SET_VERSION), strict=True
        ):
            assert i == j
            for k, v in b.state_dict().items():
                torch.testing.assert_close(a.state_dict()[k], v)
        for task in labelled:
            state = engine.store.get(task)
            assert state is not None and state.evidence is not None, task
            np.testing.assert_allclose(state.evidence, before[task])
        assert engine.router is not None
        restored = engine.router.shares()
        assert restored.keys() == shares.keys()
        np.testing.assert_allclose(list(restored.values()), list(shares.values()))
        # and it serves the set: the next events name their experts
        wait_until(lambda: second.alive() and second.service.ready()[0], timeout=60, what="join")
        _produce(kafka_bootstrap, prefix, _events(100, "b", seed=3))
        outputs = _predictions(kafka_bootstrap, prefix, "b", 100)
    finally:
        second.stop()
    assert {o["model_version"] for o in outputs} == {SET_VERSION}
    assert {o["expert"] for o in outputs} <= {PRIMARY, OTHER}
    assert None not in {o["expert"] for o in outputs}


def test_the_trainer_follows_a_published_set_and_republishes_it(
    kafka_bootstrap: str, tmp_path: Path, model_keys: Any
) -> None:
    from stream_meta.kafka.trainer import TrainerService

    prefix = new_prefix()
    settings = _settings(kafka_bootstrap, prefix, model_keys, meta_update=ADOPT_ONLY)
    metrics = EngineMetrics(CollectorRegistry())
    engine = build_engine(_shipped(), settings, metrics=metrics, model_version=1)
    updater = build_meta_updater(settings, engine, metrics, None, "sinusoid", worker="inline")
    trainer = TrainerService(engine, settings, metrics, watch=None, updater=updater)
    trainer.start()  # creates the models topic
    try:
        _publish(kafka_bootstrap, prefix, _set_bytes(tmp_path), SET_VERSION, model_keys)

        def followed() -> bool:
            trainer._follow_published()
            return engine.model_version == SET_VERSION

        wait_until(followed, timeout=60, what="the trainer following the published set")
        assert engine.expert_ids == [PRIMARY, OTHER]
        # what it publishes next (here: the set it serves, as version 3) is the set again
        trainer._publish(SET_VERSION + 1)
    finally:
        trainer.close()
        updater.close()
    reader = ModelFollower(
        KafkaConsumer(
            bootstrap_servers=kafka_bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=2 << 20,
        ),
        f"{prefix}.models",
        verifier=model_keys.verifier,
    )
    try:
        found = wait_until(
            lambda: reader.newer(_shipped(), SET_VERSION), timeout=60, what="version 3 read back"
        )
    finally:
        reader.close()
    version, model = found
    assert version == SET_VERSION + 1
    assert [i for i, _ in members(model, version)] == [PRIMARY, OTHER]
