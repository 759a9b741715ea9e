"""Meta-updates: the promotion gate, failures, probation and rollback, hot-swap consistency,
and the whole loop (a drift triggers an update that is promoted and lowers the loss)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from stream_meta.app import build_engine, run_stream
from stream_meta.config import load_settings
from stream_meta.continual.replay_buffer import ReplayBuffer
from stream_meta.continual.update_job import UpdateConfig, decide, validate
from stream_meta.continual.updater import MetaUpdateConfig, MetaUpdater
from stream_meta.engine import Engine
from stream_meta.metrics import EngineMetrics
from stream_meta.model import MetaModel
from stream_meta.tasks.scenarios import get_scenario
from stream_meta.testing.timeouts import wait_until
from tests.conftest import sinusoid_events


def _engine(model: MetaModel, **engine: Any) -> Engine:
    settings = load_settings(None, env={}, overrides={"engine": engine} if engine else None)
    return build_engine(model, settings, metrics=EngineMetrics(CollectorRegistry()))


def _events(scenario: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    return [e.event for e in get_scenario(scenario).stream(seed=seed).iter_events(n)]


def _feed(
    engine: Engine,
    events: list[dict[str, Any]],
    updater: MetaUpdater | None = None,
    batch: int = 512,
) -> list[Any]:
    results = []
    for lo in range(0, len(events), batch):
        r = engine.process(events[lo : lo + batch])
        if updater is not None:
            updater.observe(r)
        results.append(r)
    return results


def _noisy(model: MetaModel, scale: float, seed: int = 0) -> MetaModel:
    """A copy of ``model`` with Gaussian noise of ``scale`` x each tensor's spread added."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.numel() > 1:
                p += scale * p.std() * torch.randn(p.shape, generator=gen)
    return out.eval()


# -- the gate -----------------------------------------------------------------------------------
def _val(new_s: float, new_c: float, old_s: float, old_c: float, n: int = 20) -> dict:
    def g(loss: float) -> dict:
        return {"loss": loss, "tasks": n, "episodes": 3 * n, "by_shots": {"1": loss}}

    return {
        "served": {"new": g(new_s), "old": g(old_s)},
        "candidate": {"new": g(new_c), "old": g(old_c)},
    }


@pytest.mark.parametrize(
    ("validation", "outcome", "why"),
    [
        (_val(2.0, 1.5, 1.0, 1.05), "promoted", "new-task loss 2 -> 1.5"),
        (_val(2.0, 1.99, 1.0, 1.0), "rejected", "not 2% below"),
        (_val(2.0, 2.5, 1.0, 0.9), "rejected", "not 2% below"),
        (_val(2.0, 1.0, 1.0, 1.2), "rejected", "forgetting"),
        (_val(2.0, math.nan, 1.0, 1.0), "failed", "not finite"),
        (_val(2.0, 1.0, 1.0, math.inf), "failed", "not finite"),
        (_val(2.0, 1.0, 1.0, 1.0, n=3), "rejected", "too few held-out new tasks"),
    ],
)
def test_the_gate(validation: dict, outcome: str, why: str) -> None:
    got, reason = decide(validation, UpdateConfig())
    assert got == outcome and why in reason


@pytest.fixture(scope="module")
def drifted(shipped_sinusoid: Any) -> tuple[MetaModel, ReplayBuffer, int]:
    """The shipped model served over ``sinusoid-new-family`` up to 4,000 events past the drift,
    and the replay buffer of that stream."""
    model, _ = shipped_sinusoid
    engine = _engine(model)
    replay = ReplayBuffer(1)
    seen = 0
    for r in _feed(engine, _events("sinusoid-new-family", 24_000)):
        replay.observe(r, seen)
        seen += len(r.order)
    return model, replay, 20_000


