"""Event, prediction and rejection records, and the validation of incoming events.

Every event that enters the engine goes through :func:`parse_event` exactly once. It never
raises for bad input: it returns either a valid :class:`Event` or a :class:`Rejection` that says
why the input was refused (a :class:`RejectReason`), with the ids when they could be recovered
and the first :data:`MAX_RAW_BYTES` bytes of the original input, ready for a dead-letter sink.

Validation is a two-speed design. The hot path hands JSON bytes/str to pydantic-core's JSON
validator (Rust) through the strictly typed :class:`Event` model and only adds the checks that
depend on the :class:`EventSchema` (dimension, label). Input that fails there is re-read by a
plain-Python reference checker, which classifies the problem precisely; mappings go straight to
that checker. The reference checker is the single source of truth: the fast path only ever
accepts what the reference checker accepts (the unit tests hold them to that).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "DECISION_REASONS",
    "MAX_ID_LENGTH",
    "MAX_RAW_BYTES",
    "Event",
    "EventSchema",
    "Prediction",
    "RejectReason",
    "Rejection",
    "id_problem",
    "parse_event",
]

MAX_ID_LENGTH = 256
"""Longest ``event_id`` / ``task_id`` accepted, in characters."""

MAX_RAW_BYTES = 4096
"""How much of the original input a :class:`Rejection` keeps, in bytes."""

_FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]
_StrictInt = Annotated[int, Strict()]
_Id = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class Event(BaseModel):
    """One validated observation of one task.

    ``x`` is the input vector ``[x_dim]``; ``y`` the label when the event is labelled (a float
    for regression, a class index for classification once it went through
    :func:`parse_event`); ``ts`` the event time in unix seconds, when the producer gave one.
    Fields are strict (no strings as numbers, no booleans as numbers) and finite.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: _Id
    task_id: _Id
    x: tuple[_FiniteFloat, ...]
    y: _FiniteFloat | _StrictInt | None = None
    ts: _FiniteFloat | None = None

    @property
    def labelled(self) -> bool:
        """Whether the event carries a label (``y`` is not None)."""
        return self.y is not None

    def to_json(self) -> str:
        """Serialise to compact JSON, the wire format :func:`parse_event` reads back."""
        return self.model_dump_json()


class RejectReason(StrEnum):
    """Why :func:`parse_event` refused an input (one value per distinct fault); the last four
    (:data:`DECISION_REASONS`) are given to decision and reward events only."""

    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    INVALID_TYPE = "invalid_type"
    WRONG_DIMENSION = "wrong_dimension"
    NON_FINITE = "non_finite"
    OVERSIZED = "oversized"
    INVALID_LABEL = "invalid_label"
    # decision and reward events only (stream_meta.decision_events, stream_meta.decider)
    DUPLICATE_ACTION = "duplicate_action"
    NOT_DECIDABLE = "not_decidable"
    UNKNOWN_DECISION = "unknown_decision"
    LATE_REWARD = "late_reward"


#: the reasons only decision and reward events get (:func:`parse_event` never gives them)
DECISION_REASONS = frozenset(
    {
        RejectReason.DUPLICATE_ACTION,
        RejectReason.NOT_DECIDABLE,
        RejectReason.UNKNOWN_DECISION,
        RejectReason.LATE_REWARD,
    }
)


class Rejection(BaseModel):
    """An input that :func:`parse_event` refused, with enough context to dead-letter it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: RejectReason
    detail: str = Field(description="Human-readable cause, e.g. 'x has 3 values, expected 1'.")
    event_id: str | None = Field(default=None, description="The event id, if recoverable.")
    task_id: str | None = Field(default=None, description="The task id, if recoverable.")
    raw: bytes = Field(
        default=b"", description=f"The original input, truncated to {MAX_RAW_BYTES} bytes."
    )

    @field_validator("raw")
    @classmethod
    def _truncate_raw(cls, raw: bytes) -> bytes:
        return raw[:MAX_RAW_BYTES]

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable dict: the fields, with ``raw`` base64-encoded as ``raw_b64``."""
        return {
            "reason": self.reason.value,
            "detail": self.detail,
            "event_id": self.event_id,
            "task_id": self.task_id,
            "raw_b64": base64.b64encode(self.raw).decode("ascii"),
        }


