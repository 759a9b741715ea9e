"""Event parsing: every rejection reason, the accepted shapes, and the never-raise contract."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream_meta import events
from stream_meta.events import (
    MAX_RAW_BYTES,
    Event,
    EventSchema,
    Prediction,
    Rejection,
    RejectReason,
    parse_event,
)

REGRESSION = EventSchema(x_dim=2, task="regression")
CLASSIFICATION = EventSchema(x_dim=2, task="classification", n_classes=10)


def _raw(**fields: Any) -> bytes:
    """A JSON event with valid defaults, where a field set to ``...`` is left out."""
    event: dict[str, Any] = {"event_id": "e1", "task_id": "t1", "x": [0.5, -1.0]}
    event.update(fields)
    return json.dumps({k: v for k, v in event.items() if v is not ...}).encode()


# (id, raw input, schema, expected reason)
REJECTIONS: list[tuple[str, bytes | str, EventSchema, RejectReason]] = [
    (
        "oversized",
        _raw(padding="a" * 70_000),
        REGRESSION,
        RejectReason.OVERSIZED,
    ),
    ("truncated-json", b'{"event_id": "e1", "task_id":', REGRESSION, RejectReason.MALFORMED_JSON),
    ("trailing-garbage", _raw() + b" x", REGRESSION, RejectReason.MALFORMED_JSON),
    (
        "invalid-utf8",
        b'{"event_id": "\xff\xfe", "task_id": "t1"}',
        REGRESSION,
        RejectReason.MALFORMED_JSON,
    ),
    ("empty-input", b"", REGRESSION, RejectReason.MALFORMED_JSON),
    ("json-array", b"[0.5, -1.0]", REGRESSION, RejectReason.NOT_AN_OBJECT),
    ("json-string", '"an event"', REGRESSION, RejectReason.NOT_AN_OBJECT),
    ("json-null", b"null", REGRESSION, RejectReason.NOT_AN_OBJECT),
    ("no-x", _raw(x=...), REGRESSION, RejectReason.MISSING_FIELD),
    ("no-event-id", _raw(event_id=...), REGRESSION, RejectReason.MISSING_FIELD),
    ("null-task-id", _raw(task_id=None), REGRESSION, RejectReason.MISSING_FIELD),
    ("x-not-a-list", _raw(x="0.5,-1.0"), REGRESSION, RejectReason.INVALID_TYPE),
    ("x-has-a-string", _raw(x=[0.5, "1.0"]), REGRESSION, RejectReason.INVALID_TYPE),
    ("x-has-a-boolean", _raw(x=[0.5, True]), REGRESSION, RejectReason.INVALID_TYPE),
    ("x-has-a-list", _raw(x=[0.5, [1.0]]), REGRESSION, RejectReason.INVALID_TYPE),
    ("y-a-string", _raw(y="1.5"), REGRESSION, RejectReason.INVALID_TYPE),
    ("y-a-boolean", _raw(y=True), CLASSIFICATION, RejectReason.INVALID_TYPE),
    ("ts-a-string", _raw(ts="2024-11-27T00:00:00Z"), REGRESSION, RejectReason.INVALID_TYPE),
    ("event-id-a-number", _raw(event_id=17), REGRESSION, RejectReason.INVALID_TYPE),
    ("event-id-empty", _raw(event_id=""), REGRESSION, RejectReason.INVALID_TYPE),
    (
        "event-id-lone-surrogate",
        b'{"event_id": "\\ud800", "task_id": "t1", "x": [0.5, 1.0]}',
        REGRESSION,
        RejectReason.INVALID_TYPE,
    ),
    ("task-id-too-long", _raw(task_id="t" * 257), REGRESSION, RejectReason.INVALID_TYPE),
    ("x-too-short", _raw(x=[0.5]), REGRESSION, RejectReason.WRONG_DIMENSION),
    ("x-too-long", _raw(x=[0.5, 1.0, 2.0]), REGRESSION, RejectReason.WRONG_DIMENSION),
    ("x-empty", _raw(x=[]), REGRESSION, RejectReason.WRONG_DIMENSION),
    (
        "x-nan-literal",
        b'{"event_id": "e1", "task_id": "t1", "x": [NaN, 1.0]}',
        REGRESSION,
        RejectReason.NON_FINITE,
    ),
    (
        "x-overflowing-float",
        b'{"event_id": "e1", "task_id": "t1", "x": [1e400, 1.0]}',
        REGRESSION,
        RejectReason.NON_FINITE,
    ),
    (
        "x-overflowing-int",
        b'{"event_id": "e1", "task_id": "t1", "x": [1, ' + b"9" * 400 + b"]}",
        REGRESSION,
        RejectReason.NON_FINITE,
    ),
    ("y-infinity", _raw(y=math.inf), REGRESSION, RejectReason.NON_FINITE),
    ("y-overflowing-int", _raw(y=10**400), REGRESSION, RejectReason.NON_FINITE),
    ("y-nan-classification", _raw(y=math.nan), CLASSIFICATION, RejectReason.NON_FINITE),
    ("ts-minus-infinity", _raw(ts=-math.inf), REGRESSION, RejectReason.NON_FINITE),
    ("label-fractional", _raw(y=2.5), CLASSIFICATION, RejectReason.INVALID_LABEL),
    ("label-negative", _raw(y=-1), CLASSIFICATION, RejectReason.INVALID_LABEL),
    ("label-equal-to-n-classes", _raw(y=10), CLASSIFICATION, RejectReason.INVALID_LABEL),
    ("label-huge", _raw(y=10**400), CLASSIFICATION, RejectReason.INVALID_LABEL),
]


@pytest.mark.parametrize(
    ("raw", "schema", "reason"), [case[1:] for case in REJECTIONS], ids=[c[0] for c in REJECTIONS]
)
def test_parse_rejects_with_reason_when_input_is_bad(
    raw: bytes | str, schema: EventSchema, reason: RejectReason
) -> None:
    result = parse_event(raw, schema)

    assert isinstance(result, Rejection)
    assert result.reason is reason
    assert result.detail
    assert result.raw == (raw if isinstance(raw, bytes) else raw.encode())[:MAX_RAW_BYTES]


def test_rejection_table_covers_every_reason_when_listed() -> None:
    # decision and reward events have reasons of their own (tests/unit/test_decision_events.py)
    assert {case[3] for case in REJECTIONS} == set(RejectReason) - events.DECISION_REASONS


def test_parse_explains_dimension_when_x_has_wrong_length() -> None:
    result = parse_event(_raw(event_id="e7", task_id="t3", x=[1, 2, 3]), REGRESSION)

    assert isinstance(result, Rejection)
    assert result.detail == "x has 3 values, expected 2"
    assert (result.event_id, result.task_id) == ("e7", "t3")


@pytest.mark.parametrize(
    ("raw", "event_id", "task_id"),
    [
        (b"not json", None, None),
        (_raw(event_id="e7", task_id=12, x=[1.0]), "e7", None),
        (_raw(event_id="e7", task_id="t3", x=[math.nan, 1.0]), "e7", "t3"),
    ],
    ids=["malformed", "task-id-a-number", "non-finite"],
)
def test_rejection_carries_ids_when_recoverable(
    raw: bytes, event_id: str | None, task_id: str | None
) -> None:
    result = parse_event(raw, REGRESSION)

    assert isinstance(result, Rejection)
    assert (result.event_id, result.task_id) == (event_id, task_id)


def test_parse_accepts_regression_event_when_valid() -> None:
    raw = _raw(x=[0.5, -1], y=3, ts=1_732_670_000.5, extra_field={"ignored": True})

    event = parse_event(raw, REGRESSION)

    assert event == Event(event_id="e1", task_id="t1", x=(0.5, -1.0), y=3.0, ts=1_732_670_000.5)
    assert isinstance(event, Event)
    assert type(event.y) is float
    assert all(type(value) is float for value in event.x)
    assert event.labelled


@pytest.mark.parametrize("label", [0, 9, 2.0], ids=["first-class", "last-class", "integral-float"])
def test_parse_accepts_class_index_when_in_range(label: float) -> None:
    event = parse_event(_raw(y=label), CLASSIFICATION)

    assert isinstance(event, Event)
    assert type(event.y) is int
    assert event.y == int(label)


def test_parse_accepts_unlabelled_event_when_y_is_absent_or_null() -> None:
    absent = parse_event(_raw(), CLASSIFICATION)
    null = parse_event(_raw(y=None, ts=None), CLASSIFICATION)

    assert isinstance(absent, Event)
    assert absent == null
    assert not absent.labelled


@pytest.mark.parametrize(
    "to_input",
    [
        pytest.param(lambda raw: raw, id="bytes"),
        pytest.param(lambda raw: raw.decode(), id="str"),
        pytest.param(json.loads, id="dict"),
        pytest.param(bytearray, id="bytearray"),
    ],
)
def test_parse_gives_same_event_when_input_type_differs(to_input: Any) -> None:
    raw = _raw(x=[1, 2.5], y=0.25, ts=5)
    expected = Event(event_id="e1", task_id="t1", x=(1.0, 2.5), y=0.25, ts=5.0)

    assert parse_event(to_input(raw), REGRESSION) == expected


def test_parse_rejects_without_parsing_when_input_is_oversized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an oversized event was parsed")

    monkeypatch.setattr(json, "loads", must_not_parse)
    monkeypatch.setattr(Event, "model_validate_json", must_not_parse)
    schema = EventSchema(x_dim=2, task="regression", max_bytes=1024)

    for raw in (b"[" * 100_000, "é" * 600):  # "é" is 2 bytes in UTF-8
        result = parse_event(raw, schema)
        assert isinstance(result, Rejection)
        assert result.reason is RejectReason.OVERSIZED
        assert len(result.raw) <= MAX_RAW_BYTES


def test_parse_counts_utf8_bytes_when_input_is_str() -> None:
    accented = json.dumps({"event_id": "é" * 10, "task_id": "t1", "x": [0, 1]}, ensure_ascii=False)
    plain = accented.replace("é", "e")
    schema = EventSchema(x_dim=2, task="regression", max_bytes=len(accented.encode()) - 1)

    rejected = parse_event(accented, schema)

    assert isinstance(rejected, Rejection)
    assert rejected.reason is RejectReason.OVERSIZED
    assert isinstance(parse_event(plain, schema), Event)


def test_parse_rejects_when_input_is_not_bytes_str_or_mapping() -> None:
    result = parse_event(42, REGRESSION)  # type: ignore[arg-type]

    assert isinstance(result, Rejection)
    assert result.reason is RejectReason.INVALID_TYPE


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=512))
def test_parse_never_raises_when_given_arbitrary_bytes(raw: bytes) -> None:
    assert isinstance(parse_event(raw, REGRESSION), Event | Rejection)


@settings(max_examples=300, deadline=None)
@given(raw=st.text(max_size=512))
def test_parse_never_raises_when_given_arbitrary_text(raw: str) -> None:
    assert isinstance(parse_event(raw, CLASSIFICATION), Event | Rejection)


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from([10**400, -(10**400), 2.0, 9, 10, -1, ""])
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
_NUMBERS = st.floats() | st.integers(-3, 12) | st.sampled_from([2.0, 9.0, 10**400, -(10**400)])
_NEAR_VALID_EVENTS = st.fixed_dictionaries(
    {
        "event_id": st.just("e1") | st.text(max_size=3),
        "task_id": st.just("t1") | st.text(min_size=255, max_size=257),
        "x": st.lists(_NUMBERS, min_size=2, max_size=2) | st.lists(_JSON_SCALARS, max_size=3),
    },
    optional={"y": _NUMBERS | _JSON_SCALARS, "ts": _NUMBERS | _JSON_SCALARS, "other": _JSON_VALUES},
)
_WILD_EVENTS = st.fixed_dictionaries(
    {},
    optional={name: _JSON_VALUES for name in ("event_id", "task_id", "x", "y", "ts")},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_NEAR_VALID_EVENTS | _WILD_EVENTS, schema=st.sampled_from([REGRESSION, CLASSIFICATION]))
def test_fast_path_agrees_with_reference_checker_when_input_is_near_valid(
    obj: dict[str, Any], schema: EventSchema
) -> None:
    try:
        raw = json.dumps(obj).encode()
    except ValueError:  # an int too long to print
        return

    fast = parse_event(raw, schema)
    reference = events._parse_slow(raw, schema)
    from_mapping = parse_event(obj, schema)

    assert fast == reference
    if isinstance(fast, Event):
        assert from_mapping == fast
        assert all(type(value) is float for value in fast.x)
        assert fast.y is None or type(fast.y) is (float if schema is REGRESSION else int)
    else:
        assert isinstance(from_mapping, Rejection)
        assert from_mapping.reason is fast.reason


def test_rejection_record_is_json_and_round_trips_raw_when_serialised() -> None:
    raw = b'{"event_id": "e1", "task_id": "t1", "x": [NaN, 1.0]}\xff' + b"z" * 5000
    rejection = parse_event(raw, REGRESSION)
    assert isinstance(rejection, Rejection)

    record = json.loads(json.dumps(rejection.to_record()))

    assert record["reason"] == "malformed_json"
    assert record["detail"] == rejection.detail
    assert base64.b64decode(record["raw_b64"]) == raw[:MAX_RAW_BYTES]
    assert record["event_id"] is None and record["task_id"] is None


def test_rejection_truncates_raw_when_constructed_directly() -> None:
    rejection = Rejection(reason=RejectReason.OVERSIZED, detail="too big", raw=b"a" * 10_000)

    assert rejection.raw == b"a" * MAX_RAW_BYTES


@pytest.mark.parametrize(
    "prediction",
    [
        Prediction(
            event_id="e1",
            task_id="t1",
            prediction=0.25,
            std=0.125,
            model_version=3,
            shots=12,
            labelled=True,
            loss=0.0625,
            latency_s=0.0004,
        ),
        Prediction(
            event_id="e2",
            task_id="t1",
            prediction=2,
            probabilities=(0.1, 0.2, 0.7),
            model_version=0,
            shots=0,
            labelled=False,
            loss=None,
            latency_s=0.0,
        ),
    ],
    ids=["regression", "classification"],
)
def test_prediction_json_round_trips_when_serialised(prediction: Prediction) -> None:
    text = prediction.to_json()

    assert json.loads(text)["event_id"] == prediction.event_id
    assert Prediction.model_validate_json(text) == prediction
    # regression: a standard deviation; classification: probabilities and no std
    assert json.loads(text)["std"] == (0.125 if prediction.probabilities is None else None)


def test_prediction_json_is_strict_json_when_values_are_not_finite() -> None:
    prediction = Prediction(
        event_id="e1",
        task_id="t1",
        prediction=math.nan,
        probabilities=(math.inf, 0.0),
        model_version=1,
        shots=1,
        labelled=True,
        loss=math.inf,
        latency_s=0.001,
        std=math.inf,
    )

    record = json.loads(prediction.to_json(), parse_constant=pytest.fail)
    assert record["std"] is None

    assert record["prediction"] is None
    assert record["probabilities"] == [None, 0.0]
    assert record["loss"] is None


def test_event_json_round_trips_through_parse_when_serialised() -> None:
    event = Event(event_id="e1", task_id="t1", x=(0.5, 1e-300), y=1.5, ts=12.0)

    assert parse_event(event.to_json(), REGRESSION) == event


@pytest.mark.parametrize(
    "fields",
    [
        {"x": (True, 1.0)},
        {"x": ("1.0", 1.0)},
        {"x": (math.nan, 1.0)},
        {"y": math.inf},
        {"event_id": ""},
        {"task_id": 3},
    ],
    ids=["bool-in-x", "string-in-x", "nan-in-x", "infinite-y", "empty-event-id", "int-task-id"],
)
def test_event_refuses_construction_when_fields_are_invalid(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Event(**{"event_id": "e1", "task_id": "t1", "x": (0.0, 1.0), **fields})


def test_event_is_immutable_when_constructed() -> None:
    event = Event(event_id="e1", task_id="t1", x=(0.0,))

    with pytest.raises(ValidationError):
        event.y = 1.0


def test_schema_refuses_classification_when_n_classes_is_missing() -> None:
    with pytest.raises(ValidationError, match="n_classes is required"):
        EventSchema(x_dim=2, task="classification")
