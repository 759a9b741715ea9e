"""Cumulative regret of bandit strategies on new users of the simulator
(:class:`~stream_meta.tasks.bandit.BanditFamily`).

``users`` new users (seeded) each face ``decisions`` decisions of ``k`` candidate items. Users
are interleaved round by round: in round ``t`` every user decides once (one batched call per
strategy), then every reward is learned. All strategies see the same users, candidates and
reward noise (common random numbers: the noise of each candidate is drawn up front), so their
differences are the strategies'.

The *regret* of a decision is the best expected reward among its candidates minus the chosen
one's expected reward; a user's cumulative regret after ``t`` decisions is the sum over its
first ``t``. The report is its mean over users at each requested ``t``, with the standard error
of that mean (over users).

Strategies:

- ``meta``: the meta-learned model served by an :class:`~stream_meta.engine.Engine` as in
  production: Thompson sampling on :meth:`~stream_meta.engine.Engine.action_values` (one
  seeded posterior draw per decision, :func:`~stream_meta.decisions.thompson_choice`), each
  reward learned with ``engine.process``. A new user starts from the meta-learned prior.
- ``per-task-ts``: linear Thompson sampling per user from scratch: Bayesian linear regression
  on the raw item features plus a bias, isotropic prior ``N(0, prior_std^2 I)`` (default 1,
  the scale of the population's preference coefficients: a favourable choice for the
  baseline), the noise variance known (the simulator's).
- ``pooled``: one such linear Thompson-sampling model shared by all users, learning from every
  user's rewards (after one round it has seen ``users`` rewards: it is the population's linear
  model, refined as it goes).
- ``random``: a uniformly random candidate.

Plain functions do the maths (:func:`blr_update`, :func:`blr_sample`, :func:`regret_at`, ...);
the policy classes only hold their state.

>>> import numpy as np
>>> mu = np.array([[[1.0, 0.0], [0.5, 2.0]]])  # [U=1, T=2, K=2]
>>> cumulative_regret(mu, np.array([[1, 0]])).tolist()
[[1.0, 2.5]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.bandit import BanditFamily

__all__ = [
    "STRATEGIES",
    "LinearTS",
    "MetaTS",
    "RandomPolicy",
    "Simulation",
    "blr_mean",
    "blr_sample",
    "blr_update",
    "cumulative_regret",
    "evaluate_regret",
    "make_policy",
    "regret_at",
    "run_policy",
    "simulate",
    "with_bias",
]

STRATEGIES = ("meta", "per-task-ts", "pooled", "random")

Array = NDArray[np.float64]


# -- the simulation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Simulation:
    """What every strategy faces: ``params [U, d + 1]`` the users, ``x [T, U, K, d]`` the
    candidates of each round, ``mu [T, U, K]`` their expected rewards, ``noise [T, U, K]`` the
    noise a reward of each candidate would carry."""

    params: Array
    x: NDArray[np.float32]
    mu: Array
    noise: Array

    @property
    def users(self) -> int:
        return int(self.x.shape[1])

    @property
    def decisions(self) -> int:
        return int(self.x.shape[0])

    def rewards(self, t: int, chosen: NDArray[np.int64]) -> Array:
        """The observed reward of each user's choice in round ``t`` ``[U]``."""
        u = np.arange(self.users)
        return self.mu[t, u, chosen] + self.noise[t, u, chosen]


def simulate(family: BanditFamily, users: int, decisions: int, k: int, seed: int) -> Simulation:
    """``users`` new users and ``decisions`` rounds of ``k`` candidates, all from ``seed``."""
    if users < 1 or decisions < 1 or k < 2:
        raise ValueError(f"need users >= 1, decisions >= 1, k >= 2; got {users}, {decisions}, {k}")
    rng = np.random.default_rng([seed, 0x5E1])
    params = family.sample_params(users, rng)
    x = np.stack([family.candidates(users, k, rng) for _ in range(decisions)])
    mu = np.stack([family.expected_reward(params, x[t]) for t in range(decisions)])
    noise = family.noise_std * rng.standard_normal(mu.shape)
    return Simulation(params, x, mu, noise)


# -- regret bookkeeping ------------------------------------------------------------------------
def cumulative_regret(mu: Array, chosen: NDArray[np.int64]) -> Array:
    """``mu [U, T, K]`` expected rewards, ``chosen [U, T]`` indices -> ``[U, T]`` each user's
    cumulative regret after ``1..T`` decisions."""
    mu = np.asarray(mu, dtype=np.float64)
    got = np.take_along_axis(mu, np.asarray(chosen)[..., None], axis=2)[..., 0]
    return np.cumsum(mu.max(axis=2) - got, axis=1)


