"""The stream of related tasks and its control (``stream_meta.tasks.related``)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from stream_meta.tasks import DigitsFamily, RelatedTaskStream, SinusoidFamily
from stream_meta.tasks.functions import QuadraticFamily

SMALL = {
    "clusters": 4,
    "history_tasks": 40,
    "history_examples": 5,
    "probe_tasks": 12,
    "shots": (0, 1, 3),
    "queries": 4,
}


def make(related: bool = True, seed: int = 0, family: object = None, **kw: object):
    args = {**SMALL, **kw}
    return RelatedTaskStream(family or SinusoidFamily(), related=related, seed=seed, **args)  # type: ignore[arg-type]


def test_events_are_identical_when_arguments_are_equal() -> None:
    a, b = make(seed=3).events(), make(seed=3).events()
    assert a == b
    assert [e.event for e in a] != [e.event for e in make(seed=4).events()]
    assert make(seed=3).centres.tolist() == make(seed=3).centres.tolist()


def test_shapes_and_counts_follow_the_arguments() -> None:
    s = make()
    events = s.events()
    history = [e for e in events if e.phase == "history"]
    probes = [e for e in events if e.phase == "probe"]
    assert len(history) == 40 * 5
    # 3 support examples and 3 x 4 queries per probe task
    assert len(probes) == 12 * (3 + 3 * 4)
    assert all(e.phase == "history" for e in events[: len(history)])  # history comes first
    assert s.history.x.shape == (40, 5, 1) and s.history.y.shape == (40, 5)
    assert s.probes.x.shape == (12, 3, 1)
    assert s.probe_query_x.shape == (12, 3, 4, 1) and s.probe_query_y.shape == (12, 3, 4)
    assert [e.event["event_id"] for e in events] == [f"e{i}" for i in range(len(events))]
    ts = [e.event["ts"] for e in events]
    assert ts == sorted(ts)
    assert Counter(e.event["task_id"] for e in history) == {s.history_id(t): 5 for t in range(40)}


def test_probe_queries_come_after_exactly_n_support_examples_when_streamed() -> None:
    s = make()
    have: Counter[str] = Counter()
    for e in s.events():
        tid = e.event["task_id"]
        assert e.shots == have[tid]
        if e.query:
            assert e.phase == "probe" and s.shots[e.shot_slot] == have[tid]
            assert e.truth == pytest.approx(
                float(s.probe_query_y[e.task, e.shot_slot, e.query_slot])
            )
        else:
            have[tid] += 1
    pos = s.query_positions()
    assert (pos >= 0).all() and len(np.unique(pos)) == pos.size


def test_labels_are_the_family_function_when_noiseless() -> None:
    s = make()
    fam = SinusoidFamily()
    assert np.allclose(s.history.y, fam.evaluate(s.history.params, s.history.x), atol=1e-5)
    q = s.probe_query_x.reshape(12, -1, 1)
    assert np.allclose(s.probe_query_y.reshape(12, -1), fam.evaluate(s.probes.params, q), atol=1e-5)


def _same_cluster_distance(s: RelatedTaskStream) -> float:
    """Mean distance between each probe's params and its cluster's history tasks' params."""
    h, p = s.history, s.probes
    d = []
    for i in range(p.params.shape[0]):
        same = h.params[h.clusters == p.clusters[i]]
        if len(same):
            d.append(np.abs(same - p.params[i]).mean())
    return float(np.mean(d))


@pytest.mark.parametrize("seed", [0, 1])
def test_same_cluster_tasks_are_close_when_related_and_not_in_the_control(seed: int) -> None:
    related, control = make(True, seed), make(False, seed)
    assert _same_cluster_distance(related) < 0.2 * _same_cluster_distance(control)
    # the control keeps the shapes and the order of events
    assert [e.event["task_id"] for e in related.events()] == [
        e.event["task_id"] for e in control.events()
    ]


def test_jitter_zero_repeats_the_centres_when_related() -> None:
    s = make(jitter=0.0)
    assert np.array_equal(s.history.params, s.centres[s.history.clusters])
    assert np.array_equal(s.probes.params, s.centres[s.probes.clusters])


def test_other_families_work_when_they_follow_the_contract() -> None:
    quad = make(family=QuadraticFamily())
    assert quad.history.params.shape == (40, 3)
    digits = make(family=DigitsFamily("test", n_way=3), history_examples=2, probe_tasks=2)
    labels = [e.event["y"] for e in digits.events() if not e.query]
    assert all(isinstance(y, int) and 0 <= y < 3 for y in labels)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"shots": (2, 1)}, "shots"),
        ({"shots": ()}, "shots"),
        ({"clusters": 0}, "clusters"),
        ({"jitter": -0.1}, "jitter"),
        ({"queries": 0}, "queries"),
    ],
)
def test_bad_arguments_are_refused_when_built(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**kw)