class EventSchema(BaseModel):
    """What a valid event looks like for the model being served.

    ``n_classes`` is required for classification and ignored for regression. ``max_bytes``
    bounds the size of a serialised event (bytes, or UTF-8 bytes of a str).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    x_dim: int = Field(ge=1, description="Length of the input vector x.")
    task: Literal["regression", "classification"] = Field(description="Kind of label y.")
    n_classes: int | None = Field(
        default=None, ge=2, description="Number of classes; required for classification."
    )
    max_bytes: int = Field(default=65536, ge=1, description="Largest serialised event accepted.")

    @model_validator(mode="after")
    def _classes_for_classification(self) -> Self:
        if self.task == "classification" and self.n_classes is None:
            raise ValueError("n_classes is required when task is 'classification'")
        return self


class Prediction(BaseModel):
    """What the engine emits for every accepted event (the output record).

    ``to_json`` writes non-finite floats as ``null`` so the output is always valid JSON.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="null")

    event_id: str
    task_id: str
    prediction: float | int = Field(description="Regression value or predicted class index.")
    probabilities: tuple[float, ...] | None = Field(
        default=None, description="Class probabilities [n_classes] (classification only)."
    )
    std: float | None = Field(
        default=None,
        description="Predictive standard deviation in the target's units (regression; "
        "mean +- 1.645 std is the central 90% interval). None when the strategy has none.",
    )
    model_version: int = Field(ge=0, description="Version of the model snapshot that predicted.")
    shots: int = Field(ge=0, description="Support examples the task had when predicting.")
    labelled: bool = Field(description="Whether the event carried a label.")
    loss: float | None = Field(
        default=None, description="Prequential loss (predict, then reveal) when labelled."
    )
    latency_s: float = Field(ge=0, description="Time from receipt to prediction, in seconds.")
    duplicate: bool = Field(
        default=False,
        description="A labelled event whose id was already learned: predicted, not learned again.",
    )
    expert: int | None = Field(
        default=None,
        description="With several experts served: the id of the expert with the largest "
        "routing weight for this event (the prediction is their mixture); None with one model.",
    )

    def to_json(self) -> str:
        """Serialise to compact JSON (one line, suitable for a Kafka value or a JSONL file)."""
        return self.model_dump_json()


# --------------------------------------------------------------------------------------------
# parsing


_REQUIRED = ("event_id", "task_id", "x")


def parse_event(raw: bytes | str | Mapping[str, Any], schema: EventSchema) -> Event | Rejection:
    """Validate one raw event against ``schema``; never raises for bad input.

    ``raw`` is the JSON of an object (bytes or str) or an already decoded mapping. Checks run in
    this order and the first failing one decides the reason: size (``oversized``, before any
    parsing; not applied to mappings), JSON syntax and UTF-8 (``malformed_json``), top-level
    type (``not_an_object``), presence of ``event_id``/``task_id``/``x`` (``missing_field``; an
    explicit ``null`` counts as missing), types (``invalid_type``), ``len(x)``
    (``wrong_dimension``), NaN/inf in x, y or ts (``non_finite``), and the label
    (``invalid_label``). Unknown fields are ignored. Regression labels come out as floats,
    classification labels as ints (``2.0`` is read as ``2``).

    >>> schema = EventSchema(x_dim=1, task="regression")
    >>> parse_event(b'{"event_id": "e1", "task_id": "t1", "x": [0.5], "y": 2}', schema)
    Event(event_id='e1', task_id='t1', x=(0.5,), y=2.0, ts=None)
    >>> rejection = parse_event('{"event_id": "e2", "task_id": "t1", "x": [1, 2]}', schema)
    >>> rejection.reason, rejection.detail, rejection.event_id
    (<RejectReason.WRONG_DIMENSION: 'wrong_dimension'>, 'x has 2 values, expected 1', 'e2')
    """
    if isinstance(raw, bytes | str):
        if isinstance(raw, bytes):
            size = len(raw)
        elif len(raw) * 4 <= schema.max_bytes:  # a code point is at most 4 bytes in UTF-8
            size = 0
        else:
            size = len(raw.encode("utf-8", "surrogatepass"))
        if size > schema.max_bytes:
            return _reject(
                RejectReason.OVERSIZED,
                f"event is {size} bytes, limit is {schema.max_bytes}",
                raw,
                None,
            )
        try:
            event = Event.model_validate_json(raw)
        except ValidationError:
            return _parse_slow(raw, schema)
        return _check_schema(event, schema, raw)
    if isinstance(raw, Mapping):
        return _check_object(raw, schema, raw)
    if isinstance(raw, bytearray | memoryview):
        return parse_event(bytes(raw), schema)
    return _reject(
        RejectReason.INVALID_TYPE,
        f"input must be bytes, str or a mapping, got {type(raw).__name__}",
        raw,
        None,
    )


