"""Experts (stream_meta.experts): routing by prequential evidence, the mixture, a served set in
the engine, its checkpoint and state, the routed validation and the expert gate."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import norm

from stream_meta.continual.replay_buffer import ReplaySnapshot
from stream_meta.continual.update_job import (
    UpdateConfig,
    decide_experts,
    expert_passes,
    routed_validation,
    validate,
)
from stream_meta.engine import Engine, EngineConfig
from stream_meta.experts import Router, log_density, members, mix, same_encoder, with_experts
from stream_meta.model import MetaModel
from stream_meta.model_checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stream_meta.state import TaskState
from stream_meta.tasks.scenarios import get_scenario


@pytest.fixture(scope="module")
def shipped() -> MetaModel:
    from stream_meta.model_checkpoint import shipped_checkpoint

    model, _ = load_checkpoint(shipped_checkpoint("sinusoid"))
    return model.eval()


def _spoiled(model: MetaModel, scale: float = 0.6, seed: int = 0) -> MetaModel:
    """A worse expert: ``model`` with noise on its hypernetwork (the encoder kept)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.startswith("hyper.") and p.numel() > 1:
                p += scale * p.std() * torch.randn(p.shape, generator=gen)
    return out.eval()


def _events(n: int, scenario: str = "sinusoid-new-family", seed: int = 0) -> list[dict[str, Any]]:
    return [e.event for e in get_scenario(scenario).stream(seed=seed).iter_events(n)]


def _states(ids: list[str]) -> dict[str, TaskState]:
    return {t: TaskState(t, i, 4) for i, t in enumerate(sorted(set(ids)))}


# -- routing ----------------------------------------------------------------------------------
def test_routing_is_the_posterior_of_the_prequential_evidence_and_ignores_batching() -> None:
    rng = np.random.default_rng(0)
    tasks = [f"t{i}" for i in rng.integers(0, 5, 300)]
    dens = rng.normal(size=(300, 3))
    labelled = rng.random(300) < 0.7
    whole, parts = Router([1, 2, 3]), Router([1, 2, 3])
    sa, sb = _states(tasks), _states(tasks)
    w_whole = whole.route([sa[t] for t in tasks], dens, labelled)
    w_parts = np.concatenate(
        [
            parts.route(
                [sb[t] for t in tasks[lo : lo + 37]], dens[lo : lo + 37], labelled[lo : lo + 37]
            )
            for lo in range(0, 300, 37)
        ]
    )
    np.testing.assert_allclose(w_whole, w_parts, atol=1e-12)
    np.testing.assert_allclose(whole.share, parts.share, atol=1e-12)
    # event i of task t: the prior times the densities of t's labelled events before i
    i = max(j for j, t in enumerate(tasks) if t == "t0")
    before = [j for j in range(i) if tasks[j] == "t0" and labelled[j]]
    check = Router([1, 2, 3])
    prior = np.empty((300, 3))
    st = _states(tasks)
    for j, t in enumerate(tasks):  # replay the prior the router used at each event
        prior[j] = check.log_prior()
        check.route([st[t]], dens[j : j + 1], labelled[j : j + 1])
    logits = prior[i] + dens[before].sum(axis=0)
    expected = np.exp(logits - logits.max())
    np.testing.assert_allclose(w_whole[i], expected / expected.sum(), rtol=1e-9)


def test_a_joining_expert_starts_level_with_each_tasks_best_one() -> None:
    router = Router([1, 2])
    a, b = TaskState("a", 0, 4), TaskState("b", 1, 4)
    router.route([a, b], np.array([[0.0, -3.0], [-1.0, 0.5]]), np.array([True, True]))
    ev_a, ev_b = a.evidence.copy(), b.evidence.copy()
    router.remap([2, 7], [a, b])
    assert router.ids == (2, 7)
    np.testing.assert_allclose(a.evidence, [ev_a[1], ev_a.max()])
    np.testing.assert_allclose(b.evidence, [ev_b[1], ev_b.max()])
    assert router.share.sum() == pytest.approx(1.0)
    router.remap([2], [a, b])  # one expert left: no routing state
    assert a.evidence is None and b.evidence is None


