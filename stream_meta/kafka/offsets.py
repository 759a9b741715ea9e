"""The serving loop's offset and recovery bookkeeping, apart from the loop itself.

:class:`Offsets` says, per partition of the events topic, where the service is: the next offset
whose outputs are acknowledged (``positions``), what this replica committed last
(``committed``) and where a restored state checkpoint says to resume (``resume`` until the
partition is assigned, ``resume_at`` while an assigned partition waits for its restore).

:class:`Recovery` holds what a changelog restore brought: the partitions paused until they are
restored, and for each restored task the offset of the last event its changelog copy reflects,
so that a redelivered event is predicted again but never learned twice. It forgets a
partition's tasks once the stream has passed all of them.

Both are plain data with small verbs; the service (:mod:`stream_meta.kafka.service`) calls them
from its loop and its rebalance callbacks. Partitions are ``TopicPartition``-like values with
``topic`` and ``partition`` (anything hashable and ordered works in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["Offsets", "Recovery"]


class Offsets:
    """Per-partition offsets of the events topic; see the module docstring.

    >>> o = Offsets.from_checkpoint({"ev:0": 10}, make=lambda t, p: (t, p))
    >>> o.assigned([("ev", 0)], wait_for_restore=False)
    {('ev', 0): 10}
    >>> o.advanced(("ev", 0), 14); o.to_commit({("ev", 0)})
    {('ev', 0): 15}
    >>> o.committed_now({("ev", 0): 15}); o.to_commit({("ev", 0)})
    {}
    """

    def __init__(self, resume: Mapping[Any, int] | None = None) -> None:
        self.positions: dict[Any, int] = {}  # partition -> next offset, outputs acknowledged
        self.committed: dict[Any, int] = {}  # partition -> offset this replica committed last
        self.resume: dict[Any, int] = dict(resume or {})  # from the restored checkpoint
        self.resume_at: dict[Any, int] = {}  # the same, for partitions waiting for a restore

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, int], make: Callable[[str, int], Any]) -> Offsets:
        """Offsets to resume from, as a state checkpoint keeps them (``"topic:partition"``)."""
        resume = {}
        for name, offset in saved.items():
            topic, _, part = name.rpartition(":")
            resume[make(topic, int(part))] = int(offset)
        return cls(resume)

    def checkpoint_view(self, positions: Mapping[Any, int]) -> dict[str, int]:
        """``positions`` as a state checkpoint keeps them."""
        return {f"{tp.topic}:{tp.partition}": o for tp, o in positions.items()}

    # -- rebalances ---------------------------------------------------------------------------
    def assigned(self, assigned: Iterable[Any], *, wait_for_restore: bool) -> dict[Any, int]:
        """Partitions just assigned; returns those to seek now to their checkpoint's offset.

        With a changelog (``wait_for_restore``) the checkpoint's offset waits in
        ``resume_at``: the group may have committed past it (a commit per batch), which the
        loop reads after the restore (:meth:`resume_point`), never in the rebalance callback.
        """
        seek = {}
        for tp in assigned:
            self.committed.pop(tp, None)  # another owner may have committed since
            offset = self.resume.pop(tp, None)
            if offset is None:
                continue
            if wait_for_restore:
                self.resume_at[tp] = offset
            else:
                seek[tp] = offset
                # the position the next checkpoint records, even if nothing more arrives on
                # this partition (else that checkpoint would drop it)
                self.positions.setdefault(tp, offset)
        return seek

    def keep_only(self, owned: set[Any]) -> None:
        """Forget the positions of partitions that went elsewhere; those that came back
        (revoked and re-assigned, committed in between) keep theirs."""
        for tp in [tp for tp in self.positions if tp not in owned]:
            del self.positions[tp]

    def resume_point(self, tp: Any, committed: int | None) -> int | None:
        """Where a restored partition starts: the later of its checkpoint's offset and the
        group's ``committed`` one (None: it had no checkpoint offset, leave it be)."""
        offset = self.resume_at.pop(tp, None)
        if offset is None:
            return None
        start = max(offset, committed if committed is not None else -1)
        self.positions[tp] = start
        return start

    # -- the loop -----------------------------------------------------------------------------
    def advanced(self, tp: Any, last_offset: int) -> None:
        """The outputs of ``tp``'s events up to ``last_offset`` are acknowledged."""
        self.positions[tp] = last_offset + 1

    def to_commit(self, owned: set[Any], positions: Mapping[Any, int] | None = None) -> dict:
        """Of ``positions`` (default: the current ones), the offsets still to commit: of
        partitions still ``owned``, never behind what was committed already (a checkpoint's
        offsets may be older than the batches committed since, with the changelog on)."""
        todo = self.positions if positions is None else positions
        return {tp: o for tp, o in todo.items() if tp in owned and o > self.committed.get(tp, -1)}

    def committed_now(self, offsets: Mapping[Any, int]) -> None:
        self.committed.update(offsets)


class Recovery:
    """What a changelog restore brought; see the module docstring.

    >>> r = Recovery()
    >>> r.restored([0], {(0, "t1"): 41, (0, "t2"): 7})
    >>> r.already_applied([(0, "t1", 41), (0, "t1", 42), (0, "t9", 1)])
    [True, False, False]
    >>> r.passed(0, 41); r.active
    False
    """

    def __init__(self) -> None:
        #: (partition, task id) -> offset of the last event the restored changelog reflects
        self.applied: dict[tuple[int, str], int] = {}
        self.until: dict[int, int] = {}  # partition -> its largest applied offset
        self.pending: set[Any] = set()  # assigned partitions, paused until restored

    @property
    def active(self) -> bool:
        """Whether some restored task's redelivered events may still come."""
        return bool(self.applied)

    def already_applied(self, events: Iterable[tuple[int, str, int]]) -> list[bool]:
        """For each ``(partition, task id, offset)``: does the restored changelog reflect it?"""
        flags = []
        for partition, task_id, offset in events:
            applied = self.applied.get((partition, task_id))
            flags.append(applied is not None and offset <= applied)
        return flags

    def restored(self, partitions: Iterable[int], applied: Mapping[tuple[int, str], int]) -> None:
        """``partitions`` were restored from the changelog; ``applied`` holds each restored
        task's last reflected offset. What a previous assignment of them left is forgotten."""
        partitions = list(partitions)
        self._forget(partitions)
        self.applied.update(applied)
        for p in partitions:
            self.until[p] = max((o for (q, _), o in self.applied.items() if q == p), default=-1)

    def passed(self, partition: int, last_offset: int) -> None:
        """The stream of ``partition`` reached ``last_offset``: once past every restored task,
        its entries go."""
        until = self.until.get(partition)
        if until is not None and last_offset >= until:
            del self.until[partition]
            self._forget([partition])

    def _forget(self, partitions: list[int]) -> None:
        for key in [k for k in self.applied if k[0] in partitions]:
            del self.applied[key]