def _check_schema(event: Event, schema: EventSchema, raw: bytes | str) -> Event | Rejection:
    """The schema-dependent checks on an already type-checked event (fast path)."""
    if len(event.x) != schema.x_dim:
        return _reject(
            RejectReason.WRONG_DIMENSION,
            f"x has {len(event.x)} values, expected {schema.x_dim}",
            raw,
            event,
        )
    y = event.y
    if y is None:
        return event
    label = _check_label(y, schema)
    if isinstance(label, tuple):
        return _reject(label[0], label[1], raw, event)
    if label is not y:
        # Normalise the label type in place: cheaper than a copy (this event was created by
        # this call and has not escaped yet), and the value was validated just above.
        event.__dict__["y"] = label
    return event


def _parse_slow(raw: bytes | str, schema: EventSchema) -> Event | Rejection:
    """Decode with the standard library and classify the problem precisely."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        return _reject(
            RejectReason.MALFORMED_JSON, f"not valid UTF-8 at byte {exc.start}", raw, None
        )
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return _reject(
            RejectReason.MALFORMED_JSON,
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            raw,
            None,
        )
    except (ValueError, RecursionError) as exc:  # e.g. int too long, nesting too deep
        return _reject(RejectReason.MALFORMED_JSON, f"invalid JSON: {exc}", raw, None)
    if not isinstance(obj, dict):
        return _reject(
            RejectReason.NOT_AN_OBJECT,
            f"expected a JSON object, got {_kind(obj)}",
            raw,
            None,
        )
    return _check_object(obj, schema, raw)


def _check_object(
    obj: Mapping[Any, Any], schema: EventSchema, raw: bytes | str | Mapping[Any, Any]
) -> Event | Rejection:
    """The reference checker: every rule, in order, on a decoded JSON object."""
    missing = [name for name in _REQUIRED if obj.get(name) is None]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        plural = "s" if len(missing) > 1 else ""
        return _reject(
            RejectReason.MISSING_FIELD, f"missing required field{plural} {names}", raw, obj
        )

    event_id, task_id, xs = obj["event_id"], obj["task_id"], obj["x"]
    for name, value in (("event_id", event_id), ("task_id", task_id)):
        problem = id_problem(name, value)
        if problem is not None:
            return _reject(RejectReason.INVALID_TYPE, problem, raw, obj)
    if not isinstance(xs, list | tuple):
        return _reject(
            RejectReason.INVALID_TYPE, f"x must be an array of numbers, got {_kind(xs)}", raw, obj
        )
    for i, value in enumerate(xs):
        if not _is_number(value):
            return _reject(
                RejectReason.INVALID_TYPE,
                f"x[{i}] is {_kind(value, article=True)}, expected a number",
                raw,
                obj,
            )
    y, ts = obj.get("y"), obj.get("ts")
    for name, value in (("y", y), ("ts", ts)):
        if value is not None and not _is_number(value):
            return _reject(
                RejectReason.INVALID_TYPE,
                f"{name} is {_kind(value, article=True)}, expected a number",
                raw,
                obj,
            )

    if len(xs) != schema.x_dim:
        return _reject(
            RejectReason.WRONG_DIMENSION,
            f"x has {len(xs)} values, expected {schema.x_dim}",
            raw,
            obj,
        )

    x = _to_finite_floats(xs)
    if isinstance(x, int):
        return _reject(RejectReason.NON_FINITE, f"x[{x}] is not finite", raw, obj)
    if ts is not None:
        ts = _to_finite_float(ts)
        if ts is None:
            return _reject(RejectReason.NON_FINITE, "ts is not finite", raw, obj)
    if y is not None:
        label = _check_label(y, schema)
        if isinstance(label, tuple):
            return _reject(label[0], label[1], raw, obj)
        y = label
    return Event.model_construct(event_id=event_id, task_id=task_id, x=x, y=y, ts=ts)


def id_problem(name: str, value: object) -> str | None:
    """Why ``value`` is no valid id named ``name`` (None: it is one): a string of 1 to
    :data:`MAX_ID_LENGTH` characters that UTF-8 can encode (a lone surrogate, ``"\ud800"``,
    would break the output)."""
    if not isinstance(value, str):
        return f"{name} must be a string, got {_kind(value)}"
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        return f"{name} has {len(value)} characters, expected 1..{MAX_ID_LENGTH}"
    if not _is_utf8_encodable(value):
        return f"{name} is not valid Unicode text"
    return None


def _check_label(y: float | int, schema: EventSchema) -> float | int | tuple[RejectReason, str]:
    """Normalise a numeric label for the schema's task, or say why it is refused."""
    if schema.task == "regression":
        if type(y) is float:
            return y if math.isfinite(y) else (RejectReason.NON_FINITE, "y is not finite")
        value = _to_finite_float(y)
        return (RejectReason.NON_FINITE, "y is not finite") if value is None else value
    if isinstance(y, float):
        if not math.isfinite(y):
            return RejectReason.NON_FINITE, "y is not finite"
        if not y.is_integer():
            return RejectReason.INVALID_LABEL, f"y={y!r} is not an integer class index"
    label = int(y)
    n_classes = schema.n_classes or 0
    if not 0 <= label < n_classes:
        shown = repr(y) if len(str(label)) <= 32 else "a very large number"
        return (
            RejectReason.INVALID_LABEL,
            f"y={shown} is not a class index in [0, {n_classes})",
        )
    return label


