"""The service's topics: their names for a prefix, and creating the missing ones."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """The service's topic names for a prefix."""

    events: str
    predictions: str
    dead_letter: str
    drift: str  # drift alarms and meta-update outcomes
    task_embeddings: str  # compacted: every replica's task embeddings, for all the others
    task_state: str  # compacted, co-partitioned with events: the task-state changelog
    models: str  # one partition: published model versions, in chunks
    label_requests: str  # keyed by task id: the unlabelled events worth labelling
    decisions: str  # keyed by task id: the action chosen for each decision event

    @classmethod
    def for_prefix(cls, prefix: str) -> Topics:
        names = (
            "events",
            "predictions",
            "dead-letter",
            "drift",
            "task-embeddings",
            "task-state",
            "models",
            "label-requests",
            "decisions",
        )
        return cls(*(f"{prefix}.{n}" for n in names))

    def all(self) -> tuple[str, ...]:
        return (
            self.events,
            self.predictions,
            self.dead_letter,
            self.drift,
            self.task_embeddings,
            self.task_state,
            self.models,
            self.label_requests,
            self.decisions,
        )

    @property
    def compacted(self) -> frozenset[str]:
        """Topics that keep only the newest record per key."""
        return frozenset({self.task_embeddings, self.task_state})


def ensure_topics(
    admin: Any,
    topics: tuple[str, ...],
    partitions: int,
    replication_factor: int,
    *,
    compacted: frozenset[str] = frozenset(),
) -> list[str]:
    """Create those of ``topics`` that do not exist yet (``compacted`` ones with
    ``cleanup.policy=compact``); returns the ones created."""
    existing = set(admin.list_topics())
    missing = [t for t in topics if t not in existing]
    if missing:
        spec = {"num_partitions": partitions, "replication_factor": replication_factor}
        compact = {"configs": {"cleanup.policy": "compact"}}
        admin.create_topics(
            {t: {**spec, **(compact if t in compacted else {})} for t in missing},
            raise_errors=False,
        )
        log.info("created topics %s (%d partitions)", ", ".join(missing), partitions)
    return missing


def partition_count(admin: Any, topic: str) -> int | None:
    """Partitions of ``topic`` (None when it does not exist or the broker does not say)."""
    try:
        described = admin.describe_topics([topic])
    except Exception as exc:  # kafka-python raises several types for an unknown topic
        log.debug("describe %s: %s", topic, exc)
        return None
    for t in described:
        if t.get("topic") == topic and not t.get("error_code") and t.get("partitions"):
            return len(t["partitions"])
    return None
