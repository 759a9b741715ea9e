"""Episodes cut from recorded tasks: what training shows the model of a user's data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream_meta.schema import TaskSchema
from stream_meta.tasklog import read_tasks
from stream_meta.tasks.logged import LoggedEpisodes, fixed_episodes


@pytest.fixture
def table(tmp_path: Path):
    """30 tasks with 2..31 events; x = (task, time); y = time; ts increasing in the stream."""
    rng = np.random.default_rng(0)
    sizes = np.arange(2, 32)
    order = rng.permutation(np.repeat(np.arange(30), sizes))
    seen = np.zeros(30, dtype=int)
    lines = []
    for i, t in enumerate(order.tolist()):
        e = {"event_id": f"e{i}", "task_id": f"t{t}", "x": [float(t), float(seen[t])]}
        e.update(y=float(seen[t]), ts=float(i))
        lines.append(json.dumps(e))
        seen[t] += 1
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with read_tasks(path, TaskSchema(x_dim=2, time_ordered=True)) as tab:
        yield tab


def sampler(table, time_ordered: bool, seed: int = 0, max_shots: int = 8) -> LoggedEpisodes:
    return LoggedEpisodes(
        table,
        np.arange(table.n_tasks),
        batch_tasks=8,
        bank_tasks=12,
        max_shots=max_shots,
        query_points=4,
        rng=np.random.default_rng(seed),
        time_ordered=time_ordered,
    )


def test_time_ordered_support_always_precedes_its_queries(table) -> None:
    s = sampler(table, time_ordered=True)
    for _ in range(20):
        bank = s.bank()
        ep = s.episodes(bank["centres"])
        for i in range(len(ep["xs"])):
            sup = ep["ys"][i][ep["smask"][i] > 0]
            qry = ep["yq"][i][ep["qmask"][i] > 0]
            assert len(qry) >= 1  # a task always has a query left
            if len(sup):
                assert sup.max() < qry.min()  # y is the example's time within its task
                assert np.array_equal(sup, np.arange(sup[0], sup[0] + len(sup)))  # most recent
                assert qry[0] == sup[-1] + 1


def test_support_and_queries_come_from_one_task_and_never_overlap(table) -> None:
    s = sampler(table, time_ordered=False)
    ep = s.episodes(s.bank()["centres"])
    for i in range(len(ep["xs"])):
        xs = ep["xs"][i][ep["smask"][i] > 0]
        xq = ep["xq"][i][ep["qmask"][i] > 0]
        tasks = set(xs[:, 0].tolist()) | set(xq[:, 0].tolist())
        assert len(tasks) == 1
        assert not set(xs[:, 1].tolist()) & set(xq[:, 1].tolist())
        assert len(xs) <= 8


def test_the_bank_never_holds_an_episode_task(table) -> None:
    s = sampler(table, time_ordered=False)
    for _ in range(20):
        bank = s.bank()
        # x[0] is the task's number in the log (table indices follow first appearance)
        ep_tasks = {int(table.x[table.rows(t)][0, 0]) for t in s.tasks[bank["centres"]]}
        bank_tasks = set(bank["x"][bank["mask"] > 0][:, 0].astype(int).tolist())
        assert bank_tasks and not bank_tasks & ep_tasks


def test_tasks_are_drawn_by_their_events_and_shots_like_prequential_serving(table) -> None:
    s = sampler(table, time_ordered=True, max_shots=64)
    draws = np.concatenate([s.bank()["centres"] for _ in range(3000)])
    counts = np.bincount(s.tasks[draws], minlength=30)
    sizes = table.counts()
    # a task with 31 events is drawn ~15x as often as one with 2
    assert counts[np.argmax(sizes)] > 8 * counts[np.argmin(sizes)]
    ep = s.cut(
        np.array([int(np.argmax(sizes))] * 4000), np.random.default_rng(1).integers(0, 31, 4000)
    )
    shots = ep["smask"].sum(1)
    assert shots.min() == 0 and shots.max() == 30


def test_fixed_episodes_are_the_same_every_time(table) -> None:
    s = sampler(table, time_ordered=False)
    a, b = fixed_episodes(s, 4, seed=3), fixed_episodes(s, 4, seed=3)
    assert a is not None and b is not None
    assert all(np.array_equal(a[k], b[k]) for k in a)
