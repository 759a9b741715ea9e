"""Stream scenarios with scheduled drift: the task distribution changes at known event indices.

A scenario is a few *regimes*, each its own :class:`~stream_meta.tasks.TaskStream` (its own
family, seed, Zipf popularity, task arrivals, clusters and labelled fraction), and a schedule of
*transitions* between them. Event ``i`` of the scenario stream comes from the regime the
schedule picks for it (a seeded draw per event); that regime's stream supplies its next event,
which is renumbered ``e{i}`` with the scenario's clock as ``ts``, and its task id is namespaced
by the regime (``"base:t000012"``, ``"new:t000012"``: every regime's tasks are distinct tasks).
A regime that comes back continues its own stream, so its old tasks return under their old ids.

A transition at ``at`` with ``width`` ``w`` gives event ``i >= at`` to the new regime with
probability ``min(1, (i - at + 1) / (w + 1))``: ``w = 0`` is an abrupt change exactly at
``at``; ``w > 0`` blends the new regime in linearly until it has every event from ``at + w`` on.
Before ``at`` every event belongs to the previous regime. Transitions never overlap.

The scenarios (``SCENARIOS``; the shipped sinusoid model was meta-trained on ``A ~ U[0.1, 5]``,
``phase ~ U[0, pi]``, the digits model on the ``"train"`` transforms):

==========================  =====================================================  ==============
name                        regimes and transitions                                default events
==========================  =====================================================  ==============
sinusoid-stationary         ``base`` (the training sinusoids) throughout           60,000
sinusoid-amplitude-shift    ``base`` -> ``shifted`` (``A ~ U[5, 10]``) at 20,000   60,000
sinusoid-new-family         ``base`` -> ``new`` at 20,000 (abrupt); ``new``:       60,000
                            linear / quadratic / square-wave tasks, 1/3 each
sinusoid-gradual            ``base`` -> ``new`` blended in over 20,000..30,000     60,000
sinusoid-recurring          ``base`` -> ``new`` at 20,000 -> ``base`` at 40,000    60,000
digits-new-transform        ``base`` (``"test"`` split, as ``run`` streams it) ->  30,000
                            ``rotated`` at 10,000: test images rotated by
                            30..45 degrees, either sign (train: 0..15, test:
                            15..25)
==========================  =====================================================  ==============

Streams are pure functions of their arguments; the regime seeds derive from the scenario seed
by regime position, so scenarios that share their first regime (all the sinusoid ones) give the
same events up to their first drift point.

>>> scenario = get_scenario("sinusoid-recurring")
>>> scenario.drift_points, scenario.model_family, scenario.default_events
((20000, 40000), 'sinusoid', 60000)
>>> stream = scenario.stream(seed=0, tasks=500)
>>> events = list(stream.iter_events(45_000))
>>> events[0].event["event_id"], events[0].event["task_id"], len(events[0].event["x"])
('e0', 'base:t000000', 1)
>>> stream.regime_of(19_999), stream.regime_of(20_000), stream.regime_of(40_000)
('base', 'new', 'base')
>>> events[20_000].event["task_id"].startswith("new:")
True
>>> stationary = get_scenario("sinusoid-stationary").stream(seed=0, tasks=500)
>>> list(stationary.iter_events(20_000)) == events[:20_000]
True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.base import FloatArray, TaskFamily
from stream_meta.tasks.digits import DigitsFamily, TransformRange
from stream_meta.tasks.functions import (
    LinearFamily,
    MixtureFamily,
    QuadraticFamily,
    SquareWaveFamily,
    TransformedDigitsFamily,
)
from stream_meta.tasks.sinusoid import SinusoidFamily
from stream_meta.tasks.stream import StreamEvent, TaskStream

__all__ = [
    "SCENARIOS",
    "Regime",
    "Scenario",
    "ScenarioStream",
    "Transition",
    "get_scenario",
]

CHUNK_EVENTS = 4096
_MODEL_FAMILIES: dict[str, TaskFamily] = {}  # filled lazily by _model_family


@dataclass(frozen=True, slots=True)
class Regime:
    """One task distribution of a scenario.

    Attributes:
        name: the regime's name, also the namespace of its task ids (``f"{name}:t000012"``);
            non-empty, without ``":"``.
        family: the family its tasks come from.
        description: a line for listings.
    """

    name: str
    family: TaskFamily
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ValueError(f"regime name must be non-empty and without ':', got {self.name!r}")


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of regime: from event ``at`` on, regime ``to`` takes over within ``width`` events.

    Event ``i >= at`` comes from ``to`` with probability ``min(1, (i - at + 1) / (width + 1))``
    (``width = 0``: every event from ``at`` on); before ``at``, from the previous regime.
    """

    at: int
    to: str
    width: int = 0

    def __post_init__(self) -> None:
        if self.at < 0 or self.width < 0:
            raise ValueError(f"at and width must be >= 0, got at={self.at}, width={self.width}")

    @property
    def end(self) -> int:
        """The first event index from which every event belongs to ``to``."""
        return self.at + self.width

    def share(self, index: NDArray[np.int64]) -> FloatArray:
        """Probability that each event ``index`` comes from ``to`` (0 before ``at``)."""
        share: FloatArray = np.clip((index - self.at + 1) / (self.width + 1), 0.0, 1.0)
        return share


