"""Reading a user's log into tasks: grouping, the split by task, refusals, the log forms."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stream_meta.recording import EventRecorder
from stream_meta.schema import SchemaError, TaskSchema
from stream_meta.tasklog import fingerprint, log_items, read_tasks, split_of

REAL = Path(__file__).resolve().parents[1] / "data" / "real"


def make_events(n_tasks: int = 40, per_task: int = 5, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    order = rng.permutation(np.repeat(np.arange(n_tasks), per_task))
    seen: Counter[int] = Counter()
    for i, t in enumerate(order.tolist()):
        out.append(
            {
                "event_id": f"e{i}",
                "task_id": f"task-{t}",
                "x": [float(t), float(seen[t])],
                "y": float(10 * t + seen[t]),
                "ts": float(i),
            }
        )
        seen[t] += 1
    return out


def write(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_the_split_is_a_documented_pure_function_of_the_task_id() -> None:
    ids = [f"customer-{i}" for i in range(5000)]
    splits = [split_of(t) for t in ids]
    assert splits == [split_of(t) for t in ids]  # deterministic
    frac = Counter(splits)
    assert abs(frac["train"] / 5000 - 0.65) < 0.03
    assert abs(frac["validation"] / 5000 - 0.15) < 0.03
    assert [split_of(t, seed=1) for t in ids] != splits  # the seed reshuffles


def test_tasks_are_grouped_in_stream_order_and_no_task_is_in_two_splits(tmp_path: Path) -> None:
    events = make_events()
    schema = TaskSchema(x_dim=2, time_ordered=True)
    with read_tasks(write(tmp_path / "log.jsonl", events), schema) as table:
        assert table.n_tasks == 40 and table.summary.labelled == 200
        assert (table.counts() == 5).all()
        for t in range(table.n_tasks):
            r = table.rows(t)
            task = int(table.task_ids[t].split("-")[1])
            assert (table.x[r][:, 0] == task).all()  # one task's rows only
            assert np.array_equal(table.x[r][:, 1], np.arange(5))  # in stream order
            assert np.array_equal(table.y[r], 10 * task + np.arange(5))
            assert (np.diff(table.pos[r]) > 0).all() and (np.diff(table.ts[r]) > 0).all()
        by_split = {s: set(table.tasks_in(s).tolist()) for s in ("train", "validation", "test")}
        assert sum(len(v) for v in by_split.values()) == 40
        assert not (by_split["train"] & by_split["validation"])
        assert not (by_split["train"] & by_split["test"])
        assert not (by_split["validation"] & by_split["test"])
        rows = table.split_rows("test")
        assert set(np.searchsorted(table.offsets, rows, side="right") - 1) == by_split["test"]
        workdir = table.workdir
    assert not workdir.exists()  # the on-disk arrays are removed on close


def test_events_that_do_not_fit_a_declared_schema_are_refused(tmp_path: Path) -> None:
    events = make_events()
    for e in events:
        e["y"] = int(e["y"]) % 2
    events[7]["y"] = 5
    schema = TaskSchema(x_dim=2, target="classification", classes=["no", "yes"])
    path = write(tmp_path / "log.jsonl", events)
    with pytest.raises(SchemaError, match=r"1 events do not fit.*event 8: invalid_label"):
        read_tasks(path, schema)
    with read_tasks(path, schema, skip_invalid=True) as table:
        assert table.summary.labelled == 199 and table.summary.rejected == {"invalid_label": 1}
        assert set(np.unique(table.y)) <= {0, 1}


def test_a_wrong_dimension_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", make_events())
    with pytest.raises(SchemaError, match="wrong_dimension: x has 2 values, expected 3"):
        read_tasks(path, TaskSchema(x_dim=3))


def test_a_recording_directory_and_parquet_give_the_same_tasks(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    events = make_events(n_tasks=6)
    jsonl = write(tmp_path / "log.jsonl", events)
    with EventRecorder(tmp_path / "rec") as rec:
        rec.events([json.dumps(e).encode() for e in events], start=0)
    pq.write_table(pa.Table.from_pylist(events), tmp_path / "log.parquet")
    schema = TaskSchema(x_dim=2)
    tables = [read_tasks(p, schema) for p in (jsonl, tmp_path / "rec", tmp_path / "log.parquet")]
    try:
        for other in tables[1:]:
            assert other.task_ids == tables[0].task_ids
            assert np.array_equal(other.x, tables[0].x) and np.array_equal(other.y, tables[0].y)
    finally:
        for t in tables:
            t.close()
    assert sum(1 for _ in log_items(tmp_path / "rec")) == len(events)


def test_a_missing_log_and_a_plain_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="log not found"):
        list(log_items(tmp_path / "nope.jsonl"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(SchemaError, match="not a recording"):
        list(log_items(tmp_path / "dir"))


def test_the_fingerprint_is_of_the_bytes(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", make_events())
    b = write(tmp_path / "b.jsonl", make_events())
    c = write(tmp_path / "c.jsonl", make_events(seed=1))
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert fingerprint(REAL / "radon.jsonl.gz").startswith("sha256:")


def test_a_small_log_is_split_by_rank_so_no_split_is_empty() -> None:
    from stream_meta.tasklog import RANK_SPLIT_BELOW, assign_splits

    for n in (3, 5, 18, RANK_SPLIT_BELOW - 1):
        ids = [f"subject-{i}" for i in range(n)]
        splits = assign_splits(ids).tolist()
        assert splits == assign_splits(ids).tolist()
        counts = Counter(splits)
        assert counts["validation"] >= 1 and counts["test"] >= 1 and counts["train"] >= 1
        assert counts["train"] >= 0.5 * n or n < 5
    big = [f"c{i}" for i in range(RANK_SPLIT_BELOW)]
    assert assign_splits(big).tolist() == [split_of(t) for t in big]


def test_logged_decisions_are_read_as_the_examples_of_their_logged_actions(
    tmp_path: Path,
) -> None:
    from stream_meta.tasklog import infer_schema
    from stream_meta.tasks import BanditFamily, logged_stream

    family = BanditFamily()
    rng = np.random.default_rng(0)
    events = list(logged_stream(family, family.sample_params(60, rng), 4, rng, epsilon=0.5))
    path = tmp_path / "decisions.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    schema, summary = infer_schema(path)
    assert schema.x_dim == 5 and schema.target == "regression"
    assert summary.labelled == 240 and summary.tasks == 60
    with read_tasks(path, schema) as table:
        assert table.n_tasks == 60 and int(table.counts().sum()) == 240
    first = events[0]
    chosen = next(a for a in first["actions"] if a["action_id"] == first["logged"]["action_id"])
    example = next(iter(log_items(path)))
    assert example["x"] == chosen["x"] and example["y"] == first["logged"]["reward"]
    assert example["task_id"] == first["task_id"]
