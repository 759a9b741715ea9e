"""The built-in synthetic stream: events of many tasks, interleaved, as production sees them.

Tasks arrive over time: the first events start a handful of tasks, then each event starts a new
task with probability ``new_task_rate`` until ``tasks`` distinct tasks exist. Every other event
belongs to an existing task, picked with Zipf-like popularity: each task gets a random rank ``r``
(``1..tasks``) when the stream is built and weight ``r ** -zipf_s``, so a few tasks are very busy,
most are quiet, and old tasks keep recurring. With ``clusters > 0`` every task is a member of one
of ``clusters`` cluster centres (drawn with ``family.sample_params``) and its parameters are
``family.perturb(centre, cluster_spread)``: similar tasks under new ids. An event is labelled
(carries ``y``) with probability ``labelled_fraction``; the others are queries.

Events are generated in vectorised chunks; the stream is a pure function of its constructor
arguments (iterating twice gives the same events).

>>> from stream_meta.tasks import SinusoidFamily
>>> stream = TaskStream(SinusoidFamily(), tasks=50, clusters=5, seed=0)
>>> events = list(stream.iter_events(1000))
>>> first = events[0].event
>>> first["event_id"], first["task_id"], len(first["x"])
('e0', 't000000', 1)
>>> len({e.task_index for e in events}) <= 50
True
>>> events[:3] == list(stream.iter_events(3))
True
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.base import FloatArray, TaskFamily

__all__ = ["StreamEvent", "TaskStream"]

CHUNK_EVENTS = 4096
INITIAL_TASKS = 5


@dataclass(slots=True, frozen=True)
class StreamEvent:
    """One event of a ``TaskStream`` and what only the simulator knows about it.

    Attributes:
        event: the JSON-ready event: ``event_id``, ``task_id``, ``ts``, ``x`` (list of floats)
            and, for labelled events only, ``y`` (float, or int class label).
        truth: the true ``y``, also for queries (for scoring predictions).
        task_index: the task's index in the stream (``task_id`` is ``f"t{task_index:06d}"``).
        cluster: the task's cluster, ``None`` when the stream has no clusters.
        params: the task's read-only parameter row ``[p]`` (not compared by ``==``).
    """

    event: dict[str, Any]
    truth: float | int
    task_index: int
    cluster: int | None
    params: FloatArray = field(compare=False)

    @property
    def labelled(self) -> bool:
        return "y" in self.event


@dataclass(frozen=True, slots=True)
class _World:
    """Everything about the tasks, fixed by the seed: ``[clusters, p]``, ``[tasks]``, ..."""

    centres: FloatArray
    task_cluster: NDArray[np.int64]  # -1 without clusters
    task_params: FloatArray
    cum_weight: FloatArray  # cumulative popularity over tasks, in arrival order


@dataclass(slots=True)
class _Cursor:
    """Where event generation stands between chunks."""

    index: int = 0
    started: int = 0
    ts: float = 0.0


class TaskStream:
    """An infinite, seeded stream of interleaved task events; see the module docstring.

    Args:
        family: the task family the tasks come from.
        tasks: the most distinct tasks the stream ever starts.
        clusters: number of task clusters (0: every task drawn independently).
        cluster_spread: ``spread`` passed to ``family.perturb`` around a cluster centre.
        labelled_fraction: probability that an event carries its label.
        zipf_s: exponent of the Zipf popularity over tasks.
        new_task_rate: probability that an event starts a new task (while fewer than ``tasks``).
        rate: mean events per second of the synthetic clock ``ts`` (exponential gaps).
        seed: the only source of randomness.
    """

    def __init__(
        self,
        family: TaskFamily,
        *,
        tasks: int = 10_000,
        clusters: int = 200,
        cluster_spread: float = 0.05,
        labelled_fraction: float = 0.7,
        zipf_s: float = 1.1,
        new_task_rate: float = 0.05,
        rate: float = 1000.0,
        seed: int = 0,
    ) -> None:
        if tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {tasks}")
        if clusters < 0:
            raise ValueError(f"clusters must be >= 0, got {clusters}")
        if cluster_spread < 0:
            raise ValueError(f"cluster_spread must be >= 0, got {cluster_spread}")
        for name, p in (("labelled_fraction", labelled_fraction), ("new_task_rate", new_task_rate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if zipf_s < 0:
            raise ValueError(f"zipf_s must be >= 0, got {zipf_s}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.family = family
        self.tasks = int(tasks)
        self.clusters = int(clusters)
        self.cluster_spread = float(cluster_spread)
        self.labelled_fraction = float(labelled_fraction)
        self.zipf_s = float(zipf_s)
        self.new_task_rate = float(new_task_rate)
        self.rate = float(rate)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"TaskStream({self.family!r}, tasks={self.tasks}, clusters={self.clusters}, "
            f"cluster_spread={self.cluster_spread}, labelled_fraction={self.labelled_fraction}, "
            f"zipf_s={self.zipf_s}, new_task_rate={self.new_task_rate}, rate={self.rate}, "
            f"seed={self.seed})"
        )

    # -- the tasks -------------------------------------------------------------------------

    def _seeds(self) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
        world, events = np.random.SeedSequence(self.seed).spawn(2)
        return world, events

    @functools.cached_property
    def _world(self) -> _World:
        rng = np.random.default_rng(self._seeds()[0])
        fam = self.family
        if self.clusters > 0:
            centres = fam.sample_params(self.clusters, rng)
            task_cluster = rng.integers(0, self.clusters, size=self.tasks, dtype=np.int64)
            task_params = fam.perturb(centres[task_cluster], self.cluster_spread, rng)
        else:
            centres = np.zeros((0, fam.param_dim))
            task_cluster = np.full(self.tasks, -1, dtype=np.int64)
            task_params = fam.sample_params(self.tasks, rng)
        rank = rng.permutation(self.tasks) + 1.0
        cum_weight = np.cumsum(rank**-self.zipf_s)
        for arr in (centres, task_cluster, task_params, cum_weight):
            arr.setflags(write=False)
        return _World(centres, task_cluster, task_params, cum_weight)

    @property
    def centres(self) -> FloatArray:
        """Cluster centres ``[clusters, p]`` (read-only)."""
        return self._world.centres

    @property
    def task_params(self) -> FloatArray:
        """Parameters of every task the stream may start, in arrival order ``[tasks, p]``."""
        return self._world.task_params

    @property
    def task_clusters(self) -> NDArray[np.int64]:
        """Cluster of every task ``[tasks]``; -1 when the stream has no clusters."""
        return self._world.task_cluster

    @staticmethod
    def task_id(task_index: int) -> str:
        """The id under which task ``task_index`` appears in events."""
        return f"t{task_index:06d}"

    # -- the events ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[StreamEvent]:
        return self.iter_events()

    def iter_events(self, n: int | None = None) -> Iterator[StreamEvent]:
        """The stream from its start: ``n`` events, or endless when ``n`` is ``None``."""
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng(self._seeds()[1])
        cursor = _Cursor()
        while n is None or cursor.index < n:
            # Always draw whole chunks, so that a shorter run is a prefix of a longer one.
            count = CHUNK_EVENTS if n is None else min(CHUNK_EVENTS, n - cursor.index)
            yield from self._chunk(rng, cursor, count)

    def to_jsonl(self, path: str | os.PathLike[str], n: int) -> None:
        """Write the first ``n`` events' ``event`` dicts to ``path``, one JSON object a line."""
        with open(path, "w", encoding="utf-8") as out:
            for ev in self.iter_events(n):
                out.write(json.dumps(ev.event, separators=(",", ":")))
                out.write("\n")

    def _family_at(self, index: int) -> TaskFamily:
        """The family that generates the chunk starting at event ``index`` (a hook for drift)."""
        return self.family

    def _chunk(
        self, rng: np.random.Generator, cursor: _Cursor, count: int
    ) -> Iterator[StreamEvent]:
        """Draw the next ``CHUNK_EVENTS`` events, advance ``cursor``; the first ``count`` out."""
        world, size = self._world, CHUNK_EVENTS
        # which task each event belongs to
        wants_new = rng.random(size) < self.new_task_rate
        if cursor.index == 0:
            wants_new[: min(INITIAL_TASKS, size)] = True
        is_new = wants_new & (cursor.started + np.cumsum(wants_new) <= self.tasks)
        existing = cursor.started + np.cumsum(is_new)  # tasks started up to each event
        u = rng.random(size) * world.cum_weight[existing - 1]
        popular = np.minimum(np.searchsorted(world.cum_weight, u, side="right"), existing - 1)
        task = np.where(is_new, existing - 1, popular)
        # what each event holds
        labelled = rng.random(size) < self.labelled_fraction
        ts = cursor.ts + np.cumsum(rng.exponential(1.0 / self.rate, size))
        params = world.task_params[task]
        params.setflags(write=False)
        x, y = self._family_at(cursor.index).sample(params, 1, rng)

        base = cursor.index
        cursor.index += size
        cursor.started = int(existing[-1])
        cursor.ts = float(ts[-1])

        xs, ys, tss = x[:count, 0].tolist(), y[:count, 0].tolist(), ts[:count].tolist()
        tasks = task[:count].tolist()
        clusters = world.task_cluster[task[:count]].tolist() if self.clusters else [None] * count
        labels = labelled[:count].tolist()
        events = (
            {"event_id": f"e{i}", "task_id": f"t{t:06d}", "ts": when, "x": xi, "y": yi}
            if lab
            else {"event_id": f"e{i}", "task_id": f"t{t:06d}", "ts": when, "x": xi}
            for i, t, when, xi, yi, lab in zip(
                range(base, base + count), tasks, tss, xs, ys, labels, strict=True
            )
        )
        return map(StreamEvent, events, ys, tasks, clusters, params[:count])