def _is_number(value: object) -> bool:
    kind = type(value)
    if kind is float or kind is int:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_utf8_encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _to_finite_float(value: float | int) -> float | None:
    try:
        result = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return result if math.isfinite(result) else None


def _to_finite_floats(xs: list[Any] | tuple[Any, ...]) -> tuple[float, ...] | int:
    """``xs`` as floats, or the index of the first value that is not finite."""
    try:
        x = tuple(map(float, xs))
    except OverflowError:  # an int beyond the float range: report it as not finite
        x = tuple(math.inf if (f := _to_finite_float(v)) is None else f for v in xs)
    if math.isfinite(sum(x)):  # a NaN or an inf anywhere makes the sum non-finite
        return x
    for i, value in enumerate(x):
        if not math.isfinite(value):
            return i
    return x  # finite values whose sum overflowed


def _kind(value: object, *, article: bool = False) -> str:
    """The JSON name of a value's type (``string``, ``array``...), for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        name = "boolean"
    elif isinstance(value, str):
        name = "string"
    elif isinstance(value, int | float):
        name = "number"
    elif isinstance(value, list | tuple):
        name = "array"
    elif isinstance(value, Mapping):
        name = "object"
    else:
        name = type(value).__name__
    if not article:
        return name
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _recover_id(source: object, name: str) -> str | None:
    value = getattr(source, name, None) if isinstance(source, Event) else None
    if isinstance(source, Mapping):
        value = source.get(name)
    if isinstance(value, str) and 1 <= len(value) <= MAX_ID_LENGTH and _is_utf8_encodable(value):
        return value
    return None


def _raw_bytes(raw: object) -> bytes:
    """The first :data:`MAX_RAW_BYTES` bytes of the original input, whatever its type."""
    if isinstance(raw, bytes):
        return raw[:MAX_RAW_BYTES]
    if isinstance(raw, str):
        return raw[:MAX_RAW_BYTES].encode("utf-8", "surrogatepass")[:MAX_RAW_BYTES]
    try:
        text = json.dumps(raw, default=repr) if isinstance(raw, Mapping) else repr(raw)
    except (TypeError, ValueError, RecursionError):  # unserialisable keys, cycles...
        try:
            text = repr(raw)
        except Exception:  # a broken __repr__ must not turn a rejection into a crash
            return b""
    return text[:MAX_RAW_BYTES].encode("utf-8", "surrogatepass")[:MAX_RAW_BYTES]


def _reject(reason: RejectReason, detail: str, raw: object, source: object) -> Rejection:
    return Rejection.model_construct(
        reason=reason,
        detail=detail,
        event_id=_recover_id(source, "event_id"),
        task_id=_recover_id(source, "task_id"),
        raw=_raw_bytes(raw),
    )
