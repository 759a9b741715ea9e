"""A user's recorded stream as tasks: reading logs, inferring a schema, splitting by task.

``train --data LOG`` and ``evaluate --data LOG`` read a log in any form the product writes or a
user has: a JSON-lines file (``.jsonl``, ``.jsonl.gz``), a recording directory (``run/serve
--record``, ``stream-meta export`` of a topic) or a Parquet file with the event fields as
columns. Every event goes through :func:`~stream_meta.events.parse_event` against the schema,
exactly as the service would check it.

Logs larger than memory: events are streamed once into flat on-disk arrays (numpy memmaps in a
work directory: ``x [N, d]``, ``y [N]``, ``ts [N]``, task index ``[N]``); only an ``int64``
index per event is sorted in memory to group the rows by task. Python objects are kept per
*task* (its id), never per event.

A *logged decision* (a decision event with what the policy in production did: ``{"event_id",
"task_id", "actions": [{"action_id", "x"}, ...], "logged": {"action_id", "propensity",
"reward"}}``) is read as the labelled example it yields: ``x`` the features of the action
logged, ``y`` its reward (:func:`logged_example`), so ``train --data`` meta-trains on a
production decision log as on any labelled stream.

The split is by task, never by event: a task goes to ``train``, ``validation`` or ``test`` by a
hash of its id, :func:`split_of`: the first 8 bytes of ``sha256("<seed>:<task_id>")`` as an
unsigned integer ``u``; ``u / 2**64 < 0.65`` is ``train``, ``< 0.80`` ``validation``, else
``test``. The same id lands in the same split on every machine, in every run, whatever else the
log holds; a new task id of a growing log never moves an old one. A log of fewer than
:data:`RANK_SPLIT_BELOW` tasks is split by the *rank* of the same hash instead (the lowest 65%
of the tasks by ``u`` train, the next 15% validation, at least one task each in validation and
test): with 20 tasks the thresholds could leave a split empty.

>>> [split_of(t) for t in ("county:AITKIN", "county:ANOKA", "school:1")]
['train', 'train', 'test']
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_meta.events import Event, Rejection, parse_event
from stream_meta.schema import MAX_CLASSES, SchemaError, TaskSchema

__all__ = [
    "SPLITS",
    "LogSummary",
    "TaskTable",
    "fingerprint",
    "infer_schema",
    "log_items",
    "logged_example",
    "read_tasks",
    "split_of",
]

log = logging.getLogger(__name__)

#: the split fractions (train, validation; the rest is test) of :func:`split_of`
SPLITS = (("train", 0.65), ("validation", 0.80), ("test", 1.0))
#: the largest event a log may hold (bytes); bigger lines are refused like the service does
MAX_EVENT_BYTES = 1 << 20


#: below this many tasks the split is by rank of the hash (see the module docstring)
RANK_SPLIT_BELOW = 50


def _unit(task_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(task_id: str, seed: int = 0) -> str:
    """The split of a task: ``train``, ``validation`` or ``test`` (see the module docstring)."""
    u = _unit(task_id, seed)
    for name, upper in SPLITS:
        if u < upper:
            return name
    return "test"


def assign_splits(task_ids: list[str], seed: int = 0) -> np.ndarray:
    """Every task's split: :func:`split_of`, or by rank of the same hash for a small log.

    >>> from collections import Counter
    >>> sorted(Counter(assign_splits([f"s{i}" for i in range(20)]).tolist()).items())
    [('test', 4), ('train', 13), ('validation', 3)]
    """
    if len(task_ids) >= RANK_SPLIT_BELOW:
        return np.array([split_of(t, seed) for t in task_ids])
    n = len(task_ids)
    order = np.argsort([_unit(t, seed) for t in task_ids], kind="stable")
    n_test = max(1, round(n * (1.0 - SPLITS[1][1]))) if n >= 3 else 0
    n_val = max(1, round(n * (SPLITS[1][1] - SPLITS[0][1]))) if n >= 3 else 0
    out = np.full(n, "train", dtype=object)
    out[order[n - n_test - n_val : n - n_test]] = "validation"
    out[order[n - n_test :]] = "test"
    return out.astype(str)


# -- reading ------------------------------------------------------------------------------------
def log_items(path: str | Path) -> Iterator[Any]:
    """The raw events of a log, in stream order: bytes (a JSON line) or dicts (Parquet rows);
    a logged decision as its labelled example (:func:`logged_example`)."""
    for raw in _raw_items(path):
        yield logged_example(raw)


def logged_example(raw: Any) -> Any:
    """A logged decision -> the labelled example of the action it logged, ``{"event_id",
    "task_id", "x": that action's features, "y": the reward, "ts"?}``; anything else (and a
    decision whose logged action is not among its actions) unchanged, for the schema to judge.

    >>> logged_example({"event_id": "d1", "task_id": "u", "actions": [
    ...     {"action_id": "a", "x": [0.0]}, {"action_id": "b", "x": [2.0]}],
    ...     "logged": {"action_id": "b", "propensity": 0.5, "reward": 1.5}})
    {'event_id': 'd1', 'task_id': 'u', 'x': [2.0], 'y': 1.5}
    """
    if isinstance(raw, bytes | str):
        if (b'"logged"' not in raw) if isinstance(raw, bytes) else ('"logged"' not in raw):
            return raw
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return raw
    else:
        obj = raw
    if not isinstance(obj, dict):
        return raw
    logged, actions = obj.get("logged"), obj.get("actions")
    if not isinstance(logged, dict) or not isinstance(actions, list):
        return raw
    chosen = logged.get("action_id")
    for action in actions:
        if isinstance(action, dict) and action.get("action_id") == chosen:
            example = {
                "event_id": obj.get("event_id"),
                "task_id": obj.get("task_id"),
                "x": action.get("x"),
                "y": logged.get("reward"),
            }
            if "ts" in obj:
                example["ts"] = obj["ts"]
            return example
    return raw


def _raw_items(path: str | Path) -> Iterator[Any]:
    from stream_meta.recording import is_recording, recorded_events

    p = Path(path)
    if p.is_dir():
        if not is_recording(p):
            raise SchemaError(f"{p} is a directory but not a recording (events-<n>.* files)")
        for raw, _ in recorded_events(p):
            yield raw
        return
    if not p.is_file():
        raise SchemaError(f"log not found: {p}")
    if p.suffix == ".parquet":
        yield from _parquet_rows(p)
        return
    from stream_meta.sources import jsonl_source

    for raw, _ in jsonl_source(p):
        yield raw


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dev and [parquet] dependency
        raise SchemaError(
            "reading Parquet needs pyarrow: pip install 'stream-meta[parquet]'"
        ) from None
    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise SchemaError(f"{path} is not a readable Parquet file: {exc}") from None
    for batch in reader.iter_batches():
        for row in batch.to_pylist():
            yield {k: v for k, v in row.items() if v is not None}


def fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a log's bytes (a directory: its files in name order)."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# -- schema inference --------------------------------------------------------------------------
@dataclass
class LogSummary:
    """Counts of a log: what ``stream-meta schema`` prints beside the schema."""

    events: int = 0
    labelled: int = 0
    tasks: int = 0
    examples_per_task: dict[str, float] = field(default_factory=dict)
    label: dict[str, Any] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if not self.rejected:
            out.pop("rejected")
        return out


def _quantiles(counts: list[int]) -> dict[str, float]:
    if not counts:
        return {}
    q = np.quantile(np.asarray(counts, dtype=np.float64), [0.0, 0.1, 0.5, 0.9, 1.0])
    return dict(zip(("min", "p10", "median", "p90", "max"), (float(v) for v in q), strict=True))


def infer_schema(
    path: str | Path, *, max_events: int | None = None
) -> tuple[TaskSchema, LogSummary]:
    """Read a log once and infer its schema; raises :class:`SchemaError` naming the first
    event that does not fit (mixed dimensions, non-numeric features, a missing task id).

    Labels that are all JSON integers forming ``0..C-1`` with ``2 <= C <= 20`` are read as
    classes; any other numbers as regression targets (declare ``target`` in a schema file to
    decide otherwise). ``time_ordered`` is inferred when every event has a ``ts``.
    """
    dims: Counter[int] = Counter()
    first_dim: dict[int, int] = {}
    per_task: Counter[str] = Counter()
    labels_int = True
    int_values: set[int] = set()
    y_min, y_max, y_sum, y_sq = np.inf, -np.inf, 0.0, 0.0
    events = labelled = with_ts = 0
    for line, raw in enumerate(log_items(path), start=1):
        if max_events is not None and events >= max_events:
            break
        obj = _as_object(raw, line)
        task_id, x, y = obj.get("task_id"), obj.get("x"), obj.get("y")
        if not isinstance(task_id, str) or not task_id:
            raise SchemaError(f"event {line}: task_id is missing or not a string")
        if not isinstance(x, list) or not x:
            raise SchemaError(f"event {line}: x is missing or not a list of numbers")
        for j, v in enumerate(x):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise SchemaError(
                    f"event {line}: feature {j} of x is {type(v).__name__} {v!r}; features "
                    "must be numbers (encode a category as 0/1 columns)"
                )
        dims[len(x)] += 1
        first_dim.setdefault(len(x), line)
        events += 1
        per_task[task_id] += 1
        with_ts += obj.get("ts") is not None
        if y is None:
            continue
        if isinstance(y, bool) or not isinstance(y, int | float):
            raise SchemaError(
                f"event {line}: label y is {type(y).__name__} {y!r}; labels are numbers "
                "(a regression value, or a class index 0..C-1)"
            )
        labelled += 1
        if isinstance(y, int):
            if len(int_values) <= MAX_CLASSES:
                int_values.add(y)
        else:
            labels_int = False
        yf = float(y)
        y_min, y_max, y_sum, y_sq = min(y_min, yf), max(y_max, yf), y_sum + yf, y_sq + yf * yf
    if not events:
        raise SchemaError(f"{path} holds no event")
    if len(dims) > 1:
        parts = ", ".join(
            f"{d} values in {n} events (first: event {first_dim[d]})" for d, n in dims.most_common()
        )
        raise SchemaError(f"x has mixed dimensions: {parts}; every event needs the same x_dim")
    if len(per_task) < 2:
        raise SchemaError(
            f"{path} holds one task ({next(iter(per_task))!r}): meta-learning needs many tasks "
            "(group events by task_id: a customer, a device, a store...)"
        )
    if not labelled:
        raise SchemaError(f"{path} holds no labelled event (no y): nothing to learn from")
    x_dim = next(iter(dims))
    n_cls = len(int_values)
    is_classes = labels_int and 2 <= n_cls <= 20 and int_values == set(range(n_cls))
    schema = TaskSchema(
        x_dim=x_dim,
        target="classification" if is_classes else "regression",
        classes=[str(c) for c in range(n_cls)] if is_classes else None,
        time_ordered=with_ts == events,
    )
    mean = y_sum / labelled
    label: dict[str, Any] = {"min": y_min, "max": y_max, "mean": mean}
    label["std"] = float(np.sqrt(max(y_sq / labelled - mean * mean, 0.0)))
    if is_classes:
        label = {"classes": n_cls, "min": int(y_min), "max": int(y_max)}
    summary = LogSummary(
        events=events,
        labelled=labelled,
        tasks=len(per_task),
        examples_per_task=_quantiles(list(per_task.values())),
        label=label,
    )
    return schema, summary


def _as_object(raw: Any, line: int) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if len(raw) > MAX_EVENT_BYTES:
        raise SchemaError(f"event {line} is {len(raw)} bytes (limit {MAX_EVENT_BYTES})")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"event {line} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaError(f"event {line} is not a JSON object")
    return obj


# -- the task table ------------------------------------------------------------------------------
class TaskTable:
    """A log's labelled events grouped by task, on disk.

    ``x [N, d]`` float32, ``y [N]`` (float64 targets or int64 classes), ``ts [N]`` (NaN where
    absent) and ``pos [N]`` (stream position) are memmaps, rows sorted by task then stream
    position; task ``t`` owns rows ``offsets[t]:offsets[t + 1]``; ``task_ids[t]`` its id and
    ``splits[t]`` its split. ``close()`` (or ``with``) deletes the work directory.
    """

    def __init__(
        self,
        workdir: Path,
        schema: TaskSchema,
        task_ids: list[str],
        arrays: dict[str, np.ndarray],
        offsets: np.ndarray,
        seed: int,
        summary: LogSummary,
        owned: bool,
    ) -> None:
        self.workdir, self.schema, self.task_ids = workdir, schema, task_ids
        self.x, self.y, self.ts, self.pos = (arrays[k] for k in ("x", "y", "ts", "pos"))
        self.offsets, self.seed, self.summary, self._owned = offsets, seed, summary, owned
        self.splits = assign_splits(task_ids, seed)

    @property
    def n_tasks(self) -> int:
        return len(self.task_ids)

    def counts(self) -> np.ndarray:
        """Labelled examples per task ``[T]``."""
        return np.diff(self.offsets)

    def tasks_in(self, split: str) -> np.ndarray:
        """Indices of the tasks of one split."""
        return np.flatnonzero(self.splits == split)

    def rows(self, task: int) -> slice:
        return slice(int(self.offsets[task]), int(self.offsets[task + 1]))

    def split_rows(self, split: str) -> np.ndarray:
        """Row indices of every labelled event of one split's tasks (grouped by task)."""
        parts = [np.arange(self.offsets[t], self.offsets[t + 1]) for t in self.tasks_in(split)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        for a in (self.x, self.y, self.ts, self.pos):
            mm = getattr(a, "_mmap", None)
            if mm is not None:
                mm.close()
        if self._owned:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TaskTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Columns:
    """Append-only binary column files, chunked (so a log is never one Python list)."""

    def __init__(self, workdir: Path, x_dim: int, y_dtype: Any, chunk: int = 65536) -> None:
        self.workdir, self.x_dim, self.y_dtype, self.chunk = workdir, x_dim, y_dtype, chunk
        self.files = {k: open(workdir / f"{k}.raw", "wb") for k in ("x", "y", "ts", "task", "pos")}  # noqa: SIM115
        self.buf: dict[str, list[Any]] = {k: [] for k in self.files}
        self.n = 0

    def add(self, x: tuple[float, ...], y: Any, ts: float | None, task: int, pos: int) -> None:
        b = self.buf
        b["x"].append(x)
        b["y"].append(y)
        b["ts"].append(np.nan if ts is None else ts)
        b["task"].append(task)
        b["pos"].append(pos)
        self.n += 1
        if len(b["x"]) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        b = self.buf
        if not b["x"]:
            return
        np.asarray(b["x"], dtype=np.float32).reshape(-1, self.x_dim).tofile(self.files["x"])
        np.asarray(b["y"], dtype=self.y_dtype).tofile(self.files["y"])
        np.asarray(b["ts"], dtype=np.float64).tofile(self.files["ts"])
        np.asarray(b["task"], dtype=np.int64).tofile(self.files["task"])
        np.asarray(b["pos"], dtype=np.int64).tofile(self.files["pos"])
        for v in b.values():
            v.clear()

    def finish(self) -> dict[str, np.ndarray]:
        self.flush()
        for f in self.files.values():
            f.close()
        dtypes = {"x": np.float32, "y": self.y_dtype, "ts": np.float64, "task": np.int64}
        dtypes["pos"] = np.int64
        out = {}
        for k, dt in dtypes.items():
            shape = (self.n, self.x_dim) if k == "x" else (self.n,)
            path = self.workdir / f"{k}.raw"
            out[k] = (
                np.memmap(path, dtype=dt, mode="r", shape=shape)
                if self.n
                else np.zeros(shape, dtype=dt)
            )
        return out


def read_tasks(
    path: str | Path,
    schema: TaskSchema,
    *,
    seed: int = 0,
    workdir: str | Path | None = None,
    skip_invalid: bool = False,
    progress: bool = False,
) -> TaskTable:
    """Stream a log into a :class:`TaskTable` (labelled events; unlabelled ones are counted;
    ``progress``: a progress bar of the events read, on stderr).

    Events the schema refuses (:func:`~stream_meta.events.parse_event`) raise a
    :class:`SchemaError` naming the first and counting them, unless ``skip_invalid``.
    """
    owned = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="stream-meta-tasks-")) if owned else Path(str(workdir))
    wd.mkdir(parents=True, exist_ok=True)
    ev_schema = schema.event_schema(max_bytes=MAX_EVENT_BYTES)
    y_dtype = np.int64 if schema.target == "classification" else np.float64
    cols = _Columns(wd, schema.x_dim, y_dtype)
    index: dict[str, int] = {}
    per_task: Counter[int] = Counter()
    rejected: Counter[str] = Counter()
    first_bad: tuple[int, Rejection] | None = None
    events = 0
    bar = _bar(progress)
    try:
        for pos, raw in enumerate(log_items(path)):
            events += 1
            if bar is not None and events % 10_000 == 0:
                bar.update(10_000)
            ev = parse_event(raw, ev_schema)
            if isinstance(ev, Rejection):
                rejected[ev.reason.value] += 1
                first_bad = first_bad or (pos + 1, ev)
                continue
            assert isinstance(ev, Event)
            if ev.y is None:
                continue
            t = index.setdefault(ev.task_id, len(index))
            per_task[t] += 1
            cols.add(ev.x, ev.y, ev.ts, t, pos)
        arrays = cols.finish()
        if bar is not None:
            bar.update(events % 10_000)
            bar.close()
    except BaseException:
        if owned:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    if first_bad is not None and not skip_invalid:
        if owned:
            shutil.rmtree(wd, ignore_errors=True)
        line, rej = first_bad
        kinds = ", ".join(f"{n} {r}" for r, n in rejected.most_common())
        raise SchemaError(
            f"{sum(rejected.values())} events do not fit the schema ({kinds}); the first, "
            f"event {line}: {rej.reason.value}: {rej.detail} (--skip-invalid trains on the rest)"
        )
    if first_bad is not None:
        log.warning(
            "skipped %d events that do not fit the schema: %s", rejected.total(), dict(rejected)
        )
    order = np.lexsort((arrays["pos"], arrays["task"])) if cols.n else np.zeros(0, dtype=np.int64)
    sorted_arrays = _sorted_on_disk(wd, arrays, order)
    counts = np.zeros(len(index), dtype=np.int64)
    for t, n in per_task.items():
        counts[t] = n
    offsets = np.concatenate([[0], np.cumsum(counts)])
    task_ids = [""] * len(index)
    for tid, t in index.items():
        task_ids[t] = tid
    summary = LogSummary(
        events=events,
        labelled=cols.n,
        tasks=len(index),
        examples_per_task=_quantiles(counts.tolist()),
        rejected=dict(rejected),
    )
    return TaskTable(wd, schema, task_ids, sorted_arrays, offsets, seed, summary, owned)


def _bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="reading", unit="ev", unit_scale=True, dynamic_ncols=True)


def _sorted_on_disk(
    wd: Path, arrays: dict[str, np.ndarray], order: np.ndarray, chunk: int = 1 << 16
) -> dict[str, np.ndarray]:
    """The columns reordered by ``order`` into new memmaps, a chunk at a time."""
    out: dict[str, np.ndarray] = {}
    for k, a in arrays.items():
        if k == "task":
            continue
        if not len(a):
            out[k] = a
            continue
        dst = np.lib.format.open_memmap(wd / f"{k}.npy", mode="w+", dtype=a.dtype, shape=a.shape)
        for i in range(0, len(order), chunk):
            idx = order[i : i + chunk]
            dst[i : i + len(idx)] = a[np.sort(idx)][np.argsort(np.argsort(idx))]
        dst.flush()
        del dst
        (wd / f"{k}.raw").unlink(missing_ok=True)  # its memmap stays readable until dropped
        out[k] = np.load(wd / f"{k}.npy", mmap_mode="r")
    (wd / "task.raw").unlink(missing_ok=True)
    return out
