"""Drift scenarios: scheduled regimes over interleaved task streams, and the extra families."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from stream_meta.events import Event, EventSchema, parse_event
from stream_meta.tasks import (
    SCENARIOS,
    DigitsFamily,
    LinearFamily,
    MixtureFamily,
    QuadraticFamily,
    Regime,
    Scenario,
    ScenarioStream,
    SinusoidFamily,
    SquareWaveFamily,
    StreamEvent,
    TransformedDigitsFamily,
    Transition,
    get_scenario,
)
from stream_meta.tasks.digits import TransformRange
from stream_meta.tasks.functions import UniformRegressionFamily
from tests.conftest import REQUIRED_SCENARIOS

SCHEMAS = {
    "sinusoid": EventSchema(x_dim=1, task="regression"),
    "digits": EventSchema(x_dim=64, task="classification", n_classes=5),
}
STREAM_KWARGS = {"tasks": 500, "clusters": 20}


def namespace(event: StreamEvent) -> str:
    return str(event.event["task_id"]).split(":", 1)[0]


@pytest.fixture(scope="module")
def scenario_events() -> dict[str, list[StreamEvent]]:
    """Each scenario's events up to 5,000 past its last change (seed 0, 500 tasks a regime)."""
    return {
        name: list(s.stream(seed=0, **STREAM_KWARGS).iter_events(length(s)))
        for name, s in SCENARIOS.items()
    }


def length(scenario: Scenario) -> int:
    return (scenario.transitions[-1].end if scenario.transitions else 5000) + 5000


# -- the registry ----------------------------------------------------------------------------


def test_required_scenarios_are_listed_when_the_registry_is_read() -> None:
    assert set(REQUIRED_SCENARIOS) <= set(SCENARIOS)
    for name in REQUIRED_SCENARIOS:
        scenario = get_scenario(name)
        assert scenario.name == name and scenario.description
        assert scenario.model_family in SCHEMAS
        assert all(0 < p < scenario.default_events for p in scenario.drift_points)
        summary = scenario.describe()
        assert json.loads(json.dumps(summary)) == summary
        assert summary["drift_points"] == list(scenario.drift_points)


def test_get_scenario_names_the_known_ones_when_the_name_is_unknown() -> None:
    with pytest.raises(ValueError, match="unknown scenario 'nope'; known: sinusoid-stationary"):
        get_scenario("nope")


def test_drift_points_are_the_documented_ones_when_scenarios_are_built() -> None:
    points = {name: SCENARIOS[name].drift_points for name in REQUIRED_SCENARIOS}
    assert points == {
        "sinusoid-stationary": (),
        "sinusoid-amplitude-shift": (20_000,),
        "sinusoid-new-family": (20_000,),
        "sinusoid-gradual": (20_000,),
        "sinusoid-recurring": (20_000, 40_000),
        "digits-new-transform": (10_000,),
    }
    assert SCENARIOS["sinusoid-gradual"].transitions[0].end == 30_000


# -- the contract every scenario stream keeps --------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_SCENARIOS)
def test_stream_is_identical_when_iterated_twice_and_differs_when_seed_differs(
    name: str, scenario_events: dict[str, list[StreamEvent]]
) -> None:
    scenario = SCENARIOS[name]
    stream = scenario.stream(seed=0, **STREAM_KWARGS)
    n = scenario.drift_points[-1] + 2000 if scenario.drift_points else 10_000
    assert list(stream.iter_events(n)) == scenario_events[name][:n]
    it = iter(stream)  # endless, and the same object a second time
    assert [next(it) for _ in range(5000)] == scenario_events[name][:5000]
    other = scenario.stream(seed=1, **STREAM_KWARGS)
    assert [e.event for e in other.iter_events(2000)] != [
        e.event for e in scenario_events[name][:2000]
    ]


@pytest.mark.parametrize("name", REQUIRED_SCENARIOS)
def test_event_ids_are_global_and_ts_increases_when_regimes_interleave(
    name: str, scenario_events: dict[str, list[StreamEvent]]
) -> None:
    events = scenario_events[name]
    assert [e.event["event_id"] for e in events] == [f"e{i}" for i in range(len(events))]
    ts = np.array([e.event["ts"] for e in events])
    assert ts[0] > 0 and (np.diff(ts) > 0).all()
    regimes = {r.name for r in SCENARIOS[name].regimes}
    assert {namespace(e) for e in events} == regimes