def regret_at(cumulative: Array, ts: Sequence[int]) -> dict[int, dict[str, float]]:
    """The mean over users of the cumulative regret after ``t`` decisions and its standard
    error, for each ``t`` in ``ts`` (those within the horizon)."""
    out: dict[int, dict[str, float]] = {}
    u = cumulative.shape[0]
    for t in ts:
        if 1 <= t <= cumulative.shape[1]:
            col = cumulative[:, t - 1]
            se = float(col.std(ddof=1) / np.sqrt(u)) if u > 1 else float("nan")
            out[int(t)] = {"mean": float(col.mean()), "se": se}
    return out


# -- Bayesian linear regression (linear Thompson sampling) -------------------------------------
def with_bias(x: NDArray[np.floating]) -> Array:
    """``x [..., d]`` -> ``[..., d + 1]`` with a constant 1 appended."""
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([x, np.ones((*x.shape[:-1], 1))], axis=-1)


def blr_update(
    prec: Array, b: Array, phi: Array, y: Array, noise_var: float
) -> tuple[Array, Array]:
    """One observation per model: ``prec [n, p, p]`` (posterior precision), ``b [n, p]``
    (precision times mean), ``phi [n, p]``, ``y [n]`` -> the updated ``(prec, b)``."""
    prec = prec + np.einsum("np,nq->npq", phi, phi) / noise_var
    return prec, b + phi * (np.asarray(y, dtype=np.float64)[:, None] / noise_var)


def blr_mean(prec: Array, b: Array) -> Array:
    """The posterior means ``[n, p]``."""
    return np.asarray(np.linalg.solve(prec, b[..., None])[..., 0], dtype=np.float64)


def blr_sample(prec: Array, b: Array, draws: int, rng: np.random.Generator) -> Array:
    """``draws`` posterior draws of each model's coefficients ``[n, draws, p]``."""
    mean = blr_mean(prec, b)
    chol = np.linalg.cholesky(prec)  # prec = L L^T; theta = mean + L^-T eps
    eps = rng.standard_normal((prec.shape[0], prec.shape[1], draws))
    dev = np.linalg.solve(np.swapaxes(chol, 1, 2), eps)  # [n, p, draws]
    return mean[:, None, :] + np.swapaxes(dev, 1, 2)


# -- policies ----------------------------------------------------------------------------------
class Policy(Protocol):
    def choose(self, t: int, x: NDArray[np.float32]) -> NDArray[np.int64]:
        """Round ``t``: ``x [U, K, d]`` -> the chosen index of each user ``[U]``."""
        ...

    def learn(self, t: int, x: NDArray[np.float32], y: Array) -> None:
        """Round ``t``: the chosen items ``x [U, d]`` and their rewards ``y [U]``."""
        ...


class RandomPolicy:
    """A uniformly random candidate."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 0x4A])

    def choose(self, t: int, x: NDArray[np.float32]) -> NDArray[np.int64]:
        return np.asarray(self.rng.integers(0, x.shape[1], size=x.shape[0]), dtype=np.int64)

    def learn(self, t: int, x: NDArray[np.float32], y: Array) -> None:
        return None


class LinearTS:
    """Linear Thompson sampling: ``models`` Bayesian linear regressions on ``[x, 1]`` with the
    prior ``N(0, prior_std^2 I)`` and a known ``noise_std``; user ``u`` is served and taught by
    model ``u`` (``models == users``: per-task) or all by model 0 (``models == 1``: pooled)."""

    def __init__(
        self, models: int, dim: int, *, prior_std: float, noise_std: float, seed: int
    ) -> None:
        if not (prior_std > 0 and noise_std > 0):
            raise ValueError("prior_std and noise_std must be > 0")
        p = dim + 1
        self.prec = np.repeat((np.eye(p) / prior_std**2)[None], models, axis=0)
        self.b = np.zeros((models, p))
        self.noise_var = float(noise_std) ** 2
        self.rng = np.random.default_rng([seed, 0x75])

    def _model_of(self, users: int) -> NDArray[np.int64]:
        return np.zeros(users, dtype=np.int64) if len(self.prec) == 1 else np.arange(users)

    def draws(self, x: NDArray[np.float32], draws: int) -> Array:
        """``x [U, K, d]`` -> ``[U, draws, K]`` values under posterior draws (one set of draws
        per user, also when the model is shared)."""
        m = self._model_of(x.shape[0])
        theta = blr_sample(self.prec[m], self.b[m], draws, self.rng)  # [U, S, p]
        return np.einsum("ukp,usp->usk", with_bias(x), theta)

    def mean(self, x: NDArray[np.float32]) -> Array:
        """``x [U, K, d]`` -> the posterior mean values ``[U, K]``."""
        m = self._model_of(x.shape[0])
        return np.einsum("ukp,up->uk", with_bias(x), blr_mean(self.prec[m], self.b[m]))

    def choose(self, t: int, x: NDArray[np.float32]) -> NDArray[np.int64]:
        return self.draws(x, 1)[:, 0].argmax(axis=1)

    def learn(self, t: int, x: NDArray[np.float32], y: Array) -> None:
        phi = with_bias(x)
        if len(self.prec) == 1:  # pooled: every user's reward teaches the one model
            self.prec = self.prec + phi.T @ phi / self.noise_var
            self.b = self.b + (phi * (y[:, None] / self.noise_var)).sum(axis=0)
        else:
            self.prec, self.b = blr_update(self.prec, self.b, phi, y, self.noise_var)


class MetaTS:
    """Thompson sampling with the meta-learned model, served by ``engine`` (a fresh engine: the
    users are new). Task ids are ``<prefix><user>``; decision ``(u, t)``'s draw is seeded by
    ``(seed, u, t)``."""

    def __init__(self, engine: Any, *, seed: int, draws: int = 1, prefix: str = "user-") -> None:
        self.engine, self.seed, self.n_draws, self.prefix = engine, seed, draws, prefix

    def task_ids(self, users: int) -> list[str]:
        return [f"{self.prefix}{u}" for u in range(users)]

    def values(self, t: int, x: NDArray[np.float32]) -> list[Any]:
        """Each user's :class:`~stream_meta.engine.ActionValues` for round ``t``."""
        users = x.shape[0]
        seeds = [int(self.seed) * 1_000_003 + u * 10_007 + t for u in range(users)]
        return list(
            self.engine.action_values(
                self.task_ids(users), list(x), draws=self.n_draws, seeds=seeds
            )
        )

    def choose(self, t: int, x: NDArray[np.float32]) -> NDArray[np.int64]:
        from stream_meta.decisions import thompson_choice

        return np.array([thompson_choice(v).index for v in self.values(t, x)], dtype=np.int64)

    def learn(self, t: int, x: NDArray[np.float32], y: Array) -> None:
        ids = self.task_ids(x.shape[0])
        self.engine.process(
            [
                {"event_id": f"{tid}-r{t}", "task_id": tid, "x": x[u].tolist(), "y": float(y[u])}
                for u, tid in enumerate(ids)
            ]
        )


