"""Label requests: what a label is worth, the policies, and budgets that are never exceeded."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from stream_meta.engine import Engine
from stream_meta.labels import LabelPolicy, LabelRequester, label_value
from stream_meta.metrics import EngineMetrics
from stream_meta.pipeline import Pipeline
from tests.conftest import sinusoid_events


def _batches(n_batches: int, size: int, tasks: int, seed: int = 0) -> list[tuple[Any, ...]]:
    """Batches of ``(event ids, task ids, worth)`` with a heavy-tailed worth."""
    rng = np.random.default_rng(seed)
    out, k = [], 0
    for _ in range(n_batches):
        ids = [f"e{k + i}" for i in range(size)]
        k += size
        task_ids = [f"t{int(t)}" for t in rng.integers(0, tasks, size)]
        out.append((ids, task_ids, rng.pareto(1.5, size)))
    return out


def test_a_regression_label_is_worth_the_epistemic_variance_it_removes() -> None:
    v, s2 = np.array([1.0, 0.0, 3.0]), np.array([0.5, 0.5, 0.0])
    worth = label_value("regression", variance=v + s2, noise=s2)
    # v**2 / (v + s2): a sure task (v = 0) is worth nothing; noiseless labels remove all of v
    assert worth == pytest.approx([1.0 / 1.5, 0.0, 3.0])
    # more noise, same total variance: worth less
    assert (
        label_value("regression", variance=np.array([2.0]), noise=np.array([1.5]))[0]
        < label_value("regression", variance=np.array([2.0]), noise=np.array([0.5]))[0]
    )


def test_a_classification_label_is_worth_the_predictive_entropy() -> None:
    p = np.array([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    worth = label_value("classification", probabilities=p)
    assert worth[0] == pytest.approx(math.log(2))
    assert worth[1] == pytest.approx(0.0, abs=1e-9)
    assert 0 < worth[2] < worth[0]


@pytest.mark.parametrize("policy", ["uncertainty", "random", "first-k"])
@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_the_share_budget_is_never_exceeded(policy: str, fraction: float) -> None:
    requester = LabelRequester(LabelPolicy(policy=policy, fraction=fraction, burst=5, first_k=3))
    requested = eligible = 0
    for ids, tasks, worth in _batches(60, 97, tasks=50):
        out = requester.select(ids, tasks, worth, model_version=1)
        requested += len(out)
        eligible += len(ids)
        assert requested <= fraction * eligible + 1e-9
    assert requester.counts["requested"] == requested
    if policy != "first-k":  # the stream offers enough: the budget is spent
        assert requested >= 0.8 * fraction * eligible


def test_first_k_asks_each_task_at_most_k_times() -> None:
    requester = LabelRequester(LabelPolicy(policy="first-k", fraction=1.0, burst=1e9, first_k=2))
    asked: Counter[str] = Counter()
    for ids, tasks, worth in _batches(20, 50, tasks=30):
        asked.update(r.task_id for r in requester.select(ids, tasks, worth, model_version=1))
    assert set(asked.values()) == {2}


def test_an_event_id_is_requested_once_and_random_answers_by_event_id() -> None:
    policy = LabelPolicy(policy="random", fraction=0.5, burst=1e9, seed=3)
    a, b = LabelRequester(policy), LabelRequester(policy)
    ids = [f"e{i}" for i in range(400)]
    tasks = ["t"] * 400
    first = a.select(ids, tasks, None, model_version=1)
    assert 150 < len(first) < 250
    # the same ids again (a redelivery): nothing is requested twice (an event the share
    # refused the first time may be asked now)
    second = a.select(ids, tasks, None, model_version=1)
    assert not {r.event_id for r in first} & {r.event_id for r in second}
    assert a.counts["repeated"] == len(first)
    assert len(second) == a.counts["share"]
    # another requester with the same seed picks the same events, in any batching
    again = [
        r
        for lo in range(0, 400, 37)
        for r in b.select(ids[lo : lo + 37], tasks, None, model_version=1)
    ]
    assert [r.event_id for r in again] == [r.event_id for r in first]


def test_rate_budgets_hold_on_the_clock() -> None:
    policy = LabelPolicy(
        policy="random", fraction=1.0, rate_per_s=10.0, task_rate_per_s=2.0, burst=4
    )
    requester = LabelRequester(policy)
    times: list[tuple[float, str]] = []
    for step in range(200):  # 20 s at 10 batches a second, 20 events a batch, 4 tasks
        now = step * 0.1
        ids = [f"e{step}-{i}" for i in range(20)]
        tasks = [f"t{i % 4}" for i in range(20)]
        times += [
            (now, r.task_id) for r in requester.select(ids, tasks, None, model_version=1, now=now)
        ]
    # overall: at most the burst plus 10 a second; per task: the burst plus 2 a second
    for window in (1.0, 5.0, 20.0):
        for start in np.arange(0.0, 20.0 - window + 1e-9, 0.5):
            inside = [t for t, _ in times if start <= t < start + window]
            assert len(inside) <= 4 + 10 * window + 1e-9
            for task in ("t0", "t1", "t2", "t3"):
                assert sum(1 for t, k in times if start <= t < start + window and k == task) <= (
                    4 + 2 * window + 1e-9
                )
    assert requester.counts["rate"] + requester.counts["task_rate"] > 0
    # four tasks at 2 a second bind before the overall 10 a second, and they are used
    assert len(times) >= 0.9 * 4 * 2 * 20


def test_uncertainty_requests_the_events_worth_most() -> None:
    requester = LabelRequester(LabelPolicy(policy="uncertainty", fraction=0.1, burst=5))
    picked, all_worth = [], []
    for ids, tasks, worth in _batches(100, 64, tasks=40, seed=1):
        out = requester.select(ids, tasks, worth, model_version=1)
        picked += [r.score for r in out]
        all_worth += worth.tolist()
    assert len(picked) >= 0.8 * 0.1 * len(all_worth)
    # most of what is requested is in the top fifth of what was offered
    top = np.quantile(all_worth, 0.8)
    assert np.mean(np.array(picked) >= top) > 0.8


def test_bad_policies_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="unknown label policy"):
        LabelPolicy(policy="oracle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction"):
        LabelPolicy(fraction=0.0)
    with pytest.raises(ValueError, match="burst"):
        LabelPolicy(burst=0.5)
    with pytest.raises(ValueError, match="rate_per_s"):
        LabelPolicy(rate_per_s=-1.0)
    with pytest.raises(ValueError, match="uncertainty"):
        LabelRequester().select(["e"], ["t"], None, model_version=1)


def test_the_engine_scores_new_tasks_above_known_ones(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    engine = Engine(model)
    engine.label_scores = True
    known = [
        {"event_id": f"k{i}", "task_id": "known", "x": [x], "y": 2.0 * math.sin(x)}
        for i, x in enumerate(np.linspace(-4.5, 4.5, 15).tolist())
    ]
    engine.process(known)
    out = engine.process(
        [
            {"event_id": "q1", "task_id": "known", "x": [0.3]},
            {"event_id": "q2", "task_id": "new", "x": [0.3]},
        ]
    ).outputs
    assert out is not None and out.label_scores is not None and out.stds is not None
    worth = out.label_scores
    assert worth[1] > 100 * worth[0] > 0
    # the worth is part of the variance: never more than the predictive variance
    assert np.all(worth <= np.array(out.stds) ** 2 + 1e-9)


def test_the_engine_scores_a_classifier_by_entropy(make_model: Any) -> None:
    model = make_model(x_dim=4, kind="classification", n_classes=3)
    engine = Engine(model)
    engine.label_scores = True
    out = engine.process([{"event_id": "a", "task_id": "t", "x": [0.1, 0.2, 0.3, 0.4]}]).outputs
    assert out is not None and out.label_scores is not None and out.probabilities is not None
    assert out.label_scores[0] == pytest.approx(
        label_value("classification", probabilities=np.array([out.probabilities[0]]))[0], rel=1e-4
    )


def test_the_pipeline_requests_unlabelled_events_only_and_counts_them(
    shipped_sinusoid: Any,
) -> None:
    model, _ = shipped_sinusoid
    metrics = EngineMetrics(CollectorRegistry())
    engine = Engine(model, metrics=metrics)
    requester = LabelRequester(LabelPolicy(policy="random", fraction=1.0, burst=1e9), metrics)
    pipeline = Pipeline(engine, labels=requester)
    events = sinusoid_events(600, tasks=30, seed=2, labelled=0.6)
    unlabelled = {e["event_id"] for e in events if e.get("y") is None}
    asked = []
    for lo in range(0, len(events), 128):
        asked += [r.event_id for r in pipeline.step(events[lo : lo + 128]).label_requests]
    # a replay of the same events: labelled ones are duplicates, unlabelled ones asked already
    asked += [r.event_id for r in pipeline.step(events[:200]).label_requests]
    assert sorted(asked) == sorted(unlabelled)
    value = metrics.registry.get_sample_value(
        "stream_meta_label_requests_total", {"policy": "random"}
    )
    assert value == len(unlabelled)
    assert pipeline.summary()["label_requests"]["requested"] == len(unlabelled)


def test_answers_to_requests_are_counted(shipped_sinusoid: Any) -> None:
    model, _ = shipped_sinusoid
    metrics = EngineMetrics(CollectorRegistry())
    requester = LabelRequester(LabelPolicy(policy="random", fraction=1.0, burst=1e9), metrics)
    pipeline = Pipeline(Engine(model, metrics=metrics), labels=requester)
    queries = [{"event_id": f"q{i}", "task_id": "t", "x": [0.1 * i]} for i in range(10)]
    asked = pipeline.step(queries).label_requests
    assert len(asked) == 10
    # the labels of four of them come back (and one labelled event nobody asked for)
    answers = [{**q, "y": 0.5} for q in queries[:4]] + [
        {"event_id": "other", "task_id": "t", "x": [0.0], "y": 0.1}
    ]
    assert pipeline.step(answers).label_requests == []
    assert requester.counts["answered"] == 4
    assert metrics.registry.get_sample_value("stream_meta_label_answers_total") == 4
