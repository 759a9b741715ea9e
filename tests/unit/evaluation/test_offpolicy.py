"""Off-policy estimators (IPS, doubly robust) on logged streams of the bandit simulator, where
the true value of the target policy is known."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from stream_meta.evaluation.offpolicy import (
    LinearTSTarget,
    LoggedDecision,
    UniformTarget,
    dr_term,
    estimate,
    evaluate_off_policy,
    ips_terms,
    logged_decisions,
    parse_logged,
    task_batches,
)
from stream_meta.tasks import BanditFamily, logged_stream


def _log(users: int, decisions: int, *, epsilon: float = 1.0, seed: int = 0) -> list:
    family = BanditFamily()
    rng = np.random.default_rng(seed)
    return list(
        logged_stream(family, family.sample_params(users, rng), decisions, rng, epsilon=epsilon)
    )


class SoftmaxOnFeature:
    """A fixed stochastic target: softmax over the first feature; ``q`` given or 0."""

    def __init__(self, oracle_q: bool = False) -> None:
        self.oracle_q = oracle_q

    def assess(self, batch: Sequence[LoggedDecision]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for d in batch:
            e = np.exp(2.0 * d.x[:, 0].astype(np.float64))
            q = d.expected if self.oracle_q and d.expected is not None else np.zeros(len(e))
            out.append((e / e.sum(), q))
        return out

    def learn(self, batch: Sequence[LoggedDecision]) -> None:
        return None


def test_ips_and_dr_terms_follow_their_formulas() -> None:
    np.testing.assert_allclose(ips_terms(np.array([0.2]), np.array([0.1]), np.array([3.0])), [6.0])
    # sum pi q = 0.5 * 1 + 0.5 * 3 = 2; correction 0.5 / 0.25 * (4 - 3) = 2
    assert dr_term(np.array([0.5, 0.5]), np.array([1.0, 3.0]), 1, 0.25, 4.0) == 4.0
    est = estimate(np.array([1.0, 3.0]))
    assert est["value"] == 2.0 and np.isclose(est["se"], 1.0)


@pytest.mark.parametrize("epsilon", [1.0, 0.5], ids=["uniform-log", "epsilon-greedy-log"])
def test_ips_is_unbiased_for_a_fixed_target_policy(epsilon: float) -> None:
    decisions = logged_decisions(_log(200, 20, epsilon=epsilon, seed=1))
    out = evaluate_off_policy(SoftmaxOnFeature(), decisions)
    truth, ips = out["truth"], out["ips"]
    assert abs(ips["value"] - truth) < 3.5 * ips["se"]
    assert abs(out["dr"]["value"] - truth) < 3.5 * out["dr"]["se"]  # q = 0: DR is IPS


def test_dr_with_a_good_reward_model_has_a_smaller_error() -> None:
    decisions = logged_decisions(_log(100, 20, seed=2))
    out = evaluate_off_policy(SoftmaxOnFeature(oracle_q=True), decisions)
    assert out["dr"]["se"] < 0.5 * out["ips"]["se"]
    assert abs(out["dr"]["value"] - out["truth"]) < 3.5 * out["dr"]["se"]


def test_per_task_thompson_sampling_is_estimated_within_a_few_standard_errors() -> None:
    decisions = logged_decisions(_log(100, 20, seed=3))
    out = evaluate_off_policy(LinearTSTarget(noise_std=0.5, draws=128), decisions)
    for name in ("ips", "dr"):
        assert abs(out[name]["value"] - out["truth"]) < 3.5 * out[name]["se"], name
    # the learner beats uniform choice, whose true value is the log's mean expected reward
    uniform = evaluate_off_policy(UniformTarget(), decisions)
    assert out["truth"] > uniform["truth"] + 1.0


def test_parse_logged_skips_other_events_and_refuses_a_broken_decision() -> None:
    assert parse_logged({"event_id": "e", "task_id": "t", "x": [1.0], "y": 2.0}) is None
    ok = {
        "event_id": "d1",
        "task_id": "t",
        "actions": [{"action_id": "a", "x": [0.0]}, {"action_id": "b", "x": [1.0]}],
        "logged": {"action_id": "b", "propensity": 0.5, "reward": 1.5},
    }
    d = parse_logged(ok)
    assert d is not None and d.logged == 1 and d.x.shape == (2, 1) and d.expected is None
    with pytest.raises(ValueError, match="not among"):
        parse_logged({**ok, "logged": {**ok["logged"], "action_id": "z"}})
    with pytest.raises(ValueError, match="propensity"):
        parse_logged({**ok, "logged": {**ok["logged"], "propensity": 0.0}})


def test_task_batches_never_hold_a_task_twice_and_keep_log_order() -> None:
    decisions = logged_decisions(_log(3, 4, seed=0))
    # interleaved users; a batch ends where a task repeats or at max_size
    batches = task_batches(decisions, 2)
    assert [len(b) for b in batches] == [2] * 6  # u0 u1 | u2 u0 | u1 u2 | ...
    flat = [d for b in batches for d in b]
    assert flat == decisions
    for b in task_batches(decisions, 100):
        assert len({d.task_id for d in b}) == len(b)