def test_log_density_and_the_mixture_are_the_textbook_ones() -> None:
    rng = np.random.default_rng(1)
    mean, std, y = rng.normal(size=50), rng.uniform(0.1, 2, 50), rng.normal(size=50)
    got = log_density("regression", torch.tensor(mean), torch.tensor(std), y)
    np.testing.assert_allclose(got, norm.logpdf(y, mean, std), rtol=1e-6)
    logits = torch.tensor(rng.normal(size=(50, 4)))
    labels = rng.integers(0, 4, 50)
    expected = torch.log_softmax(logits, -1).numpy()[np.arange(50), labels]
    np.testing.assert_allclose(log_density("classification", logits, None, labels), expected)
    # regression: mean and variance of the mixture (law of total variance)
    m1, m2 = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0])
    s1, s2 = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5])
    w = np.array([[0.5, 0.5], [0.2, 0.8]])
    m, s = mix("regression", [m1, m2], [s1, s2], w)
    np.testing.assert_allclose(m.numpy(), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(s.numpy() ** 2, [2.0, 0.25], atol=1e-6)
    # classification: the mixture of the class probabilities
    l1, l2 = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    out, none = mix("classification", [l1, l2], [None, None], np.array([[0.25, 0.75]]))
    p1, p2 = torch.softmax(l1, -1), torch.softmax(l2, -1)
    np.testing.assert_allclose(
        torch.softmax(out, -1).numpy(), (0.25 * p1 + 0.75 * p2).numpy(), rtol=1e-5
    )
    assert none is None


# -- a served set -----------------------------------------------------------------------------
def test_a_set_refuses_experts_with_another_encoder(shipped: MetaModel) -> None:
    other = copy.deepcopy(shipped)
    with torch.no_grad():
        next(other.encoder.parameters()).add_(0.1)
    assert not same_encoder(other, shipped)
    with pytest.raises(ValueError, match="encoder"):
        with_experts(shipped, 1, [(2, other)])
    with pytest.raises(ValueError, match="distinct"):
        with_experts(shipped, 1, [(1, _spoiled(shipped))])
    served = with_experts(shipped, 1, [(2, _spoiled(shipped))])
    assert [i for i, _ in members(served, 9)] == [1, 2]
    assert [i for i, _ in members(shipped, 9)] == [9]  # the original is unchanged
    assert served.state_dict().keys() == shipped.state_dict().keys()


def _run(model: MetaModel, events: list[dict[str, Any]], batch: int = 256) -> tuple[Engine, list]:
    engine = Engine(model, EngineConfig(seed=0))
    outs = [engine.process(events[lo : lo + batch]).outputs for lo in range(0, len(events), batch)]
    return engine, outs


def _loss(outs: list) -> float:
    return float(np.nanmean(np.concatenate([np.asarray(o.losses) for o in outs])))


def test_routing_serves_each_task_by_the_expert_that_explains_it(shipped: MetaModel) -> None:
    """A set of the shipped model and a spoiled copy: tasks are routed to the good one, so the
    set serves nearly as well as the good model alone and far better than the spoiled one."""
    events = _events(3000, "sinusoid-amplitude-shift")
    bad = _spoiled(shipped)
    _, good_outs = _run(shipped, events)
    _, bad_outs = _run(bad, events)
    engine, outs = _run(with_experts(shipped, 1, [(2, bad)]), events)
    good, worse, routed = _loss(good_outs), _loss(bad_outs), _loss(outs)
    assert worse > 1.5 * good
    assert routed < good * 1.10, (routed, good, worse)
    tops = np.concatenate([np.asarray(o.experts) for o in outs])
    assert (tops[-1000:] == 1).mean() > 0.9
    assert engine.router.shares()[1] > 0.8
    assert engine.metrics.experts._value.get() == 2
    record = outs[-1].record(0)
    assert record.expert in (1, 2) and record.std is not None and record.std > 0


def test_the_routing_state_survives_a_state_checkpoint(shipped: MetaModel) -> None:
    events = _events(2000)
    served = with_experts(shipped, 1, [(2, _spoiled(shipped))])
    engine, _ = _run(served, events)
    arrays = engine.state_arrays()
    assert "experts.evidence" in arrays
    fresh = Engine(served, EngineConfig(seed=0))
    fresh.restore_state(arrays)
    for s in engine.store:
        other = fresh.store.get(s.task_id)
        assert other is not None
        if s.evidence is None:
            assert other.evidence is None
        else:
            np.testing.assert_allclose(other.evidence, s.evidence)
    np.testing.assert_allclose(fresh.router.share, engine.router.share)
    # restored into a single model: the routing state is dropped, the tasks are kept
    single = Engine(shipped, EngineConfig(seed=0))
    single.restore_state(arrays)
    assert len(single.store) == len(engine.store)
    assert all(s.evidence is None for s in single.store)


def test_swapping_in_a_set_with_the_same_encoder_keeps_the_embeddings(shipped: MetaModel) -> None:
    events = _events(1500)
    engine, _ = _run(shipped, events)
    before = {s.task_id: s.embedding.copy() for s in engine.store if s.embedding is not None}
    engine.swap_model(with_experts(shipped, 1, [(2, _spoiled(shipped))]), 2)
    assert engine.expert_ids == [1, 2]
    for task_id, z in before.items():
        np.testing.assert_array_equal(engine.store.get(task_id).embedding, z)
    engine.process(events[:300])  # serves with both
    engine.swap_model(shipped, 3)  # back to one model
    assert engine.expert_ids == [3]
    assert engine.process(events[300:600]).outputs.experts is None


def test_a_set_is_one_checkpoint(shipped: MetaModel, tmp_path: Path) -> None:
    bad = _spoiled(shipped)
    served = with_experts(shipped, 4, [(7, bad)])
    path = tmp_path / "set.safetensors"
    manifest = save_checkpoint(path, served, family="sinusoid", model_version=7)
    assert manifest["expert_id"] == 4 and manifest["experts"] == [7]
    loaded, _ = load_checkpoint(path)
    assert [i for i, _ in members(loaded, 7)] == [4, 7]
    x = torch.linspace(-5, 5, 11).reshape(1, 11, 1)
    for (_, a), (_, b) in zip(members(loaded, 7), members(served, 7), strict=True):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(v, b.state_dict()[k])
    w = torch.zeros(1, shipped.target.n_params)
    torch.testing.assert_close(members(loaded, 7)[1][1].predict(x, w), bad.predict(x, w))
    # a single model saves and loads as before
    save_checkpoint(tmp_path / "one.safetensors", shipped, family="sinusoid", model_version=3)
    one, m1 = load_checkpoint(tmp_path / "one.safetensors")
    assert m1["experts"] == [] and members(one, 3) == [(3, one)]


def test_a_checkpoint_with_unlisted_expert_tensors_is_refused(
    shipped: MetaModel, tmp_path: Path
) -> None:
    from stream_meta.model_checkpoint import read_manifest, write_tensors

    path = tmp_path / "set.safetensors"
    save_checkpoint(path, with_experts(shipped, 1, [(2, _spoiled(shipped))]), family="s")
    manifest = read_manifest(path)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    write_tensors(path, tensors, {**manifest, "experts": []})
    with pytest.raises(CheckpointError, match="does not list"):
        load_checkpoint(path)
    other = copy.deepcopy(shipped)
    with torch.no_grad():
        next(other.encoder.parameters()).add_(0.1)
    bad = dict(tensors)
    bad.update({f"experts.2.{k}": v for k, v in other.state_dict().items()})
    write_tensors(path, bad, manifest)
    with pytest.raises(CheckpointError, match="encoder"):
        load_checkpoint(path)


# -- the routed validation and the gate -------------------------------------------------------
def _snapshot(n_tasks: int = 40, m: int = 24, seed: int = 0) -> ReplaySnapshot:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, 5, (n_tasks, m, 1)).astype(np.float32)
    amp, phase = rng.uniform(0.5, 5, n_tasks), rng.uniform(0, np.pi, n_tasks)
    y = (amp[:, None] * np.sin(x[:, :, 0] - phase[:, None])).astype(np.float32)
    n = rng.integers(6, m + 1, n_tasks)
    return ReplaySnapshot(
        [f"t{i}" for i in range(n_tasks)], x, y, n, np.arange(n_tasks), np.zeros(n_tasks, bool)
    )


