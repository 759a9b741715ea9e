"""Off-policy evaluation of a logged decision stream: what average reward would a *target*
policy have earned on the decisions another policy (the *logging* policy) made?

A logged decision is a decision event with what the logging policy did (the wire format):

    {"event_id", "task_id", "actions": [{"action_id", "x": [...]}, ...], "ts"?,
     "logged": {"action_id", "propensity", "reward"}}

The decisions are walked in log order. For each one the target policy states, from what it has
learned so far, the probability ``pi(a)`` of playing each candidate and its own predicted reward
``q(a)``; then it learns the logged action's reward (every target policy learns the same logged
examples, so they compare on the same events). With ``p`` the logged propensity, ``a`` the
logged action and ``r`` its reward, the per-decision terms are

- inverse propensity scoring (IPS): ``pi(a) / p * r``, unbiased whenever ``p > 0`` for every
  action the target may play;
- doubly robust (DR): ``sum_b pi(b) q(b) + pi(a) / p * (r - q(a))``, unbiased under the same
  condition, and of lower variance when ``q`` is good,

and an estimate is their mean over the decisions, with the standard error of that mean. When
the log carries the simulator's expected rewards (``"expected"``, written by
:func:`~stream_meta.tasks.bandit.logged_stream`), the *true* value of the target policy on the
same decisions, ``mean sum_b pi(b) mu(b)``, is reported beside them.

Target policies: ``meta-ts`` (the meta-model's Thompson sampling; ``pi`` from
:func:`~stream_meta.decisions.action_probabilities` over ``draws`` seeded posterior draws, ``q``
the posterior mean), ``per-task-ts`` (linear Thompson sampling per task from scratch, as in
:mod:`stream_meta.evaluation.bandit`) and ``random`` (uniform; ``q`` the task's mean logged
reward so far, 0 before any).

>>> ips_terms(np.array([0.5, 0.0]), np.array([0.25, 0.5]), np.array([1.0, 3.0])).tolist()
[2.0, 0.0]
>>> float(dr_term(np.array([0.5, 0.5]), np.array([1.0, 0.0]), 0, 0.25, 2.0))
2.5
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "OFF_POLICY_STRATEGIES",
    "LinearTSTarget",
    "LoggedDecision",
    "MetaTSTarget",
    "UniformTarget",
    "dr_term",
    "estimate",
    "evaluate_off_policy",
    "ips_terms",
    "logged_decisions",
    "logged_value",
    "parse_logged",
    "task_batches",
]

OFF_POLICY_STRATEGIES = ("meta-ts", "per-task-ts", "random")


@dataclass(frozen=True)
class LoggedDecision:
    """One logged decision: ``x [K, d]`` the candidates' features, ``logged`` the index of the
    action played, its ``propensity`` and ``reward``; ``expected [K]`` the simulator's truth
    when the log carries it."""

    event_id: str
    task_id: str
    action_ids: tuple[str, ...]
    x: NDArray[np.float32]
    logged: int
    propensity: float
    reward: float
    expected: NDArray[np.float64] | None = None


def parse_logged(raw: Mapping[str, Any]) -> LoggedDecision | None:
    """A logged decision, or None for any other event (a labelled example, a reward event);
    raises ``ValueError`` on a logged decision that breaks the format."""
    logged = raw.get("logged")
    if not isinstance(logged, Mapping) or "actions" not in raw:
        return None
    actions = raw["actions"]
    if not isinstance(actions, Sequence) or len(actions) < 1:
        raise ValueError(f"decision {raw.get('event_id')!r}: 'actions' must be a non-empty list")
    ids = tuple(str(a["action_id"]) for a in actions)
    x = np.asarray([a["x"] for a in actions], dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"decision {raw.get('event_id')!r}: every action needs an 'x' list")
    try:
        index = ids.index(str(logged["action_id"]))
    except ValueError:
        raise ValueError(
            f"decision {raw.get('event_id')!r}: logged action {logged['action_id']!r} is not "
            "among its actions"
        ) from None
    p = float(logged["propensity"])
    if not 0.0 < p <= 1.0:
        raise ValueError(f"decision {raw.get('event_id')!r}: propensity must be in (0, 1]")
    expected = raw.get("expected")
    return LoggedDecision(
        event_id=str(raw["event_id"]),
        task_id=str(raw["task_id"]),
        action_ids=ids,
        x=x,
        logged=index,
        propensity=p,
        reward=float(logged["reward"]),
        expected=None if expected is None else np.asarray(expected, dtype=np.float64),
    )


def logged_decisions(raws: Iterable[Any]) -> list[LoggedDecision]:
    """The logged decisions among ``raws`` (dicts, or JSON strings / bytes), in log order."""
    import json

    out = []
    for raw in raws:
        obj = json.loads(raw) if isinstance(raw, str | bytes) else raw
        if isinstance(obj, Mapping):
            d = parse_logged(obj)
            if d is not None:
                out.append(d)
    return out


# -- the estimators ----------------------------------------------------------------------------
def ips_terms(
    pi_logged: NDArray[np.floating], propensity: NDArray[np.floating], reward: NDArray[np.floating]
) -> NDArray[np.float64]:
    """Inverse propensity terms ``pi(a) / p * r`` ``[n]``."""
    return np.asarray(pi_logged, np.float64) / np.asarray(propensity, np.float64) * reward


def dr_term(
    pi: NDArray[np.floating], q: NDArray[np.floating], logged: int, propensity: float, reward: float
) -> float:
    """The doubly robust term of one decision: ``sum_b pi(b) q(b) + pi(a) / p (r - q(a))``."""
    pi, q = np.asarray(pi, np.float64), np.asarray(q, np.float64)
    return float(pi @ q + pi[logged] / propensity * (reward - q[logged]))


def estimate(terms: NDArray[np.floating]) -> dict[str, float]:
    """The mean of the per-decision terms and its standard error."""
    terms = np.asarray(terms, dtype=np.float64)
    n = len(terms)
    se = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"value": float(terms.mean()) if n else float("nan"), "se": se}


# -- target policies -----------------------------------------------------------------------------
class Target(Protocol):
    def assess(self, batch: Sequence[LoggedDecision]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each decision (distinct tasks): ``(pi [K], q [K])``, learning nothing."""
        ...

    def learn(self, batch: Sequence[LoggedDecision]) -> None:
        """Learn each decision's logged action and reward."""
        ...


