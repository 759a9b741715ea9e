"""Experts: several meta-models served side by side, each task routed by its own evidence.

A meta-update that helps the tasks of a new regime but would make the old ones worse is not
forced to choose (:mod:`stream_meta.continual.update_job`): its candidate can be kept as an
*expert* beside the served model. A served model version is then a *set*: the primary model
(which owns the set encoder, so the task embeddings, the FAISS index and the retrieval bank are
its) and up to ``max_experts - 1`` others that share its encoder and differ in everything that
generates and solves a task's weights (hypernetwork, head prior, noise, calibration). The set
travels as one model: the primary :class:`~stream_meta.model.MetaModel` carries the others in
its ``experts`` attribute (``(expert id, model)`` pairs; ids are the served versions that added
them), and one checkpoint holds them all (:mod:`stream_meta.model_checkpoint`), so state
checkpoints, the models topic, replicas and the trainer follow a set like any version.

Routing is Bayesian model averaging per task. Each expert adapts every task (one forward pass
each) and predicts every event; the event is served by the mixture of the experts' predictive
distributions, weighted by the posterior over experts given the task's own history:

    p(e | task) ∝ prior(e) · prod_t p_e(y_t | x_t, the task's examples before t)

The product is the task's *prequential* likelihood under expert ``e``: the predictive density
each expert gave each of the task's labelled events before it learned it, which is its exact
marginal likelihood when the predictive is the model's posterior predictive, and costs nothing
extra (every expert predicts every event anyway). The prior is the population's current share
of each expert (an exponential average, over labelled events, of the routing posterior of the
event's task; floored at ``share_floor / K`` so no expert becomes unreachable): a task with no
example is served the way the stream's current tasks are. Both are updated event by event in
stream order, so a batch's routing does not depend on how the stream was cut into batches.

An expert that falls ``prune_nats`` (12) behind a task's best is ruled out for that task for
good (its weight would be below ``e^-12``): the engine no longer adapts or evaluates it for the
task, so a set of K experts costs about one expert's work for the tasks that have chosen.

When the set changes, the evidence of the experts that stay is kept; an expert that joins has
scored none of a live task's past examples, so it starts level with the task's best expert
(nothing yet tells them apart) and the task's next examples decide. The share of an expert
that joins starts at ``1 / K``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from stream_meta.model import MetaModel
    from stream_meta.state import TaskState

__all__ = [
    "Router",
    "RoutingConfig",
    "log_density",
    "members",
    "mix",
    "same_encoder",
    "with_experts",
]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class RoutingConfig:
    """How tasks are routed among experts (the ``[engine]`` settings ``expert_*`` fill it)."""

    #: weight of one labelled event in the population share (an exponential average)
    share_rate: float = 0.03
    #: an expert's prior is at least ``share_floor / K`` (then renormalised)
    share_floor: float = 0.01
    #: a task's evidence is multiplied by this before each new example's joins it (1: exact
    #: Bayes; below 1 weighs an expert's recent predictions more than its early ones)
    decay: float = 1.0
    #: an expert this far behind a task's best (nats) is ruled out for the task
    prune_nats: float = 12.0


def members(model: MetaModel, version: int) -> list[tuple[int, MetaModel]]:
    """The served set as ``(expert id, model)`` pairs, the primary first (its id is its own
    ``expert_id``, or ``version`` when it never had one: a model loaded as it was trained)."""
    return [(int(model.expert_id or version), model), *model.experts]


def with_experts(
    primary: MetaModel, primary_id: int, others: Sequence[tuple[int, MetaModel]]
) -> MetaModel:
    """A served set: ``primary`` (shallow copy: its weights are shared, never changed) with
    ``others`` beside it. Raises ``ValueError`` if an expert's configuration or encoder
    differs from the primary's (experts share the primary's task embeddings)."""
    for expert_id, model in others:
        if model.config != primary.config:
            raise ValueError(f"expert {expert_id}: its configuration differs from the primary's")
        if not same_encoder(model, primary):
            raise ValueError(f"expert {expert_id}: its set encoder differs from the primary's")
    ids = [primary_id, *(i for i, _ in others)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"expert ids must be distinct: {ids}")
    out = copy.copy(primary)
    out.expert_id = int(primary_id)
    out.experts = tuple((int(i), m) for i, m in others)
    return out


def same_encoder(a: MetaModel, b: MetaModel) -> bool:
    """Whether two models embed tasks identically (equal encoder weights and input scaling)."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(("encoder.", "scaling."))]
    return all(k in sb and torch.equal(sa[k], sb[k]) for k in keys)