def test_routed_validation_of_one_expert_is_its_validation(shipped: MetaModel) -> None:
    snap = _snapshot()
    rows, bank = np.arange(20), np.arange(20, 40)
    config = UpdateConfig(val_shots=(1, 3, 5), val_repeats=2)
    direct = validate(shipped, snap, rows, bank, config)
    passes = expert_passes(shipped, snap, rows, bank, config)
    routed = routed_validation("regression", [passes], config)
    for s, v in direct["by_shots"].items():
        assert routed["by_shots"][s] == pytest.approx(v, rel=1e-4)
    assert routed["episodes"] == direct["episodes"]
    # a set with a spoiled expert is routed to the good one: close to the good one alone
    worse = expert_passes(_spoiled(shipped), snap, rows, bank, config)
    bad_alone = routed_validation("regression", [worse], config)["loss"]
    both = routed_validation("regression", [passes, worse], config)["loss"]
    assert bad_alone > 1.5 * direct["loss"]
    assert both < direct["loss"] + 0.25 * (bad_alone - direct["loss"])


def _v(new: float, old: float, n: int = 20) -> dict:
    def g(loss: float) -> dict:
        return {"loss": loss, "tasks": n, "episodes": 3 * n, "by_shots": {"1": loss}}

    return {"new": g(new), "old": g(old)}


