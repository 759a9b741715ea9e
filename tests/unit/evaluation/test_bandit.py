"""The bandit regret evaluation: bookkeeping, linear Thompson sampling, the meta-model's
Thompson sampling against random choice on a seeded simulation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stream_meta.engine import Engine, EngineConfig
from stream_meta.evaluation.bandit import (
    LinearTS,
    RandomPolicy,
    blr_mean,
    blr_sample,
    blr_update,
    cumulative_regret,
    evaluate_regret,
    regret_at,
    run_policy,
    simulate,
    with_bias,
)
from stream_meta.tasks import BanditFamily


def test_cumulative_regret_sums_the_gap_to_the_best_candidate() -> None:
    mu = np.array([[[1.0, 3.0, 2.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]]])  # [U=1, T=3, K=3]
    chosen = np.array([[1, 0, 2]])
    np.testing.assert_allclose(cumulative_regret(mu, chosen), [[0.0, 5.0, 5.0]])


def test_regret_at_reports_the_mean_and_its_standard_error_within_the_horizon() -> None:
    cum = np.array([[1.0, 2.0], [3.0, 6.0]])
    out = regret_at(cum, [1, 2, 5])
    assert set(out) == {1, 2}
    assert out[2]["mean"] == 4.0
    assert np.isclose(out[2]["se"], np.std([2.0, 6.0], ddof=1) / np.sqrt(2))


def test_blr_matches_the_closed_form_posterior() -> None:
    rng = np.random.default_rng(0)
    phi = with_bias(rng.standard_normal((30, 3)))
    y = phi @ np.array([1.0, -2.0, 0.5, 0.3]) + 0.1 * rng.standard_normal(30)
    prec, b = np.eye(4)[None] / 4.0, np.zeros((1, 4))
    for i in range(30):
        prec, b = blr_update(prec, b, phi[i : i + 1], y[i : i + 1], 0.01)
    want = np.linalg.solve(phi.T @ phi / 0.01 + np.eye(4) / 4.0, phi.T @ y / 0.01)
    np.testing.assert_allclose(blr_mean(prec, b)[0], want, rtol=1e-8)
    draws = blr_sample(prec, b, 4000, np.random.default_rng(1))[0]
    np.testing.assert_allclose(draws.mean(axis=0), want, atol=0.01)
    np.testing.assert_allclose(np.cov(draws.T), np.linalg.inv(prec[0]), atol=2e-4)


def test_simulation_is_seeded_and_rewards_are_mean_plus_noise() -> None:
    family = BanditFamily()
    a, b = simulate(family, 4, 6, 5, seed=1), simulate(family, 4, 6, 5, seed=1)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.noise, b.noise)
    assert a.x.shape == (6, 4, 5, 5) and a.mu.shape == (6, 4, 5)
    chosen = np.array([0, 1, 2, 3])
    np.testing.assert_allclose(
        a.rewards(2, chosen), a.mu[2, np.arange(4), chosen] + a.noise[2, np.arange(4), chosen]
    )


def test_per_task_thompson_sampling_learns_each_user() -> None:
    family = BanditFamily()
    sim = simulate(family, 40, 100, 10, seed=0)
    mu = np.swapaxes(sim.mu, 0, 1)
    ts = cumulative_regret(mu, run_policy(_ts(family, sim.users), sim))
    rnd = cumulative_regret(mu, run_policy(RandomPolicy(0), sim))
    per_round = np.diff(ts.mean(axis=0))
    assert per_round[-20:].mean() < 0.25 * per_round[:10].mean()  # it learns
    assert ts[:, -1].mean() < 0.2 * rnd[:, -1].mean()


def test_pooled_model_learns_from_every_user() -> None:
    family = BanditFamily()
    sim = simulate(family, 20, 3, 10, seed=0)
    pooled = LinearTS(1, family.x_dim, prior_std=1.0, noise_std=family.noise_std, seed=0)
    run_policy(pooled, sim)
    assert np.isclose(pooled.prec[0, -1, -1], 1.0 + 60 / family.noise_std**2)  # 60 rewards


def test_evaluate_regret_reports_every_strategy_at_the_requested_decisions() -> None:
    out = evaluate_regret(
        BanditFamily(), users=5, decisions=8, strategies=("random", "pooled"), at=(4,)
    )
    assert set(out["strategies"]) == {"random", "pooled"}
    assert set(out["strategies"]["random"]) == {"4", "8"}
    assert len(out["curves"]["pooled"]) == 8
    with pytest.raises(ValueError, match="needs a model"):
        evaluate_regret(BanditFamily(), users=2, decisions=2, strategies=("meta",))


def test_meta_thompson_sampling_has_less_regret_than_random_when_seeded(
    shipped_bandit: tuple[Any, dict],
) -> None:
    model, _ = shipped_bandit
    out = evaluate_regret(
        BanditFamily(),
        users=30,
        decisions=20,
        seed=7,
        strategies=("meta", "random"),
        engine_factory=lambda: Engine(model, EngineConfig()),
    )
    meta, rnd = out["strategies"]["meta"]["20"], out["strategies"]["random"]["20"]
    # random's regret is ~3.5 per decision; honest slack: meta at half of it, and 3 SEs apart
    assert meta["mean"] < 0.5 * rnd["mean"]
    assert rnd["mean"] - meta["mean"] > 3 * np.hypot(meta["se"], rnd["se"])


def _ts(family: BanditFamily, users: int) -> LinearTS:
    return LinearTS(users, family.x_dim, prior_std=1.0, noise_std=family.noise_std, seed=0)