# -- running ------------------------------------------------------------------------------------
def run_policy(
    policy: Policy, sim: Simulation, *, on_round: Callable[[int], None] | None = None
) -> NDArray[np.int64]:
    """Play every round of ``sim`` with ``policy``; the chosen indices ``[U, T]``."""
    chosen = np.zeros((sim.users, sim.decisions), dtype=np.int64)
    u = np.arange(sim.users)
    for t in range(sim.decisions):
        c = np.asarray(policy.choose(t, sim.x[t]), dtype=np.int64)
        chosen[:, t] = c
        policy.learn(t, sim.x[t, u, c], sim.rewards(t, c))
        if on_round is not None:
            on_round(t)
    return chosen


def make_policy(
    name: str,
    family: BanditFamily,
    sim: Simulation,
    *,
    seed: int,
    engine_factory: Callable[[], Any] | None = None,
    prior_std: float = 1.0,
) -> Policy:
    """The policy of strategy ``name`` (``meta`` needs ``engine_factory``: a fresh engine)."""
    if name == "meta":
        if engine_factory is None:
            raise ValueError("strategy meta needs a model (engine_factory)")
        return MetaTS(engine_factory(), seed=seed)
    if name in ("per-task-ts", "pooled"):
        models = sim.users if name == "per-task-ts" else 1
        return LinearTS(
            models, family.x_dim, prior_std=prior_std, noise_std=family.noise_std, seed=seed
        )
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"unknown bandit strategy {name!r}; known: {', '.join(STRATEGIES)}")


def evaluate_regret(
    family: BanditFamily,
    *,
    users: int,
    decisions: int,
    k: int = 10,
    seed: int = 0,
    strategies: Sequence[str] = STRATEGIES,
    at: Sequence[int] = (20, 200),
    engine_factory: Callable[[], Any] | None = None,
    prior_std: float = 1.0,
    on_round: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Every strategy on the same simulation: ``{"strategies": {name: {t: {"mean", "se"}}},
    "curves": {name: [mean cumulative regret after 1..T]}, ...}``; ``at`` defaults to 20 and
    200 decisions (and the horizon is always reported)."""
    sim = simulate(family, users, decisions, k, seed)
    mu = np.swapaxes(sim.mu, 0, 1)  # [U, T, K]
    ts = sorted({*at, decisions})
    out: dict[str, Any] = {
        "users": users,
        "decisions": decisions,
        "k": k,
        "seed": seed,
        "prior_std": prior_std,
        "noise_std": family.noise_std,
        "strategies": {},
        "curves": {},
    }
    for name in strategies:
        policy = make_policy(
            name, family, sim, seed=seed, engine_factory=engine_factory, prior_std=prior_std
        )
        tick = None if on_round is None else (lambda t, n=name: on_round(n, t))
        chosen = run_policy(policy, sim, on_round=tick)
        cum = cumulative_regret(mu, chosen)
        out["strategies"][name] = {str(t): v for t, v in regret_at(cum, ts).items()}
        out["curves"][name] = [round(float(v), 4) for v in cum.mean(axis=0)]
    return out
