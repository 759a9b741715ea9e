"""A contextual-bandit task family: users with latent preferences, items with features, noisy
rewards.

A *task* is a user. Each decision offers the user ``K`` candidate items, each described by a
feature vector ``x ~ N(0, I_d)``; the user's expected reward for an item is

    mu(x) = bias + w . x + quality * tanh(2 v . x)

where ``w`` (the user's taste) comes from a structured population: one of ``archetypes``
preference vectors (fixed by the family's ``seed``, entries ``~ N(0, 1)``), plus Gaussian
within-archetype spread ``spread``; ``bias ~ N(0, bias_std)``; and ``v`` (a unit vector, also
fixed by ``seed``) is a shared, nonlinear item quality every user responds to alike. The reward
observed is ``mu(x)`` plus Gaussian noise of ``noise_std``.

So a model meta-learned on the population knows the archetypes (a new user is identified after
a few rewards) and the shared nonlinearity; a per-task linear model from scratch knows neither.

It is a :class:`~stream_meta.tasks.base.TaskFamily` (regression: ``x`` = item features, ``y`` =
reward; ``stream-meta train --family bandit``), whose params ``[B, d + 1]`` are ``(w, bias)``,
and it has a bandit interface for the regret evaluation (:mod:`stream_meta.evaluation.bandit`):
:meth:`BanditFamily.candidates`, :meth:`BanditFamily.expected_reward` and
:meth:`BanditFamily.reward`, and :func:`logged_stream` writes a logged decision stream of a
known logging policy (with propensities) for off-policy evaluation.

>>> import numpy as np
>>> family = BanditFamily()
>>> rng = np.random.default_rng(0)
>>> params = family.sample_params(3, rng)  # [B, d + 1]: w, bias
>>> params.shape
(3, 6)
>>> x = family.candidates(3, 10, rng)  # [B, K, d]
>>> x.shape, family.expected_reward(params, x).shape
((3, 10, 5), (3, 10))
>>> xs, ys = family.sample(params, 4, rng)
>>> xs.shape, ys.shape, ys.dtype.name
((3, 4, 5), (3, 4), 'float32')
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.base import FloatArray, Kind, TaskFamily

__all__ = ["BanditFamily", "logged_stream"]


class BanditFamily(TaskFamily):
    """Users (tasks) with latent preference vectors from a population of archetypes.

    Args:
        dim: item feature dimension ``d``.
        archetypes: number of preference archetypes (population clusters).
        spread: standard deviation of a user's taste around its archetype, per coordinate.
        bias_std: standard deviation of a user's reward offset.
        quality: weight of the shared nonlinear item quality ``tanh(2 v . x)``.
        noise_std: standard deviation of the reward noise.
        seed: fixes the population (archetypes and the quality direction); two families with
            the same arguments are the same population.
    """

    name: ClassVar[str] = "bandit"
    kind: Kind = "regression"
    n_classes = None

    def __init__(
        self,
        *,
        dim: int = 5,
        archetypes: int = 4,
        spread: float = 0.15,
        bias_std: float = 0.2,
        quality: float = 0.75,
        noise_std: float = 0.5,
        seed: int = 0,
    ) -> None:
        if dim < 1 or archetypes < 1:
            raise ValueError(f"dim and archetypes must be >= 1, got {dim} and {archetypes}")
        for label, value in (
            ("spread", spread),
            ("bias_std", bias_std),
            ("quality", quality),
            ("noise_std", noise_std),
        ):
            if not value >= 0.0:
                raise ValueError(f"{label} must be >= 0, got {value}")
        self.x_dim = int(dim)
        self.archetypes = int(archetypes)
        self.spread = float(spread)
        self.bias_std = float(bias_std)
        self.quality = float(quality)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        pop = np.random.default_rng([self.seed, 0xBA4D17])
        #: ``[C, d]`` the archetypes' preference vectors
        self.centres = pop.standard_normal((self.archetypes, self.x_dim))
        v = pop.standard_normal(self.x_dim)
        #: ``[d]`` the shared quality direction (unit norm)
        self.quality_direction = v / np.linalg.norm(v)
        self.param_names = (*(f"w{i}" for i in range(self.x_dim)), "bias")

    def _describe(self) -> str:
        return (
            f"dim={self.x_dim}, archetypes={self.archetypes}, spread={self.spread}, "
            f"bias_std={self.bias_std}, quality={self.quality}, noise_std={self.noise_std}, "
            f"seed={self.seed}"
        )

    # -- the population ----------------------------------------------------------------------
    def sample_params(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``[n, d + 1]`` users: an archetype drawn uniformly plus the spread, and a bias."""
        c = rng.integers(0, self.archetypes, size=n)
        w = self.centres[c] + self.spread * rng.standard_normal((n, self.x_dim))
        bias = self.bias_std * rng.standard_normal((n, 1))
        return np.concatenate([w, bias], axis=1)

    def perturb(self, params: FloatArray, spread: float, rng: np.random.Generator) -> FloatArray:
        """Similar users: Gaussian steps of ``spread`` (relative to a unit-scale taste) on every
        column (0: the same users)."""
        params = self.check_params(params)
        if spread < 0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        if spread == 0:
            return params.copy()
        return params + spread * rng.standard_normal(params.shape)

    # -- items and rewards -------------------------------------------------------------------
    def candidates(self, n: int, k: int, rng: np.random.Generator) -> NDArray[np.float32]:
        """``[n, k, d]`` item features of ``n`` decisions with ``k`` candidates each."""
        return rng.standard_normal((n, k, self.x_dim), dtype=np.float32)

    def expected_reward(self, params: FloatArray, x: NDArray[np.floating]) -> FloatArray:
        """The noiseless reward ``mu(x)``: ``params [B, d + 1]``, ``x [B, n, d]`` -> ``[B, n]``
        (float64)."""
        params = self.check_params(params)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[0] != params.shape[0] or x.shape[2] != self.x_dim:
            raise ValueError(
                f"x must have shape [{params.shape[0]}, n, {self.x_dim}], got {x.shape}"
            )
        linear = np.einsum("bnd,bd->bn", x, params[:, : self.x_dim]) + params[:, -1:]
        return linear + self.quality * np.tanh(2.0 * (x @ self.quality_direction))

    def reward(
        self, params: FloatArray, x: NDArray[np.floating], rng: np.random.Generator
    ) -> FloatArray:
        """A noisy reward draw for each item: ``x [B, n, d]`` -> ``[B, n]``."""
        mu = self.expected_reward(params, x)
        return mu + self.noise_std * rng.standard_normal(mu.shape)

    def sample(
        self,
        params: FloatArray,
        n: int,
        rng: np.random.Generator,
        *,
        per_class: bool = False,
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """``n`` random items per user and their noisy rewards: ``x [B, n, d]``, ``y [B, n]``."""
        if per_class:
            raise ValueError("per_class sampling needs a classification family")
        params = self.check_params(params)
        x = self.candidates(params.shape[0], n, rng)
        return x, self.reward(params, x, rng).astype(np.float32)


def logged_stream(
    family: BanditFamily,
    params: FloatArray,
    decisions: int,
    rng: np.random.Generator,
    *,
    k: int = 10,
    epsilon: float = 1.0,
    prefix: str = "u",
) -> Iterator[dict[str, Any]]:
    """A production log of a known logging policy: ``decisions`` rounds for each user (rows of
    ``params``; task ids ``<prefix><row>``), users interleaved round by round, as decision
    events with ``"logged": {"action_id", "propensity", "reward"}``.

    The logging policy is epsilon-greedy around the *population's* greedy choice (the item with
    the largest expected reward of the population's mean user, archetypes averaged): with
    probability ``epsilon`` a uniformly random candidate, else that item. ``epsilon=1`` is
    uniform random logging (propensity ``1 / k``). Every propensity is the exact probability
    of the action logged.

    Each event also carries ``"expected": [mu of each candidate]`` (the simulator's truth,
    which an evaluator must not read; tests and the bench use it for the true value of a
    target policy).
    """
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    params = family.check_params(params)
    n = params.shape[0]
    mean_user = np.concatenate([family.centres.mean(axis=0), [0.0]])[None, :]
    for t in range(decisions):
        x = family.candidates(n, k, rng)
        mu = family.expected_reward(params, x)
        noise = family.noise_std * rng.standard_normal((n, k))
        greedy = np.asarray(
            family.expected_reward(np.repeat(mean_user, n, axis=0), x).argmax(axis=1)
        )
        explore = np.asarray(rng.random(n) < epsilon)
        uniform = np.asarray(rng.integers(0, k, size=n))
        for u in range(n):
            a = int(uniform[u]) if explore[u] else int(greedy[u])
            p = epsilon / k + (1.0 - epsilon) * float(a == greedy[u])
            yield {
                "event_id": f"{prefix}{u}-d{t}",
                "task_id": f"{prefix}{u}",
                "actions": [
                    {"action_id": f"a{j}", "x": [float(v) for v in x[u, j]]} for j in range(k)
                ],
                "logged": {
                    "action_id": f"a{a}",
                    "propensity": p,
                    "reward": float(mu[u, a] + noise[u, a]),
                },
                "expected": [float(v) for v in mu[u]],
            }
