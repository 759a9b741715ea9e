"""Per-task state: bounded support buffers, the encoder's pooled sum, and idle-task eviction.

Memory stays flat with millions of tasks: a task's support buffer holds at most
``support_size`` examples (the most recent, or a uniform reservoir sample of all it has seen),
and the store keeps at most ``max_live_tasks`` task states (least recently seen evicted first)
or drops tasks idle for longer than ``ttl_s``. An evicted task's embedding stays in the FAISS
index, so it keeps helping its neighbours and is served from it if it comes back.

Besides the support buffer a task holds its pooled encoder state ``(feature_sum, n)`` (float64,
so incremental add/subtract does not drift), its embedding and a few scalars: about 1.8 KB with
the default sizes (``TaskStore.bytes_per_task`` estimates it; ``make bench`` measures it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np


class TaskState:
    """One live task. Mutated only by :class:`TaskStore` and the engine."""

    __slots__ = (
        "embedding",
        "feature_sum",
        "key",
        "last_seen",
        "n",
        "seen",
        "slot",
        "task_id",
        "version",
        "xs",
        "ys",
    )

    def __init__(self, task_id: str, key: int, feat_dim: int) -> None:
        self.task_id = task_id
        self.key = key
        self.xs: np.ndarray | None = None  # [support_size, x_dim], allocated on first example
        self.ys: np.ndarray | None = None  # [support_size]
        self.n = 0  # examples in the buffer
        self.seen = 0  # labelled examples ever learned
        self.feature_sum = np.zeros(feat_dim, dtype=np.float64)
        self.embedding: np.ndarray | None = None  # [E] float32, None until computed
        self.version = 0  # bumped whenever the support set changes
        self.slot = -1  # row in the engine's weights cache, -1 = none
        self.last_seen = 0.0


class TaskStore:
    """Live task states keyed by task id, in least-recently-seen order."""

    def __init__(
        self,
        *,
        x_dim: int,
        feat_dim: int,
        support_size: int,
        policy: Literal["recent", "reservoir"] = "recent",
        max_live_tasks: int = 100_000,
        ttl_s: float | None = None,
        y_dtype: type = np.float32,
        key: Callable[[str], int] = hash,
        seed: int = 0,
    ) -> None:
        self.x_dim, self.feat_dim, self.support_size = x_dim, feat_dim, support_size
        self.policy, self.max_live_tasks, self.ttl_s = policy, max_live_tasks, ttl_s
        self.y_dtype = y_dtype
        self._key = key  # task id -> int64 key (the index's), computed once per task
        self._rng = np.random.default_rng(seed)
        self._tasks: OrderedDict[str, TaskState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def __iter__(self) -> Iterator[TaskState]:
        return iter(self._tasks.values())

    def get(self, task_id: str) -> TaskState | None:
        return self._tasks.get(task_id)

    def touch(self, task_id: str, now: float) -> tuple[TaskState, bool]:
        """The task's state (created if new), marked as most recently seen; ``(state, created)``."""
        state = self._tasks.get(task_id)
        created = state is None
        if state is None:
            state = TaskState(task_id, self._key(task_id), self.feat_dim)
            self._tasks[task_id] = state
        else:
            self._tasks.move_to_end(task_id)
        state.last_seen = now
        return state, created

    def add_example(
        self, state: TaskState, x: Sequence[float] | np.ndarray, y: float | int
    ) -> tuple[bool, tuple[np.ndarray, float | int] | None]:
        """Learn one example: ``(kept, evicted)``.

        ``kept`` is False only for a reservoir buffer that declined the example (the support
        set is then unchanged); ``evicted`` is the example that left the buffer, if one did.
        """
        if state.xs is None or state.ys is None:
            state.xs = np.zeros((self.support_size, self.x_dim), dtype=np.float32)
            state.ys = np.zeros(self.support_size, dtype=self.y_dtype)
        state.seen += 1
        state.version += 1
        if state.n < self.support_size:
            slot = state.n
            state.n += 1
            evicted = None
        else:
            if self.policy == "recent":
                slot = (state.seen - 1) % self.support_size
            else:  # reservoir (Vitter's algorithm R): keep each seen example with equal chance
                j = int(self._rng.integers(0, state.seen))
                if j >= self.support_size:
                    state.version -= 1  # not kept: the support set is unchanged
                    return False, None
                slot = j
            evicted = (state.xs[slot].copy(), state.ys[slot].tolist())
        state.xs[slot] = x
        state.ys[slot] = y
        return True, evicted

    def evict(self, now: float) -> list[TaskState]:
        """Drop tasks over the live cap (least recently seen first) or idle past the TTL."""
        out: list[TaskState] = []
        while len(self._tasks) > self.max_live_tasks:
            out.append(self._tasks.popitem(last=False)[1])
        if self.ttl_s is not None:
            horizon = now - self.ttl_s
            while self._tasks:
                oldest = next(iter(self._tasks.values()))
                if oldest.last_seen >= horizon:
                    break
                out.append(self._tasks.popitem(last=False)[1])
        return out

    def bytes_per_task(self, embed_dim: int) -> int:
        """Approximate bytes a live task holds besides its support buffer."""
        import sys

        probe = TaskState("t" * 12, 1, self.feat_dim)
        probe.embedding = np.zeros(embed_dim, dtype=np.float32)
        fixed = sys.getsizeof(probe) + sys.getsizeof(probe.task_id) + 2 * 8
        arrays = probe.feature_sum.nbytes + probe.embedding.nbytes + 2 * 112  # ndarray headers
        dict_entry = 100  # OrderedDict slot + linked-list node
        return fixed + arrays + dict_entry
