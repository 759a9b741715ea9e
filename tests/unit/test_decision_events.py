"""Decision and reward events: what is recognised, what is accepted, every refusal's reason."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_meta.decision_events import Decision, Reward, candidate, candidates, parse_other
from stream_meta.events import EventSchema, Rejection, RejectReason, parse_event

SCHEMA = EventSchema(x_dim=2, task="regression", max_bytes=4096)


def _decision(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "d1",
        "task_id": "t1",
        "actions": [{"action_id": "a", "x": [0.0, 1.0]}, {"action_id": "b", "x": [2, -3]}],
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def _reward(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"event_id": "r1", "decision_id": "d1", "reward": 1.5}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def _action(action_id: Any = "c", x: Any = (1.0, 2.0)) -> dict[str, Any]:
    return {"action_id": action_id, "x": list(x) if isinstance(x, tuple) else x}


REFUSALS: list[tuple[str, dict[str, Any], RejectReason, str]] = [
    ("decision-no-event-id", _decision(event_id=...), RejectReason.MISSING_FIELD, "event_id"),
    ("decision-task-id-number", _decision(task_id=7), RejectReason.INVALID_TYPE, "task_id"),
    ("decision-task-id-long", _decision(task_id="t" * 300), RejectReason.INVALID_TYPE, "300"),
    ("actions-not-array", _decision(actions={"a": 1}), RejectReason.INVALID_TYPE, "object"),
    ("actions-empty", _decision(actions=[]), RejectReason.INVALID_TYPE, "empty"),
    (
        "too-many-actions",
        _decision(actions=[_action(str(k)) for k in range(9)]),
        RejectReason.OVERSIZED,
        "9 actions, limit is 8",
    ),
    ("action-not-object", _decision(actions=[[1, 2]]), RejectReason.INVALID_TYPE, "actions[0]"),
    (
        "action-without-id",
        _decision(actions=[{"x": [1.0, 2.0]}]),
        RejectReason.MISSING_FIELD,
        "action_id",
    ),
    ("action-id-number", _decision(actions=[_action(3)]), RejectReason.INVALID_TYPE, "action_id"),
    (
        "action-without-x",
        _decision(actions=[{"action_id": "a"}]),
        RejectReason.MISSING_FIELD,
        "actions[0] has no 'x'",
    ),
    ("action-x-string", _decision(actions=[_action(x="12")]), RejectReason.INVALID_TYPE, ".x"),
    (
        "action-x-bool",
        _decision(actions=[_action(x=[True, 1.0])]),
        RejectReason.INVALID_TYPE,
        "x[0]",
    ),
    (
        "action-x-dimension",
        _decision(actions=[_action("a"), _action("b", x=(1.0,))]),
        RejectReason.WRONG_DIMENSION,
        "actions[1].x has 1 values, expected 2",
    ),
    (
        "action-x-nan",
        _decision(actions=[_action(x=(1.0, math.nan))]),
        RejectReason.NON_FINITE,
        "actions[0].x[1]",
    ),
    (
        "action-ids-repeat",
        _decision(actions=[_action("a"), _action("b"), _action("a")]),
        RejectReason.DUPLICATE_ACTION,
        "'a'",
    ),
    ("decision-ts-string", _decision(ts="now"), RejectReason.INVALID_TYPE, "ts"),
    ("decision-ts-inf", _decision(ts=math.inf), RejectReason.NON_FINITE, "ts"),
    ("reward-no-event-id", _reward(event_id=...), RejectReason.MISSING_FIELD, "event_id"),
    ("reward-decision-id-number", _reward(decision_id=4), RejectReason.INVALID_TYPE, "decision"),
    ("reward-missing", _reward(reward=...), RejectReason.MISSING_FIELD, "reward"),
    ("reward-string", _reward(reward="1"), RejectReason.INVALID_TYPE, "reward"),
    ("reward-bool", _reward(reward=True), RejectReason.INVALID_TYPE, "boolean"),
    ("reward-nan", _reward(reward=math.nan), RejectReason.NON_FINITE, "reward"),
    ("reward-task-id-list", _reward(task_id=["t"]), RejectReason.INVALID_TYPE, "task_id"),
    ("reward-ts-string", _reward(ts="x"), RejectReason.INVALID_TYPE, "ts"),
]


@pytest.mark.parametrize(
    ("obj", "reason", "detail"), [pytest.param(*c[1:], id=c[0]) for c in REFUSALS]
)
def test_parse_other_refuses_with_reason_when_a_decision_or_reward_is_bad(
    obj: dict[str, Any], reason: RejectReason, detail: str
) -> None:
    for raw in (obj, json.dumps(obj).encode(), json.dumps(obj)):
        assert candidate(raw)
        result = parse_other(raw, SCHEMA, max_actions=8)

        assert isinstance(result, Rejection), result
        assert result.reason is reason
        assert detail in result.detail
        assert result.raw


def test_parse_other_refuses_an_oversized_decision_when_its_bytes_exceed_the_limit() -> None:
    raw = json.dumps(_decision(actions=[_action(str(k)) for k in range(8)], pad="x" * 5000))

    result = parse_other(raw.encode(), SCHEMA, max_actions=8)

    assert isinstance(result, Rejection) and result.reason is RejectReason.OVERSIZED


def test_parse_other_reads_a_decision_when_valid() -> None:
    raw = json.dumps(_decision(ts=12.0, logged={"action_id": "a", "propensity": 0.5})).encode()

    result = parse_other(raw, SCHEMA, max_actions=8)

    assert isinstance(result, Decision)
    assert (result.event_id, result.task_id, result.action_ids, result.ts) == (
        "d1",
        "t1",
        ("a", "b"),
        12.0,
    )
    np.testing.assert_array_equal(result.x, [[0.0, 1.0], [2.0, -3.0]])


def test_parse_other_reads_a_reward_when_valid() -> None:
    result = parse_other(json.dumps(_reward(task_id="t1", ts=3)), SCHEMA, max_actions=8)

    assert result == Reward("r1", "d1", 1.5, "t1", 3.0)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id": "e", "task_id": "t", "x": [1, 2], "actions": []}',  # x: a plain event
        b'{"event_id": "e", "task_id": "t", "x": [1, 2], "decision_id": "d"}',
        b'["actions", "decision_id"]',  # not an object: the engine explains
        b'{"actions": [',  # not JSON: the engine explains
        b'{"event_id": "e", "task_id": "actions"}',  # a value, not a key
    ],
)
def test_parse_other_leaves_input_to_the_engine_when_it_is_neither(raw: bytes) -> None:
    assert parse_other(raw, SCHEMA, max_actions=8) is None


def test_candidate_is_false_when_an_event_is_plain() -> None:
    plain = b'{"event_id": "e", "task_id": "t", "x": [1, 2], "y": 1}'

    assert not candidate(plain)
    assert not candidate(plain.decode())
    assert not candidate({"event_id": "e", "task_id": "t", "x": [1, 2]})
    assert not isinstance(parse_event(plain, SCHEMA), Rejection)


def test_parse_never_raises_when_fed_odd_values() -> None:
    for value in (1, None, b"\xff\xfe", "{}", {"actions": None, "decision_id": None}):
        assert parse_other(value, SCHEMA, max_actions=8) is None  # type: ignore[arg-type]


def test_candidates_finds_the_same_positions_when_a_batch_is_bytes_or_mixed() -> None:
    plain = b'{"event_id": "e", "task_id": "t", "x": [1, 2]}'
    decision = json.dumps(_decision()).encode()
    reward = json.dumps(_reward()).encode()

    assert candidates([plain] * 5) == []
    assert candidates([plain, decision, plain, reward]) == [1, 3]
    assert candidates([plain.decode(), decision, {"decision_id": "d"}, plain]) == [1, 2]
    assert candidates([plain.decode()] * 3) == []
    assert candidates([plain.decode(), reward.decode()]) == [1]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "event_id": _JSON,
            "task_id": _JSON,
            "decision_id": _JSON,
            "reward": _JSON,
            "ts": _JSON,
            "actions": st.lists(
                st.fixed_dictionaries({}, optional={"action_id": _JSON, "x": _JSON}) | _JSON,
                max_size=4,
            )
            | _JSON,
        },
    )
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_parse_other_never_raises_when_fields_hold_anything(obj: dict[str, Any]) -> None:
    for raw in (obj, json.dumps(obj).encode()):
        result = parse_other(raw, SCHEMA, max_actions=8)
        assert result is None or isinstance(result, Decision | Reward | Rejection)
        if isinstance(result, Decision):
            assert result.x.shape == (len(result.action_ids), 2) and np.isfinite(result.x).all()
