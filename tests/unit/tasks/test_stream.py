"""The synthetic interleaved task stream."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stream_meta.tasks import DigitsFamily, SinusoidFamily, StreamEvent, TaskStream


def make_stream(family: str = "sinusoid", **kwargs: object) -> TaskStream:
    fam = SinusoidFamily() if family == "sinusoid" else DigitsFamily("train")
    return TaskStream(fam, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sinusoid_events() -> list[StreamEvent]:
    return list(make_stream(tasks=300, clusters=20, seed=7).iter_events(20_000))


def test_events_are_identical_when_seed_is_equal() -> None:
    a = list(make_stream(seed=3).iter_events(5000))
    b = list(make_stream(seed=3).iter_events(5000))
    assert a == b
    c = list(make_stream(seed=4).iter_events(5000))
    assert [e.event for e in a] != [e.event for e in c]


def test_shorter_run_is_a_prefix_when_n_differs() -> None:
    stream = make_stream(seed=1)
    long = list(stream.iter_events(5000))  # crosses a chunk boundary
    assert list(stream.iter_events(4100)) == long[:4100]
    assert list(stream.iter_events(3)) == long[:3]
    assert list(stream.iter_events(0)) == []


def test_iteration_is_endless_when_no_count_is_given() -> None:
    stream = make_stream(seed=1)
    it = iter(stream)
    events = [next(it) for _ in range(9000)]
    assert events[-1].event["event_id"] == "e8999"
    assert events == list(stream.iter_events(9000))


def test_event_ids_are_unique_and_ts_increases_when_streaming(
    sinusoid_events: list[StreamEvent],
) -> None:
    ids = [e.event["event_id"] for e in sinusoid_events]
    assert len(set(ids)) == len(ids)
    ts = np.array([e.event["ts"] for e in sinusoid_events])
    assert (np.diff(ts) > 0).all() and ts[0] > 0


def test_labelled_fraction_is_close_to_the_setting_when_streaming(
    sinusoid_events: list[StreamEvent],
) -> None:
    labelled = np.mean([e.labelled for e in sinusoid_events])
    assert abs(labelled - 0.7) < 0.02
    few = list(make_stream(labelled_fraction=0.2, seed=2).iter_events(20_000))
    assert abs(np.mean([e.labelled for e in few]) - 0.2) < 0.02


def test_popular_tasks_dominate_when_popularity_is_zipf(
    sinusoid_events: list[StreamEvent],
) -> None:
    counts = np.array(sorted(Counter(e.task_index for e in sinusoid_events).values()))
    assert counts[-1] > 20 * np.median(counts)
    flat = list(make_stream(tasks=300, zipf_s=0.0, seed=7).iter_events(20_000))
    flat_counts = np.array(list(Counter(e.task_index for e in flat).values()))
    assert flat_counts.max() < counts[-1] / 4


def test_distinct_tasks_are_bounded_when_tasks_is_small() -> None:
    events = list(make_stream(tasks=40, seed=0).iter_events(20_000))
    seen = {e.event["task_id"] for e in events}
    assert len(seen) == 40
    assert seen == {TaskStream.task_id(i) for i in range(40)}


def test_tasks_arrive_over_time_when_new_task_rate_is_set() -> None:
    events = list(make_stream(tasks=10_000, new_task_rate=0.05, seed=0).iter_events(20_000))
    first_seen: dict[int, int] = {}
    for i, e in enumerate(events):
        first_seen.setdefault(e.task_index, i)
    assert len({e.task_index for e in events[:5]}) == 5  # a handful start at once
    assert abs(len(first_seen) / len(events) - 0.05) < 0.01
    # tasks start in index order, and old tasks keep recurring after newer ones started
    assert sorted(first_seen, key=first_seen.__getitem__) == sorted(first_seen)
    assert np.mean([e.task_index < 100 for e in events[-5000:]]) > 0.01


def test_cluster_members_are_near_their_centre_when_clustered() -> None:
    stream = make_stream(tasks=2000, clusters=50, cluster_spread=0.05, seed=5)
    params, cluster, centres = stream.task_params, stream.task_clusters, stream.centres
    assert centres.shape == (50, 2) and cluster.min() >= 0 and cluster.max() < 50
    own = np.linalg.norm(params - centres[cluster], axis=1)
    other = np.linalg.norm(params - centres[(cluster + 1) % 50], axis=1)
    assert np.median(own) < 0.25 * np.median(other)
    for e in stream.iter_events(2000):
        assert e.cluster == cluster[e.task_index]
        np.testing.assert_array_equal(e.params, params[e.task_index])


def test_cluster_members_share_classes_when_family_is_digits() -> None:
    stream = make_stream("digits", tasks=500, clusters=10, seed=0)
    classes = stream.task_params[:, :5]
    np.testing.assert_array_equal(classes, stream.centres[stream.task_clusters][:, :5])


def test_cluster_is_none_when_clusters_is_zero() -> None:
    stream = make_stream(tasks=100, clusters=0, seed=0)
    assert stream.centres.shape == (0, 2)
    assert (stream.task_clusters == -1).all()
    assert all(e.cluster is None for e in stream.iter_events(500))


@pytest.mark.parametrize(
    ("family", "x_dim", "y_type"),
    [("sinusoid", 1, float), ("digits", 64, int)],
    ids=["sinusoid", "digits"],
)
def test_events_are_json_dicts_with_the_right_x_when_serialised(
    family: str, x_dim: int, y_type: type
) -> None:
    for e in make_stream(family, tasks=200, seed=0).iter_events(3000):
        parsed = json.loads(json.dumps(e.event))
        assert parsed == e.event
        assert set(parsed) == {"event_id", "task_id", "ts", "x"} | ({"y"} if e.labelled else set())
        assert len(parsed["x"]) == x_dim and all(type(v) is float for v in parsed["x"])
        assert type(e.truth) is y_type
        if e.labelled:
            assert type(parsed["y"]) is y_type and parsed["y"] == e.truth
        assert parsed["task_id"] == TaskStream.task_id(e.task_index)


def test_truth_is_the_task_function_when_event_is_a_query() -> None:
    family = SinusoidFamily()
    events = [e for e in TaskStream(family, seed=0).iter_events(2000) if not e.labelled]
    assert events
    params = np.stack([e.params for e in events])
    x = np.array([e.event["x"] for e in events], dtype=np.float32)[:, None, :]
    want = family.evaluate(params, x)[:, 0]
    np.testing.assert_allclose([e.truth for e in events], want, rtol=1e-6)


def test_digits_labels_cover_the_task_classes_when_streaming() -> None:
    events = list(make_stream("digits", tasks=20, seed=0).iter_events(4000))
    truths = {e.truth for e in events}
    assert truths == set(range(5))


def test_events_are_immutable_when_yielded() -> None:
    e = next(iter(make_stream(seed=0)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.truth = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        e.params[0] = 1.0


def test_to_jsonl_writes_the_event_dicts_when_called(tmp_path: Path) -> None:
    stream = make_stream(seed=9)
    path = tmp_path / "stream.jsonl"
    stream.to_jsonl(path, 500)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [e.event for e in stream.iter_events(500)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tasks": 0},
        {"clusters": -1},
        {"labelled_fraction": 1.5},
        {"new_task_rate": -0.1},
        {"cluster_spread": -1.0},
        {"zipf_s": -1.0},
        {"rate": 0.0},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_stream_raises_when_arguments_are_invalid(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_stream(**kwargs)