def _check_schedule(regimes: Sequence[Regime], transitions: Sequence[Transition]) -> None:
    """Regimes named uniquely and compatible; transitions ordered, not overlapping, known."""
    if not regimes:
        raise ValueError("a scenario needs at least one regime")
    names = [r.name for r in regimes]
    if len(set(names)) != len(names):
        raise ValueError(f"regime names must be unique, got {names}")
    first = regimes[0].family
    for r in regimes[1:]:
        f = r.family
        if (f.kind, f.x_dim, f.n_classes) != (first.kind, first.x_dim, first.n_classes):
            raise ValueError(
                f"regime {r.name!r}: kind, x_dim and n_classes must match the first regime's "
                f"({first.kind}, {first.x_dim}, {first.n_classes}), got "
                f"({f.kind}, {f.x_dim}, {f.n_classes})"
            )
    current, free_from = names[0], 0
    for t in transitions:
        if t.to not in names:
            raise ValueError(f"transition to unknown regime {t.to!r}; known: {', '.join(names)}")
        if t.to == current:
            raise ValueError(f"transition at {t.at} goes to {t.to!r}, already the regime there")
        if t.at < free_from:
            raise ValueError(
                f"transitions must be ordered and must not overlap: one starts at {t.at}, "
                f"before {free_from}"
            )
        current, free_from = t.to, t.end + 1


