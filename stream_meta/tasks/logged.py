"""Episodes from a user's recorded tasks (a :class:`~stream_meta.tasklog.TaskTable`).

The built-in families *simulate* tasks; a user's tasks are real and finite, so an episode is
cut from one recorded task: a support set of its examples and queries from the same task's
*other* examples. Episodes reproduce what prequential serving sees:

* a task is drawn with probability proportional to its number of labelled events, and its
  support size uniformly in ``0..n-1``: exactly the distribution of ``(task, shots)`` over the
  predictions of a stream in which every labelled event is predicted once before it is learned
  (a task with 100 events is predicted 100 times, at 0..99 shots). Support sets larger than
  ``max_shots`` keep ``max_shots`` examples, like the engine's bounded support buffer;
* with ``time_ordered`` the support is the task's most recent examples before a point in time
  and the queries are the ones after it (never the past predicted from the future); otherwise
  the task's examples are shuffled first;
* the *bank* (the tasks retrieval may find) holds other training tasks with their examples,
  never the episode's own tasks (a task must not retrieve its own queries).

Shapes follow :mod:`stream_meta.meta_training`: ``xs [B, S, d]``, ``ys [B, S]``, ``smask``,
``xq [B, Q, d]``, ``yq [B, Q]``, ``qmask``, and the task's whole data for the contrastive term
``x_all [B, S + Q, d]`` with ``amask``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_meta.tasklog import TaskTable

__all__ = ["LoggedEpisodes"]


class LoggedEpisodes:
    """Banks and episodes of one split's tasks (``bank()`` then ``episodes(bank["centres"])``,
    the sampler interface of :func:`~stream_meta.meta_training.meta_train`)."""

    def __init__(
        self,
        table: TaskTable,
        tasks: np.ndarray,
        *,
        batch_tasks: int,
        bank_tasks: int,
        max_shots: int,
        query_points: int,
        rng: np.random.Generator,
        time_ordered: bool = False,
    ) -> None:
        if len(tasks) < 2:
            raise ValueError(f"need at least 2 tasks to sample episodes, got {len(tasks)}")
        self.table, self.tasks, self.rng = table, np.asarray(tasks), rng
        self.counts = table.counts()[self.tasks]
        self.batch_tasks = max(1, min(batch_tasks, len(self.tasks) // 2))
        self.bank_tasks = max(1, min(bank_tasks, len(self.tasks) - self.batch_tasks))
        self.max_shots, self.query_points = max_shots, query_points
        self.time_ordered = time_ordered
        self.y_dtype = table.y.dtype
        self._p = self.counts / self.counts.sum()

    # -- the sampler interface ----------------------------------------------------------------
    def bank(self) -> dict[str, np.ndarray]:
        """Bank tasks with up to ``max_shots`` examples each; ``centres`` carries the episode
        tasks (drawn first, so the bank never holds them)."""
        rng = self.rng
        episode = rng.choice(len(self.tasks), self.batch_tasks, replace=True, p=self._p)
        others = np.setdiff1d(np.arange(len(self.tasks)), episode)
        if len(others) == 0:
            others = np.arange(len(self.tasks))
        take = rng.choice(others, min(self.bank_tasks, len(others)), replace=False)
        x, y, mask = self.task_sets(self.tasks[take], self.max_shots)
        return {"centres": episode, "x": x, "y": y, "mask": mask}

    def episodes(self, centres: np.ndarray) -> dict[str, np.ndarray]:
        rng = self.rng
        shots = np.array([rng.integers(0, n) for n in self.counts[centres]])
        return self.cut(self.tasks[centres], shots)

    # -- building blocks ----------------------------------------------------------------------
    def task_sets(self, tasks: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
        """Up to ``size`` examples of each task (its most recent ones when time-ordered, else a
        random subset): ``x [B, size, d], y [B, size], mask [B, size]``."""
        t = self.table
        x = np.zeros((len(tasks), size, t.schema.x_dim), dtype=np.float32)
        y = np.zeros((len(tasks), size), dtype=self.y_dtype)
        mask = np.zeros((len(tasks), size), dtype=np.float32)
        for i, task in enumerate(tasks.tolist()):
            rows = self._rows(task)
            rows = rows[-size:] if self.time_ordered else rows[:size]
            n = len(rows)
            x[i, :n], y[i, :n], mask[i, :n] = t.x[rows], t.y[rows], 1.0
        return x, y, mask

    def cut(self, tasks: np.ndarray, shots: np.ndarray) -> dict[str, np.ndarray]:
        """One episode per ``(task, shots)``: the support and the queries after it."""
        t, s_max, q_max = self.table, self.max_shots, self.query_points
        b, d = len(tasks), t.schema.x_dim
        xs = np.zeros((b, s_max, d), dtype=np.float32)
        ys = np.zeros((b, s_max), dtype=self.y_dtype)
        smask = np.zeros((b, s_max), dtype=np.float32)
        xq = np.zeros((b, q_max, d), dtype=np.float32)
        yq = np.zeros((b, q_max), dtype=self.y_dtype)
        qmask = np.zeros((b, q_max), dtype=np.float32)
        for i, (task, s) in enumerate(zip(tasks.tolist(), shots.tolist(), strict=True)):
            rows = self._rows(task)
            sup = rows[max(0, s - s_max) : s]
            qry = rows[s : s + q_max]
            xs[i, : len(sup)], ys[i, : len(sup)], smask[i, : len(sup)] = t.x[sup], t.y[sup], 1.0
            xq[i, : len(qry)], yq[i, : len(qry)], qmask[i, : len(qry)] = t.x[qry], t.y[qry], 1.0
        return {
            "xs": xs,
            "ys": ys,
            "smask": smask,
            "xq": xq,
            "yq": yq,
            "qmask": qmask,
            "x_all": np.concatenate([xs, xq], axis=1),
            "y_all": np.concatenate([ys, yq], axis=1),
            "amask": np.concatenate([smask, qmask], axis=1),
        }

    def _rows(self, task: int) -> np.ndarray:
        r = self.table.rows(task)
        rows = np.arange(r.start, r.stop)
        if self.time_ordered:
            ts = self.table.ts[rows]
            if not np.isnan(ts).any():
                return rows[np.argsort(ts, kind="stable")]
            return rows  # stream order
        return self.rng.permutation(rows)


def fixed_episodes(
    sampler: LoggedEpisodes, per_task: int, seed: int
) -> dict[str, np.ndarray] | None:
    """A fixed set of episodes of the sampler's tasks (``per_task`` support sizes each, drawn
    like training's): the validation set early stopping compares checkpoints on."""
    rng = np.random.default_rng(seed)
    saved, sampler.rng = sampler.rng, rng
    try:
        tasks, shots = [], []
        for task, n in zip(sampler.tasks.tolist(), sampler.counts.tolist(), strict=True):
            k = min(per_task, n)
            tasks += [task] * k
            shots += rng.choice(n, k, replace=False).tolist()
        if not tasks:
            return None
        return sampler.cut(np.asarray(tasks), np.asarray(shots))
    finally:
        sampler.rng = saved


def describe(sampler: LoggedEpisodes) -> dict[str, Any]:
    return {
        "tasks": len(sampler.tasks),
        "batch_tasks": sampler.batch_tasks,
        "bank_tasks": sampler.bank_tasks,
        "max_shots": sampler.max_shots,
        "query_points": sampler.query_points,
        "time_ordered": sampler.time_ordered,
    }