@pytest.mark.parametrize(
    ("replace", "add", "can_add", "outcome", "action"),
    [
        ((1.0, 1.0), (0.9, 1.0), True, "promoted", "add"),  # adding helps more
        ((0.9, 1.01), (0.895, 1.0), True, "promoted", "replace"),  # as good: one fewer
        ((0.9, 1.5), (0.9, 1.01), True, "promoted", "add"),  # replacing forgets
        ((0.9, 1.5), (0.9, 1.01), False, "rejected", None),  # no room to add
        ((0.99, 1.0), (0.99, 1.0), True, "rejected", None),  # not 2% better
        ((0.5, 1.03), (0.5, 1.03), True, "rejected", None),  # old tasks +3%
    ],
)
def test_the_expert_gate(
    replace: tuple, add: tuple, can_add: bool, outcome: str, action: str | None
) -> None:
    validation = {"served": _v(1.0, 1.0), "replace": _v(*replace), "add": _v(*add)}
    got, reason, act = decide_experts(validation, UpdateConfig(), can_add)
    assert (got, act) == (outcome, action), reason


# -- the updater keeps experts ----------------------------------------------------------------
def _feed(engine: Engine, updater: Any, events: list[dict[str, Any]], batch: int = 512) -> None:
    for lo in range(0, len(events), batch):
        updater.observe(engine.process(events[lo : lo + batch]))