def test_the_gate_rejects_a_deliberately_worse_candidate(drifted: Any) -> None:
    model, replay, drift = drifted
    snap = replay.snapshot(min_examples=4)
    parts = snap.split(drift, 0.2)
    bank = np.concatenate([parts["train_new"], parts["train_old"]])
    config = UpdateConfig()
    worse = _noisy(model, 0.3)
    validation = {
        name: {g: validate(m, snap, parts[f"val_{g}"], bank, config) for g in ("new", "old")}
        for name, m in (("served", model), ("candidate", worse))
    }
    assert validation["candidate"]["old"]["loss"] > 1.5 * validation["served"]["old"]["loss"]
    outcome, reason = decide(validation, config)
    assert outcome == "rejected", reason
    # the served model against itself is no improvement either: nothing is promoted for free
    same = {"served": validation["served"], "candidate": validation["served"]}
    assert decide(same, config)[0] == "rejected"


# -- the updater --------------------------------------------------------------------------------
def _updater(engine: Engine, **config: Any) -> MetaUpdater:
    update = config.pop("update", {})
    cfg = MetaUpdateConfig(
        on_drift=False, cooldown_events=0, update=UpdateConfig(**update), **config
    )
    return MetaUpdater(engine, cfg, metrics=engine.metrics)


def test_a_diverging_update_fails_with_an_alarm_and_the_served_model_stays(
    shipped_sinusoid: Any,
) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    updater = _updater(engine, update={"lr": 1e30, "expert_lr": 1e30, "steps": 5})
    events = sinusoid_events(6000, tasks=300)
    _feed(engine, events[:4000], updater)
    updater.request("manual", "test")
    results = _feed(engine, events[4000:], updater)
    [rec] = updater.records
    assert rec["outcome"] == "failed" and rec["alarm"] is True
    assert "non-finite" in rec["reason"] or "not finite" in rec["reason"]
    assert engine.model is model and engine.model_version == 1
    assert all(np.isfinite(r.outputs.values).all() for r in results)
    assert engine.metrics.meta_updates.labels("failed")._value.get() == 1


