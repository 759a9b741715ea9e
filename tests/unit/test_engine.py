"""The per-event loop: prequential order, batching semantics, bad input, caching, eviction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stream_meta.events import RejectReason
from tests.conftest import sinusoid_events


def _snapshot(engine) -> dict:
    return {
        "tasks": {
            s.task_id: (
                s.n,
                s.seen,
                s.version,
                s.feature_sum.copy(),
                None if s.xs is None else s.xs.copy(),
            )
            for s in engine.store
        },
        "index": len(engine.index),
        "labelled": engine.stats.labelled,
        "loss_sum": engine.stats.loss_sum,
    }


BAD_EVENTS = [
    pytest.param(
        b'{"event_id": "b1", "task_id": "t0", "x": [0.1]',
        RejectReason.MALFORMED_JSON,
        id="malformed-json",
    ),
    pytest.param(b"[1, 2, 3]", RejectReason.NOT_AN_OBJECT, id="not-an-object"),
    pytest.param(
        b'{"event_id": "b2", "x": [0.1], "y": 1.0}',
        RejectReason.MISSING_FIELD,
        id="missing-task-id",
    ),
    pytest.param(
        b'{"event_id": "b3", "task_id": "t0", "x": [0.1, 0.2], "y": 1.0}',
        RejectReason.WRONG_DIMENSION,
        id="wrong-dimension",
    ),
    pytest.param(
        b'{"event_id": "b4", "task_id": "t0", "x": [NaN], "y": 1.0}',
        RejectReason.NON_FINITE,
        id="nan-x",
    ),
    pytest.param(
        b'{"event_id": "b5", "task_id": "t0", "x": [0.1], "y": Infinity}',
        RejectReason.NON_FINITE,
        id="inf-y",
    ),
    pytest.param(
        b'{"event_id": "b6", "task_id": "t0", "x": ["a"], "y": 1.0}',
        RejectReason.INVALID_TYPE,
        id="string-x",
    ),
    pytest.param(
        b'{"event_id": "b7", "task_id": "t0", "x": [0.1], "pad": "' + b"z" * 70_000 + b'"}',
        RejectReason.OVERSIZED,
        id="oversized",
    ),
]


@pytest.mark.parametrize(("raw", "reason"), BAD_EVENTS)
def test_bad_event_is_rejected_and_changes_no_state_when_mixed_with_good_ones(
    make_model, make_engine, raw, reason
) -> None:
    engine = make_engine(make_model())
    engine.process(sinusoid_events(200, tasks=10))
    before = _snapshot(engine)
    result = engine.process([raw])
    assert [r.reason for r in result.rejections] == [reason]
    assert result.order == [-1]
    assert result.rejections[0].raw == raw[:4096]
    after = _snapshot(engine)
    assert after["index"] == before["index"]
    assert after["labelled"] == before["labelled"]
    assert after["tasks"].keys() == before["tasks"].keys()
    for tid, (n, seen, version, fsum, xs) in before["tasks"].items():
        n2, seen2, version2, fsum2, xs2 = after["tasks"][tid]
        assert (n, seen, version) == (n2, seen2, version2)
        np.testing.assert_array_equal(fsum, fsum2)
        if xs is not None:
            np.testing.assert_array_equal(xs, xs2)
    reg = engine.metrics.registry
    assert reg.get_sample_value("stream_meta_rejections_total", {"reason": reason.value}) == 1


def test_outputs_keep_input_order_when_good_and_bad_events_interleave(
    make_model, make_engine
) -> None:
    engine = make_engine(make_model())
    good = sinusoid_events(4, tasks=2)
    raws = [good[0], b"not json", good[1], json.dumps(good[2]).encode(), b"{}", good[3]]
    result = engine.process(raws)
    kinds = ["p" if o >= 0 else "r" for o in result.order]
    assert kinds == ["p", "r", "p", "p", "r", "p"]
    ids = [result.predictions[o].event_id for o in result.order if o >= 0]
    assert ids == [g["event_id"] for g in good]
    assert engine.summary()["events"] == 6 and engine.summary()["rejected"] == 2


def test_labelled_event_is_scored_before_it_is_learned_when_task_is_new(
    make_model, make_engine
) -> None:
    engine = make_engine(make_model())
    evs = [
        {"event_id": "a", "task_id": "t", "x": [0.5], "y": 1.0},
        {"event_id": "b", "task_id": "t", "x": [0.5], "y": 1.0},
        {"event_id": "c", "task_id": "t", "x": [0.5]},
    ]
    preds = engine.process(evs).predictions
    assert [p.shots for p in preds] == [0, 1, 2]
    assert preds[0].loss == pytest.approx((preds[0].prediction - 1.0) ** 2)
    assert preds[2].loss is None and not preds[2].labelled
    assert engine.summary()["loss_by_shots"].keys() == {"0", "1"}


def test_predictions_do_not_depend_on_micro_batch_size_when_retrieval_is_off(
    make_model, make_engine
) -> None:
    """Batching across tasks must not change what any event sees (exact prequential order)."""
    events = sinusoid_events(200, tasks=12, seed=3)
    one = make_engine(make_model(), k_neighbours=0, retrieval=False)
    ref = [p.prediction for i in range(0, 200) for p in one.process(events[i : i + 1]).predictions]
    for batch in (7, 64, 200):
        other = make_engine(make_model(), k_neighbours=0, retrieval=False)
        got = [
            p.prediction
            for i in range(0, 200, batch)
            for p in other.process(events[i : i + batch]).predictions
        ]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f"batch {batch}")
        assert other.stats.prequential_loss == pytest.approx(one.stats.prequential_loss, rel=1e-4)


def test_weights_are_reused_when_task_support_is_unchanged(make_model, make_engine) -> None:
    engine = make_engine(make_model())
    engine.process([{"event_id": "a", "task_id": "t", "x": [0.1], "y": 0.3}])
    reg = engine.metrics.registry
    before = reg.get_sample_value("stream_meta_adaptations_total")
    engine.process([{"event_id": f"q{i}", "task_id": "t", "x": [0.2]} for i in range(3)])
    engine.process([{"event_id": "q9", "task_id": "t", "x": [0.2]}])
    assert reg.get_sample_value("stream_meta_adaptations_total") == before + 1


@pytest.mark.parametrize("policy", ["recent", "reservoir"])
def test_support_set_stays_bounded_when_a_task_keeps_learning(
    make_model, make_engine, policy
) -> None:
    engine = make_engine(make_model(), support_size=4, support_policy=policy)
    evs = [{"event_id": f"e{i}", "task_id": "t", "x": [float(i)], "y": float(i)} for i in range(30)]
    engine.process(evs[:13])
    engine.process(evs[13:])
    state = engine.store.get("t")
    assert state.n == 4 and state.seen == 30
    if policy == "recent":
        assert sorted(state.ys.tolist()) == [26.0, 27.0, 28.0, 29.0]
    # the incremental encoder state equals a recomputation from the buffer
    model = engine.model
    with torch.no_grad():
        f = model.encoder.point_features(
            torch.from_numpy(state.xs), model.encode_labels(torch.from_numpy(state.ys))
        )
    np.testing.assert_allclose(state.feature_sum, f.sum(0).double().numpy(), rtol=1e-4, atol=1e-4)


def test_idle_tasks_are_evicted_but_stay_indexed_when_over_the_live_cap(
    make_model, make_engine
) -> None:
    engine = make_engine(make_model(), max_live_tasks=3)
    evs = [{"event_id": f"e{i}", "task_id": f"t{i}", "x": [0.1 * i], "y": 1.0} for i in range(6)]
    engine.process(evs)
    assert len(engine.store) == 3 and len(engine.index) == 6
    assert "t0" not in engine.store
    stored = engine.index.reconstruct(["t0"])[0]
    engine.process([{"event_id": "back", "task_id": "t0", "x": [0.0]}])
    state = engine.store.get("t0")
    assert state is not None and state.n == 0
    np.testing.assert_allclose(state.embedding, stored)
    reg = engine.metrics.registry
    assert reg.get_sample_value("stream_meta_tasks_evicted_total") >= 3


def test_idle_tasks_are_evicted_when_ttl_passes(make_model, make_engine) -> None:
    engine = make_engine(make_model(), task_ttl_s=10.0)
    engine.process([{"event_id": "a", "task_id": "old", "x": [0.1], "y": 1.0, "ts": 100.0}])
    engine.process([{"event_id": "b", "task_id": "new", "x": [0.1], "y": 1.0, "ts": 120.0}])
    assert "old" not in engine.store and "new" in engine.store
    assert "old" in engine.index


def test_neighbours_never_include_the_task_itself_when_retrieved(make_model, make_engine) -> None:
    engine = make_engine(make_model(), k_neighbours=4)
    engine.process(sinusoid_events(300, tasks=10))
    state = engine.store.get("t1")
    zn, _sim, mask = engine.neighbours(state.embedding[None], ["t1"])
    own = torch.from_numpy(engine.index.reconstruct(["t1"])[0])
    assert mask.sum() == 4
    assert not any(torch.allclose(zn[0, j], own) for j in range(4))


def test_swap_serves_the_new_version_and_reencodes_when_model_changes(
    make_model, make_engine
) -> None:
    engine = make_engine(make_model(seed=0))
    engine.process(sinusoid_events(100, tasks=5))
    old = engine.index.reconstruct(["t1"])[0].copy()
    engine.swap_model(make_model(seed=1), version=2)
    after = engine.index.reconstruct(["t1"])[0]
    assert not np.allclose(old, after)
    preds = engine.process([{"event_id": "q", "task_id": "t1", "x": [0.3]}]).predictions
    assert preds[0].model_version == 2
    assert engine.metrics.registry.get_sample_value("stream_meta_model_version") == 2


def test_metrics_match_the_summary_when_a_stream_is_processed(make_model, make_engine) -> None:
    engine = make_engine(make_model())
    engine.process([*sinusoid_events(500, tasks=20), b"bad"])
    s, reg = engine.summary(), engine.metrics.registry
    val = reg.get_sample_value
    assert (
        val("stream_meta_events_total", {"kind": "labelled", "outcome": "predicted"})
        == s["labelled"]
    )
    assert (
        val("stream_meta_events_total", {"kind": "query", "outcome": "predicted"}) == s["queries"]
    )
    assert val("stream_meta_prediction_latency_seconds_count") == s["labelled"] + s["queries"]
    assert val("stream_meta_prequential_loss_count") == s["labelled"]
    assert val("stream_meta_prequential_loss_sum") == pytest.approx(
        s["prequential_loss"] * s["labelled"]
    )
    assert val("stream_meta_tasks") == s["tasks"] == 20
    assert val("stream_meta_index_vectors") == s["index_size"]
    assert not math.isnan(s["prequential_loss"])


# -- de-duplication of labelled events ---------------------------------------------------------


def _labelled(event_id: str, task_id: str = "t", x: float = 0.5, y: float = 1.0) -> dict:
    return {"event_id": event_id, "task_id": task_id, "x": [x], "y": y}


def _duplicates_total(engine) -> float:
    return engine.metrics.registry.get_sample_value("stream_meta_duplicates_total")


@pytest.mark.parametrize("split", [False, True], ids=["one-batch", "two-batches"])
def test_repeated_labelled_event_is_learned_once_when_its_id_comes_back(
    make_model, make_engine, split
) -> None:
    engine = make_engine(make_model())
    first, other, again = _labelled("a"), _labelled("b", x=-1.0, y=0.2), _labelled("a")
    if split:
        preds = engine.process([first, other]).predictions
        preds += engine.process([again]).predictions
    else:
        preds = engine.process([first, other, again]).predictions
    state = engine.store.get("t")
    assert state.n == 2 and state.seen == 2
    assert [p.duplicate for p in preds] == [False, False, True]
    assert [p.labelled for p in preds] == [True, True, False]
    assert preds[2].loss is None and preds[0].loss is not None
    assert preds[2].shots == 2  # still served, with what the task has learned
    assert engine.stats.labelled == 2 and engine.stats.queries == 1
    assert engine.summary()["labelled"] == 2
    assert _duplicates_total(engine) == 1


def test_each_repeat_is_counted_when_an_event_arrives_three_times(make_model, make_engine) -> None:
    engine = make_engine(make_model())
    result = engine.process([_labelled("a"), _labelled("a"), _labelled("a", task_id="u")])
    assert [p.duplicate for p in result.predictions] == [False, True, True]
    assert engine.store.get("t").seen == 1
    assert engine.store.get("u").n == 0  # a known id is not learned under another task either
    assert _duplicates_total(engine) == 2


def test_duplicate_is_learned_again_when_dedupe_is_off(make_model, make_engine) -> None:
    engine = make_engine(make_model(), dedupe_window=0)
    assert engine.dedupe is None
    preds = engine.process([_labelled("a"), _labelled("a")]).predictions
    preds += engine.process([_labelled("a")]).predictions
    assert engine.store.get("t").n == 3 and engine.store.get("t").seen == 3
    assert [p.duplicate for p in preds] == [False, False, False]
    assert all(p.labelled and p.loss is not None for p in preds)
    assert engine.stats.labelled == 3
    assert _duplicates_total(engine) == 0


def test_repeated_ids_are_not_flagged_when_events_are_unlabelled(make_model, make_engine) -> None:
    engine = make_engine(make_model())
    query = {"event_id": "q", "task_id": "t", "x": [0.1]}
    preds = engine.process([query, query]).predictions + engine.process([query]).predictions
    assert [p.duplicate for p in preds] == [False, False, False]
    assert engine.stats.queries == 3 and engine.stats.labelled == 0
    assert _duplicates_total(engine) == 0
    # an unlabelled event does not claim its id: the labelled one with it is still learned
    labelled = engine.process([_labelled("q")]).predictions[0]
    assert labelled.labelled and not labelled.duplicate
    assert engine.store.get("t").n == 1


def test_duplicate_is_learned_again_when_it_left_a_full_window(make_model, make_engine) -> None:
    engine = make_engine(make_model(), dedupe_window=2)
    engine.process([_labelled("a"), _labelled("b"), _labelled("c")])
    preds = engine.process([_labelled("a"), _labelled("c")]).predictions
    assert [p.duplicate for p in preds] == [False, True]
    assert engine.store.get("t").seen == 4


def test_a_task_restored_from_its_changelog_state_serves_like_the_original(
    make_model, make_engine
) -> None:
    model = make_model()
    source, target = make_engine(model), make_engine(model)
    source.track_changes()
    events = sinusoid_events(200, tasks=4, labelled=1.0)
    source.process(events)
    changed = {s.task_id: s for s in source.drain_changes()}
    assert set(changed) == {"t0", "t1", "t2", "t3"} and source.drain_changes() == []
    states = [(t, s.seen, s.xs[: s.n].copy(), s.ys[: s.n].copy()) for t, s in changed.items()]
    assert target.restore_tasks(states) == 4
    assert target.restore_tasks(states) == 0  # nothing newer: kept as they are
    query = [{"event_id": "q", "task_id": "t2", "x": [0.7]}]
    a = source.process(query).predictions[0].prediction
    b = target.process(query).predictions[0].prediction
    assert a == pytest.approx(b, rel=1e-5)
    assert target.store.get("t2").seen == source.store.get("t2").seen
    # a state that does not fit (too many examples, wrong width) is skipped, not raised
    too_big = np.zeros((500, 1), np.float32), np.zeros(500, np.float32)
    wrong = np.zeros((3, 2), np.float32), np.zeros(3, np.float32)
    assert target.restore_tasks([("x", 600, *too_big), ("y", 3, *wrong)]) == 0
    assert "x" not in target.store and "y" not in target.store


def test_events_marked_learned_are_predicted_as_duplicates_and_not_learned(
    make_model, make_engine
) -> None:
    engine = make_engine(make_model())
    events = sinusoid_events(20, tasks=1, labelled=1.0)
    result = engine.process(events, learned=[i < 5 for i in range(20)])
    out = result.outputs
    assert out.duplicates[:5] == [True] * 5 and not any(out.duplicates[5:])
    assert engine.store.get("t0").seen == 15