def test_an_expert_candidate_is_added_beside_the_served_model_saved_and_rolled_back(
    shipped: MetaModel, tmp_path: Path
) -> None:
    """The whole path of an expert: a manual update after a shift to a new family (promote =
    always, so a short training is kept whatever the gate says) adds the candidate as expert
    ``2`` beside the primary; the set is served (both experts predict, the outputs name the
    top one), saved as one checkpoint, counted; a rollback serves the single model again."""
    from prometheus_client import CollectorRegistry

    from stream_meta.continual.updater import MetaUpdateConfig, MetaUpdater
    from stream_meta.metrics import EngineMetrics

    engine = Engine(shipped, EngineConfig(seed=0), metrics=EngineMetrics(CollectorRegistry()))
    config = MetaUpdateConfig(
        on_drift=False,
        cooldown_events=0,
        collect_events=0,
        promote="always",
        probation_events=0,
        max_experts=2,
        update=UpdateConfig(steps=20, val_repeats=1, val_shots=(1, 5)),
    )
    updater = MetaUpdater(engine, config, metrics=engine.metrics, models_dir=tmp_path)
    events = _events(26_000)
    _feed(engine, updater, events[:24_000])
    updater.request("manual", "test")
    _feed(engine, updater, events[24_000:25_000])
    rec = updater.records[-1]
    assert rec["outcome"] == "promoted", rec["reason"]
    assert rec["experts"]["action"] == "add", rec["experts"]
    assert rec["experts"]["members"] == [1, 2] and engine.expert_ids == [1, 2]
    assert {"served", "replace", "add", "candidate"} <= set(rec["validation"])
    assert engine.metrics.expert_changes.labels("added")._value.get() == 1
    saved, manifest = load_checkpoint(tmp_path / "model-v2.safetensors")
    assert manifest["experts"] == [2] and manifest["expert_id"] == 1
    assert same_encoder(members(saved, 2)[1][1], shipped)
    out = engine.process(events[25_000:25_500]).outputs
    assert set(out.experts) <= {1, 2} and out.model_version == 2
    # at capacity (2): the next candidate replaces its parent (the most used expert), or is
    # added in place of the other one (never the primary)
    payload = updater._experts_payload()
    assert len(payload["experts"]) == 2
    assert payload["retire"] == (1 if payload["parent"] == 0 else None)
    # a rollback swaps the single model back in
    engine.swap_model(shipped, 1)
    assert engine.expert_ids == [1]
    assert engine.process(events[25_500:]).outputs.experts is None
    # a candidate judged against a set that has changed since (here: [1, 2], now [1]) is not
    # applied: its validation no longer describes what it would join
    from stream_meta.continual.update_job import model_arrays
    from stream_meta.continual.updater import _Request

    late = {"outcome": "promoted", "reason": "", "action": "add", "parent": 0}
    late.update(weights=model_arrays(shipped), expert_ids=[1, 2])
    updater._job = (_Request("manual", updater.seen), late, updater.seen)
    updater._maybe_finish(updater.seen, [], block=True)
    rec = updater.records[-1]
    assert rec["outcome"] == "rejected" and "changed while the candidate trained" in rec["reason"]
    assert engine.expert_ids == [1] and engine.model_version == 1


@pytest.mark.parametrize("kind", ["sinusoid", "digits"])
def test_an_engine_serving_a_set_passes_the_engine_contract(kind: str, shipped: MetaModel) -> None:
    """Output order, rejections, batch-size invariance, duplicates: for a regression set and
    a classifier set. Without neighbours and bank (whose reads depend on batching by design,
    and through the predictions so would the evidence) every prediction must be the same
    whatever the batch size: the routing is walked in stream order."""
    from stream_meta import checks
    from stream_meta.model_checkpoint import shipped_checkpoint

    base = shipped if kind == "sinusoid" else load_checkpoint(shipped_checkpoint("digits"))[0]
    served = with_experts(base, 1, [(2, _spoiled(base, 0.3))])
    config = EngineConfig(seed=0, k_neighbours=0, retrieval=False)
    checks.check_engine(lambda: Engine(served, config), retrieval="none")


def test_an_expert_ruled_out_by_a_tasks_evidence_is_skipped_for_it(shipped: MetaModel) -> None:
    """Skipping an expert far behind in a task's evidence (``expert_prune_nats``) saves its
    adaptations and predictions and changes no prediction beyond its negligible weight."""
    events = _events(3000, "sinusoid-amplitude-shift")
    served = with_experts(shipped, 1, [(2, _spoiled(shipped))])
    runs = {}
    for prune in (12.0, math.inf):
        engine = Engine(served, EngineConfig(seed=0, expert_prune_nats=prune))
        outs = [engine.process(events[lo : lo + 256]).outputs for lo in range(0, 3000, 256)]
        runs[prune] = (engine, np.concatenate([np.asarray(o.values) for o in outs]))
    skipped = runs[12.0][0].metrics.experts_skipped._value.get()
    assert skipped > 500
    assert runs[math.inf][0].metrics.experts_skipped._value.get() == 0
    np.testing.assert_allclose(runs[12.0][1], runs[math.inf][1], rtol=1e-3, atol=1e-3)
