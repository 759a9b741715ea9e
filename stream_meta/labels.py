"""Label requests: ask for the labels that help most, within a budget.

Labels cost money or a person's time. The engine knows how uncertain each task's model is, so
for every unlabelled event it can say what learning that event's label is worth, and the
service asks for the labels worth most (``<prefix>.label-requests``, ``run --label-requests``),
at the rate and in the share the budget allows.

**What a label is worth** (:func:`label_value`), the *expected reduction of the task's loss at
the event* once its label is learned:

- regression: the closed-form head is a Bayesian linear regression, so learning the label of
  ``x`` shrinks the epistemic variance at ``x`` from ``v`` to ``v * s2 / (v + s2)`` (``s2``:
  the noise variance), a reduction of ``v**2 / (v + s2)``; the expected squared error at ``x``
  falls by exactly that. It is the predictive variance minus the part no label removes: an
  event of a task whose model is sure (``v`` small) or whose labels are mostly noise (``s2``
  large) is worth little. Plain predictive variance would spend the budget on noisy tasks.
  The reduction is measured at the event, not multiplied by the task's expected further
  events: a new task's first events are where most loss is, and they are worth most already
  (a variant that multiplied them in, estimated from the stream's task lengths or as "as many
  as it has had", did slightly worse on the sinusoid log during development and was removed).
  With experts the disagreement
  between them counts as epistemic: labels settle which expert is right.
- classification: the predictive entropy (the expected log loss at the event under the
  model's own predictive): the head gives no closed-form reduction for the softmax.

**The policies** (:class:`LabelRequester`):

- ``uncertainty``: request an event whose worth is at least the ``1 - pace`` quantile of the
  last ``window`` eligible events' worth, where ``pace`` is the share the unspent budget
  allows now (``fraction`` with :data:`PACE` labels of credit banked; more when the stream
  offered too little, less after a burst spent it): the budget goes to the events worth
  most, is spent, and the threshold follows the stream (new tasks, drift) on its own (a fixed
  ``1 - fraction`` quantile left much of the budget unspent when high-worth events came in
  bursts).
- ``random``: each eligible event with probability ``fraction`` (a hash of its event id and the
  seed: a redelivered event gets the same answer).
- ``first-k``: a task's first ``first_k`` eligible events.

**Budgets**, checked in this order for an event the policy picked: the *share*, at any time
at most ``fraction`` of the eligible events seen so far (a credit of ``fraction`` per eligible
event, from 0; a request spends 1; unspent credit is kept up to ``burst`` requests, so a quiet
stretch cannot bank a flood); requests per second overall (``rate_per_s``) and per
task (``task_rate_per_s``), token buckets of depth ``burst`` on the clock passed in (wall
time live; replays use the share only). A budget that says no is counted by reason. One event
id is requested at most once (a window of ``dedupe_window`` ids).

>>> import numpy as np
>>> label_value("regression", variance=np.array([1.1, 2.0]), noise=np.array([0.1, 1.9]))
array([0.90909091, 0.005     ])
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stream_meta.dedupe import DedupeWindow

__all__ = [
    "LabelPolicy",
    "LabelRequest",
    "LabelRequester",
    "label_value",
]

Policy = Literal["uncertainty", "random", "first-k"]
#: labels of credit at which the uncertainty policy requests exactly its ``fraction``
PACE = 5.0
POLICIES: tuple[str, ...] = ("uncertainty", "random", "first-k")
#: what a request's ``reason`` says, per policy
REASONS = {
    "uncertainty": "expected_loss_reduction",
    "random": "random_sample",
    "first-k": "first_k",
}


def label_value(
    kind: str,
    *,
    variance: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """What learning each event's label is worth ``[N]`` (see the module docstring):
    regression, ``v**2 / (v + s2)`` from the predictive ``variance = v + s2 [N]`` and its
    ``noise = s2 [N]`` part; classification, the entropy of ``probabilities [N, C]``."""
    if kind == "regression":
        if variance is None or noise is None:
            raise ValueError("a regression label's worth needs the variance and its noise part")
        total = np.maximum(np.asarray(variance, np.float64), 1e-300)
        epistemic = np.clip(total - np.asarray(noise, np.float64), 0.0, None)
        return epistemic * epistemic / total
    if probabilities is None:
        raise ValueError("a classification label's worth needs the class probabilities")
    p = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


@dataclass(frozen=True)
class LabelPolicy:
    """How label requests are chosen and bounded (the ``[labels]`` settings)."""

    policy: Policy = "uncertainty"
    fraction: float = 0.1  # at most this share of the eligible events seen so far
    rate_per_s: float | None = None  # requests per second, overall (None: no limit)
    task_rate_per_s: float | None = None  # requests per second, per task (None: no limit)
    burst: float = 10.0  # depth of the share credit and of the rate buckets (inf: unbounded)
    first_k: int = 10  # first-k: requests per task
    window: int = 2000  # uncertainty: eligible events the threshold is the quantile of
    dedupe_window: int = 200_000  # requested event ids remembered
    max_tasks: int = 100_000  # tasks whose request counts and buckets are remembered
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown label policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"labels fraction must be in (0, 1], got {self.fraction}")
        for name in ("rate_per_s", "task_rate_per_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"labels {name} must be > 0 (or unset), got {value}")
        if not self.burst >= 1:  # inf: the unspent share carries over without limit
            raise ValueError(f"labels burst must be >= 1, got {self.burst}")
        for name in ("first_k", "window", "max_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"labels {name} must be >= 1, got {getattr(self, name)}")
        if self.dedupe_window < 0:
            raise ValueError(f"labels dedupe_window must be >= 0, got {self.dedupe_window}")


@dataclass(frozen=True)
class LabelRequest:
    """One request: label event ``event_id`` of ``task_id``; ``score`` is what the label is
    worth (:func:`label_value`; None where the policy needs none), ``reason`` why it was
    chosen, ``model_version`` the model that judged it."""

    event_id: str
    task_id: str
    score: float | None
    reason: str
    model_version: int

    def to_record(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "task_id": self.task_id,
            "score": self.score,
            "reason": self.reason,
            "model_version": self.model_version,
        }

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_record(), separators=(",", ":"))


class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``depth``."""

    __slots__ = ("depth", "rate", "t", "tokens")

    def __init__(self, rate: float, depth: float, now: float) -> None:
        self.rate, self.depth, self.tokens, self.t = rate, depth, depth, now

    def ready(self, now: float) -> bool:
        """Refill to ``now``; whether a token is there (not taken: :meth:`spend` takes it)."""
        if now > self.t:
            self.tokens = min(self.depth, self.tokens + (now - self.t) * self.rate)
            self.t = now
        return self.tokens >= 1.0

    def spend(self) -> None:
        self.tokens -= 1.0


