"""State checkpoints and offset commits, in the order that keeps state and stream together.

Like Quix Streams' ``Checkpoint.commit``, each path is a short list of numbered steps.

**After every batch** (:meth:`Checkpointer.batch_done`), once the service has delivered the
batch's outputs *and* its task-state changelog records (acknowledged, ``acks=all``):

1. the batch's offsets are committed, when the changelog is on (it holds what the batch
   taught) or there is no state directory (nothing else could hold it); otherwise they wait
   for the next state checkpoint.

**A state checkpoint** (:meth:`Checkpointer.checkpoint`: every ``checkpoint_every_s``, when
partitions are revoked, at shutdown):

1. a previous write still in flight is waited for (revocation, shutdown) or left to finish
   (the periodic checkpoint tries again at the next interval);
2. nothing processed since the last checkpoint: done;
3. the engine's state is captured with the offsets it reflects, between two batches;
4. the file is written atomically on the checkpoint thread;
5. once it is on disk, exactly those offsets are committed (never behind what was committed
   since); a failed write or commit leaves the state dirty, and the next checkpoint covers it.

A commit from a rebalance callback is sent without waiting (``blocking=False``): the callback
runs on the client's IO thread, which must not wait on itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stream_meta.engine import Engine
from stream_meta.kafka.offsets import Offsets
from stream_meta.metrics import ServiceMetrics
from stream_meta.state_checkpoint import StateDir

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


class Checkpointer:
    """See the module docstring. ``parts`` returns extra state arrays to checkpoint (the
    meta-updater's); ``state`` None means no state directory (commits only)."""

    def __init__(
        self,
        engine: Engine,
        offsets: Offsets,
        metrics: ServiceMetrics,
        *,
        state: StateDir | None,
        changelog: bool,
        group: str,
        parts: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.engine, self.offsets, self.metrics = engine, offsets, metrics
        self.state, self.changelog, self.group, self.parts = state, changelog, group, parts
        self.consumer: Any = None  # set once the service opened it
        self.dirty = False  # processed since the last checkpoint / commit
        self.last = time.monotonic()  # when the last checkpoint was started
        # state checkpoints are written off the serving thread (one at a time)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if state else None
        self._inflight: tuple[Future[Path], dict[Any, int], float] | None = None

    # -- after every batch --------------------------------------------------------------------
    def batch_done(self) -> None:
        """A batch's outputs (and changelog records) are acknowledged; see step 1 above."""
        self.dirty = True
        if self.state is None or self.changelog:
            # a replica that dies between two checkpoints leaves only its unfinished batch
            self.commit(dict(self.offsets.positions))

    # -- state checkpoints --------------------------------------------------------------------
    def checkpoint(self, why: str, *, wait: bool = True, blocking_commit: bool = True) -> bool:
        """Checkpoint state with the offsets it reflects, then commit them; False on failure.
        ``wait=False`` (the periodic checkpoint) returns once the write is handed over."""
        self.last = time.monotonic()
        # 1. one write at a time
        if self._inflight is not None:
            if not wait:
                return True
            if not self.finish(block=True, blocking_commit=blocking_commit):
                return False
        # 2. nothing new
        if not self.dirty:
            return True
        offsets = dict(self.offsets.positions)
        if self.state is None or self._writer is None:
            self.dirty = not self.commit(offsets, blocking=blocking_commit)
            return not self.dirty
        # 3. capture, between two batches
        write = self.state.capture(
            self.engine,
            parts=self.parts(),
            extra={
                "offsets": self.offsets.checkpoint_view(offsets),
                "group": self.group,
                "reason": why,
            },
        )
        self.dirty = False  # set again if the write or the commit fails
        # 4. write on the checkpoint thread
        self._inflight = (self._writer.submit(write), offsets, time.perf_counter())
        if not wait:
            return True
        return self.finish(block=True, blocking_commit=blocking_commit)

    def finish(self, *, block: bool, blocking_commit: bool = True) -> bool:
        """5. Commit the offsets of a written checkpoint (when its write is done, or waiting)."""
        if self._inflight is None:
            return True
        future, offsets, t0 = self._inflight
        if not block and not future.done():
            return True
        self._inflight = None
        try:
            path = future.result()
        except (OSError, ValueError) as exc:
            self.metrics.checkpoint_failures.inc()
            log.error("state checkpoint failed (%s); offsets not committed", exc)
            self.dirty = True
            return False
        m = self.metrics
        m.checkpoints.inc()
        m.checkpoint_seconds.observe(time.perf_counter() - t0)
        m.checkpoint_bytes.set(path.stat().st_size)
        m.last_checkpoint.set(time.time())
        if not self.commit(offsets, blocking=blocking_commit):
            self.dirty = True
            return False
        return True

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None

    # -- commits ------------------------------------------------------------------------------
    def commit(self, offsets: dict[Any, int], *, blocking: bool = True) -> bool:
        """Commit ``offsets`` of the partitions still owned; False on failure. ``blocking=False``
        sends the commit and returns (a commit that lands late only means the next owner sees
        some events again, which the changelog keeps from being learned twice)."""
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        todo = self.offsets.to_commit(self.consumer.assignment(), offsets)
        if not todo:
            return True
        request = {tp: OffsetAndMetadata(o, "", -1) for tp, o in todo.items()}
        try:
            if blocking:
                self.consumer.commit(request)
            else:
                self.consumer.commit_async(request, callback=self._commit_done)
        except (KafkaError, OSError) as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); the next commit covers it", exc)
            return False
        self.offsets.committed_now(todo)
        self.metrics.commits.inc()
        return True

    def _commit_done(self, offsets: Any, response: Any) -> None:
        if isinstance(response, Exception):
            self.metrics.commit_failures.inc()
            log.warning("offset commit on revocation failed (%s)", response)

    def close(self) -> None:
        """Wait for the checkpoint thread (after the last :meth:`checkpoint`)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