def _seed(seed: int, event_id: str) -> int:
    return (int(seed) * 0x9E3779B1 + zlib.crc32(event_id.encode())) % 2**63


class MetaTSTarget:
    """The meta-model's Thompson sampling, served by ``engine`` (fresh for the log)."""

    def __init__(self, engine: Any, *, draws: int = 256, seed: int = 0) -> None:
        self.engine, self.draws, self.seed = engine, draws, seed

    def assess(self, batch: Sequence[LoggedDecision]) -> list[tuple[np.ndarray, np.ndarray]]:
        from stream_meta.decisions import action_probabilities

        values = self.engine.action_values(
            [d.task_id for d in batch],
            [d.x for d in batch],
            draws=self.draws,
            seeds=[_seed(self.seed, d.event_id) for d in batch],
        )
        return [(action_probabilities(v), v.mean) for v in values]

    def learn(self, batch: Sequence[LoggedDecision]) -> None:
        self.engine.process(
            [
                {
                    "event_id": d.event_id,
                    "task_id": d.task_id,
                    "x": d.x[d.logged].tolist(),
                    "y": d.reward,
                }
                for d in batch
            ]
        )


class LinearTSTarget:
    """Linear Thompson sampling per task from scratch (Bayesian linear regression on ``[x, 1]``,
    prior ``N(0, prior_std^2 I)``, noise ``noise_std``); ``pi`` from ``draws`` seeded draws."""

    def __init__(
        self, *, prior_std: float = 1.0, noise_std: float = 1.0, draws: int = 256, seed: int = 0
    ) -> None:
        self.prior_std, self.noise_var = float(prior_std), float(noise_std) ** 2
        self.draws, self.seed = draws, seed
        self.state: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _posterior(self, d: LoggedDecision) -> tuple[np.ndarray, np.ndarray]:
        p = d.x.shape[1] + 1
        return self.state.get(d.task_id, (np.eye(p) / self.prior_std**2, np.zeros(p)))

    def assess(self, batch: Sequence[LoggedDecision]) -> list[tuple[np.ndarray, np.ndarray]]:
        from stream_meta.evaluation.bandit import blr_mean, blr_sample, with_bias

        out = []
        for d in batch:
            prec, b = self._posterior(d)
            rng = np.random.default_rng(_seed(self.seed, d.event_id))
            theta = blr_sample(prec[None], b[None], self.draws, rng)[0]  # [S, p]
            phi = with_bias(d.x)  # [K, p]
            best = (theta @ phi.T).argmax(axis=1)
            pi = np.bincount(best, minlength=len(phi)) / self.draws
            out.append((pi, phi @ blr_mean(prec[None], b[None])[0]))
        return out

    def learn(self, batch: Sequence[LoggedDecision]) -> None:
        from stream_meta.evaluation.bandit import blr_update, with_bias

        for d in batch:
            prec, b = self._posterior(d)
            phi = with_bias(d.x[d.logged])[None]
            prec2, b2 = blr_update(prec[None], b[None], phi, np.array([d.reward]), self.noise_var)
            self.state[d.task_id] = (prec2[0], b2[0])


