"""The trainer service's pieces that need no broker: whole tasks are sampled, by a stable hash
of their id. (Active/standby and publication against a real broker:
tests/integration/test_trainer.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_meta.app import build_engine
from stream_meta.config import load_settings
from stream_meta.kafka.trainer import TrainerService
from stream_meta.metrics import EngineMetrics


def _trainer(model: Any, sample: float) -> TrainerService:
    settings = load_settings(None, env={}, overrides={"trainer": {"sample": sample}})
    metrics = EngineMetrics(CollectorRegistry())
    engine = build_engine(model, settings, metrics=metrics)
    return TrainerService(engine, settings, metrics, watch=None, updater=None)


def test_whole_tasks_are_sampled_by_a_stable_hash_of_their_id(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    trainer = _trainer(model, 0.25)
    keys = [f"task-{i}".encode() for i in range(4000)]
    first = [trainer._sampled(k) for k in keys]
    assert first == [trainer._sampled(k) for k in keys]  # every event of a task, or none
    again = _trainer(model, 0.25)  # another process (a standby taking over) agrees
    assert first == [again._sampled(k) for k in keys]
    assert 0.22 < sum(first) / len(keys) < 0.28
    everything = _trainer(model, 1.0)
    assert all(everything._sampled(k) for k in keys)


def test_events_without_a_key_are_drawn_at_the_sampling_rate(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    trainer = _trainer(model, 0.5)
    drawn = sum(trainer._sampled(None) for _ in range(4000))
    assert 1800 < drawn < 2200
    assert trainer.ready() == (True, "standby")  # not active before it holds the lock


def test_without_a_signing_key_a_promotion_is_not_published(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    trainer = _trainer(model, 1.0)  # default settings: no models.signing_key_file
    assert trainer.signer is None and not trainer.models_cfg.accept_unsigned
    with pytest.raises(RuntimeError, match="no signing key"):
        trainer._publish(2)  # refused before anything is sent (there is no producer here)
    assert trainer.published == 0
