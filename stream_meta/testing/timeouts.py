"""Deadlines that hold on a busy machine.

Tests wait on conditions, never on a budget of events or seconds a busy machine can exhaust:
every deadline is a generous upper bound on the wait (generous enough for ``make
test-loaded``: the suite beside a core-hogging process), multiplied by ``TEST_TIMEOUT_SCALE``
(default 1) for a slower machine still, so load only makes a test slower, never red. A wait
that runs out raises :class:`TimeoutError` naming what it waited for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def scale() -> float:
    """``TEST_TIMEOUT_SCALE`` (a positive number; 1 when unset)."""
    raw = os.environ.get("TEST_TIMEOUT_SCALE", "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"TEST_TIMEOUT_SCALE={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"TEST_TIMEOUT_SCALE={raw!r} must be positive")
    return value


def scaled(seconds: float) -> float:
    """``seconds`` times :func:`scale`: a deadline for this machine."""
    return seconds * scale()


def wait_until(
    condition: Callable[[], T | bool | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Call ``condition`` every ``interval`` s until it returns something truthy, and return
    that; :class:`TimeoutError` after ``scaled(timeout)`` seconds.

    >>> wait_until(lambda: 42, timeout=1, what="the answer")
    42
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = condition()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {scaled(timeout):g} s")
        time.sleep(interval)
