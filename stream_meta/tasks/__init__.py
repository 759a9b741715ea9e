"""Task families (distributions over tasks), the synthetic interleaved task stream and its drift
scenarios.

>>> from stream_meta.tasks import FAMILIES, get_family
>>> FAMILIES
('sinusoid', 'digits', 'bandit')
>>> family = get_family("digits", split="test", n_way=3)
>>> family.kind, family.n_classes, family.x_dim, family.loss_name
('classification', 3, 64, 'cross_entropy')
>>> get_family("mnist")
Traceback (most recent call last):
...
ValueError: unknown task family 'mnist'; known: sinusoid, digits, bandit

The families of ``functions`` (linear, quadratic, square wave, mixtures) only serve drift
scenarios and are not registered: ``FAMILIES`` names the families a model is trained on.
``RelatedTaskStream`` (:mod:`stream_meta.tasks.related`) is the stream of related tasks and its
control that retrieval is measured on.

>>> from stream_meta.tasks import SCENARIOS, get_scenario
>>> list(SCENARIOS)  # doctest: +NORMALIZE_WHITESPACE
['sinusoid-stationary', 'sinusoid-amplitude-shift', 'sinusoid-new-family', 'sinusoid-gradual',
 'sinusoid-recurring', 'digits-new-transform']
>>> get_scenario("sinusoid-gradual").drift_points
(20000,)
"""

from __future__ import annotations

from typing import Any

from stream_meta.tasks.bandit import BanditFamily, logged_stream
from stream_meta.tasks.base import TaskFamily
from stream_meta.tasks.digits import DigitsFamily
from stream_meta.tasks.functions import (
    LinearFamily,
    MixtureFamily,
    QuadraticFamily,
    SquareWaveFamily,
    TransformedDigitsFamily,
)
from stream_meta.tasks.related import RelatedEvent, RelatedTaskStream
from stream_meta.tasks.scenarios import (
    SCENARIOS,
    Regime,
    Scenario,
    ScenarioStream,
    Transition,
    get_scenario,
)
from stream_meta.tasks.sinusoid import SinusoidFamily
from stream_meta.tasks.stream import StreamEvent, TaskStream

__all__ = [
    "FAMILIES",
    "SCENARIOS",
    "BanditFamily",
    "DigitsFamily",
    "LinearFamily",
    "MixtureFamily",
    "QuadraticFamily",
    "Regime",
    "RelatedEvent",
    "RelatedTaskStream",
    "Scenario",
    "ScenarioStream",
    "SinusoidFamily",
    "SquareWaveFamily",
    "StreamEvent",
    "TaskFamily",
    "TaskStream",
    "TransformedDigitsFamily",
    "Transition",
    "get_family",
    "get_family_class",
    "get_scenario",
    "logged_stream",
]

_REGISTRY: dict[str, type[TaskFamily]] = {
    SinusoidFamily.name: SinusoidFamily,
    DigitsFamily.name: DigitsFamily,
    BanditFamily.name: BanditFamily,
}
FAMILIES: tuple[str, ...] = tuple(_REGISTRY)


def get_family_class(name: str) -> type[TaskFamily]:
    """The family class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}") from None


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """Build the family registered as ``name`` with its constructor ``kwargs``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}") from None
    return cls(**kwargs)
