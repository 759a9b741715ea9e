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

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import numpy as np

from stream_meta.packing import pack_strings, unpack_strings


class TaskState:
    """One live task. Mutated only by :class:`TaskStore` and the engine."""

    __slots__ = (
        "embedding",
        "evidence",
        "feature_sum",
        "key",
        "last_seen",
        "n",
        "offered",
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
        self.offered = 0  # examples seen when last offered to the retrieval bank
        self.feature_sum = np.zeros(feat_dim, dtype=np.float64)
        self.embedding: np.ndarray | None = None  # [E] float32, None until computed
        self.version = 0  # bumped whenever the support set changes
        self.slot = -1  # row in the engine's weights cache, -1 = none
        #: log evidence of each served expert (stream_meta.experts), None: none yet / one expert
        self.evidence: np.ndarray | None = None
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

    def load(self, state: TaskState, xs: np.ndarray, ys: np.ndarray, seen: int) -> None:
        """Replace ``state``'s support set with ``xs [n, x_dim], ys [n]`` (buffer slot order, as
        :meth:`add_example` left it) after ``seen`` examples; the caller re-encodes it."""
        n = len(ys)
        if n > self.support_size or xs.shape != (n, self.x_dim) or seen < n:
            raise ValueError(
                f"a support set of {n} examples x {xs.shape[1:]} after {seen} does not fit "
                f"(support_size {self.support_size}, x_dim {self.x_dim})"
            )
        if state.xs is None or state.ys is None:
            state.xs = np.zeros((self.support_size, self.x_dim), dtype=np.float32)
            state.ys = np.zeros(self.support_size, dtype=self.y_dtype)
        state.xs[:n] = xs
        state.ys[:n] = ys
        state.n, state.seen = n, seen
        state.version += 1
        state.slot = -1

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

    # -- persistence ---------------------------------------------------------------------------
    def layout(self) -> dict[str, object]:
        """What a saved store must match to be restored into this one."""
        return {
            "x_dim": self.x_dim,
            "feat_dim": self.feat_dim,
            "support_size": self.support_size,
            "policy": self.policy,
            "y_dtype": np.dtype(self.y_dtype).str,
        }

    def to_arrays(self, embed_dim: int) -> dict[str, np.ndarray]:
        """Every live task as plain arrays, in least-recently-seen order (no pickle).

        Support buffers are saved in storage order, so a restored "recent" buffer overwrites
        the same slot next; the reservoir's random generator is saved too. Together with
        :meth:`restore` this reproduces the store exactly.
        """
        return self.capture(embed_dim)()

    def capture(self, embed_dim: int) -> Callable[[], dict[str, np.ndarray]]:
        """Take what :meth:`to_arrays` needs now, cheaply; the returned function builds the
        arrays later (e.g. in a writer thread) while the store keeps changing.

        Support buffers are copied (they are written in place); pooled sums and embeddings are
        only referenced, since the engine replaces them rather than writing into them.
        """
        states = list(self._tasks.values())
        rows = [
            (s.task_id, s.n, s.seen, s.version, s.last_seen, s.feature_sum, s.embedding)
            for s in states
        ]
        with_support = [s for s in states if s.n]
        xs = (
            np.concatenate([s.xs[: s.n] for s in with_support])  # type: ignore[index]
            if with_support
            else np.zeros((0, self.x_dim), dtype=np.float32)
        )
        ys = (
            np.concatenate([s.ys[: s.n] for s in with_support])  # type: ignore[index]
            if with_support
            else np.zeros(0, dtype=self.y_dtype)
        )
        rng = json.dumps(self._rng.bit_generator.state).encode()
        feat_dim = self.feat_dim

        def pack() -> dict[str, np.ndarray]:
            ids, n, seen, version, last_seen, fsums, embs = (
                zip(*rows, strict=True) if rows else ((),) * 7
            )
            utf8, offsets = pack_strings(ids)
            emb = np.zeros((len(rows), embed_dim), dtype=np.float32)
            has_emb = np.array([e is not None for e in embs], dtype=bool)
            if has_emb.any():
                emb[has_emb] = np.stack([e for e in embs if e is not None])
            return {
                "ids_utf8": utf8,
                "ids_offsets": offsets,
                "n": np.array(n, dtype=np.int64),
                "seen": np.array(seen, dtype=np.int64),
                "version": np.array(version, dtype=np.int64),
                "last_seen": np.array(last_seen, dtype=np.float64),
                "feature_sum": (
                    np.stack(fsums) if rows else np.zeros((0, feat_dim), dtype=np.float64)
                ),
                "embedding": emb,
                "has_embedding": has_emb,
                "xs": xs,
                "ys": ys,
                "rng": np.frombuffer(rng, dtype=np.uint8),
            }

        return pack

    def restore(self, arrays: Mapping[str, np.ndarray]) -> list[TaskState]:
        """Replace the store's content with :meth:`to_arrays` output; returns the states.

        Raises ``ValueError`` when the arrays are inconsistent (nothing is changed then).
        """
        ids = unpack_strings(arrays["ids_utf8"], arrays["ids_offsets"])
        t = len(ids)
        n = np.asarray(arrays["n"])
        xs, ys = np.asarray(arrays["xs"]), np.asarray(arrays["ys"])
        fsum, emb = np.asarray(arrays["feature_sum"]), np.asarray(arrays["embedding"])
        for name in ("n", "seen", "version", "last_seen", "has_embedding"):
            if np.asarray(arrays[name]).shape != (t,):
                raise ValueError(f"task array {name!r} does not have {t} rows")
        if fsum.shape != (t, self.feat_dim) or emb.ndim != 2 or len(emb) != t:
            raise ValueError("feature sums or embeddings do not match the task count")
        if np.any(n < 0) or np.any(n > self.support_size):
            raise ValueError(f"support sizes outside 0..{self.support_size}")
        total = int(n.sum())
        if xs.shape != (total, self.x_dim) or ys.shape != (total,):
            raise ValueError("support arrays do not match the support sizes")
        rng_state = json.loads(np.asarray(arrays["rng"]).tobytes().decode())
        rng = np.random.default_rng()
        rng.bit_generator.state = rng_state
        seen, version = arrays["seen"].tolist(), arrays["version"].tolist()
        last_seen, has_emb = arrays["last_seen"].tolist(), arrays["has_embedding"].tolist()
        tasks: OrderedDict[str, TaskState] = OrderedDict()
        bounds = np.concatenate([[0], np.cumsum(n)]).tolist()
        for i, task_id in enumerate(ids):
            state = TaskState(task_id, self._key(task_id), self.feat_dim)
            k = int(n[i])
            if k:
                state.xs = np.zeros((self.support_size, self.x_dim), dtype=np.float32)
                state.ys = np.zeros(self.support_size, dtype=self.y_dtype)
                state.xs[:k] = xs[bounds[i] : bounds[i + 1]]
                state.ys[:k] = ys[bounds[i] : bounds[i + 1]]
            state.n, state.seen, state.version = k, int(seen[i]), int(version[i])
            state.last_seen = float(last_seen[i])
            state.feature_sum = fsum[i].astype(np.float64, copy=True)
            state.embedding = emb[i].astype(np.float32, copy=True) if has_emb[i] else None
            tasks[task_id] = state
        if len(tasks) != t:
            raise ValueError("duplicate task ids")
        self._tasks, self._rng = tasks, rng
        return list(tasks.values())

    def bytes_per_task(self, embed_dim: int) -> int:
        """Approximate bytes a live task holds besides its support buffer."""
        import sys

        probe = TaskState("t" * 12, 1, self.feat_dim)
        probe.embedding = np.zeros(embed_dim, dtype=np.float32)
        fixed = sys.getsizeof(probe) + sys.getsizeof(probe.task_id) + 2 * 8
        arrays = probe.feature_sum.nbytes + probe.embedding.nbytes + 2 * 112  # ndarray headers
        dict_entry = 100  # OrderedDict slot + linked-list node
        return fixed + arrays + dict_entry
