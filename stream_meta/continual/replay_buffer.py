"""The replay buffer: labelled examples of a bounded sample of the tasks the stream has shown.

Meta-updates train on *tasks*, not on single events, so the buffer keeps whole tasks: up to
``max_examples`` labelled examples each (the first ones a task showed; a task's function does
not change, so later examples add little), in preallocated arrays. Two populations share them:

* the **recent window**: the last ``recent_tasks`` tasks to *arrive* (whose first labelled
  event had no support example before it), in arrival order; what the stream is like now;
* the **reservoir**: a uniform sample of ``reservoir_tasks`` of all the tasks that have left
  the recent window (Vitter's algorithm R over tasks); what the stream has been like.

A task that leaves the recent window is offered to the reservoir, which keeps it with
probability ``reservoir_tasks / offered``, replacing a random member. Memory is fixed:
``(recent_tasks + reservoir_tasks) * max_examples`` examples, allocated up front. A task the
buffer does not hold and that already had examples (an old task that was not sampled) is
ignored, so an old task never poses as a new one.

Every task records the stream position of its arrival (``first_seen``): a meta-update calls the
tasks that arrived after a drift "new" and the others "old" (see
:meth:`ReplaySnapshot.split`). The whole buffer is saved with the service's state checkpoint
(:meth:`to_arrays` / :meth:`restore`).

>>> import numpy as np
>>> buf = ReplayBuffer(x_dim=1, reservoir_tasks=2, recent_tasks=2, max_examples=3, seed=0)
>>> tasks, shots = ["a", "a", "b", "c", "a", "d", "a"], [0, 1, 0, 0, 2, 0, 3]
>>> buf.add(tasks, np.arange(7.0)[:, None], np.arange(7.0), shots=shots, first_index=range(7))
>>> buf.recent_ids(), buf.stats()["reservoir"]
(['c', 'd'], 2)
>>> snap = buf.snapshot()
>>> dict(zip(snap.task_ids, snap.n.tolist()))  # "a" keeps its first 3 examples
{'a': 3, 'b': 1, 'c': 1, 'd': 1}
>>> snap.y[snap.task_ids.index("a")].tolist(), snap.first_seen.tolist()
([0.0, 1.0, 4.0], [0, 2, 3, 5])
"""

from __future__ import annotations

import json
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["ReplayBuffer", "ReplaySnapshot"]

_FREE, _RECENT, _RESERVOIR = 0, 1, 2


