"""The engine contract checks (stream_meta/checks.py) hold for every replay strategy."""

from __future__ import annotations

import functools

import pytest
from prometheus_client import CollectorRegistry

from stream_meta import checks
from stream_meta.config import load_settings
from stream_meta.engine import Engine
from stream_meta.evaluation.strategies import (
    STRATEGIES,
    StrategyOptions,
    build_strategy_engine,
    strategy_settings,
)
from stream_meta.metrics import EngineMetrics

#: strategies that read the task index while serving (the others never do)
RETRIEVAL: dict[str, checks.Retrieval] = {
    "full": "others",  # k-NN neighbours: other tasks' embeddings
    "no-meta-update": "others",
    "nearest-task": "shared",  # the nearest task's adaptation retrieves its own neighbours
}
#: small support sets (the check streams overflow them), a small weights pool, few steps
SETTINGS = {"engine": {"support_size": 16, "weights_cache_size": 1024}}
OPTIONS = StrategyOptions(inner_steps=2, scratch_steps=3)


def _factory(name: str, model, family: str = "sinusoid") -> checks.EngineFactory:
    settings = strategy_settings(load_settings(overrides=SETTINGS), name)

    def make() -> Engine:
        metrics = EngineMetrics(CollectorRegistry())
        return build_strategy_engine(name, model, settings, metrics, family, OPTIONS)

    return make


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_passes_the_engine_contract(name, check, shipped_sinusoid) -> None:
    model, _ = shipped_sinusoid
    make = _factory(name, model)
    if check is checks.check_batch_size_invariance:
        check = functools.partial(check, retrieval=RETRIEVAL.get(name, "none"))
    check(make)


@pytest.mark.parametrize(
    ("name", "stricter"),
    [("full", "none"), ("no-meta-update", "none"), ("nearest-task", "others")],
)
def test_each_relaxed_batch_size_check_is_needed(name, stricter, shipped_sinusoid) -> None:
    """RETRIEVAL is no list of excuses: the next stricter check fails for each of them."""
    model, _ = shipped_sinusoid
    with pytest.raises(AssertionError, match="differ"):
        checks.check_batch_size_invariance(_factory(name, model), retrieval=stricter, sizes=(1, 64))


@pytest.fixture(scope="module")
def shipped_digits():
    from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint

    return load_checkpoint(shipped_checkpoint("digits"))[0]


@pytest.mark.parametrize("name", ["full", "maml"])
def test_a_classifier_passes_the_engine_contract(name, shipped_digits) -> None:
    make = _factory(name, shipped_digits, family="digits")
    checks.check_engine(make, retrieval=RETRIEVAL.get(name, "none"))
