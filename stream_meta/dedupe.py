"""A bounded window of the event ids a task store has learned, to never learn one twice.

Kafka delivers at least once: after a crash, or when a producer retries, the same event can
arrive again. The engine remembers the ids of the last ``capacity`` labelled events it learned;
a labelled event whose id is in the window is still predicted (its output is owed) but not
scored and not learned again. The window is saved with the state checkpoint, so the guarantee
holds across restarts. Memory: about 120 bytes per id (the id string, a set slot, a deque slot).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from stream_meta.packing import pack_strings, unpack_strings


class DedupeWindow:
    """The last ``capacity`` distinct ids added, oldest forgotten first.

    >>> w = DedupeWindow(2)
    >>> w.add("a"), w.add("b"), w.add("a"), w.add("c"), "a" in w, "b" in w
    (True, True, False, True, False, True)
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._order: deque[str] = deque()
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; False if it was already in the window (a duplicate)."""
        if event_id in self._ids:
            return False
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())
        return True

    def to_arrays(self) -> dict[str, np.ndarray]:
        return self.capture()()

    def capture(self) -> Callable[[], dict[str, np.ndarray]]:
        """Copy the ids now (cheap); the returned function packs them into arrays later."""
        ids = list(self._order)

        def pack() -> dict[str, np.ndarray]:
            utf8, offsets = pack_strings(ids)
            return {"utf8": utf8, "offsets": offsets}

        return pack

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the window's content with :meth:`to_arrays` output (the newest ids kept
        when the capacity shrank since)."""
        ids = unpack_strings(arrays["utf8"], arrays["offsets"])[-self.capacity :]
        self._order = deque(ids)
        self._ids = set(ids)
