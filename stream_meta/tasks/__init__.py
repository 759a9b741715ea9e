"""Task families (distributions over tasks) and the synthetic interleaved task stream.

>>> from stream_meta.tasks import FAMILIES, get_family
>>> FAMILIES
('sinusoid', 'digits')
>>> family = get_family("digits", split="test", n_way=3)
>>> family.kind, family.n_classes, family.x_dim, family.loss_name
('classification', 3, 64, 'cross_entropy')
>>> get_family("mnist")
Traceback (most recent call last):
...
ValueError: unknown task family 'mnist'; known: sinusoid, digits
"""

from __future__ import annotations

from typing import Any

from stream_meta.tasks.base import TaskFamily
from stream_meta.tasks.digits import DigitsFamily
from stream_meta.tasks.sinusoid import SinusoidFamily
from stream_meta.tasks.stream import StreamEvent, TaskStream

__all__ = [
    "FAMILIES",
    "DigitsFamily",
    "SinusoidFamily",
    "StreamEvent",
    "TaskFamily",
    "TaskStream",
    "get_family",
]

_REGISTRY: dict[str, type[TaskFamily]] = {
    SinusoidFamily.name: SinusoidFamily,
    DigitsFamily.name: DigitsFamily,
}
FAMILIES: tuple[str, ...] = tuple(_REGISTRY)


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """Build the family registered as ``name`` with its constructor ``kwargs``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}") from None
    return cls(**kwargs)
