"""What the Kafka processes share: their error type and the reconnect backoff."""

from __future__ import annotations


class ServiceError(RuntimeError):
    """The service cannot run (e.g. Kafka unreachable past the start-up deadline)."""


def backoff(attempt: int, first: float, most: float) -> float:
    """Exponential backoff: ``first * 2**attempt`` seconds, at most ``most``."""
    return float(min(most, first * 2**attempt))
