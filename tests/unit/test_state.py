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


# -- persistence: to_arrays / restore ------------------------------------------------------------


def _filled_store(policy: str = "recent", seed: int = 0) -> TaskStore:
    """Four tasks: wrapped buffer, partial buffer, one never labelled, one with an embedding."""
    store = make_store(x_dim=2, support_size=5, policy=policy, seed=seed)
    rng = np.random.default_rng(7)
    plan = [("alpha", 8, True), ("beta", 3, False), ("gamma", 0, False), ("delta", 12, True)]
    for i, (task_id, examples, embed) in enumerate(plan):
        state, _ = store.touch(task_id, now=10.0 + i)
        for _ in range(examples):
            store.add_example(state, rng.normal(size=2), float(rng.normal()))
        state.feature_sum = rng.normal(size=4)
        if embed:
            state.embedding = rng.normal(size=3).astype(np.float32)
    store.touch("beta", now=20.0)  # LRU order now: alpha, gamma, delta, beta
    return store


def _tasks(store: TaskStore) -> list[tuple]:
    return [
        (
            s.task_id,
            s.n,
            s.seen,
            s.version,
            s.last_seen,
            s.feature_sum.tolist(),
            None if s.embedding is None else s.embedding.tolist(),
            None if s.xs is None else s.xs[: s.n].tolist(),
            None if s.ys is None else s.ys[: s.n].tolist(),
        )
        for s in store
    ]


@pytest.mark.parametrize("policy", ["recent", "reservoir"])
def test_restore_reproduces_every_task_when_given_to_arrays_output(policy: str) -> None:
    store = _filled_store(policy)
    assert [s.task_id for s in store] == ["alpha", "gamma", "delta", "beta"]
    restored = make_store(x_dim=2, support_size=5, policy=policy)
    restored.touch("stale", now=1.0)
    states = restored.restore(store.to_arrays(embed_dim=3))
    assert [s.task_id for s in states] == ["alpha", "gamma", "delta", "beta"]
    assert _tasks(restored) == _tasks(store)
    assert "stale" not in restored and len(restored) == 4
    gamma = restored.get("gamma")
    assert gamma.embedding is None and gamma.xs is None and gamma.n == 0
    assert restored.get("alpha").key == store.get("alpha").key
    # buffers are full-size and private: learning in the copy leaves the original alone
    beta, orig_beta = restored.get("beta"), store.get("beta")
    assert beta.xs.shape == (5, 2) and beta.xs.dtype == np.float32
    restored.add_example(beta, [9.0, 9.0], 9.0)
    assert orig_beta.n == 3 and beta.n == 4


def test_restore_keeps_lru_order_when_the_cap_evicts_afterwards() -> None:
    store = _filled_store()
    restored = make_store(x_dim=2, support_size=5, max_live_tasks=2)
    restored.restore(store.to_arrays(embed_dim=3))
    evicted = restored.evict(now=100.0)
    assert [s.task_id for s in evicted] == ["alpha", "gamma"]


def test_recent_buffer_overwrites_the_same_slot_when_restored() -> None:
    """Storage order is saved, so the oldest example is replaced next, as in the original."""
    store = _filled_store("recent")
    restored = make_store(x_dim=2, support_size=5)
    restored.restore(store.to_arrays(embed_dim=3))
    for s in (store, restored):
        s.add_example(s.get("alpha"), [5.0, 5.0], 5.0)
    assert store.get("alpha").ys.tolist() == restored.get("alpha").ys.tolist()
    assert np.array_equal(store.get("alpha").xs, restored.get("alpha").xs)


def test_reservoir_draws_the_same_samples_when_restored_mid_stream() -> None:
    store = _filled_store("reservoir", seed=3)
    restored = make_store(x_dim=2, support_size=5, policy="reservoir", seed=99)
    restored.restore(store.to_arrays(embed_dim=3))
    for i in range(40):
        for s in (store, restored):
            s.add_example(s.get("delta"), [float(i), -float(i)], float(i))
    a, b = store.get("delta"), restored.get("delta")
    assert a.seen == b.seen == 52
    assert a.version == b.version
    assert a.ys.tolist() == b.ys.tolist()
    assert np.array_equal(a.xs, b.xs)
    assert a.ys.tolist() != _filled_store("reservoir", seed=3).get("delta").ys.tolist()


def test_restore_gives_an_empty_store_when_saved_store_was_empty() -> None:
    store = _filled_store()
    store.restore(make_store(x_dim=2, support_size=5).to_arrays(embed_dim=3))
    assert len(store) == 0 and list(store) == []


def _corrupt(name: str, arrays: dict) -> dict:
    arrays = dict(arrays)
    if name == "truncated-xs":
        arrays["xs"] = arrays["xs"][:-1]
    elif name == "truncated-ys":
        arrays["ys"] = arrays["ys"][:-1]
    elif name == "missing-n-row":
        arrays["n"] = arrays["n"][:-1]
    elif name == "missing-seen-row":
        arrays["seen"] = arrays["seen"][:-1]
    elif name == "feature-width":
        arrays["feature_sum"] = arrays["feature_sum"][:, :3]
    elif name == "embedding-rows":
        arrays["embedding"] = arrays["embedding"][:-1]
    elif name == "n-over-support-size":
        n = arrays["n"].copy()
        n[0] += 1
        arrays["n"] = n
    elif name == "negative-n":
        n = arrays["n"].copy()
        n[1] = -1
        arrays["n"] = n
    elif name == "offsets":
        arrays["ids_offsets"] = arrays["ids_offsets"][:-1]
    elif name == "duplicate-ids":
        from stream_meta.packing import pack_strings

        arrays["ids_utf8"], arrays["ids_offsets"] = pack_strings(["a", "a", "b", "c"])
    elif name == "rng":
        arrays["rng"] = np.frombuffer(b"not json", dtype=np.uint8)
    return arrays


@pytest.mark.parametrize(
    "corruption",
    [
        "truncated-xs",
        "truncated-ys",
        "missing-n-row",
        "missing-seen-row",
        "feature-width",
        "embedding-rows",
        "n-over-support-size",
        "negative-n",
        "offsets",
        "duplicate-ids",
        "rng",
    ],
)
def test_restore_raises_and_changes_nothing_when_arrays_are_inconsistent(corruption) -> None:
    arrays = _filled_store().to_arrays(embed_dim=3)
    target = make_store(x_dim=2, support_size=5)
    state, _ = target.touch("keep-me", now=5.0)
    target.add_example(state, [1.0, 2.0], 3.0)
    before = _tasks(target)
    rng_before = target._rng.bit_generator.state
    with pytest.raises(ValueError):
        target.restore(_corrupt(corruption, arrays))
    assert _tasks(target) == before
    assert target._rng.bit_generator.state == rng_before
