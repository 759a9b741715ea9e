"""Streams of related tasks: what retrieval by evidence (issue 15) must exploit, and a control.

A *history* phase, then a *probe* phase, both interleaved across tasks as production sees them:

* history: ``history_tasks`` tasks, each with ``history_examples`` labelled examples. With
  ``related=True`` every task belongs to one of ``clusters`` centres, drawn with
  ``family.sample_params`` from this stream's own seed (so never the centres of a training run),
  and its parameters are ``family.perturb(centre, jitter)``;
* probe: ``probe_tasks`` new tasks of the same clusters (fresh jitter) under new ids: a task
  seen before, come back under another name. Each is fed its support examples one at a time;
  once it holds ``n`` of them, for every ``n`` of ``shots``, ``queries`` unlabelled events
  follow whose truth only the simulator knows (``RelatedEvent.truth``).

``related=False`` is the control: the same shapes, event order and nominal cluster labels, but
every task's parameters are drawn independently from the family (a "same-cluster" task is then
just another task). So a method that helps on the related stream by exploiting the relations,
and not by some other effect, shows no gain on the control.

Every draw comes from ``np.random.SeedSequence(seed)``: the stream is a pure function of its
arguments. Any :class:`~stream_meta.tasks.TaskFamily` works (classification labels come out as
ints in ``y`` and ``truth``).

>>> from stream_meta.tasks import SinusoidFamily
>>> stream = RelatedTaskStream(SinusoidFamily(), clusters=3, history_tasks=6,
...                            history_examples=4, probe_tasks=2, shots=(0, 2), queries=3)
>>> events = stream.events()
>>> len(events) == 6 * 4 + 2 * (2 + 2 * 3)
True
>>> [e.phase for e in events[23:25]]
['history', 'probe']
>>> first_query = next(e for e in events if e.query)
>>> sorted(first_query.event), first_query.shots
(['event_id', 'task_id', 'ts', 'x'], 0)
>>> stream.probe_query_x.shape  # [P, len(shots), Q, x_dim]
(2, 2, 3, 1)
>>> events == RelatedTaskStream(SinusoidFamily(), clusters=3, history_tasks=6,
...     history_examples=4, probe_tasks=2, shots=(0, 2), queries=3).events()
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.base import FloatArray, TaskFamily

__all__ = ["RelatedEvent", "RelatedTaskStream"]

Phase = Literal["history", "probe"]


@dataclass(frozen=True, slots=True)
class RelatedEvent:
    """One event of a :class:`RelatedTaskStream` and what only the simulator knows about it.

    Attributes:
        event: the JSON-ready event (``event_id``, ``task_id``, ``ts``, ``x``; ``y`` if labelled).
        truth: the true ``y``, also for queries.
        phase: ``"history"`` or ``"probe"``.
        task: the task's row in ``history_*`` or ``probe_*`` arrays (by ``phase``).
        cluster: the task's cluster (nominal on the control stream).
        shots: the task's support examples when the event arrives.
        shot_slot: for a probe query, its index into ``shots`` (else -1).
        query_slot: for a probe query, its index among the ``queries`` (else -1).
    """

    event: dict[str, Any]
    truth: float | int
    phase: Phase
    task: int
    cluster: int
    shots: int
    shot_slot: int = -1
    query_slot: int = -1

    @property
    def query(self) -> bool:
        return "y" not in self.event


@dataclass(frozen=True)
class _Tasks:
    """Parameters and examples of one phase: ``params [T, p]``, ``clusters [T]``, ``x [T, m,
    x_dim]``, ``y [T, m]``."""

    params: FloatArray
    clusters: NDArray[np.int64]
    x: NDArray[np.float32]
    y: NDArray[Any]


@dataclass(frozen=True)
class RelatedTaskStream:
    """A history of related tasks and probes of the same clusters; see the module docstring.

    Args:
        family: where tasks come from (``sample_params``, ``perturb``, ``sample``).
        related: ``False`` for the control stream (independent tasks, same shapes).
        clusters: number of cluster centres.
        jitter: the ``spread`` given to ``family.perturb`` around a centre.
        history_tasks: tasks of the history phase.
        history_examples: labelled examples of each history task.
        probe_tasks: tasks of the probe phase.
        shots: support sizes after which a probe task gets its queries (sorted, distinct, >= 0).
        queries: query events per probe task and shot count.
        rate: events per second of the synthetic clock ``ts``.
        seed: the only source of randomness.
    """

    family: TaskFamily
    related: bool = True
    clusters: int = 20
    jitter: float = 0.02
    history_tasks: int = 1000
    history_examples: int = 20
    probe_tasks: int = 200
    shots: tuple[int, ...] = (0, 1, 2, 5)
    queries: int = 10
    rate: float = 1000.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("clusters", "history_tasks", "history_examples", "probe_tasks", "queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        shots = tuple(int(s) for s in self.shots)
        if not shots or min(shots) < 0 or list(shots) != sorted(set(shots)):
            raise ValueError(f"shots must be distinct, sorted and >= 0, got {self.shots}")
        object.__setattr__(self, "shots", shots)
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")

    # -- the tasks -------------------------------------------------------------------------
    @functools.cached_property
    def _world(self) -> tuple[FloatArray, _Tasks, _Tasks, NDArray[np.float32], NDArray[Any]]:
        """Centres, both phases' tasks and the probes' query points, from the seed."""
        world, hist, probe, query = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(4)
        )
        fam = self.family
        centres = fam.sample_params(self.clusters, world)
        h_clusters = world.integers(0, self.clusters, self.history_tasks, dtype=np.int64)
        p_clusters = world.integers(0, self.clusters, self.probe_tasks, dtype=np.int64)
        if self.related:
            h_params = fam.perturb(centres[h_clusters], self.jitter, world)
            p_params = fam.perturb(centres[p_clusters], self.jitter, world)
        else:
            h_params = fam.sample_params(self.history_tasks, world)
            p_params = fam.sample_params(self.probe_tasks, world)
        hx, hy = fam.sample(h_params, self.history_examples, hist)
        px, py = fam.sample(p_params, max(max(self.shots), 1), probe)
        n_q = len(self.shots) * self.queries
        qx, qy = fam.sample(p_params, n_q, query)
        qx = qx.reshape(self.probe_tasks, len(self.shots), self.queries, fam.x_dim)
        qy = qy.reshape(self.probe_tasks, len(self.shots), self.queries)
        arrays = (centres, h_params, h_clusters, p_params, p_clusters, hx, hy, px, py, qx, qy)
        for a in arrays:
            a.setflags(write=False)
        return (
            centres,
            _Tasks(h_params, h_clusters, hx, hy),
            _Tasks(p_params, p_clusters, px, py),
            qx,
            qy,
        )

    @property
    def centres(self) -> FloatArray:
        """Cluster centres ``[clusters, p]`` (unused by the control's tasks)."""
        return self._world[0]

    @property
    def history(self) -> _Tasks:
        """History tasks: ``params [H, p]``, ``clusters [H]``, examples ``x [H, m, x_dim]``,
        ``y [H, m]`` in the order each task's events carry them."""
        return self._world[1]

    @property
    def probes(self) -> _Tasks:
        """Probe tasks: ``params [P, p]``, ``clusters [P]``, support examples ``x [P, S, x_dim]``,
        ``y [P, S]`` with ``S = max(shots)`` (at least 1), fed in this order."""
        return self._world[2]

    @property
    def probe_query_x(self) -> NDArray[np.float32]:
        """Query inputs ``[P, len(shots), Q, x_dim]``: for each probe and shot count."""
        return self._world[3]

    @property
    def probe_query_y(self) -> NDArray[Any]:
        """The queries' truth ``[P, len(shots), Q]``."""
        return self._world[4]

    @staticmethod
    def history_id(task: int) -> str:
        return f"h{task:06d}"

    @staticmethod
    def probe_id(task: int) -> str:
        return f"p{task:06d}"

    # -- the events ------------------------------------------------------------------------
    def events(self) -> list[RelatedEvent]:
        """Every event, history then probes (a new list; the draws are cached)."""
        return list(self._events)

    @functools.cached_property
    def _events(self) -> tuple[RelatedEvent, ...]:
        return (*self._history_events(), *self._probe_events())

    def _interleave(self, tasks: int, per_task: int, rng: np.random.Generator) -> NDArray[Any]:
        """``[tasks * per_task, 2]`` (task, its k-th event) in a random interleaving that keeps
        each task's own order."""
        order = rng.permutation(np.repeat(np.arange(tasks), per_task))
        kth = np.empty_like(order)
        seen = np.zeros(tasks, dtype=np.int64)
        for i, t in enumerate(order.tolist()):
            kth[i] = seen[t]
            seen[t] += 1
        return np.stack([order, kth], axis=1)

    def _order_rng(self, phase: int) -> np.random.Generator:
        """The interleaving of ``phase`` (0: history, 1: probes), apart from the tasks' draws."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, 1, phase]))

    def _history_events(self) -> list[RelatedEvent]:
        h = self.history
        rng = self._order_rng(0)
        pairs = self._interleave(self.history_tasks, self.history_examples, rng).tolist()
        xs, ys, clusters = h.x.tolist(), h.y.tolist(), h.clusters.tolist()
        out = []
        for i, (t, k) in enumerate(pairs):
            y = ys[t][k]
            ev = {
                "event_id": f"e{i}",
                "task_id": self.history_id(t),
                "ts": i / self.rate,
                "x": xs[t][k],
                "y": y,
            }
            out.append(RelatedEvent(ev, y, "history", t, clusters[t], k))
        return out

    def _probe_script(self) -> list[tuple[int, int, int]]:
        """One probe task's events in order: ``(support index or -1, shot slot, query slot)``."""
        script: list[tuple[int, int, int]] = []
        have = 0
        for slot, n in enumerate(self.shots):
            script += [(k, -1, -1) for k in range(have, n)]
            have = n
            script += [(-1, slot, q) for q in range(self.queries)]
        return script

    def _probe_events(self) -> list[RelatedEvent]:
        p = self.probes
        script = self._probe_script()
        rng = self._order_rng(1)
        pairs = self._interleave(self.probe_tasks, len(script), rng).tolist()
        base = self.history_tasks * self.history_examples
        sx, sy, clusters = p.x.tolist(), p.y.tolist(), p.clusters.tolist()
        qx, qy = self.probe_query_x.tolist(), self.probe_query_y.tolist()
        have = [0] * self.probe_tasks
        out = []
        for j, (t, k) in enumerate(pairs):
            i = base + j
            support, slot, q = script[k]
            ev: dict[str, Any] = {
                "event_id": f"e{i}",
                "task_id": self.probe_id(t),
                "ts": i / self.rate,
            }
            if support >= 0:
                ev["x"], ev["y"] = sx[t][support], sy[t][support]
                out.append(RelatedEvent(ev, ev["y"], "probe", t, clusters[t], have[t]))
                have[t] += 1
            else:
                ev["x"] = qx[t][slot][q]
                truth = qy[t][slot][q]
                out.append(RelatedEvent(ev, truth, "probe", t, clusters[t], have[t], slot, q))
        return out

    def support_positions(self) -> NDArray[np.int64]:
        """``[P, max(shots)]``: each probe support example's position in :meth:`events`."""
        pos = np.full((self.probe_tasks, max(self.shots)), -1, dtype=np.int64)
        for i, e in enumerate(self._events):
            if e.phase == "probe" and not e.query:
                pos[e.task, e.shots] = i
        return pos

    def query_positions(self) -> NDArray[np.int64]:
        """``[P, len(shots), Q]``: each probe query's position in :meth:`events`."""
        pos = np.full((self.probe_tasks, len(self.shots), self.queries), -1, dtype=np.int64)
        for i, e in enumerate(self._events):
            if e.shot_slot >= 0:
                pos[e.task, e.shot_slot, e.query_slot] = i
        return pos