def test_non_finite_predictions_after_a_swap_roll_back_at_once(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    updater = _updater(engine)
    events = sinusoid_events(5000, tasks=200)
    _feed(engine, events[:3000], updater)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.hyper.base.mul_(1e20)  # finite weights whose outputs overflow
    rec = updater.adopt(broken, "test: a model that overflows")
    assert rec["outcome"] == "promoted" and engine.model_version == 2
    results = _feed(engine, events[3000:], updater)
    assert not np.isfinite(results[0].outputs.values).all()  # the one batch served by it
    assert updater.records[-1]["outcome"] == "rolled_back"
    assert updater.records[-1]["alarm"] is True
    assert engine.model is model and engine.model_version == 1
    assert all(np.isfinite(r.outputs.values).all() for r in results[1:])
    assert all(r.outputs.model_version == 1 for r in results[1:])


def test_a_worse_model_in_serving_is_rolled_back_after_probation(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    updater = _updater(engine, probation_events=1000)
    events = sinusoid_events(9000, tasks=200)
    _feed(engine, events[:4000], updater)
    updater.adopt(_noisy(model, 0.3), "test: a worse model")
    _feed(engine, events[4000:], updater)
    rec = updater.records[-1]
    assert rec["outcome"] == "rolled_back", rec
    assert rec["loss_after"] > 2.0 * rec["loss_before"]
    assert rec["version"] == 1 and rec["rolled_back_version"] == 2
    assert engine.model_version == 1


def test_non_finite_weights_are_never_served(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    engine = _engine(model)
    nan = copy.deepcopy(model)
    with torch.no_grad():
        nan.log_noise.fill_(math.nan)
    rec = _updater(engine).adopt(nan)
    assert rec["outcome"] == "failed" and engine.model is model


def test_after_a_swap_every_prediction_is_the_new_models(make_model: Any) -> None:
    """Hot-swap consistency: each batch is served by one version, and after the swap the
    predictions equal those of an engine that served the new model all along (same support
    sets; its adapted-weights cache cleared at the same point)."""
    old, new = make_model(seed=1), make_model(seed=2)
    events = sinusoid_events(3000, tasks=80)
    a = Engine(old, metrics=EngineMetrics(CollectorRegistry()))
    b = Engine(new, metrics=EngineMetrics(CollectorRegistry()), model_version=2)
    updater = _updater(a)
    before = _feed(a, events[:1536], updater)
    _feed(b, events[:1536])
    updater.adopt(new, "test")
    b.clear_weights_cache()
    after_a, after_b = _feed(a, events[1536:], updater), _feed(b, events[1536:])
    assert all(r.outputs.model_version == 1 for r in before)
    assert all(r.outputs.model_version == 2 for r in after_a)
    pa = np.concatenate([r.outputs.values for r in after_a])
    pb = np.concatenate([r.outputs.values for r in after_b])
    np.testing.assert_allclose(pa, pb, rtol=1e-4, atol=1e-5)


def test_a_background_update_never_mixes_versions_in_a_batch(shipped_sinusoid: Any) -> None:
    """Batches keep coming while the worker process trains (as many as it takes: the stream
    never runs out, the wait is bounded by a scaled deadline); every batch is served by one
    version, and the batch after the promotion by the new one."""
    model, _ = shipped_sinusoid
    engine = _engine(model)
    updater = _updater(
        engine, worker="process", promote="always", update={"steps": 20, "min_val_tasks": 1}
    )

    def batches() -> Iterator[list[dict[str, Any]]]:  # an endless stream of fresh events
        for k in itertools.count():
            chunk = sinusoid_events(256, tasks=400, seed=1000 + k)
            yield [{**e, "event_id": f"b{k}-{e['event_id']}"} for e in chunk]

    stream = batches()
    versions: list[int] = []

    def step() -> bool:
        r = engine.process(next(stream))
        updater.observe(r)
        versions.append(r.outputs.model_version)
        if updater.training:
            updater.finish(timeout=0.05)
        return bool(updater.records)

    try:
        _feed(engine, sinusoid_events(6000, tasks=400), updater)
        updater.request("manual", "test")
        wait_until(step, timeout=600, what="the background meta-update's outcome", interval=0)
    finally:
        updater.close()
    [rec] = updater.records
    assert rec["outcome"] == "promoted", rec
    assert rec["version"] == 2 == engine.model_version
    # batches were served (by version 1) while the worker process trained
    assert versions.count(1) >= 1 and set(versions) <= {1}
    r = engine.process(next(stream))
    assert r.outputs.model_version == 2


# -- end to end ---------------------------------------------------------------------------------
def test_a_drift_triggers_a_promoted_update_that_lowers_the_loss(shipped_sinusoid: Any) -> None:
    """``sinusoid-amplitude-shift``: the alarm at the shift starts an update after 5,000 events of
    collection; it is promoted, and the 6,000 events after it have a lower prequential loss
    than the same events served by the unchanged model."""
    model, _ = shipped_sinusoid
    settings = load_settings(None, env={})
    events = 32_000

    def run(meta: bool) -> tuple[dict[str, Any], MetaUpdater | None]:
        from stream_meta.app import build_drift_watch, build_meta_updater

        metrics = EngineMetrics(CollectorRegistry())
        engine = build_engine(model, settings, metrics=metrics)
        watch = build_drift_watch(settings, engine, metrics, None)
        updater = build_meta_updater(settings, engine, metrics, watch, "sinusoid", worker="inline")
        source = ((e.event, None) for e in get_scenario("sinusoid-amplitude-shift").stream(seed=0))
        summary = run_stream(
            engine, itertools.islice(source, events), watch=watch, updater=updater if meta else None
        )
        summary.update(watch.summary())
        return summary, updater

    with_update, updater = run(True)
    without, _ = run(False)
    assert updater is not None
    first = updater.records[0]
    assert first["trigger"] == "drift" and 20_000 <= first["trigger_index"] <= 20_300
    assert first["outcome"] == "promoted", first["reason"]
    assert with_update["model_version"] == 2
    # the drift is followed up: another update on it is due 10,000 events after the promotion
    assert updater.status()["pending"] == "follow_up"
    swap = first["event_index"]

    def loss(summary: dict[str, Any]) -> float:
        w = [x for x in summary["loss_windows"] if swap <= x["start"] < swap + 6000]
        return sum(x["loss"] * x["labelled"] for x in w) / sum(x["labelled"] for x in w)

    assert loss(with_update) < 0.97 * loss(without)