class ScenarioStream:
    """An infinite, seeded stream of the events of a schedule of regimes; see the module
    docstring.

    Events are :class:`~stream_meta.tasks.StreamEvent` as a ``TaskStream`` yields them, with
    ``event_id = f"e{i}"`` (``i`` the scenario-wide index), ``task_id`` namespaced by the regime
    and ``ts`` from the scenario's own clock (exponential gaps at ``rate`` events per second,
    so strictly increasing). ``task_index``, ``cluster`` and ``params`` are the regime's own.

    Args:
        regimes: the regimes; the first one is in force from event 0.
        transitions: the schedule, ordered and not overlapping.
        seed: the only source of randomness (regime ``k``'s stream gets a seed derived from
            ``seed`` and ``k``).
        stream_kwargs: :class:`~stream_meta.tasks.TaskStream` options (``tasks``, ``clusters``,
            ``cluster_spread``, ``labelled_fraction``, ``zipf_s``, ``new_task_rate``, ``rate``),
            applied to every regime.
    """

    def __init__(
        self,
        regimes: Sequence[Regime],
        transitions: Sequence[Transition] = (),
        *,
        seed: int = 0,
        **stream_kwargs: Any,
    ) -> None:
        self.regimes = tuple(regimes)
        self.transitions = tuple(transitions)
        _check_schedule(self.regimes, self.transitions)
        for key in ("family", "seed"):
            if key in stream_kwargs:
                raise TypeError(f"{key!r} is not a stream option of a scenario")
        self.seed = int(seed)
        self.stream_kwargs = dict(stream_kwargs)
        regime_seeds = self._seeds()[1:]
        self.streams = tuple(
            TaskStream(r.family, seed=int(s.generate_state(1)[0]), **stream_kwargs)
            for r, s in zip(self.regimes, regime_seeds, strict=True)
        )
        self.rate = self.streams[0].rate  # validated by TaskStream
        self._positions = {r.name: k for k, r in enumerate(self.regimes)}
        self._picks: list[NDArray[np.int64]] = []
        self._pick_chunks: Iterator[tuple[int, NDArray[np.int64], FloatArray]] | None = None

    def __repr__(self) -> str:
        kwargs = "".join(f", {k}={v!r}" for k, v in self.stream_kwargs.items())
        return (
            f"ScenarioStream({list(self.regimes)!r}, {list(self.transitions)!r}, "
            f"seed={self.seed}{kwargs})"
        )

    @property
    def drift_points(self) -> tuple[int, ...]:
        """Event indices where a transition starts."""
        return tuple(t.at for t in self.transitions)

    def _seeds(self) -> list[np.random.SeedSequence]:
        """The schedule's seed, then one per regime (by position: stable across scenarios)."""
        seeds: list[np.random.SeedSequence] = np.random.SeedSequence(self.seed).spawn(
            1 + len(self.regimes)
        )
        return seeds

    # -- the schedule ----------------------------------------------------------------------

    def regime_probabilities(self, start: int, stop: int) -> FloatArray:
        """``[stop - start, R]``: the probability of each regime for events ``start..stop-1``."""
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
        index = np.arange(start, stop, dtype=np.int64)
        out = np.zeros((index.size, len(self.regimes)))
        out[:, 0] = 1.0
        for t in self.transitions:
            share = t.share(index)
            out *= (1.0 - share)[:, None]
            out[:, self._positions[t.to]] += share
        return out

    def _schedule(self) -> Iterator[tuple[int, NDArray[np.int64], FloatArray]]:
        """Endless chunks ``(first index, regime position [C], ts [C])`` of the schedule."""
        rng = np.random.default_rng(self._seeds()[0])
        base, ts0 = 0, 0.0
        while True:
            index = np.arange(base, base + CHUNK_EVENTS, dtype=np.int64)
            u = rng.random(CHUNK_EVENTS)
            ts = ts0 + np.cumsum(rng.exponential(1.0 / self.rate, CHUNK_EVENTS))
            picks = np.zeros(CHUNK_EVENTS, dtype=np.int64)
            current = 0
            for t in self.transitions:  # later transitions override earlier ones
                to = self._positions[t.to]
                after = index >= t.at
                picks[after] = np.where(u[after] < t.share(index[after]), to, current)
                current = to
            yield base, picks, ts
            base += CHUNK_EVENTS
            ts0 = float(ts[-1])

    def regime_indices(self, n: int) -> NDArray[np.int64]:
        """Position (in ``regimes``) of the regime behind each of the first ``n`` events."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self._pick_chunks is None:
            self._pick_chunks = self._schedule()
        while len(self._picks) * CHUNK_EVENTS < n:
            self._picks.append(next(self._pick_chunks)[1])
        if not self._picks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self._picks)[:n]

    def regime_of(self, event_index: int) -> str:
        """The name of the regime that produced event ``event_index``."""
        if event_index < 0:
            raise ValueError(f"event_index must be >= 0, got {event_index}")
        chunk, offset = divmod(event_index, CHUNK_EVENTS)
        self.regime_indices((chunk + 1) * CHUNK_EVENTS)
        return self.regimes[int(self._picks[chunk][offset])].name

    # -- the events ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[StreamEvent]:
        return self.iter_events()

    def iter_events(self, n: int | None = None) -> Iterator[StreamEvent]:
        """The stream from its start: ``n`` events, or endless when ``n`` is ``None``."""
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._events(n)

    def _events(self, n: int | None) -> Iterator[StreamEvent]:
        sources = [s.iter_events() for s in self.streams]  # lazy: drawn only when picked
        prefixes = [f"{r.name}:" for r in self.regimes]
        for base, picks, ts in self._schedule():
            if n is not None and base >= n:
                return
            count = CHUNK_EVENTS if n is None else min(CHUNK_EVENTS, n - base)
            for i, k, when in zip(
                range(base, base + count), picks[:count].tolist(), ts[:count].tolist(), strict=True
            ):
                item = next(sources[k])
                # The event dict is fresh and private to this iteration: rewrite it in place.
                event = item.event
                event["event_id"] = f"e{i}"
                event["task_id"] = prefixes[k] + event["task_id"]
                event["ts"] = when
                yield item

    def to_jsonl(self, path: str | os.PathLike[str], n: int) -> None:
        """Write the first ``n`` events' ``event`` dicts to ``path``, one JSON object a line."""
        with open(path, "w", encoding="utf-8") as out:
            for ev in self.iter_events(n):
                out.write(json.dumps(ev.event, separators=(",", ":")))
                out.write("\n")


