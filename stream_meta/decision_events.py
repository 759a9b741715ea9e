"""Decision and reward events: their wire formats and their validation.

Both arrive on the events topic beside plain events and have no ``x`` of their own:

- a **decision** offers a task candidate actions and asks which to play::

    {"event_id": "d1", "task_id": "user-7", "ts": 1700000000.0,
     "actions": [{"action_id": "a", "x": [0.1]}, {"action_id": "b", "x": [2.5]}]}

  Its ``event_id`` is the decision id. It holds 1..``max_actions`` actions with distinct
  ``action_id`` s, each with an ``x`` of the model's ``x_dim`` finite numbers. A *logged*
  decision (replay's off-policy evaluator reads its extra ``"logged"`` object) is the same
  event to the online service: the extra field is ignored, as unknown fields are.
- a **reward** reports what the played action earned, later::

    {"event_id": "r1", "decision_id": "d1", "reward": 0.8, "task_id": "user-7"}

  ``reward`` is a finite number; ``task_id`` (optional) must then be the decision's task.

:func:`parse_other` validates them as :func:`~stream_meta.events.parse_event` does plain
events, never raising for bad input: a :class:`~stream_meta.events.Rejection` says why one was
refused (the generic reasons for generic faults, ``duplicate_action`` for two actions with one
id). :func:`candidates` is the cheap test the decider runs on every batch (a substring search
of the joined batch, a small fraction of the engine's work on it) so that
plain events never pay for a second parse; an
event whose object has an ``x`` is a plain event whatever else it holds, and one that spells
``actions`` or ``decision_id`` with JSON escapes is not recognised (it is then dead-lettered as
a plain event without ``x``).

>>> schema = EventSchema(x_dim=1, task="regression")
>>> raw = b'{"event_id": "d1", "task_id": "t", "actions": [{"action_id": "a", "x": [1]}]}'
>>> candidate(raw), parse_other(raw, schema, max_actions=8).action_ids
(True, ('a',))
>>> parse_other(b'{"event_id": "r1", "decision_id": "d1", "reward": 2}', schema, max_actions=8)
Reward(event_id='r1', decision_id='d1', reward=2.0, task_id=None, ts=None)
>>> bad = parse_other(b'{"event_id": "r2", "decision_id": "d1", "reward": "a lot"}', schema, 8)
>>> bad.reason.value, bad.detail
('invalid_type', 'reward is a string, expected a number')
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# the reference checker's helpers: decisions and rewards follow the same rules
from stream_meta.events import (
    EventSchema,
    Rejection,
    RejectReason,
    _is_number,
    _kind,
    _reject,
    _to_finite_float,
    id_problem,
)

__all__ = ["Decision", "Reward", "candidate", "candidates", "parse_other"]

_MARKS_B = (b'"actions"', b'"decision_id"')
_MARKS_S = ('"actions"', '"decision_id"')


@dataclass(frozen=True)
class Decision:
    """A validated decision event: ``x [K, x_dim]`` (float64) holds action ``k``'s features in
    row ``k``; ``action_ids[k]`` its id."""

    event_id: str
    task_id: str
    action_ids: tuple[str, ...]
    x: np.ndarray
    ts: float | None = None


@dataclass(frozen=True)
class Reward:
    """A validated reward event (``task_id``: None when the producer gave none)."""

    event_id: str
    decision_id: str
    reward: float
    task_id: str | None = None
    ts: float | None = None


def candidate(raw: object) -> bool:
    """Whether ``raw`` may be a decision or a reward (cheap; :func:`parse_other` decides)."""
    if isinstance(raw, bytes):
        return _MARKS_B[0] in raw or _MARKS_B[1] in raw
    if isinstance(raw, str):
        return _MARKS_S[0] in raw or _MARKS_S[1] in raw
    if isinstance(raw, Mapping):
        return "actions" in raw or "decision_id" in raw
    return False


def candidates(raws: Sequence[Any]) -> list[int]:
    """The positions of the :func:`candidate` s among ``raws``; a batch of bytes (or of str)
    without any is ruled out at once (one search of the joined batch, cheaper than a test of
    each)."""
    try:
        blob = b"\n".join(raws)
    except TypeError:  # not all bytes
        try:
            text = "\n".join(raws)
        except TypeError:  # not all str either
            pass
        else:
            if _MARKS_S[0] not in text and _MARKS_S[1] not in text:
                return []
    else:
        if _MARKS_B[0] not in blob and _MARKS_B[1] not in blob:
            return []
    return [i for i, raw in enumerate(raws) if candidate(raw)]


def parse_other(
    raw: bytes | str | Mapping[str, Any], schema: EventSchema, max_actions: int
) -> Decision | Reward | Rejection | None:
    """A decision, a reward, why one was refused, or None: not one of them (a plain event,
    or input the engine's own parser refuses: not JSON, not an object...).

    An object with a non-null ``x`` is a plain event (None); else one with ``actions`` is a
    decision, else one with ``decision_id`` a reward. Checks, the first failing one deciding:
    size (``oversized``), ids (``missing_field``, ``invalid_type``), the actions (count: 0 is
    ``invalid_type``, more than ``max_actions`` ``oversized``; each an object with an
    ``action_id`` and an ``x``: ``missing_field``, ``invalid_type``, ``wrong_dimension``,
    ``non_finite``; ids distinct: ``duplicate_action``), the reward (``missing_field``,
    ``invalid_type``, ``non_finite``) and ``ts`` (``invalid_type``, ``non_finite``).
    """
    if isinstance(raw, bytes | str):
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):  # the engine's parser explains it
            return None
        if not isinstance(obj, dict):
            return None
        if size > schema.max_bytes and obj.get("x") is None:
            return _reject(
                RejectReason.OVERSIZED,
                f"event is {size} bytes, limit is {schema.max_bytes}",
                raw,
                obj,
            )
    elif isinstance(raw, Mapping):
        obj = raw
    else:
        return None
    if obj.get("x") is not None:
        return None
    if obj.get("actions") is not None:
        return _decision(obj, schema, max_actions, raw)
    if obj.get("decision_id") is not None:
        return _reward(obj, raw)
    return None


def _id(obj: Mapping[Any, Any], name: str, raw: object) -> str | Rejection:
    value = obj.get(name)
    if value is None:
        return _reject(RejectReason.MISSING_FIELD, f"missing required field {name!r}", raw, obj)
    problem = id_problem(name, value)
    if problem is not None:
        return _reject(RejectReason.INVALID_TYPE, problem, raw, obj)
    assert isinstance(value, str)
    return value


def _ts(obj: Mapping[Any, Any], raw: object) -> float | Rejection | None:
    ts = obj.get("ts")
    if ts is None:
        return None
    if not _is_number(ts):
        return _reject(
            RejectReason.INVALID_TYPE,
            f"ts is {_kind(ts, article=True)}, expected a number",
            raw,
            obj,
        )
    value = _to_finite_float(ts)
    if value is None:
        return _reject(RejectReason.NON_FINITE, "ts is not finite", raw, obj)
    return value


def _decision(
    obj: Mapping[Any, Any], schema: EventSchema, max_actions: int, raw: object
) -> Decision | Rejection:
    ids = []
    for name in ("event_id", "task_id"):
        value = _id(obj, name, raw)
        if isinstance(value, Rejection):
            return value
        ids.append(value)
    actions = obj["actions"]
    if not isinstance(actions, list | tuple):
        return _reject(
            RejectReason.INVALID_TYPE,
            f"actions must be an array of objects, got {_kind(actions)}",
            raw,
            obj,
        )
    if not actions:
        return _reject(RejectReason.INVALID_TYPE, "actions is empty", raw, obj)
    if len(actions) > max_actions:
        return _reject(
            RejectReason.OVERSIZED,
            f"{len(actions)} actions, limit is {max_actions}",
            raw,
            obj,
        )
    x_dim = schema.x_dim
    x = np.empty((len(actions), x_dim), dtype=np.float64)
    action_ids: list[str] = []
    for k, action in enumerate(actions):
        where = f"actions[{k}]"
        if not isinstance(action, Mapping):
            return _reject(
                RejectReason.INVALID_TYPE,
                f"{where} is {_kind(action, article=True)}, expected an object",
                raw,
                obj,
            )
        action_id = _id(action, "action_id", raw)
        if isinstance(action_id, Rejection):
            return _reject(action_id.reason, f"{where}: {action_id.detail}", raw, obj)
        xs = action.get("x")
        if xs is None:
            return _reject(RejectReason.MISSING_FIELD, f"{where} has no 'x'", raw, obj)
        if not isinstance(xs, list | tuple):
            return _reject(
                RejectReason.INVALID_TYPE,
                f"{where}.x must be an array of numbers, got {_kind(xs)}",
                raw,
                obj,
            )
        for i, value in enumerate(xs):
            if not _is_number(value):
                return _reject(
                    RejectReason.INVALID_TYPE,
                    f"{where}.x[{i}] is {_kind(value, article=True)}, expected a number",
                    raw,
                    obj,
                )
        if len(xs) != x_dim:
            return _reject(
                RejectReason.WRONG_DIMENSION,
                f"{where}.x has {len(xs)} values, expected {x_dim}",
                raw,
                obj,
            )
        for i, value in enumerate(xs):
            f = _to_finite_float(value)
            if f is None:
                return _reject(RejectReason.NON_FINITE, f"{where}.x[{i}] is not finite", raw, obj)
            x[k, i] = f
        action_ids.append(action_id)
    if len(set(action_ids)) != len(action_ids):
        seen: set[str] = set()
        for dup in action_ids:
            if dup in seen:
                return _reject(
                    RejectReason.DUPLICATE_ACTION,
                    f"action_id {dup!r} appears more than once",
                    raw,
                    obj,
                )
            seen.add(dup)
    ts = _ts(obj, raw)
    if isinstance(ts, Rejection):
        return ts
    return Decision(ids[0], ids[1], tuple(action_ids), x, ts)


def _reward(obj: Mapping[Any, Any], raw: object) -> Reward | Rejection:
    ids = []
    for name in ("event_id", "decision_id"):
        value = _id(obj, name, raw)
        if isinstance(value, Rejection):
            return value
        ids.append(value)
    task_id = None
    if obj.get("task_id") is not None:
        task = _id(obj, "task_id", raw)
        if isinstance(task, Rejection):
            return task
        task_id = task
    reward = obj.get("reward")
    if reward is None:
        return _reject(RejectReason.MISSING_FIELD, "missing required field 'reward'", raw, obj)
    if not _is_number(reward):
        return _reject(
            RejectReason.INVALID_TYPE,
            f"reward is {_kind(reward, article=True)}, expected a number",
            raw,
            obj,
        )
    amount = _to_finite_float(reward)
    if amount is None:
        return _reject(RejectReason.NON_FINITE, "reward is not finite", raw, obj)
    ts = _ts(obj, raw)
    if isinstance(ts, Rejection):
        return ts
    return Reward(ids[0], ids[1], amount, task_id, ts)