def log_density(
    kind: str, out: torch.Tensor, std: torch.Tensor | None, y: np.ndarray
) -> np.ndarray:
    """Log predictive density of labels ``y [N]`` under predictions ``out`` (``[N]`` values with
    ``std [N]``, or ``[N, C]`` logits) -> ``[N]`` float64."""
    if kind == "regression":
        mean = out.double().numpy()
        var = np.ones_like(mean) if std is None else np.maximum(std.double().numpy() ** 2, 1e-12)
        return -0.5 * (_LOG_2PI + np.log(var) + (np.asarray(y, np.float64) - mean) ** 2 / var)
    logp = torch.log_softmax(out.double(), dim=-1).numpy()
    return logp[np.arange(len(y)), np.asarray(y, dtype=np.int64)]


def mix(
    kind: str,
    outs: Sequence[torch.Tensor],
    stds: Sequence[torch.Tensor | None],
    weights: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mixture of the experts' predictions ``outs[e] [N]`` (or ``[N, C]`` logits) under
    per-event weights ``[N, K]``: regression, the mixture's mean and standard deviation (law
    of total variance); classification, the log of the mixed class probabilities."""
    w = torch.from_numpy(weights.astype(np.float32))
    if kind == "regression":
        from stream_meta.uncertainty import mixture_moments

        means = torch.stack(list(outs), dim=-1)
        if any(s is None for s in stds):
            return (w * means).sum(-1), None
        variances = torch.stack([s * s for s in stds if s is not None], dim=-1)
        mean, var = mixture_moments(means, variances, w)
        return mean, var.clamp(min=0).sqrt()
    probs = torch.stack([torch.softmax(o, dim=-1) for o in outs], dim=-1)  # [N, C, K]
    return torch.log((probs * w.unsqueeze(1)).sum(-1).clamp(min=1e-12)), None


class Router:
    """Per-task evidence (on each task's :class:`~stream_meta.state.TaskState`) and the
    population share; see the module docstring."""

    def __init__(self, ids: Sequence[int], config: RoutingConfig | None = None) -> None:
        self.config = config or RoutingConfig()
        self.ids = tuple(int(i) for i in ids)
        self.share = np.full(len(self.ids), 1.0 / len(self.ids))

    def log_prior(self) -> np.ndarray:
        """The routing prior of a task with no evidence: the floored population share."""
        return self._log_prior_of(self.share)

    def route(
        self, states: Sequence[TaskState], dens: np.ndarray | None, labelled: np.ndarray
    ) -> np.ndarray:
        """Routing weights ``[N, K]`` of a batch's events in stream order: event ``i`` of task
        ``states[i]`` with the evidence of that task's events before it; a labelled event's
        log densities ``dens[i] [K]`` then join its task's evidence (and the share moves).
        An expert other than the primary that falls ``prune_nats`` behind the task's best is
        ruled out for the task for good (evidence ``-inf``, weight 0: its weight would have
        been below ``exp(-prune_nats)``): the engine stops adapting and evaluating it for that
        task. The decision is taken here, in stream order, so it does not depend on
        batching."""
        n, k = len(states), len(self.ids)
        out = np.empty((n, k))
        rate, decay = self.config.share_rate, self.config.decay
        share = self.share
        prior = self.log_prior()
        zeros = np.zeros(k)
        prune = self.config.prune_nats
        for i, s in enumerate(states):
            ev = s.evidence if s.evidence is not None else zeros
            logits = prior + ev
            w = np.exp(logits - logits.max())
            w /= w.sum()
            out[i] = w
            if labelled[i] and dens is not None:
                ev = decay * ev + dens[i]  # a ruled-out expert stays at -inf
                ev = ev - ev.max()  # only differences matter; keeps numbers small
                far = ev < -prune
                far[0] = False  # the primary is always evaluated (it holds the encoder)
                s.evidence = np.where(far, -np.inf, ev)
                logits = prior + s.evidence
                post = np.exp(logits - logits.max())
                post /= post.sum()
                share = (1.0 - rate) * share + rate * post
                prior = self._log_prior_of(share)
        self.share = share
        return out

    def _log_prior_of(self, share: np.ndarray) -> np.ndarray:
        p = np.maximum(share, self.config.share_floor / len(share))
        return np.log(p / p.sum())

    def remap(self, ids: Sequence[int], states: Sequence[TaskState]) -> None:
        """The served set is now ``ids``: evidence and shares of the experts that stay are
        kept, a joining expert starts level with each task's best one (share ``1 / K``)."""
        ids = tuple(int(i) for i in ids)
        if ids == self.ids:
            return
        old = {expert_id: j for j, expert_id in enumerate(self.ids)}
        keep = [old.get(i, -1) for i in ids]
        k = len(ids)
        share = np.array([self.share[j] if j >= 0 else 1.0 / k for j in keep])
        self.share = share / share.sum()
        for s in states:
            ev = s.evidence
            if ev is None:
                continue
            if k == 1:
                s.evidence = None
                continue
            best = float(ev.max())
            s.evidence = np.array([ev[j] if j >= 0 else best for j in keep])
        self.ids = ids

    def shares(self) -> dict[int, float]:
        return {i: float(v) for i, v in zip(self.ids, self.share, strict=True)}

    # -- persistence ------------------------------------------------------------------------
    def to_arrays(self, states: Sequence[TaskState]) -> dict[str, np.ndarray]:
        """The routing state: expert ids, shares, and every live task's evidence by task id."""
        from stream_meta.packing import pack_strings

        held = [s for s in states if s.evidence is not None and len(s.evidence) == len(self.ids)]
        blob, offsets = pack_strings([s.task_id for s in held])
        return {
            "ids": np.asarray(self.ids, dtype=np.int64),
            "share": self.share.copy(),
            "task_blob": blob,
            "task_offsets": offsets,
            "evidence": (
                np.stack([s.evidence for s in held])  # type: ignore[misc]
                if held
                else np.zeros((0, len(self.ids)))
            ),
        }

    def restore(self, arrays: Mapping[str, np.ndarray], store: Any) -> None:
        """Load :meth:`to_arrays` output saved with experts ``arrays["ids"]`` into the tasks of
        ``store``, then :meth:`remap` to this router's ids. Raises ``ValueError`` on arrays
        that do not fit."""
        from stream_meta.packing import unpack_strings

        ids = tuple(int(i) for i in np.asarray(arrays["ids"]))
        share = np.asarray(arrays["share"], dtype=np.float64)
        evidence = np.asarray(arrays["evidence"], dtype=np.float64)
        task_ids = unpack_strings(arrays["task_blob"], arrays["task_offsets"])
        if (
            not ids
            or share.shape != (len(ids),)
            or evidence.shape != (len(task_ids), len(ids))
            or np.isnan(evidence).any()
            or np.isposinf(evidence).any()
        ):
            raise ValueError("saved expert routing state is inconsistent")
        target = self.ids
        self.ids, self.share = ids, share / max(share.sum(), 1e-12)
        touched = []
        for task_id, row in zip(task_ids, evidence, strict=True):
            s = store.get(task_id)
            if s is not None:
                s.evidence = row.copy()
                touched.append(s)
        self.remap(target, touched)
