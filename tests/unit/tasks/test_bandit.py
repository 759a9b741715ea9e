"""The bandit simulator: users from a structured population, items, rewards, logged streams."""

from __future__ import annotations

import numpy as np
import pytest

from stream_meta.tasks import BanditFamily, get_family, logged_stream


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_population_is_fixed_by_the_family_seed() -> None:
    a, b, c = BanditFamily(seed=3), BanditFamily(seed=3), BanditFamily(seed=4)
    np.testing.assert_array_equal(a.centres, b.centres)
    np.testing.assert_array_equal(a.quality_direction, b.quality_direction)
    assert not np.allclose(a.centres, c.centres)
    assert a.centres.shape == (4, 5)
    assert np.isclose(np.linalg.norm(a.quality_direction), 1.0)


def test_users_cluster_around_the_archetypes_when_spread_is_small() -> None:
    family = BanditFamily(spread=0.05)
    w = family.sample_params(400, rng())[:, :5]
    dist = np.linalg.norm(w[:, None] - family.centres[None], axis=2)  # [users, archetypes]
    assert dist.min(axis=1).max() < 0.05 * 6  # every user within a few spreads of one
    assert len(np.unique(dist.argmin(axis=1))) == 4  # and every archetype has users


def test_draws_are_identical_when_seeds_are_equal() -> None:
    family = BanditFamily()
    p1, p2 = family.sample_params(6, rng(1)), family.sample_params(6, rng(1))
    np.testing.assert_array_equal(p1, p2)
    x1, x2 = family.candidates(6, 8, rng(2)), family.candidates(6, 8, rng(2))
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(family.reward(p1, x1, rng(3)), family.reward(p2, x2, rng(3)))


def test_expected_reward_is_the_linear_taste_plus_the_shared_quality() -> None:
    family = BanditFamily(quality=0.0)
    params = family.sample_params(3, rng())
    x = family.candidates(3, 7, rng(1))
    mu = family.expected_reward(params, x)
    want = np.einsum("bkd,bd->bk", x.astype(np.float64), params[:, :5]) + params[:, 5:]
    np.testing.assert_allclose(mu, want)
    with_quality = BanditFamily(quality=1.0).expected_reward(params, x)
    np.testing.assert_allclose(with_quality - mu, np.tanh(2 * x @ family.quality_direction))


def test_reward_noise_has_the_configured_spread() -> None:
    family = BanditFamily(noise_std=0.5)
    params = family.sample_params(50, rng())
    x = family.candidates(50, 200, rng(1))
    noise = family.reward(params, x, rng(2)) - family.expected_reward(params, x)
    assert abs(noise.std() - 0.5) < 0.02
    assert abs(noise.mean()) < 0.02


def test_family_is_registered_and_trains_as_regression() -> None:
    family = get_family("bandit")
    assert isinstance(family, BanditFamily)
    assert family.kind == "regression" and family.x_dim == 5 and family.param_dim == 6
    x, y = family.sample(family.sample_params(2, rng()), 3, rng())
    assert x.shape == (2, 3, 5) and y.shape == (2, 3) and y.dtype == np.float32


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"archetypes": 0}, {"noise_std": -1.0}])
def test_constructor_raises_when_arguments_are_out_of_range(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BanditFamily(**kwargs)


def test_logged_stream_writes_decisions_with_exact_propensities() -> None:
    family = BanditFamily()
    params = family.sample_params(3, rng())
    events = list(logged_stream(family, params, 4, rng(1), k=6, epsilon=0.3))
    assert len(events) == 12
    assert [e["task_id"] for e in events[:3]] == ["u0", "u1", "u2"]  # users interleaved
    for e in events:
        assert len(e["actions"]) == 6 and len(e["actions"][0]["x"]) == 5
        p = e["logged"]["propensity"]
        assert np.isclose(p, 0.3 / 6) or np.isclose(p, 0.7 + 0.3 / 6)
        assert len(e["expected"]) == 6
    again = list(logged_stream(family, params, 4, rng(1), k=6, epsilon=0.3))
    assert again == events


def test_logged_stream_is_uniform_when_epsilon_is_one() -> None:
    family = BanditFamily()
    events = list(logged_stream(family, family.sample_params(2, rng()), 3, rng(1), k=5))
    assert all(np.isclose(e["logged"]["propensity"], 0.2) for e in events)
    with pytest.raises(ValueError):
        next(logged_stream(family, family.sample_params(2, rng()), 3, rng(1), epsilon=0.0))
