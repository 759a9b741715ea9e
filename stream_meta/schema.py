"""Task schemas: what the events of a user's tasks look like.

A schema says how many features an event's ``x`` has (and, optionally, their names), what its
label ``y`` is (a regression value, or a class index ``0..C-1`` with the classes' names) and
whether a task's events are time-ordered (then training shows a task's support strictly before
its queries, as the stream will). It is declared in TOML::

    [schema]
    x_dim = 2
    feature_names = ["floor", "log_uranium"]
    target = "regression"          # or "classification", with classes = ["N", "Y"]
    time_ordered = false

or inferred from a log (``stream-meta schema LOG``, :func:`stream_meta.tasklog.infer_schema`).
The scaling statistics are not part of the declaration: ``train --data`` fits them on the
training tasks and stores them, with the schema, in the checkpoint
(:class:`~stream_meta.scaling.Scaling`). The built-in families are schemas too
(:func:`family_schema`): every checkpoint serves the schema in its manifest.

>>> s = TaskSchema(x_dim=3, target="classification", classes=["a", "b", "c"])
>>> s.n_classes, s.event_schema().n_classes
(3, 3)
>>> TaskSchema(x_dim=2, feature_names=["only-one"])
Traceback (most recent call last):
...
stream_meta.schema.SchemaError: schema: feature_names has 1 names, x_dim is 2
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stream_meta.events import EventSchema

__all__ = ["SchemaError", "TaskSchema", "family_schema", "load_schema"]

#: the most classes an inferred or declared classification schema may have
MAX_CLASSES = 1000


class SchemaError(ValueError):
    """A schema that cannot be used, or a log that does not fit one (one clear message)."""


class TaskSchema(BaseModel):
    """The shape of one kind of task; see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    x_dim: int = Field(ge=1, description="Length of every event's feature vector x.")
    feature_names: list[str] | None = Field(default=None, description="One name per feature.")
    target: Literal["regression", "classification"] = "regression"
    classes: list[str] | None = Field(
        default=None, description="Class names (classification): label i is classes[i]."
    )
    time_ordered: bool = Field(
        default=False, description="A task's events are in time order (support before query)."
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SchemaError(_first_error(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> TaskSchema:
        if self.feature_names is not None and len(self.feature_names) != self.x_dim:
            raise ValueError(
                f"feature_names has {len(self.feature_names)} names, x_dim is {self.x_dim}"
            )
        if self.target == "classification":
            if not self.classes or not 2 <= len(self.classes) <= MAX_CLASSES:
                raise ValueError(
                    f"a classification schema needs 2..{MAX_CLASSES} classes "
                    '(classes = ["no", "yes"]); labels are class indices 0..C-1'
                )
        elif self.classes is not None:
            raise ValueError("classes are only for target = 'classification'")
        return self

    @property
    def n_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def event_schema(self, max_bytes: int | None = None) -> EventSchema:
        """What :func:`~stream_meta.events.parse_event` checks events against."""
        extra = {} if max_bytes is None else {"max_bytes": max_bytes}
        return EventSchema(x_dim=self.x_dim, task=self.target, n_classes=self.n_classes, **extra)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def to_toml(self) -> str:
        """The ``[schema]`` table of a settings or schema file."""
        lines = ["[schema]", f"x_dim = {self.x_dim}"]
        if self.feature_names is not None:
            lines.append(f"feature_names = {_toml_list(self.feature_names)}")
        lines.append(f'target = "{self.target}"')
        if self.classes is not None:
            lines.append(f"classes = {_toml_list(self.classes)}")
        lines.append(f"time_ordered = {'true' if self.time_ordered else 'false'}")
        return "\n".join(lines) + "\n"


def _toml_list(items: list[str]) -> str:
    import json

    return "[" + ", ".join(json.dumps(s) for s in items) + "]"  # a JSON string is a TOML one


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"schema: {where}: {msg}" if where else f"schema: {msg}"


def load_schema(path: str | Path) -> TaskSchema:
    """The ``[schema]`` table of a TOML file; raises :class:`SchemaError` (never a traceback)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"schema file not found: {p}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{p} is not valid TOML: {exc}") from None
    table = data.get("schema")
    if not isinstance(table, dict):
        raise SchemaError(f"{p} has no [schema] table")
    try:
        return TaskSchema(**table)
    except SchemaError as exc:
        raise SchemaError(f"{p}: {exc}") from None


def family_schema(family: Any) -> TaskSchema:
    """The schema of a built-in task family (its simulator is the family itself)."""
    classes = None
    if family.kind == "classification":
        classes = [str(i) for i in range(int(family.n_classes))]
    return TaskSchema(x_dim=family.x_dim, target=family.kind, classes=classes)
