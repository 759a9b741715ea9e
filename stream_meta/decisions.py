"""Choosing an action from a task's posterior: Thompson sampling and upper confidence bounds.

A *decision* offers a task ``K`` candidate actions, each described by a feature vector; the
service picks one and later learns the reward of that one only. The task's closed-form head
already holds a Gaussian posterior (:meth:`~stream_meta.engine.Engine.action_values` returns
its predicted values, their epistemic standard deviations and joint posterior draws), so:

- **Thompson sampling** (the default) plays the action that is best under one posterior draw.
  Its *propensity*, the probability that the policy plays that action, is what off-policy
  evaluation needs; it is estimated as the share of the ``S`` draws whose best action is the
  one played (the played draw included, so never 0).
- **UCB** plays the action with the largest ``mean + c * epistemic std``: deterministic
  (propensity 1 for the action played), so logs of it support no inverse-propensity estimate
  of another policy.

The meta-learned prior is what makes a new task's first choices good: with no reward seen the
posterior is the population's, not a flat one.

>>> import numpy as np
>>> from stream_meta.engine import ActionValues
>>> draws = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
>>> v = ActionValues(np.array([0.5, 1.5]), np.array([1.0, 1.0]), np.zeros(2), draws, shots=0)
>>> thompson_choice(v)
Choice(index=1, propensity=0.75, value=1.0)
>>> action_probabilities(v).tolist()
[0.25, 0.75]
>>> ucb_choice(v, c=1.0)
Choice(index=1, propensity=1.0, value=2.5)
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stream_meta.engine import ActionValues
from stream_meta.packing import pack_strings, unpack_strings

__all__ = [
    "Choice",
    "Pending",
    "PendingDecisions",
    "RewardOutcome",
    "action_probabilities",
    "decision_seed",
    "thompson_choice",
    "ucb_choice",
]

#: what became of a reward (label values of ``stream_meta_rewards_total``)
RewardOutcome = Literal["learned", "duplicate", "late", "unknown"]
REWARD_OUTCOMES: tuple[RewardOutcome, ...] = ("learned", "duplicate", "late", "unknown")


@dataclass(frozen=True)
class Choice:
    """The action played (its index among the candidates), the probability that the policy
    plays it, and the value the policy ranked it by (the draw, or the upper bound)."""

    index: int
    propensity: float
    value: float


def action_probabilities(values: ActionValues) -> np.ndarray:
    """Thompson sampling's probability of playing each action ``[K]``: the share of the
    posterior draws in which it is the best (ties go to the first)."""
    if values.draws is None or len(values.draws) == 0:
        raise ValueError("Thompson sampling needs posterior draws (action_values(draws=S))")
    best = values.draws.argmax(axis=1)
    return np.bincount(best, minlength=values.draws.shape[1]) / len(best)


def thompson_choice(values: ActionValues) -> Choice:
    """Play the best action under the first posterior draw; its propensity is estimated from
    all the draws (:func:`action_probabilities`)."""
    probs = action_probabilities(values)
    assert values.draws is not None
    index = int(values.draws[0].argmax())
    return Choice(index, float(probs[index]), float(values.draws[0, index]))


def ucb_choice(values: ActionValues, c: float = 2.0) -> Choice:
    """Play the action with the largest ``mean + c * epistemic std`` (propensity 1)."""
    if not c >= 0:
        raise ValueError(f"the UCB width c must be >= 0, got {c}")
    bound = values.mean + c * values.epistemic_std
    index = int(bound.argmax())
    return Choice(index, 1.0, float(bound[index]))


def decision_seed(decision_id: str, seed: int = 0) -> int:
    """The seed of a decision's posterior draws: a hash of its id (and the engine's seed), so
    a redelivered decision draws the same numbers.

    >>> decision_seed("d1") == decision_seed("d1") != decision_seed("d2")
    True
    """
    digest = hashlib.blake2b(f"{seed}:{decision_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Pending:
    """A decision waiting for its reward: its task, the played action's features ``x
    [x_dim]``, when it was made (event time, or receipt time without one), the output record
    it produced (a redelivery gets it again) and whether its reward was learned."""

    task_id: str
    x: np.ndarray
    t: float
    record: dict[str, Any]
    rewarded: bool = False


class PendingDecisions:
    """Decisions by id, the ``capacity`` most recently made or redelivered (LRU), each kept
    after its reward too so that a second reward is known as a duplicate.

    A reward is ``learned`` once: for a decision that is held, not rewarded yet, made at most
    ``ttl_s`` before the reward; ``duplicate`` for one already rewarded; ``late`` after
    ``ttl_s`` (not learned: a window that bounds when feedback counts, the same whether or not
    the entry was evicted yet); ``unknown`` for a decision not held (never seen, evicted, or
    another task's when the reward names one).

    >>> store = PendingDecisions(capacity=2, ttl_s=10.0, x_dim=1)
    >>> store.add("d1", Pending("t", np.zeros(1), 0.0, {}))
    0
    >>> [store.reward("d1", None, now=5.0)[0], store.reward("d1", None, now=6.0)[0]]
    ['learned', 'duplicate']
    >>> store.add("d2", Pending("t", np.zeros(1), 0.0, {})), store.reward("d2", "t", now=11.0)[0]
    (0, 'late')
    >>> store.add("d3", Pending("t", np.zeros(1), 0.0, {})), store.reward("d1", None, now=1.0)[0]
    (0, 'unknown')
    """

    def __init__(self, capacity: int, ttl_s: float, x_dim: int) -> None:
        if capacity < 1 or not ttl_s > 0:
            raise ValueError("pending decisions need capacity >= 1 and ttl_s > 0")
        self.capacity, self.ttl_s, self.x_dim = capacity, ttl_s, x_dim
        self._entries: OrderedDict[str, Pending] = OrderedDict()
        #: entries whose reward has not come yet
        self.awaiting = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, decision_id: object) -> bool:
        return decision_id in self._entries

    def get(self, decision_id: str) -> Pending | None:
        """The held decision (made most recent: a redelivery keeps it), or None."""
        entry = self._entries.get(decision_id)
        if entry is not None:
            self._entries.move_to_end(decision_id)
        return entry

    def add(self, decision_id: str, entry: Pending) -> int:
        """Hold a new decision; returns how many held decisions that never got a reward were
        evicted to make room."""
        if decision_id in self._entries:
            raise ValueError(f"decision {decision_id!r} is already held")
        self._entries[decision_id] = entry
        self.awaiting += not entry.rewarded
        lost = 0
        while len(self._entries) > self.capacity:
            _, old = self._entries.popitem(last=False)
            if not old.rewarded:
                self.awaiting -= 1
                lost += 1
        return lost

    def reward(
        self, decision_id: str, task_id: str | None, now: float
    ) -> tuple[RewardOutcome, Pending | None]:
        """What a reward for ``decision_id`` (naming ``task_id``, or None) received at ``now``
        becomes, and the decision it is for (None when unknown); a learned one marks the
        decision rewarded."""
        entry = self._entries.get(decision_id)
        if entry is None or (task_id is not None and task_id != entry.task_id):
            return "unknown", None
        if entry.rewarded:
            return "duplicate", entry
        if now - entry.t > self.ttl_s:
            return "late", entry
        entry.rewarded = True
        self.awaiting -= 1
        return "learned", entry

    # -- persistence (the service's state checkpoint) -----------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The held decisions as plain arrays, oldest first."""
        ids = list(self._entries)
        entries = list(self._entries.values())
        id_bytes, id_off = pack_strings(ids)
        task_bytes, task_off = pack_strings([e.task_id for e in entries])
        rec_bytes, rec_off = pack_strings([json.dumps(e.record) for e in entries])
        x = np.zeros((len(entries), self.x_dim), dtype=np.float64)
        for i, e in enumerate(entries):
            x[i] = e.x
        return {
            "ids": id_bytes,
            "ids_offsets": id_off,
            "tasks": task_bytes,
            "tasks_offsets": task_off,
            "records": rec_bytes,
            "records_offsets": rec_off,
            "x": x,
            "t": np.array([e.t for e in entries], dtype=np.float64),
            "rewarded": np.array([e.rewarded for e in entries], dtype=np.bool_),
        }

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load :meth:`to_arrays` output (the newest ``capacity`` entries); raises
        ``ValueError`` or ``KeyError`` on inconsistent arrays, leaving the store unchanged."""
        ids = unpack_strings(arrays["ids"], arrays["ids_offsets"])
        tasks = unpack_strings(arrays["tasks"], arrays["tasks_offsets"])
        records = [
            json.loads(r) for r in unpack_strings(arrays["records"], arrays["records_offsets"])
        ]
        x = np.asarray(arrays["x"], dtype=np.float64)
        t = np.asarray(arrays["t"], dtype=np.float64)
        rewarded = np.asarray(arrays["rewarded"], dtype=np.bool_)
        n = len(ids)
        if not (len(tasks) == len(records) == len(t) == len(rewarded) == n) or x.shape != (
            n,
            self.x_dim,
        ):
            raise ValueError("pending decisions' arrays do not match each other or x_dim")
        entries: OrderedDict[str, Pending] = OrderedDict()
        for i in range(max(0, n - self.capacity), n):
            entries[ids[i]] = Pending(
                tasks[i], x[i].copy(), float(t[i]), records[i], bool(rewarded[i])
            )
        self._entries = entries
        self.awaiting = sum(not e.rewarded for e in entries.values())
