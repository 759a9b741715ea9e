"""Decisions with reward-only feedback, online: what a pipeline step does with decision and
reward events (:mod:`stream_meta.decision_events`) before the engine sees the batch.

For a batch of raw events, :meth:`Decider.intake`:

1. picks out the decisions and rewards (a substring test on every raw event, then a full
   parse of the few candidates; plain events go to the engine untouched);
2. chooses an action for every new decision of the batch, all together
   (:meth:`~stream_meta.engine.Engine.action_values`: each task's posterior *as it was before
   this batch's learning*, the same state for every decision of the batch, so the choice does
   not depend on where in the batch a decision sits), by Thompson sampling (seeded by a hash of
   the decision id: :func:`~stream_meta.decisions.decision_seed`) or UCB;
3. walks the batch in stream order: a decision is held (:class:`PendingDecisions`) with the
   played action's features, or, when its id is already held (a redelivery), outputs the held
   record again (same choice, nothing new held; the id is the decision: a second event with
   it gets the first one's record whatever actions it offers); a reward is resolved against the held
   decisions: *learned* becomes the labelled event ``(event_id: the reward's, task_id: the
   decision's, x: the played action's features, y: the reward, ts)`` that the engine then
   predicts, scores and learns in its place in the batch; *duplicate* becomes the same event
   marked as learned already (predicted, flagged ``duplicate``, not learned); *late* and
   *unknown* are refused (dead letters ``late_reward`` / ``unknown_decision``).

Every input thus yields exactly one output: a prediction (plain events, learned and duplicate
rewards), a decision record, or a rejection. A reward for a decision made earlier in the same
batch is resolved like any other; one that comes before its decision is unknown.

The decision record (the ``<prefix>.decisions`` topic, ``run --output``) is ``decision_id``,
``task_id``, ``action_id``, ``action_index``, ``propensity`` (the probability that the policy
plays that action: the share of ``draws`` posterior draws whose best action it is for Thompson
sampling, 1 for UCB), ``policy``, ``value`` (what the policy ranked by: the draw, or the upper
bound), ``mean``, ``std`` (the chosen action's predictive std: epistemic and noise),
``model_version``, ``shots``, ``expert`` (or null) and ``latency_s``.

Held decisions are per process: the service checkpoints them with its state
(:meth:`state_arrays` / :meth:`restore_state`), but they are not on the task-state changelog,
so a reward whose decision another replica made is unknown; rewards should be keyed by the
decision's task id, like its decision, so both go to the replica that owns the task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from stream_meta.adapters import MetaAdapter
from stream_meta.decision_events import Decision, Reward, candidates, parse_other
from stream_meta.decisions import (
    Pending,
    PendingDecisions,
    decision_seed,
    thompson_choice,
    ucb_choice,
)
from stream_meta.engine import Engine
from stream_meta.events import Rejection, RejectReason, _raw_bytes
from stream_meta.metrics import DecisionMetrics

__all__ = ["Decider", "DecisionConfig", "Intake"]


@dataclass(frozen=True)
class DecisionConfig:
    """Decision knobs; the ``[decisions]`` settings section maps onto these fields by name."""

    policy: Literal["thompson", "ucb"] = "thompson"
    ucb_c: float = 2.0  # UCB's width, in epistemic standard deviations
    draws: int = 256  # Thompson sampling's posterior draws (its propensity estimate)
    max_actions: int = 256
    max_pending: int = 100_000  # decisions held for their reward (about 1 KiB each)
    reward_ttl_s: float = 86_400.0

    def __post_init__(self) -> None:
        if self.policy not in ("thompson", "ucb"):
            raise ValueError(f"policy must be 'thompson' or 'ucb', got {self.policy!r}")
        if not (self.ucb_c >= 0 and self.draws >= 1 and self.max_actions >= 1):
            raise ValueError("decisions need ucb_c >= 0, draws >= 1 and max_actions >= 1")
        if not (self.max_pending >= 1 and self.reward_ttl_s > 0):
            raise ValueError("decisions need max_pending >= 1 and reward_ttl_s > 0")


@dataclass
class Intake:
    """What :meth:`Decider.intake` made of a batch: the engine's inputs (``raws``, from input
    positions ``positions``, with their ``learned`` flags), the decision records and the
    refusals, each with its input position."""

    raws: list[Any]
    positions: list[int]
    learned: list[bool] | None
    decisions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    refused: list[tuple[int, Rejection]] = field(default_factory=list)


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class Decider:
    """Chooses actions for decision events and turns rewards into labelled events; see the
    module docstring. ``seed`` (the engine's) enters every decision's draw seed."""

    def __init__(
        self,
        engine: Engine,
        config: DecisionConfig | None = None,
        *,
        metrics: DecisionMetrics | None = None,
        seed: int = 0,
    ) -> None:
        self.engine = engine
        self.config = config = config or DecisionConfig()
        self.metrics = metrics if metrics is not None else DecisionMetrics()
        self.seed = seed
        self.store = PendingDecisions(config.max_pending, config.reward_ttl_s, engine.schema.x_dim)
        self.counts = {"decisions": 0, "redelivered": 0, "refused": 0}
        self.rewards = {"learned": 0, "duplicate": 0, "late": 0, "unknown": 0}

    @property
    def decidable(self) -> str | None:
        """Why this engine cannot decide (None: it can)."""
        e = self.engine
        if e.kind != "regression":
            return "decisions need a regression model (this one classifies)"
        if not isinstance(e.adapter, MetaAdapter):
            return "decisions need the meta-model's own adapter"
        return None

    def intake(
        self,
        raws: Sequence[Any],
        *,
        received_at: float,
        learned: Sequence[bool] | None = None,
    ) -> Intake | None:
        """Decide the batch's decisions and resolve its rewards (see the module docstring);
        None when the batch holds neither (the engine then takes ``raws`` as they are).
        ``received_at`` is a ``time.perf_counter()`` reading; ``learned`` as for
        :meth:`~stream_meta.engine.Engine.process`."""
        parsed: dict[int, Decision | Reward | Rejection] = {}
        schema, max_actions = self.engine.schema, self.config.max_actions
        for i in candidates(raws):
            p = parse_other(raws[i], schema, max_actions)
            if p is not None:
                parsed[i] = p
        if not parsed:
            return None
        wall = time.time()
        why_not = self.decidable
        fresh: dict[str, Decision] = {}
        if why_not is None:
            for p in parsed.values():
                if isinstance(p, Decision) and p.event_id not in self.store:
                    fresh.setdefault(p.event_id, p)
        made: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
        if fresh:
            try:
                made = self._choose(list(fresh.values()), received_at)
            except ValueError as exc:  # a model with no posterior to decide with
                why_not = f"no decision possible: {exc}"

        intake = Intake([], [], None)
        extra: list[tuple[int, dict[str, Any], bool]] = []  # rewards for the engine
        m = self.metrics
        for i, p in parsed.items():
            if isinstance(p, Rejection):
                intake.refused.append((i, p))
            elif isinstance(p, Decision):
                if why_not is not None:
                    intake.refused.append(
                        (i, self._refuse(RejectReason.NOT_DECIDABLE, why_not, raws[i], p))
                    )
                    continue
                entry = self.store.get(p.event_id)
                if entry is not None:
                    self.counts["redelivered"] += 1
                    m.redelivered.inc()
                    intake.decisions.append((i, entry.record))
                    continue
                record, x = made[p.event_id]
                t = wall if p.ts is None else p.ts
                lost = self.store.add(p.event_id, Pending(p.task_id, x, t, record))
                if lost:
                    m.unrewarded.inc(lost)
                self.counts["decisions"] += 1
                m.decisions.labels(record["policy"]).inc()
                m.propensity.observe(record["propensity"])
                intake.decisions.append((i, record))
            else:
                now = wall if p.ts is None else p.ts
                outcome, held = self.store.reward(p.decision_id, p.task_id, now)
                self.rewards[outcome] += 1
                m.rewards.labels(outcome).inc()
                if outcome == "unknown":
                    detail = f"no decision {p.decision_id!r} is held"
                    if held is None and p.task_id is not None and p.decision_id in self.store:
                        detail = f"decision {p.decision_id!r} is not task {p.task_id!r}'s"
                    intake.refused.append(
                        (i, self._refuse(RejectReason.UNKNOWN_DECISION, detail, raws[i], p))
                    )
                elif outcome == "late":
                    assert held is not None
                    detail = (
                        f"reward came {now - held.t:.3g} s after decision {p.decision_id!r}, "
                        f"beyond decisions.reward_ttl_s ({self.store.ttl_s:g} s)"
                    )
                    intake.refused.append(
                        (i, self._refuse(RejectReason.LATE_REWARD, detail, raws[i], p))
                    )
                else:
                    assert held is not None
                    event = {
                        "event_id": p.event_id,
                        "task_id": held.task_id,
                        "x": held.x.tolist(),
                        "y": p.reward,
                        "ts": p.ts,
                    }
                    extra.append((i, event, outcome == "duplicate"))
        if intake.refused:
            self.counts["refused"] += len(intake.refused)
            rejections = self.engine.metrics.rejections
            for _, r in intake.refused:
                rejections.labels(r.reason.value).inc()
        m.pending.set(self.store.awaiting)

        # the engine's inputs, in input order: untouched raws and the rewards' events
        rewards = {i: (event, dup) for i, event, dup in extra}
        flags: list[bool] = []
        for i, raw in enumerate(raws):
            if i in rewards:
                event, dup = rewards[i]
                intake.raws.append(event)
                flags.append(dup or (learned is not None and learned[i]))
            elif i not in parsed:
                intake.raws.append(raw)
                flags.append(learned is not None and learned[i])
            else:
                continue
            intake.positions.append(i)
        intake.learned = flags if learned is not None or any(flags) else None
        return intake

    def _choose(
        self, decisions: list[Decision], received_at: float
    ) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
        """The decision record and the played action's features of each decision."""
        c, engine = self.config, self.engine
        thompson = c.policy == "thompson"
        values = engine.action_values(
            [d.task_id for d in decisions],
            [d.x for d in decisions],
            draws=c.draws if thompson else 0,
            seeds=[decision_seed(d.event_id, self.seed) for d in decisions],
            ts=[d.ts for d in decisions],
        )
        version = engine.model_version
        latency = max(0.0, time.perf_counter() - received_at)
        out = {}
        for d, v in zip(decisions, values, strict=True):
            choice = thompson_choice(v) if thompson else ucb_choice(v, c.ucb_c)
            k = choice.index
            std = math.sqrt(float(v.epistemic_std[k]) ** 2 + float(v.noise_std[k]) ** 2)
            record = {
                "decision_id": d.event_id,
                "task_id": d.task_id,
                "action_id": d.action_ids[k],
                "action_index": k,
                "propensity": choice.propensity,
                "policy": c.policy,
                "value": _num(choice.value),
                "mean": _num(float(v.mean[k])),
                "std": _num(std),
                "model_version": version,
                "shots": v.shots,
                "expert": v.expert,
                "latency_s": latency,
            }
            out[d.event_id] = (record, d.x[k].copy())
        return out

    @staticmethod
    def _refuse(reason: RejectReason, detail: str, raw: Any, p: Decision | Reward) -> Rejection:
        return Rejection.model_construct(
            reason=reason,
            detail=detail,
            event_id=p.event_id,
            task_id=p.task_id,
            raw=_raw_bytes(raw),
        )

    # -- persistence and reporting ------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The held decisions (a state checkpoint's ``decisions`` part)."""
        return self.store.to_arrays()

    def restore_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Hold the decisions of :meth:`state_arrays` (raises ``ValueError`` / ``KeyError``)."""
        self.store.restore(arrays)
        self.metrics.pending.set(self.store.awaiting)

    def summary(self) -> dict[str, Any]:
        """Counts since start: decisions made, redelivered, refused; rewards by outcome;
        decisions held and awaiting a reward."""
        return {
            **self.counts,
            "rewards": dict(self.rewards),
            "held": len(self.store),
            "pending": self.store.awaiting,
        }
