"""Decisions through the suite's real broker: every decision event gets exactly one decision
record on ``<prefix>.decisions`` (a redelivered one the same record again), and each reward is
learned once, by a service restarted from its state directory (the held decisions are part of
its checkpoint); duplicate rewards are predicted, not learned; unknown rewards and bad
decisions are dead-lettered with their reason.

The services run in this process (:class:`~stream_meta.kafka.service.KafkaService`, built as
``stream-meta serve`` builds it), so the test reads their engines directly."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from stream_meta.app import build_decider, build_engine
from stream_meta.config import load_settings
from stream_meta.kafka.service import KafkaService
from stream_meta.metrics import EngineMetrics, ServiceMetrics
from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint
from stream_meta.testing.kafka import create_topics, new_prefix, read_topic
from stream_meta.testing.timeouts import scaled

pytestmark = pytest.mark.kafka

TASKS, PER_TASK = 6, 4  # 24 decisions


def _settings(bootstrap: str, prefix: str, state_dir: Path) -> Any:
    overrides: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic_prefix": prefix,
            "group_id": f"{prefix}-g",
            "session_timeout_ms": 6000,  # FAST_GROUP_SETS: joins in ~3 s on Tansu
            "heartbeat_interval_ms": 2000,
        },
        "service": {"state_dir": str(state_dir), "partitions": 3},
        "drift": {"enabled": False},
        "meta_update": {"enabled": False},
        "engine": {"micro_batch": 16},
    }
    return load_settings(None, env={}, overrides=overrides)


def _serve(settings: Any, events: int) -> tuple[KafkaService, dict[str, Any]]:
    """A service built like ``stream-meta serve``, run until it consumed ``events`` records."""
    model, _ = load_checkpoint(shipped_checkpoint("sinusoid"))
    registry = CollectorRegistry()
    engine = build_engine(model, settings, metrics=EngineMetrics(registry))
    service = KafkaService(
        engine, settings, ServiceMetrics(registry), decider=build_decider(settings, engine)
    )
    summary = service.run(events=events, timeout_s=scaled(180))
    assert summary["consumed"] == events, summary
    return service, summary


def _produce(bootstrap: str, prefix: str, events: list[dict[str, Any]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for ev in events:
            key = ev.get("task_id", "t0")
            producer.send(f"{prefix}.events", key=key.encode(), value=json.dumps(ev).encode())
        producer.flush()
    finally:
        producer.close()


def _decision(i: int) -> dict[str, Any]:
    task = f"t{i % TASKS}"
    actions = [{"action_id": f"a{k}", "x": [k - 3.5]} for k in range(8)]
    return {"event_id": f"d{i}", "task_id": task, "actions": actions, "ts": 1000.0 + i}


def test_decisions_are_answered_once_and_rewards_learned_once_through_the_broker(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix)  # 3 partitions, before anything is produced
    settings = _settings(kafka_bootstrap, prefix, tmp_path / "state")
    decisions = [_decision(i) for i in range(TASKS * PER_TASK)]
    plain = [
        {"event_id": f"e{t}", "task_id": f"t{t}", "x": [0.5], "y": 0.25, "ts": 999.0}
        for t in range(TASKS)
    ]
    first = [*plain, *decisions, decisions[0]]  # the last one: a redelivery
    _produce(kafka_bootstrap, prefix, first)

    service, summary = _serve(settings, len(first))

    records = read_topic(
        kafka_bootstrap, f"{prefix}.decisions", until=lambda rs: len(rs) >= len(first) - TASKS
    )
    values = [json.loads(r.value) for r in records]
    counts = Counter(v["decision_id"] for v in values)
    assert len(values) == len(decisions) + 1
    assert set(counts) == {d["event_id"] for d in decisions} and counts["d0"] == 2
    d0 = [v for v in values if v["decision_id"] == "d0"]
    assert d0[0] == d0[1]
    assert all(r.key.decode() == json.loads(r.value)["task_id"] for r in records)
    assert summary["decided"] == len(decisions) + 1
    assert summary["decisions"]["redelivered"] == 1
    held = service.decider.store  # type: ignore[union-attr]
    assert len(held) == len(decisions) and held.awaiting == len(decisions)
    before = sum(s.n for s in service.engine.store)
    assert before == TASKS

    # a restarted service (state restored from its checkpoint) learns the rewards
    chosen = {v["decision_id"]: v for v in values}
    rewards = [
        {
            "event_id": f"r{i}",
            "decision_id": d["event_id"],
            "reward": 0.1 * i,
            "task_id": d["task_id"],
            "ts": 1100.0,
        }
        for i, d in enumerate(decisions)
    ]
    duplicate = {**rewards[3], "event_id": "r-again"}
    unknown = {"event_id": "r-x", "decision_id": "nope", "reward": 1.0, "task_id": "t1"}
    bad = {**_decision(99), "actions": [{"action_id": "a", "x": [1.0]}] * 2}
    second = [*rewards, duplicate, unknown, bad]
    _produce(kafka_bootstrap, prefix, second)

    restarted, _ = _serve(settings, len(second))

    preds = read_topic(
        kafka_bootstrap,
        f"{prefix}.predictions",
        until=lambda rs: len(rs) >= len(plain) + len(rewards) + 1,
    )
    by_id = {v["event_id"]: v for v in (json.loads(r.value) for r in preds)}
    assert all(by_id[r["event_id"]]["labelled"] for r in rewards)
    assert not any(by_id[r["event_id"]]["duplicate"] for r in rewards)
    assert by_id["r-again"]["duplicate"] and not by_id["r-again"]["labelled"]
    assert sum(s.n for s in restarted.engine.store) == before + len(rewards)
    # the learned example is the played action's features with the reward
    state = restarted.engine.store.get(decisions[5]["task_id"])
    assert state is not None
    x5 = chosen["d5"]["action_index"] - 3.5
    examples = zip(state.xs[: state.n, 0].tolist(), state.ys[: state.n].tolist(), strict=True)
    assert any(abs(x - x5) < 1e-6 and abs(y - 0.5) < 1e-6 for x, y in examples)

    letters = read_topic(kafka_bootstrap, f"{prefix}.dead-letter", until=lambda rs: len(rs) >= 2)
    reasons = {json.loads(r.value)["event_id"]: json.loads(r.value)["reason"] for r in letters}
    assert reasons == {"r-x": "unknown_decision", "d99": "duplicate_action"}
    assert restarted.decider.store.awaiting == 0  # type: ignore[union-attr]