@dataclass
class ReplaySnapshot:
    """A copy of the buffer's tasks (what a meta-update trains and validates on).

    Arrays are indexed by task: ``x [T, M, x_dim]``, ``y [T, M]``, ``n [T]`` (examples held),
    ``first_seen [T]`` (stream position of the task's arrival), ``recent [T]`` (in the recent
    window), ``task_ids``.
    """

    task_ids: list[str]
    x: NDArray[np.float32]
    y: NDArray[Any]
    n: NDArray[np.int64]
    first_seen: NDArray[np.int64]
    recent: NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.task_ids)

    def split(self, new_from: int, holdout_fraction: float) -> dict[str, NDArray[np.int64]]:
        """Task rows by role: ``train_new``, ``train_old``, ``val_new``, ``val_old``.

        New tasks arrived at or after stream position ``new_from``. A task is held out for
        validation by a hash of its id (stable across runs and processes), never by chance.
        """
        h = np.array([zlib.crc32(t.encode()) % 10_000 for t in self.task_ids], dtype=np.int64)
        held = h < round(holdout_fraction * 10_000)
        new = self.first_seen >= new_from
        rows = np.arange(len(self))
        return {
            "train_new": rows[new & ~held],
            "train_old": rows[~new & ~held],
            "val_new": rows[new & held],
            "val_old": rows[~new & held],
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "ids": np.array(self.task_ids, dtype=np.str_),
            "x": self.x,
            "y": self.y,
            "n": self.n,
            "first_seen": self.first_seen,
            "recent": self.recent,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ReplaySnapshot:
        return cls(
            task_ids=[str(t) for t in arrays["ids"].tolist()],
            x=np.asarray(arrays["x"], dtype=np.float32),
            y=np.asarray(arrays["y"]),
            n=np.asarray(arrays["n"], dtype=np.int64),
            first_seen=np.asarray(arrays["first_seen"], dtype=np.int64),
            recent=np.asarray(arrays["recent"], dtype=bool),
        )


class ReplayBuffer:
    """Bounded replay of whole tasks; see the module docstring.

    Parameters
    ----------
    x_dim:
        Feature dimension of the events.
    y_dtype:
        ``float32`` (regression) or ``int64`` (class labels).
    reservoir_tasks, recent_tasks:
        Capacities of the reservoir and of the recent window (tasks).
    max_examples:
        Examples kept per task.
    """

    def __init__(
        self,
        x_dim: int,
        *,
        y_dtype: Any = np.float32,
        reservoir_tasks: int = 2000,
        recent_tasks: int = 500,
        max_examples: int = 32,
        seed: int = 0,
    ) -> None:
        if reservoir_tasks < 0 or recent_tasks < 1 or max_examples < 2:
            raise ValueError(
                "replay needs recent_tasks >= 1, reservoir_tasks >= 0 and max_examples >= 2"
            )
        self.x_dim, self.max_examples = x_dim, max_examples
        self.reservoir_tasks, self.recent_tasks = reservoir_tasks, recent_tasks
        cap = reservoir_tasks + recent_tasks
        self._x = np.zeros((cap, max_examples, x_dim), dtype=np.float32)
        self._y = np.zeros((cap, max_examples), dtype=y_dtype)
        self._n = np.zeros(cap, dtype=np.int64)
        self._first = np.zeros(cap, dtype=np.int64)
        self._role = np.zeros(cap, dtype=np.int8)
        self._ids: list[str | None] = [None] * cap
        self._slot: dict[str, int] = {}
        self._recent: deque[int] = deque()
        self._reservoir: list[int] = []
        self._free = list(range(cap - 1, -1, -1))
        self.offered = 0  # tasks offered to the reservoir so far
        self.arrivals = 0  # tasks that entered the recent window so far
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        return self._x.nbytes + self._y.nbytes

    def recent_ids(self) -> list[str]:
        """Task ids of the recent window, oldest arrival first."""
        return [self._ids[s] for s in self._recent]  # type: ignore[misc]

    def recent_first_seen(self) -> int | None:
        """Stream position of the oldest arrival in the recent window (None when empty)."""
        return int(self._first[self._recent[0]]) if self._recent else None

    # -- intake ------------------------------------------------------------------------------
    def observe(self, result: Any, start: int) -> None:
        """Take the labelled events of an engine :class:`~stream_meta.engine.BatchResult` whose
        first input was at stream position ``start``."""
        out = result.outputs
        if out is None or out.x is None or not any(out.labelled):
            return
        pos = np.flatnonzero(np.asarray(result.order) >= 0)
        lab = np.flatnonzero(np.asarray(out.labelled, dtype=bool))
        self.add(
            [out.task_ids[i] for i in lab],
            out.x[lab],
            [out.y[i] for i in lab],
            shots=np.asarray(out.shots)[lab],
            first_index=start + pos[lab],
        )

    def add(
        self,
        task_ids: Sequence[str],
        x: NDArray[np.float32],
        y: Sequence[Any],
        *,
        shots: Sequence[int] | NDArray[np.int64],
        first_index: Sequence[int] | NDArray[np.int64] | int,
    ) -> None:
        """Labelled examples in stream order; ``shots[i]`` is the support size example ``i``'s
        task had when it arrived (0: the task arrives), ``first_index`` its stream position."""
        index = np.broadcast_to(np.asarray(first_index, dtype=np.int64), (len(task_ids),))
        slot_of, n, cap = self._slot, self._n, self.max_examples
        for i, tid in enumerate(task_ids):
            slot = slot_of.get(tid)
            if slot is None:
                if shots[i]:
                    continue  # an old task the buffer did not keep
                slot = self._arrive(tid, int(index[i]))
            k = n[slot]
            if k < cap:
                self._x[slot, k] = x[i]
                self._y[slot, k] = y[i]
                n[slot] = k + 1

    def _arrive(self, task_id: str, index: int) -> int:
        if len(self._recent) >= self.recent_tasks:
            self._offer(self._recent.popleft())
        slot = self._free.pop()
        self._ids[slot], self._first[slot], self._n[slot] = task_id, index, 0
        self._role[slot] = _RECENT
        self._slot[task_id] = slot
        self._recent.append(slot)
        self.arrivals += 1
        return slot

    def _offer(self, slot: int) -> None:
        """Algorithm R: the ``offered``-th candidate is kept with probability cap / offered."""
        self.offered += 1
        if len(self._reservoir) < self.reservoir_tasks:
            self._reservoir.append(slot)
            self._role[slot] = _RESERVOIR
            return
        j = int(self._rng.integers(self.offered))
        if j < self.reservoir_tasks:
            self._release(self._reservoir[j])
            self._reservoir[j] = slot
            self._role[slot] = _RESERVOIR
        else:
            self._release(slot)

    def _release(self, slot: int) -> None:
        del self._slot[self._ids[slot]]  # type: ignore[arg-type]
        self._ids[slot] = None
        self._role[slot] = _FREE
        self._n[slot] = 0
        self._free.append(slot)

    # -- views -------------------------------------------------------------------------------
    def snapshot(self, min_examples: int = 1) -> ReplaySnapshot:
        """A copy of every held task with at least ``min_examples`` examples."""
        slots = np.array(
            [s for s in (*self._reservoir, *self._recent) if self._n[s] >= min_examples],
            dtype=np.int64,
        )
        return ReplaySnapshot(
            task_ids=[str(self._ids[s]) for s in slots.tolist()],
            x=self._x[slots].copy(),
            y=self._y[slots].copy(),
            n=self._n[slots].copy(),
            first_seen=self._first[slots].copy(),
            recent=self._role[slots] == _RECENT,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "tasks": len(self),
            "recent": len(self._recent),
            "reservoir": len(self._reservoir),
            "examples": int(self._n.sum()),
            "arrivals": self.arrivals,
            "offered": self.offered,
        }

    # -- persistence -------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The buffer as named arrays (exact: restoring continues the same sampling)."""
        recent = np.array(list(self._recent), dtype=np.int64)
        reservoir = np.array(self._reservoir, dtype=np.int64)
        used = np.concatenate([reservoir, recent])
        state = self._rng.bit_generator.state
        return {
            "shape": np.array(
                [self.x_dim, self.max_examples, self.reservoir_tasks, self.recent_tasks],
                dtype=np.int64,
            ),
            "counters": np.array([self.offered, self.arrivals], dtype=np.int64),
            "ids": np.array([self._ids[s] for s in used.tolist()], dtype=np.str_),
            "x": self._x[used].copy(),
            "y": self._y[used].copy(),
            "n": self._n[used].copy(),
            "first_seen": self._first[used].copy(),
            "n_reservoir": np.array([len(reservoir)], dtype=np.int64),
            "rng": np.frombuffer(json.dumps(state).encode(), dtype=np.uint8).copy(),
        }

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load :meth:`to_arrays` output; ``ValueError`` (buffer unchanged) if it does not fit."""
        shape = np.asarray(arrays["shape"]).tolist()
        if shape[:2] != [self.x_dim, self.max_examples]:
            raise ValueError(
                f"replay buffer of x_dim {shape[0]} with {shape[1]} examples a task does not "
                f"fit this one (x_dim {self.x_dim}, {self.max_examples} examples)"
            )
        ids = [str(t) for t in np.asarray(arrays["ids"]).tolist()]
        n_res = int(np.asarray(arrays["n_reservoir"])[0])
        # a smaller capacity than saved keeps the newest recent tasks and a prefix of the
        # reservoir (still a uniform sample)
        keep_res = list(range(min(n_res, self.reservoir_tasks)))
        keep_recent = list(range(n_res, len(ids)))[-self.recent_tasks :]
        fresh = ReplayBuffer(
            self.x_dim,
            y_dtype=self._y.dtype,
            reservoir_tasks=self.reservoir_tasks,
            recent_tasks=self.recent_tasks,
            max_examples=self.max_examples,
            seed=self.seed,
        )
        for rows, role in ((keep_res, _RESERVOIR), (keep_recent, _RECENT)):
            for r in rows:
                slot = fresh._free.pop()
                fresh._ids[slot] = ids[r]
                fresh._slot[ids[r]] = slot
                fresh._x[slot] = arrays["x"][r]
                fresh._y[slot] = arrays["y"][r]
                fresh._n[slot] = int(arrays["n"][r])
                fresh._first[slot] = int(arrays["first_seen"][r])
                fresh._role[slot] = role
                (fresh._reservoir.append if role == _RESERVOIR else fresh._recent.append)(slot)
        fresh.offered, fresh.arrivals = (int(v) for v in np.asarray(arrays["counters"]))
        fresh._rng.bit_generator.state = json.loads(bytes(np.asarray(arrays["rng"], np.uint8)))
        self.__dict__.update(fresh.__dict__)
