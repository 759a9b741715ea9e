"""Choosing an action from a task's posterior: Thompson sampling and upper confidence bounds.

A *decision* offers a task ``K`` candidate actions, each described by a feature vector; the
service picks one and later learns the reward of that one only. The task's closed-form head
already holds a Gaussian posterior (:meth:`~stream_meta.engine.Engine.action_values` returns
its predicted values, their epistemic standard deviations and joint posterior draws), so:

- **Thompson sampling** (the default) plays the action that is best under one posterior draw.
  Its *propensity*, the probability that the policy plays that action, is what off-policy
  evaluation needs; it is estimated as the share of the ``S`` draws whose best action is the
  one played (the played draw included, so never 0).
- **UCB** plays the action with the largest ``mean + c * epistemic std``: deterministic
  (propensity 1 for the action played), so logs of it support no inverse-propensity estimate
  of another policy.

The meta-learned prior is what makes a new task's first choices good: with no reward seen the
posterior is the population's, not a flat one.

>>> import numpy as np
>>> from stream_meta.engine import ActionValues
>>> draws = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
>>> v = ActionValues(np.array([0.5, 1.5]), np.array([1.0, 1.0]), np.zeros(2), draws, shots=0)
>>> thompson_choice(v)
Choice(index=1, propensity=0.75, value=1.0)
>>> action_probabilities(v).tolist()
[0.25, 0.75]
>>> ucb_choice(v, c=1.0)
Choice(index=1, propensity=1.0, value=2.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_meta.engine import ActionValues

__all__ = ["Choice", "action_probabilities", "thompson_choice", "ucb_choice"]


@dataclass(frozen=True)
class Choice:
    """The action played (its index among the candidates), the probability that the policy
    plays it, and the value the policy ranked it by (the draw, or the upper bound)."""

    index: int
    propensity: float
    value: float


def action_probabilities(values: ActionValues) -> np.ndarray:
    """Thompson sampling's probability of playing each action ``[K]``: the share of the
    posterior draws in which it is the best (ties go to the first)."""
    if values.draws is None or len(values.draws) == 0:
        raise ValueError("Thompson sampling needs posterior draws (action_values(draws=S))")
    best = values.draws.argmax(axis=1)
    return np.bincount(best, minlength=values.draws.shape[1]) / len(best)


def thompson_choice(values: ActionValues) -> Choice:
    """Play the best action under the first posterior draw; its propensity is estimated from
    all the draws (:func:`action_probabilities`)."""
    probs = action_probabilities(values)
    assert values.draws is not None
    index = int(values.draws[0].argmax())
    return Choice(index, float(probs[index]), float(values.draws[0, index]))


def ucb_choice(values: ActionValues, c: float = 2.0) -> Choice:
    """Play the action with the largest ``mean + c * epistemic std`` (propensity 1)."""
    if not c >= 0:
        raise ValueError(f"the UCB width c must be >= 0, got {c}")
    bound = values.mean + c * values.epistemic_std
    index = int(bound.argmax())
    return Choice(index, 1.0, float(bound[index]))