class LabelRequester:
    """Chooses the label requests of each batch (see the module docstring).

    :meth:`select` sees a batch's eligible events in stream order and returns the requests;
    ``counts`` says how many were requested and how many the policy picked but a budget
    refused, by reason (``share``, ``rate``, ``task_rate``), ``repeated``: events already
    requested, and ``answered``: labelled events whose label was requested (:meth:`answered`).
    ``metrics`` (an :class:`~stream_meta.metrics.EngineMetrics`) is optional."""

    def __init__(self, policy: LabelPolicy | None = None, metrics: Any = None) -> None:
        self.policy = p = policy or LabelPolicy()
        self.metrics = metrics
        self.credit = 0.0  # requests never exceed fraction x eligible events
        self.requested = DedupeWindow(p.dedupe_window) if p.dedupe_window else None
        self.window = np.full(p.window, np.nan)
        self._sorted: np.ndarray | None = None  # the window's filled part, sorted
        self._filled = self._next = 0
        self._asked: OrderedDict[str, int] = OrderedDict()  # task -> requests made
        self._task_buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._bucket: _Bucket | None = None
        self.counts: dict[str, int] = {
            "eligible": 0,
            "requested": 0,
            "share": 0,
            "rate": 0,
            "task_rate": 0,
            "repeated": 0,
            "answered": 0,
        }

    @property
    def pace(self) -> float:
        """The share of eligible events the uncertainty policy aims to request now: the
        unspent credit spread over the next ``PACE / fraction`` eligible events (``fraction``
        when ``PACE`` labels are banked, or half the burst if that is less; more when the
        stream offered too little, less after a burst spent them)."""
        p = self.policy
        banked = min(PACE, p.burst / 2.0)  # a small burst: aim at half of it
        return min(1.0, max(0.0, self.credit) * p.fraction / banked)

    @property
    def threshold(self) -> float | None:
        """The uncertainty policy's current threshold: the ``1 - pace`` quantile of the worth
        of the last ``window`` eligible events (None until one was seen)."""
        if self._filled == 0:
            return None
        if self._sorted is None:
            self._sorted = np.sort(self.window[: self._filled])
        ranks = self._sorted
        pace = self.pace
        if pace >= 1.0:
            return 0.0
        return float(ranks[min(len(ranks) - 1, int((1.0 - pace) * len(ranks)))])

    def select(
        self,
        event_ids: Sequence[str],
        task_ids: Sequence[str],
        scores: np.ndarray | None,
        *,
        eligible: Sequence[bool] | None = None,
        model_version: int,
        now: float = 0.0,
    ) -> list[LabelRequest]:
        """The requests among a batch's events (in stream order): ``eligible[i]`` (default:
        all) says whether event ``i`` may be requested (an unlabelled one), ``scores[i]`` what
        its label is worth (:func:`label_value`; needed by ``uncertainty``)."""
        p = self.policy
        if p.policy == "uncertainty" and scores is None:
            raise ValueError(
                "the uncertainty label policy needs a model that gives its uncertainty "
                "(a regression model with its head posterior, or a classifier)"
            )
        n = len(event_ids)
        if n == 0:
            return []
        if scores is not None:
            scores = np.asarray(scores, np.float64)
        if eligible is not None:
            keep = np.flatnonzero(np.asarray(eligible, dtype=bool))
            event_ids = [event_ids[int(i)] for i in keep]
            task_ids = [task_ids[int(i)] for i in keep]
            scores = None if scores is None else scores[keep]
            n = len(keep)
        if scores is not None:  # the batch is predicted before any request: its worth counts
            self._remember(scores)
        reason = REASONS[p.policy]
        out: list[LabelRequest] = []
        for i in range(n):
            event_id, task_id = event_ids[i], task_ids[i]
            if self.requested is not None and event_id in self.requested:
                self.counts["repeated"] += 1
                continue
            self.counts["eligible"] += 1
            self.credit = min(p.burst, self.credit + p.fraction)
            score = None if scores is None else float(scores[i])
            if not self._picks(event_id, task_id, score):
                continue
            refused = self._refusal(task_id, now)
            if refused:
                self.counts[refused] += 1
                if self.metrics is not None:
                    self.metrics.label_refused.labels(refused).inc()
                continue
            self.credit -= 1.0
            if self.requested is not None:
                self.requested.add(event_id)
            self._asked[task_id] = self._asked.pop(task_id, 0) + 1
            while len(self._asked) > p.max_tasks:
                self._asked.popitem(last=False)
            out.append(LabelRequest(event_id, task_id, score, reason, model_version))
        self.counts["requested"] += len(out)
        if self.metrics is not None:
            if out:
                self.metrics.label_requests.labels(p.policy).inc(len(out))
            if self.threshold is not None and p.policy == "uncertainty":
                self.metrics.label_threshold.set(self.threshold)
        return out

    def answered(self, event_ids: Sequence[str]) -> int:
        """Count the labelled events that answer a request (their id was requested); how
        many of ``event_ids`` did."""
        if self.requested is None:
            return 0
        n = sum(1 for event_id in event_ids if event_id in self.requested)
        if n:
            self.counts["answered"] += n
            if self.metrics is not None:
                self.metrics.label_answers.inc(n)
        return n

    def _picks(self, event_id: str, task_id: str, score: float | None) -> bool:
        p = self.policy
        if p.policy == "uncertainty":
            assert score is not None
            if not math.isfinite(score) or score <= 0.0:
                return False
            threshold = self.threshold
            return threshold is None or score >= threshold
        if p.policy == "random":
            return _uniform(event_id, p.seed) < p.fraction
        return self._asked.get(task_id, 0) < p.first_k

    def _refusal(self, task_id: str, now: float) -> str | None:
        """Which budget refuses a request now (None: all allow it, and each is spent)."""
        p = self.policy
        if self.credit < 1.0:
            return "share"
        buckets = []
        if p.rate_per_s is not None:
            if self._bucket is None:
                self._bucket = _Bucket(p.rate_per_s, _depth(p.burst, p.rate_per_s), now)
            if not self._bucket.ready(now):
                return "rate"
            buckets.append(self._bucket)
        if p.task_rate_per_s is not None:
            bucket = self._task_buckets.pop(task_id, None)
            if bucket is None:
                bucket = _Bucket(p.task_rate_per_s, _depth(p.burst, p.task_rate_per_s), now)
            self._task_buckets[task_id] = bucket
            while len(self._task_buckets) > p.max_tasks:
                self._task_buckets.popitem(last=False)
            if not bucket.ready(now):
                return "task_rate"
            buckets.append(bucket)
        for b in buckets:
            b.spend()
        return None

    def _remember(self, scores: np.ndarray) -> None:
        """Add the batch's scores to the window the threshold is the quantile of."""
        self._sorted = None
        scores = scores[np.isfinite(scores)]
        size = len(self.window)
        for lo in range(0, len(scores), size):
            part = scores[lo : lo + size]
            end = self._next + len(part)
            if end <= size:
                self.window[self._next : end] = part
            else:
                cut = size - self._next
                self.window[self._next :] = part[:cut]
                self.window[: end - size] = part[cut:]
            self._next = end % size
            self._filled = min(size, self._filled + len(part))

    def summary(self) -> dict[str, Any]:
        c = self.counts
        return {
            "policy": self.policy.policy,
            "fraction": self.policy.fraction,
            **c,
            "requested_fraction": round(c["requested"] / c["eligible"], 4)
            if c["eligible"]
            else None,
            "threshold": self.threshold if self.policy.policy == "uncertainty" else None,
        }


def _uniform(event_id: str, seed: int) -> float:
    """A number in [0, 1) that depends on the event id and the seed only."""
    digest = hashlib.blake2b(f"{seed}:{event_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _depth(burst: float, rate: float) -> float:
    """A rate bucket's depth: ``burst``, or one second's worth when the burst is unbounded."""
    return burst if math.isfinite(burst) else max(1.0, rate)