class UniformTarget:
    """Uniformly random choice; its reward model is the task's mean logged reward so far."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[float, int]] = {}

    def assess(self, batch: Sequence[LoggedDecision]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for d in batch:
            s, n = self.sums.get(d.task_id, (0.0, 0))
            k = len(d.action_ids)
            out.append((np.full(k, 1.0 / k), np.full(k, s / n if n else 0.0)))
        return out

    def learn(self, batch: Sequence[LoggedDecision]) -> None:
        for d in batch:
            s, n = self.sums.get(d.task_id, (0.0, 0))
            self.sums[d.task_id] = (s + d.reward, n + 1)


# -- the evaluation ------------------------------------------------------------------------------
def task_batches(
    decisions: Sequence[LoggedDecision], max_size: int
) -> list[Sequence[LoggedDecision]]:
    """Consecutive runs of at most ``max_size`` decisions of distinct tasks, in log order (so a
    task's decision is assessed after every earlier decision of the task was learned)."""
    batches: list[Sequence[LoggedDecision]] = []
    start, seen = 0, set[str]()
    for i, d in enumerate(decisions):
        if d.task_id in seen or i - start >= max_size:
            batches.append(decisions[start:i])
            start, seen = i, set[str]()
        seen.add(d.task_id)
    if start < len(decisions):
        batches.append(decisions[start:])
    return batches


def evaluate_off_policy(
    target: Target,
    decisions: Sequence[LoggedDecision],
    *,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """IPS and DR estimates of ``target``'s average reward on ``decisions`` (and the truth when
    the log carries expected rewards); the logged policy's own average reward beside them."""
    ips, dr, truth = [], [], []
    for batch in task_batches(decisions, batch_size):
        for d, (pi, q) in zip(batch, target.assess(batch), strict=True):
            ips.append(float(pi[d.logged]) / d.propensity * d.reward)
            dr.append(dr_term(pi, q, d.logged, d.propensity, d.reward))
            if d.expected is not None:
                truth.append(float(np.asarray(pi, np.float64) @ d.expected))
        target.learn(batch)
        if on_batch is not None:
            on_batch(len(batch))
    out: dict[str, Any] = {
        "decisions": len(decisions),
        "ips": estimate(np.array(ips)),
        "dr": estimate(np.array(dr)),
    }
    if decisions and len(truth) == len(decisions):
        out["truth"] = float(np.mean(truth))
    return out


def logged_value(decisions: Sequence[LoggedDecision]) -> dict[str, float]:
    """The logging policy's own average reward (and its standard error)."""
    return estimate(np.array([d.reward for d in decisions]))
