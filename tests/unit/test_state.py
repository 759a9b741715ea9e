"""Per-task state: bounded buffers (recent, reservoir), eviction, memory per task."""

from __future__ import annotations

import numpy as np
import pytest

from stream_meta.state import TaskStore


def make_store(**kwargs) -> TaskStore:
    defaults = {"x_dim": 1, "feat_dim": 4, "support_size": 5, "key": lambda t: len(t)}
    defaults.update(kwargs)
    return TaskStore(**defaults)


def test_recent_policy_keeps_the_last_examples_when_buffer_overflows() -> None:
    store = make_store()
    state, created = store.touch("t", now=0.0)
    assert created
    evicted = [store.add_example(state, [float(i)], float(i))[1] for i in range(8)]
    assert evicted[:5] == [None] * 5
    assert [e[1] for e in evicted[5:]] == [0.0, 1.0, 2.0]
    assert sorted(state.ys.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert state.n == 5 and state.seen == 8 and state.version == 8


def test_reservoir_keeps_a_uniform_sample_when_many_examples_arrive() -> None:
    """Each of 100 examples ends up in a 5-slot reservoir with probability 5/100."""
    hits = np.zeros(100)
    for seed in range(400):
        store = make_store(policy="reservoir", seed=seed)
        state, _ = store.touch("t", now=0.0)
        for i in range(100):
            store.add_example(state, [float(i)], float(i))
        hits[state.ys.astype(int)] += 1
    freq = hits / 400
    assert freq.mean() == pytest.approx(0.05)
    # first and second half equally represented (the "recent" policy would give 0 vs 0.1)
    assert abs(freq[:50].mean() - freq[50:].mean()) < 0.015


def test_reservoir_leaves_the_version_unchanged_when_it_declines_an_example() -> None:
    store = make_store(policy="reservoir", support_size=1, seed=1)
    state, _ = store.touch("t", now=0.0)
    results = [store.add_example(state, [0.0], 0.0)[0] for _ in range(50)]
    assert state.version == sum(results)  # one version per kept example only
    assert not all(results)


def test_cap_evicts_least_recently_seen_tasks_when_exceeded() -> None:
    store = make_store(max_live_tasks=2)
    for t in ("a", "b", "c"):
        store.touch(t, now=0.0)
    store.touch("a", now=1.0)  # a is now the most recent
    gone = store.evict(now=1.0)
    assert [s.task_id for s in gone] == ["b"]
    assert "a" in store and "c" in store


def test_bytes_per_task_stays_under_4kb_when_defaults_are_used() -> None:
    store = make_store(feat_dim=128, support_size=64)
    assert store.bytes_per_task(embed_dim=64) < 4096
