"""The replay buffer: recent window, task reservoir, bounded memory, exact persistence."""

from __future__ import annotations

import numpy as np
import pytest

from stream_meta.continual.replay_buffer import ReplayBuffer, ReplaySnapshot


def _arrivals(buf: ReplayBuffer, tasks: range, examples: int = 1, start: int = 0) -> None:
    """Each task of ``tasks`` arrives and shows ``examples`` labelled examples (x = y = id)."""
    ids, shots, index = [], [], []
    for t in tasks:
        for k in range(examples):
            ids.append(f"t{t}")
            shots.append(k)
            index.append(start + len(index))
    vals = np.array([float(i[1:]) for i in ids], dtype=np.float32)
    buf.add(ids, vals[:, None], vals.tolist(), shots=shots, first_index=index)


def test_recent_window_keeps_the_last_arrivals_in_order() -> None:
    buf = ReplayBuffer(1, reservoir_tasks=10, recent_tasks=4, max_examples=4)
    _arrivals(buf, range(9))
    assert buf.recent_ids() == ["t5", "t6", "t7", "t8"]
    assert buf.stats()["reservoir"] == 5  # everything that left the window, while it has room
    assert len(buf) == 9


def test_memory_is_bounded_and_examples_capped() -> None:
    buf = ReplayBuffer(2, reservoir_tasks=20, recent_tasks=5, max_examples=3)
    nbytes = buf.nbytes
    _arrivals(buf, range(1000), examples=7)
    assert len(buf) == 25
    assert buf.nbytes == nbytes  # preallocated, never grown
    snap = buf.snapshot()
    assert snap.n.max() == 3 and snap.x.shape == (25, 3, 2)


def test_an_old_task_the_buffer_did_not_keep_is_not_taken_for_a_new_one() -> None:
    buf = ReplayBuffer(1, reservoir_tasks=0, recent_tasks=2, max_examples=4)
    _arrivals(buf, range(3))  # t0 leaves the window; the reservoir has no room
    assert "t0" not in buf.snapshot().task_ids
    buf.add(["t0"], np.zeros((1, 1), np.float32), [0.0], shots=[5], first_index=99)
    assert buf.recent_ids() == ["t1", "t2"]


def test_the_reservoir_is_a_uniform_sample_of_every_task_that_left_the_window() -> None:
    # 200 repetitions of 500 tasks through a 50-task reservoir: every task that left the
    # window is kept with probability 50 / 490; compare early, middle and late arrivals
    kept = np.zeros(500)
    for seed in range(200):
        buf = ReplayBuffer(1, reservoir_tasks=50, recent_tasks=10, max_examples=2, seed=seed)
        _arrivals(buf, range(500))
        snap = buf.snapshot()
        for t, recent in zip(snap.task_ids, snap.recent, strict=True):
            if not recent:
                kept[int(t[1:])] += 1
    p = kept[:490] / 200
    expected = 50 / 490
    for part in np.array_split(p, 5):  # 98 tasks x 200 runs each: sd of the mean ~0.0022
        assert abs(part.mean() - expected) < 0.012
    assert kept[490:].sum() == 0  # still in the recent window


def test_split_holds_out_by_task_id_and_separates_new_from_old() -> None:
    buf = ReplayBuffer(1, reservoir_tasks=500, recent_tasks=100, max_examples=2)
    _arrivals(buf, range(600))
    snap = buf.snapshot()
    parts = snap.split(new_from=500, holdout_fraction=0.2)
    assert sum(len(v) for v in parts.values()) == len(snap)
    held = np.concatenate([parts["val_new"], parts["val_old"]])
    assert 0.12 < len(held) / len(snap) < 0.28
    assert all(snap.first_seen[r] >= 500 for r in parts["train_new"])
    assert all(snap.first_seen[r] < 500 for r in parts["train_old"])
    again = ReplaySnapshot.from_arrays(snap.to_arrays()).split(500, 0.2)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_restore_continues_exactly_like_the_original() -> None:
    a = ReplayBuffer(1, reservoir_tasks=30, recent_tasks=8, max_examples=3, seed=3)
    _arrivals(a, range(200), examples=2)
    b = ReplayBuffer(1, reservoir_tasks=30, recent_tasks=8, max_examples=3, seed=99)
    b.restore(a.to_arrays())
    for buf in (a, b):
        _arrivals(buf, range(200, 400), examples=2, start=10_000)
    sa, sb = a.snapshot(), b.snapshot()
    assert sorted(sa.task_ids) == sorted(sb.task_ids)
    assert a.recent_ids() == b.recent_ids()
    order = [sb.task_ids.index(t) for t in sa.task_ids]
    assert np.array_equal(sa.y, sb.y[order]) and np.array_equal(sa.first_seen, sb.first_seen[order])


def test_restore_refuses_another_shape_and_leaves_the_buffer_unchanged() -> None:
    a = ReplayBuffer(2, max_examples=3)
    b = ReplayBuffer(1, max_examples=3)
    _arrivals(b, range(5))
    before = b.snapshot().task_ids
    with pytest.raises(ValueError, match="x_dim 2"):
        b.restore(a.to_arrays())
    assert b.snapshot().task_ids == before


def test_bad_capacities_are_refused() -> None:
    with pytest.raises(ValueError, match="recent_tasks"):
        ReplayBuffer(1, recent_tasks=0)
