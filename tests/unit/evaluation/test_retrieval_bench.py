"""The retrieval comparison of issue 15 (``stream_meta.evaluation.retrieval``), at small sizes.

Nothing here judges the ``retrieval`` strategy itself: only the harness, its references and its
arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest

from stream_meta.engine import EngineConfig
from stream_meta.evaluation.retrieval import (
    STRATEGIES,
    Mixture,
    calibrate_mixture,
    compare,
    fractions,
    speed,
)
from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint
from stream_meta.tasks import (
    LinearFamily,
    QuadraticFamily,
    RelatedTaskStream,
    SinusoidFamily,
    TaskFamily,
)

# A sparse history (100 tasks): with 1,000 stored sinusoids the exact mixture also beats the
# shipped model at 2 shots on the control stream (the stored tasks then cover the prior densely,
# and the model is not Bayes-optimal at 2 shots), so "no gain without relations" holds for a
# sparse history only.
SMALL = {
    "clusters": 5,
    "history_tasks": 100,
    "history_examples": 10,
    "probe_tasks": 40,
    "shots": (0, 1, 2),
    "queries": 5,
}


@pytest.fixture(scope="module")
def model():
    m, _ = load_checkpoint(shipped_checkpoint("sinusoid"))
    return m


def _compare(model, related: bool, seed: int) -> dict:
    stream = RelatedTaskStream(SinusoidFamily(), related=related, seed=seed, **SMALL)  # type: ignore[arg-type]
    strategies = {k: STRATEGIES[k] for k in ("no-retrieval", "attention")}
    return compare(model, stream, strategies=strategies)


@pytest.mark.parametrize("seed", [0, 1])
def test_mixture_beats_no_retrieval_at_two_shots_when_related_and_not_in_the_control(
    model, seed: int
) -> None:
    related, control = _compare(model, True, seed), _compare(model, False, seed)
    for report in (related, control):
        assert report["shots"] == [0, 1, 2]
        assert set(report["loss"]) == {
            "no-retrieval",
            "attention",
            "oracle-neighbour",
            "bayes-mixture",
        }
        assert all(len(v) == 3 for v in report["loss"].values())
        assert len(report["mixture"]["variance"]) == 3
    two = 2  # the slot of 2 shots
    r, c = related["loss"], control["loss"]
    assert r["bayes-mixture"][two] < 0.5 * r["no-retrieval"][two]
    assert c["bayes-mixture"][two] > 0.9 * c["no-retrieval"][two]
    # a same-cluster neighbour is a good guess only when clusters mean something
    assert max(r["oracle-neighbour"]) < r["no-retrieval"][1]
    assert min(c["oracle-neighbour"]) > c["no-retrieval"][1]
    assert related["attainable"][two] > 0.5 * r["no-retrieval"][two]


def test_report_is_deterministic_when_run_twice(model) -> None:
    a, b = _compare(model, True, 3), _compare(model, True, 3)
    assert a["loss"] == b["loss"] and a["mixture"] == b["mixture"]


def test_fractions_are_the_share_of_the_best_reference_gain_when_hand_made() -> None:
    losses = {
        "no-retrieval": [3.0, 1.0, 0.5],
        "oracle-neighbour": [1.0, 0.5, 0.6],
        "bayes-mixture": [2.0, 0.2, 0.5],
        "attention": [3.0, 0.6, 0.55],
        "retrieval": [2.0, 0.2, 0.4],
    }
    out = fractions(losses)
    assert out["attainable"] == pytest.approx([2.0, 0.8, 0.0])
    assert out["fraction"]["retrieval"][:2] == pytest.approx([0.5, 1.0])
    assert out["fraction"]["attention"][:2] == pytest.approx([0.0, 0.5])
    # nothing attainable (the references are no better than no retrieval): undefined
    assert out["fraction"]["retrieval"][2] is None
    # a gain within 1% of the no-retrieval loss is noise: no fraction either
    tiny = fractions({"no-retrieval": [1.0], "bayes-mixture": [0.995], "retrieval": [0.9]})
    assert tiny["attainable"] == pytest.approx([0.005])
    assert tiny["fraction"]["retrieval"] == [None]


def test_mixture_weights_follow_the_likelihood_when_one_component_fits() -> None:
    # two history functions (constant 0 and constant 1), one probe, one support point y = 1
    h_sup = np.array([[[0.0]], [[1.0]]])  # [H=2, P=1, S=1]
    h_query = np.array([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])  # [H, P, slots=1, Q=2]
    null_sup, null_query = np.array([[0.5]]), np.array([[[0.5, 0.5]]])
    mix = Mixture(h_sup, h_query, null_sup, null_query, np.array([[1.0]]), shots=(1,))
    sharp = mix.predict([1e-4], [0.5])
    assert sharp == pytest.approx(np.ones((1, 1, 2)), abs=1e-6)
    # no evidence yet (0 shots): the prior, half null, half spread over the history
    mix0 = Mixture(h_sup, h_query, null_sup, null_query, np.array([[1.0]]), shots=(0,))
    assert mix0.predict([1.0], [0.5]) == pytest.approx(np.full((1, 1, 2), 0.5))
    truth = np.ones((1, 1, 2))
    variance, prior = calibrate_mixture(mix, truth, y_var=1.0)
    assert mix.predict(variance, prior) == pytest.approx(truth, abs=1e-3)


@pytest.mark.parametrize(
    ("family", "shots"),
    [(SinusoidFamily(), (0,)), (QuadraticFamily(), (3,)), (LinearFamily(), (1, 4))],
    ids=["sinusoid-0", "quadratic-3", "linear-1-4"],
)
def test_compare_runs_when_family_and_shot_counts_vary(
    model, family: TaskFamily, shots: tuple[int, ...]
) -> None:
    stream = RelatedTaskStream(
        family,
        clusters=3,
        history_tasks=30,
        history_examples=5,
        probe_tasks=7,
        shots=shots,
        queries=3,
        seed=5,
    )
    report = compare(model, stream, strategies={"no-retrieval": STRATEGIES["no-retrieval"]})
    assert report["shots"] == list(shots)
    assert all(len(v) == len(shots) and np.isfinite(v).all() for v in report["loss"].values())
    assert report["stream"]["family"] == repr(family)


def test_compare_refuses_strategies_without_the_base_when_asked(model) -> None:
    stream = RelatedTaskStream(SinusoidFamily(), **SMALL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no-retrieval"):
        compare(model, stream, strategies={"attention": EngineConfig(retrieval=False)})


def test_speed_reports_every_configuration_when_tasks_are_live(model) -> None:
    configs = {"off": EngineConfig(retrieval=False), "default": EngineConfig()}
    out = speed(
        model, SinusoidFamily(), configs, live_tasks=300, timed_events=1024, latency_samples=15
    )
    assert min(out["live_tasks"].values()) >= 300
    for name in configs:
        assert out[name]["events_per_s"] > 0
        assert 0 < out[name]["adapt_latency_ms_p50"] <= out[name]["adapt_latency_ms_p99"]
    assert out["timed_events"] >= 1024