@pytest.mark.parametrize("name", REQUIRED_SCENARIOS)
def test_events_fit_the_shipped_models_schema_when_parsed(
    name: str, scenario_events: dict[str, list[StreamEvent]]
) -> None:
    scenario = SCENARIOS[name]
    schema = SCHEMAS[scenario.model_family]
    events = scenario_events[name]
    for e in events[:: max(1, len(events) // 3000)]:
        parsed = parse_event(json.dumps(e.event).encode(), schema)
        assert isinstance(parsed, Event), parsed
        assert parsed.event_id == e.event["event_id"]
        if scenario.model_family == "digits":
            assert isinstance(e.truth, int) and 0 <= e.truth < 5
            assert parsed.y is None or parsed.y == e.truth
        else:
            assert isinstance(e.truth, float) and math.isfinite(e.truth)


@pytest.mark.parametrize("name", REQUIRED_SCENARIOS)
def test_regime_of_names_the_task_namespace_when_asked_per_event(
    name: str, scenario_events: dict[str, list[StreamEvent]]
) -> None:
    stream = SCENARIOS[name].stream(seed=0, **STREAM_KWARGS)
    events = scenario_events[name]
    positions = stream.regime_indices(len(events))
    names = [r.name for r in stream.regimes]
    assert [names[k] for k in positions.tolist()] == [namespace(e) for e in events]
    assert stream.regime_of(len(events) - 1) == namespace(events[-1])
    assert stream.regime_of(0) == names[0]


@pytest.mark.parametrize("name", REQUIRED_SCENARIOS)
def test_regime_changes_exactly_at_the_drift_point_when_the_change_is_abrupt(
    name: str, scenario_events: dict[str, list[StreamEvent]]
) -> None:
    scenario = SCENARIOS[name]
    events = scenario_events[name]
    first = scenario.regimes[0].name
    start = scenario.drift_points[0] if scenario.drift_points else len(events)
    assert all(namespace(e) == first for e in events[:start])  # not rounded to a chunk
    stops = [*(t.at for t in scenario.transitions), len(events)][1:]
    for t, nxt in zip(scenario.transitions, stops, strict=True):
        after = {namespace(e) for e in events[t.end : nxt]}
        assert after == {t.to}
        if t.width == 0:
            assert namespace(events[t.at]) == t.to


def test_shorter_run_is_a_prefix_when_n_crosses_chunks_and_drift(
    scenario_events: dict[str, list[StreamEvent]],
) -> None:
    stream = SCENARIOS["sinusoid-gradual"].stream(seed=0, **STREAM_KWARGS)
    events = scenario_events["sinusoid-gradual"]
    assert list(stream.iter_events(21_003)) == events[:21_003]
    assert list(stream.iter_events(1)) == events[:1]
    assert list(stream.iter_events(0)) == []


def test_scenarios_agree_before_drift_when_they_share_the_first_regime(
    scenario_events: dict[str, list[StreamEvent]],
) -> None:
    stationary = scenario_events["sinusoid-stationary"]  # 10,000 events
    for name in ("sinusoid-amplitude-shift", "sinusoid-new-family", "sinusoid-recurring"):
        assert scenario_events[name][: len(stationary)] == stationary
    gradual = scenario_events["sinusoid-gradual"][:20_000]
    assert scenario_events["sinusoid-recurring"][:20_000] == gradual


# -- what each scenario does -----------------------------------------------------------------


def test_new_regime_share_ramps_linearly_when_drift_is_gradual(
    scenario_events: dict[str, list[StreamEvent]],
) -> None:
    events = scenario_events["sinusoid-gradual"]
    is_new = np.array([namespace(e) == "new" for e in events[20_000:30_000]])
    share = is_new.reshape(10, 1000).mean(axis=1)
    expected = (np.arange(10) + 0.5) / 10
    assert np.abs(share - expected).max() < 0.07
    assert np.corrcoef(share, expected)[0, 1] > 0.98
    stream = SCENARIOS["sinusoid-gradual"].stream(seed=0)
    p = stream.regime_probabilities(19_999, 30_001)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert p[0, 1] == 0.0 and p[1, 1] == pytest.approx(1 / 10_001)
    assert p[-2, 1] < 1.0 and p[-1, 1] == 1.0  # 30,000 = transition.end


def test_old_tasks_return_under_their_ids_when_the_regime_recurs(
    scenario_events: dict[str, list[StreamEvent]],
) -> None:
    events = scenario_events["sinusoid-recurring"]
    before = Counter(e.event["task_id"] for e in events[:20_000])
    after = Counter(e.event["task_id"] for e in events[40_000:])
    assert all(t.startswith("base:") for t in after)
    # the busiest old tasks are busy again, as the same tasks (same parameters)
    top = [t for t, _ in before.most_common(20)]
    assert all(after[t] > 0 for t in top)
    params_before = {e.event["task_id"]: e.params for e in events[:20_000]}
    for e in events[40_000:41_000]:
        if e.event["task_id"] in params_before:
            np.testing.assert_array_equal(e.params, params_before[e.event["task_id"]])
    # the regime's own stream goes on where it stopped: its events 20,000.. come after 40,000
    stream = SCENARIOS["sinusoid-recurring"].stream(seed=0, **STREAM_KWARGS)
    own = list(stream.streams[0].iter_events(len(events) - 20_000))
    resumed = events[:20_000] + events[40_000:]

    def key(e: StreamEvent) -> tuple[object, ...]:
        return e.task_index, e.event["x"], e.truth, e.labelled

    assert [key(e) for e in resumed] == [key(e) for e in own]
    assert [e.event["task_id"] for e in resumed] == ["base:" + e.event["task_id"] for e in own]


def test_amplitudes_leave_the_training_range_when_amplitude_shifts(
    scenario_events: dict[str, list[StreamEvent]],
) -> None:
    events = scenario_events["sinusoid-amplitude-shift"]
    amp_before = np.array([e.params[0] for e in events[:20_000]])
    amp_after = np.array([e.params[0] for e in events[20_000:]])
    assert amp_before.min() >= 0.1 and amp_before.max() <= 5.0
    assert amp_after.min() >= 5.0 and amp_after.max() <= 10.0
    assert max(abs(e.truth) for e in events[20_000:]) > 5.0


def test_tasks_come_from_every_new_family_when_the_family_changes(
    scenario_events: dict[str, list[StreamEvent]],
) -> None:
    events = scenario_events["sinusoid-new-family"][20_000:]
    components = Counter(int(e.params[0]) for e in events)
    assert set(components) == {0, 1, 2}
    assert max(abs(e.truth) for e in events) <= 5.0 + 1e-5


def test_rotations_leave_every_split_when_digits_get_a_new_transform(
    scenario_events: dict[str, list[StreamEvent]],
) -> None:
    events = scenario_events["digits-new-transform"]
    rotation = 5  # the column after the 5 class ids
    before = np.abs([e.params[rotation] for e in events[:10_000]])
    after = np.abs([e.params[rotation] for e in events[10_000:]])
    assert before.min() > 15.0 and before.max() <= 25.0
    assert after.min() > 30.0 and after.max() <= 45.0


def test_stream_options_apply_to_every_regime_when_given() -> None:
    stream = SCENARIOS["sinusoid-new-family"].stream(
        seed=3, tasks=40, labelled_fraction=0.2, rate=10.0
    )
    events = list(stream.iter_events(30_000))
    for regime in ("base", "new"):
        own = [e for e in events if namespace(e) == regime]
        assert len({e.event["task_id"] for e in own}) <= 40
        assert abs(np.mean([e.labelled for e in own]) - 0.2) < 0.03
    assert events[-1].event["ts"] == pytest.approx(3000.0, rel=0.05)


# -- building scenarios ----------------------------------------------------------------------


def sine(name: str = "a", **kwargs: object) -> Regime:
    return Regime(name, SinusoidFamily(**kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("regimes", "transitions", "match"),
    [
        ((), (), "at least one regime"),
        ((sine("a"), sine("a")), (), "unique"),
        ((sine("a"), sine("b")), (Transition(10, "c"),), "unknown regime 'c'"),
        ((sine("a"), sine("b")), (Transition(10, "a"),), "already the regime"),
        (
            (sine("a"), sine("b")),
            (Transition(10, "b", width=100), Transition(50, "a")),
            "must not overlap",
        ),
        ((sine("a"), Regime("d", DigitsFamily("test"))), (), "must match"),
    ],
    ids=["empty", "duplicate", "unknown", "same", "overlap", "incompatible"],
)
def test_schedule_is_refused_when_it_is_inconsistent(
    regimes: tuple[Regime, ...], transitions: tuple[Transition, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ScenarioStream(regimes, transitions)


def test_bad_parts_are_refused_when_constructed() -> None:
    with pytest.raises(ValueError, match="without ':'"):
        sine("a:b")
    with pytest.raises(ValueError, match=">= 0"):
        Transition(-1, "a")
    with pytest.raises(TypeError, match="'seed'"):
        ScenarioStream((sine(),), seed=0, **{"seed": 1})
    with pytest.raises(ValueError, match="do not fit the digits model"):
        Scenario("x", "x", "digits", (sine(),))
    with pytest.raises(ValueError, match="unknown model family"):
        Scenario("x", "x", "mnist", (sine(),))
    with pytest.raises(ValueError, match="must pass the last drift"):
        Scenario("x", "x", "sinusoid", (sine("a"), sine("b")), (Transition(10, "b"),), 10)
    with pytest.raises(ValueError, match="n must be >= 0"):
        ScenarioStream((sine(),)).iter_events(-1)


def test_custom_schedule_switches_at_the_exact_index_when_not_chunk_aligned() -> None:
    stream = ScenarioStream(
        (sine("a"), sine("b", amplitude=(6.0, 7.0)), sine("c")),
        (Transition(5, "b"), Transition(4097, "c", width=0)),
        seed=11,
        tasks=20,
    )
    names = [namespace(e) for e in stream.iter_events(4200)]
    assert names == ["a"] * 5 + ["b"] * (4097 - 5) + ["c"] * (4200 - 4097)


# -- the extra families ----------------------------------------------------------------------

RegressionFamily = UniformRegressionFamily | MixtureFamily
REGRESSION_FAMILIES: list[RegressionFamily] = [
    LinearFamily(),
    QuadraticFamily(),
    SquareWaveFamily(),
    MixtureFamily([LinearFamily(), QuadraticFamily(), SquareWaveFamily()], weights=[1, 2, 1]),
]


@pytest.mark.parametrize("family", REGRESSION_FAMILIES, ids=lambda f: f.name)
def test_outputs_stay_within_five_when_inputs_span_the_range(family: RegressionFamily) -> None:
    rng = np.random.default_rng(0)
    params = family.sample_params(2000, rng)
    assert params.shape == (2000, family.param_dim)
    x, y = family.sample(params, 50, rng)
    assert x.shape == (2000, 50, 1) and x.dtype == np.float32 and y.dtype == np.float32
    assert x.min() >= -5.0 and x.max() <= 5.0
    assert np.abs(y).max() <= 5.0 + 1e-5
    assert np.abs(y).max() > 3.0  # and they use that range
    grid = np.broadcast_to(np.linspace(-5, 5, 101, dtype=np.float32)[None, :, None], (2000, 101, 1))
    assert np.abs(family.evaluate(params, grid)).max() <= 5.0 + 1e-5
    np.testing.assert_allclose(family.evaluate(params, x), y)


@pytest.mark.parametrize("family", REGRESSION_FAMILIES, ids=lambda f: f.name)
def test_perturb_keeps_tasks_in_range_when_spread_is_large(family: RegressionFamily) -> None:
    rng = np.random.default_rng(1)
    params = family.sample_params(500, rng)
    np.testing.assert_array_equal(family.perturb(params, 0.0, rng), params)
    moved = family.perturb(params, 2.0, rng)
    assert not np.array_equal(moved, params)
    assert np.abs(family.sample(moved, 20, rng)[1]).max() <= 5.0 + 1e-5
    if isinstance(family, MixtureFamily):
        np.testing.assert_array_equal(moved[:, 0], params[:, 0])
    with pytest.raises(ValueError, match="spread"):
        family.perturb(params, -1.0, rng)


def test_families_compute_their_formulas_when_evaluated() -> None:
    x = np.array([[[-2.0], [0.5], [3.0]]], dtype=np.float32)
    lin = LinearFamily().evaluate(np.array([[0.5, -1.0]]), x)
    quad = QuadraticFamily().evaluate(np.array([[0.1, -0.2, 0.3]]), x)
    sq = SquareWaveFamily().evaluate(np.array([[2.0, 1.0]]), x)
    np.testing.assert_allclose(lin, [[-2.0, -0.75, 0.5]])
    np.testing.assert_allclose(quad, [[1.1, 0.225, 0.6]], rtol=1e-6)
    np.testing.assert_allclose(sq, [[-2.0, -2.0, 2.0]])


def test_mixture_follows_its_weights_when_sampling_params() -> None:
    family = MixtureFamily([LinearFamily(), SquareWaveFamily()], weights=[3, 1])
    comp = family.component_of(family.sample_params(8000, np.random.default_rng(2)))
    assert abs(np.mean(comp == 0) - 0.75) < 0.02
    with pytest.raises(ValueError, match="share kind"):
        MixtureFamily([LinearFamily(), DigitsFamily("test")])
    with pytest.raises(ValueError, match="weights"):
        MixtureFamily([LinearFamily()], weights=[-1.0])


def test_mixture_of_classifiers_keeps_labels_when_sampling_per_class() -> None:
    family = MixtureFamily([DigitsFamily("test", n_way=3), DigitsFamily("train", n_way=3)])
    rng = np.random.default_rng(4)
    x, y = family.sample(family.sample_params(4, rng), 2, rng, per_class=True)
    assert x.shape == (4, 6, 64) and y.dtype == np.int64
    assert [np.bincount(row).tolist() for row in y] == [[2, 2, 2]] * 4


def test_transformed_digits_refuse_unknown_transforms_when_overridden() -> None:
    with pytest.raises(ValueError, match="unknown transforms"):
        TransformedDigitsFamily("test", overrides={"zoom": TransformRange(1.0, 0.0, 0.5)})
    family = TransformedDigitsFamily("train", overrides={"noise_std": TransformRange(0, 0, 0)})
    assert family.split == "train" and family.ranges["noise_std"].high == 0
    assert family.ranges["rotation_deg"] == DigitsFamily("train").ranges["rotation_deg"]