@dataclass(frozen=True)
class Scenario:
    """A named stream scenario: regimes, a schedule of transitions, the model that serves it.

    Attributes:
        name: the name ``stream-meta scenarios`` lists and ``--scenario`` takes.
        description: one line.
        model_family: ``"sinusoid"`` or ``"digits"``: the shipped model (and event schema) that
            serves the stream.
        regimes: the regimes (the first is in force from event 0).
        transitions: the schedule (empty: stationary).
        default_events: a sensible stream length (past the last drift point).
    """

    name: str
    description: str
    model_family: str
    regimes: tuple[Regime, ...]
    transitions: tuple[Transition, ...] = ()
    default_events: int = 60_000

    def __post_init__(self) -> None:
        _check_schedule(self.regimes, self.transitions)
        model = _model_family(self.model_family)
        fam = self.regimes[0].family
        if (fam.kind, fam.x_dim, fam.n_classes) != (model.kind, model.x_dim, model.n_classes):
            raise ValueError(
                f"scenario {self.name!r}: its tasks ({fam.kind}, x_dim {fam.x_dim}, "
                f"n_classes {fam.n_classes}) do not fit the {self.model_family} model"
            )
        if self.transitions and self.transitions[-1].end >= self.default_events:
            raise ValueError(f"scenario {self.name!r}: default_events must pass the last drift")

    @property
    def drift_points(self) -> tuple[int, ...]:
        """Event indices where the distribution starts to change (a transition's ``at``)."""
        return tuple(t.at for t in self.transitions)

    def stream(self, seed: int = 0, **stream_kwargs: Any) -> ScenarioStream:
        """The scenario's events; ``stream_kwargs`` are ``TaskStream`` options for every regime."""
        return ScenarioStream(self.regimes, self.transitions, seed=seed, **stream_kwargs)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (for listings)."""
        return {
            "name": self.name,
            "description": self.description,
            "model_family": self.model_family,
            "drift_points": list(self.drift_points),
            "default_events": self.default_events,
            "regimes": [
                {"name": r.name, "family": r.family.name, "description": r.description}
                for r in self.regimes
            ],
            "transitions": [{"at": t.at, "to": t.to, "width": t.width} for t in self.transitions],
        }


def _model_family(name: str) -> TaskFamily:
    """What the shipped ``name`` model's tasks look like (kind, x_dim, n_classes)."""
    if not _MODEL_FAMILIES:
        _MODEL_FAMILIES.update({"sinusoid": SinusoidFamily(), "digits": DigitsFamily("test")})
    try:
        return _MODEL_FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r}; known: {', '.join(_MODEL_FAMILIES)}"
        ) from None


def _sinusoid_base() -> Regime:
    return Regime(
        "base", SinusoidFamily(), "sinusoids as meta-trained: A ~ U[0.1, 5], phase ~ U[0, pi]"
    )


def _new_family() -> Regime:
    family = MixtureFamily([LinearFamily(), QuadraticFamily(), SquareWaveFamily()])
    return Regime("new", family, "linear, quadratic and square-wave tasks (1/3 each)")


def _build() -> dict[str, Scenario]:
    base = _sinusoid_base()
    new = _new_family()
    shifted = Regime(
        "shifted", SinusoidFamily(amplitude=(5.0, 10.0)), "sinusoids with A ~ U[5, 10]"
    )
    digits_base = Regime("base", DigitsFamily("test"), "digits: test images and transforms")
    rotated = Regime(
        "rotated",
        TransformedDigitsFamily(
            "test", overrides={"rotation_deg": TransformRange(0.0, 30.0, 45.0)}
        ),
        "digits: test images rotated by 30..45 degrees (either sign)",
    )
    scenarios = (
        Scenario(
            "sinusoid-stationary",
            "the meta-training sinusoid distribution throughout (no drift)",
            "sinusoid",
            (base,),
        ),
        Scenario(
            "sinusoid-amplitude-shift",
            "new tasks' amplitudes jump from U[0.1, 5] to U[5, 10] at 20,000",
            "sinusoid",
            (base, shifted),
            (Transition(20_000, "shifted"),),
        ),
        Scenario(
            "sinusoid-new-family",
            "linear/quadratic/square-wave tasks replace sinusoids at 20,000 (abrupt)",
            "sinusoid",
            (base, new),
            (Transition(20_000, "new"),),
        ),
        Scenario(
            "sinusoid-gradual",
            "linear/quadratic/square-wave tasks blended in over 20,000..30,000",
            "sinusoid",
            (base, new),
            (Transition(20_000, "new", width=10_000),),
        ),
        Scenario(
            "sinusoid-recurring",
            "new function families at 20,000; the old sinusoid tasks come back at 40,000",
            "sinusoid",
            (base, new),
            (Transition(20_000, "new"), Transition(40_000, "base")),
        ),
        Scenario(
            "digits-new-transform",
            "digit tasks rotated by 30..45 degrees (never seen) from 10,000",
            "digits",
            (digits_base, rotated),
            (Transition(10_000, "rotated"),),
            default_events=30_000,
        ),
    )
    return {s.name: s for s in scenarios}


SCENARIOS: dict[str, Scenario] = _build()
"""Every built-in scenario by name (see the module docstring)."""


def get_scenario(name: str) -> Scenario:
    """The built-in scenario called ``name``.

    >>> get_scenario("nope")
    Traceback (most recent call last):
    ...
    ValueError: unknown scenario 'nope'; known: sinusoid-stationary, sinusoid-amplitude-shift, \
sinusoid-new-family, sinusoid-gradual, sinusoid-recurring, digits-new-transform
    """
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
