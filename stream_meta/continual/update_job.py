"""One meta-update: train a candidate on replayed tasks, validate it, decide.

This module is pure computation (no engine, no threads): :func:`run_job` takes the served
model's weights and a :class:`~stream_meta.continual.replay_buffer.ReplaySnapshot` and returns the
candidate's weights with the evidence for the decision. It runs wherever the
:class:`~stream_meta.continual.updater.MetaUpdater` puts it: inline, in a thread, or in a worker
process (its payload and result are plain arrays and numbers).

Training
--------
The candidate starts as a copy of the served model and is meta-trained for ``steps`` steps of
episodes drawn from the replay tasks that are not held out: ``new_fraction`` of each batch from
the *new* tasks (arrived after the drift), the rest from the *old* ones. Each episode task's
examples are shuffled; a random prefix (``0 .. min(n - 1, max_shots)`` examples) is its support
set and the rest its query set. Its ``k`` nearest neighbours are retrieved from a bank of other
replay tasks embedded from all their examples, as in :mod:`stream_meta.meta_training` (neighbours
dropped for ``neighbour_dropout`` of the episodes). The loss is

    query loss + contrastive_weight * contrastive + distill_weight * distillation

where *distillation* is the anti-forgetting term: on each old task's query points, the mean
squared difference between the candidate's predictions and the served model's (the KL
divergence of class probabilities for classification), each model adapting the task from the
same support set with its own embeddings and neighbours, divided by the served model's own
query loss on that episode plus ``distill_floor``. Replaying old tasks keeps the old data in
the loss; distillation also keeps the *function* the served model computed for them where
their few examples do not pin it down. Dividing makes it relative: an old task served to an
MSE of 0.002 at 10 shots must stay near 0.002 (an absolute term would let it drift to 0.05,
invisible next to a 1-shot loss of 1), while ``distill_floor`` keeps a handful of such
episodes from outweighing everything else. Measured once during development on
``sinusoid-new-family`` (replay up to event 25,000, 400 steps, seed 0): without the division
the old tasks' 3-shot validation loss rose from 0.004 to 0.09-0.16 (lr 3e-4 to 1e-3) and the
gate rejected the candidate; with it (floor 0.05) to 0.016, and the candidate was promoted.

Validation and the gate
-----------------------
The held-out tasks (``holdout_fraction``, chosen by a hash of the task id) are split into new
and old. Every held-out task is adapted at each of ``val_shots`` support sizes (1 to 20; not
0: with no example the model can only give its prior, and the prior *should* move to the new
regime) below its example count (a fixed permutation of its examples; the rest are the query
set) with neighbours from the training tasks, by the served model and by the candidate, on
identical episodes (``val_repeats`` orders of each task's examples; each episode's loss capped
at the squared label range). The loss of a group is its per-size mean query loss, weighted by
how often the stream has served each size (:func:`shot_weights`): the prequential loss the
model would have on such tasks. Equal weights would judge mostly one-shot guesses, while a
stream of popular tasks is served mostly with many examples; the probation after a swap
measures the same mixture in serving.
The candidate is *promoted* when every loss is finite, its new-task loss is below the served
model's by at least ``min_improvement`` (relative) and its old-task loss is above the served
model's by at most ``old_margin`` (relative); otherwise it is *rejected* (or *failed*, on a
non-finite loss or an error), with the reason.

Experts
-------
With ``max_experts > 1`` (the payload's ``experts``: every served expert's weights) the
candidate is trained from the expert that serves the stream most (``parent``) with the set
encoder frozen (experts share the primary's task embeddings), as a specialist of the new
tasks (``expert_new_fraction`` of each batch, ``expert_distill_weight``, ``expert_lr``: by
default new tasks only, no anti-forgetting term, a larger step), and judged by *routing*
(:mod:`stream_meta.experts`): each held-out episode is served by the mixture of a set of
experts weighted by their prequential evidence on the episode's support examples, as serving
does. Three sets are compared on the same episodes: the served one, the served one with the
parent *replaced* by the candidate, and the served one with the candidate *added* (at
capacity, minus the expert the updater chose to retire). A set passes when its new-task loss
is ``expert_min_improvement`` below the served set's and its old-task loss at most
``expert_old_margin`` above it; the replacement is preferred when it passes and is within 1%
of the addition (one expert fewer to serve), else the addition, else the candidate is
rejected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from stream_meta.continual.replay_buffer import ReplaySnapshot
from stream_meta.experts import log_density
from stream_meta.meta_training import contrastive_loss, retrieve
from stream_meta.model import MetaModel, ModelConfig, no_neighbours

__all__ = [
    "UpdateConfig",
    "decide",
    "run_job",
    "shot_weights",
    "train_candidate",
    "validate",
    "weighted_loss",
]


@dataclass(frozen=True)
class UpdateConfig:
    """How a candidate is trained and judged (the ``[meta_update]`` settings fill it)."""

    steps: int = 400
    batch_tasks: int = 32
    bank_tasks: int = 256
    lr: float = 3e-4
    new_fraction: float = 0.5
    distill_weight: float = 1.0
    distill_floor: float = 0.05
    contrastive_weight: float = 0.1
    neighbour_dropout: float = 0.2
    k_neighbours: int = 8
    max_shots: int = 20
    min_task_examples: int = 4
    holdout_fraction: float = 0.2
    val_shots: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    val_repeats: int = 4
    #: parameters (or modules: ``encoder``) left as served; none by default (after an
    #: amplitude shift the head's prior precision is what must move)
    frozen: tuple[str, ...] = ()
    min_val_tasks: int = 8
    min_improvement: float = 0.02
    old_margin: float = 0.10
    #: the expert gate (see "Experts" above)
    expert_min_improvement: float = 0.02
    expert_old_margin: float = 0.02
    #: an expert candidate is a specialist: trained on new tasks only, without the
    #: anti-forgetting term (routing keeps the old tasks with the experts that serve them)
    expert_new_fraction: float = 1.0
    expert_distill_weight: float = 0.0
    expert_lr: float = 1e-3
    grad_clip: float = 10.0
    threads: int = 1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateConfig:
        data = dict(data)
        for key in ("val_shots", "frozen"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


# -- episodes ---------------------------------------------------------------------------------
def _shuffled(
    snap: ReplaySnapshot, rows: NDArray[np.int64], rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[Any], NDArray[np.int64]]:
    """The tasks' examples, each task's valid ones in a random order first: ``x, y, n``."""
    n = snap.n[rows]
    m = snap.x.shape[1]
    keys = rng.random((len(rows), m))
    keys[np.arange(m)[None, :] >= n[:, None]] = 2.0
    perm = np.argsort(keys, axis=1)
    x = np.take_along_axis(snap.x[rows], perm[:, :, None], axis=1)
    y = np.take_along_axis(snap.y[rows], perm, axis=1)
    return x, y, n


def _masks(n: NDArray[np.int64], s: NDArray[np.int64], m: int) -> tuple[torch.Tensor, ...]:
    """Support (first ``s``), query (``s .. n``) and all-example (first ``n``) masks."""
    pos = np.arange(m)[None, :]
    smask = pos < s[:, None]
    qmask = (pos >= s[:, None]) & (pos < n[:, None])
    amask = pos < n[:, None]
    return tuple(torch.from_numpy(a.astype(np.float32)) for a in (smask, qmask, amask))


def _tensors(x: NDArray[np.float32], y: NDArray[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


class _Bank:
    """Replay tasks embedded from all their examples: the neighbours of episodes."""

    def __init__(self, model: MetaModel, snap: ReplaySnapshot, rows: NDArray[np.int64]) -> None:
        self.rows = rows
        x, y = _tensors(snap.x[rows], snap.y[rows])
        m = snap.x.shape[1]
        amask = torch.from_numpy((np.arange(m)[None, :] < snap.n[rows][:, None]).astype(np.float32))
        self.z = model.embed(x, y, amask) if len(rows) else torch.zeros(0, model.config.embed_dim)


def _adapt_and_predict(
    model: MetaModel,
    bank_z: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    smask: torch.Tensor,
    k: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt each task from its support set (and ``k`` bank neighbours): ``(predictions, z)``."""
    z = model.embed(x, y, smask)
    if len(bank_z) and k:
        zn, sim, nmask = retrieve(z, bank_z, k)
        if keep is not None:
            nmask = nmask * keep.unsqueeze(-1)
    else:
        zn, sim, nmask = no_neighbours(len(z), z.shape[1])
    weights = model.adapt(z, zn, sim, nmask, x, y, smask)
    return model.predict(x, weights), z


def _distillation(model: MetaModel, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Pointwise divergence ``[B, n]`` of the student's outputs from the teacher's (in the
    model's units, like :meth:`MetaModel.train_loss`)."""
    if model.config.kind == "regression":
        return (student - teacher) ** 2 / model.scaling.loss_scale()
    t = torch.log_softmax(teacher, dim=-1)
    s = torch.log_softmax(student, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def _masked_mean_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row masked mean ``[B]`` of ``[B, n]`` values."""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _frozen(name: str, frozen: tuple[str, ...]) -> bool:
    """Whether parameter ``name`` is in ``frozen`` (a name, or a module prefix: ``encoder``)."""
    return any(name == f or name.startswith(f + ".") for f in frozen)


def _draw(rng: np.random.Generator, rows: NDArray[np.int64], k: int) -> NDArray[np.int64]:
    """``k`` of ``rows`` (with replacement only when there are fewer)."""
    return rng.choice(rows, k, replace=len(rows) < k) if k else rows[:0]


# -- training ---------------------------------------------------------------------------------
def train_candidate(
    served: MetaModel,
    snap: ReplaySnapshot,
    train_new: NDArray[np.int64],
    train_old: NDArray[np.int64],
    config: UpdateConfig,
) -> tuple[MetaModel, dict[str, Any]]:
    """Meta-train a copy of ``served`` on replay episodes; returns it and a training summary.

    Raises ``FloatingPointError`` on a non-finite training loss.
    """
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    teacher = served
    student = copy.deepcopy(served).train()
    params = [p for name, p in student.named_parameters() if not _frozen(name, config.frozen)]
    opt = torch.optim.Adam(params, lr=config.lr)
    pool = np.concatenate([train_new, train_old])
    b = config.batch_tasks
    n_new = min(len(train_new), round(b * config.new_fraction)) if len(train_old) else b
    n_new = min(n_new, len(train_new))
    m = snap.x.shape[1]
    start, ema, history = time.perf_counter(), math.nan, []
    for step in range(1, config.steps + 1):
        rows = np.concatenate(
            [
                _draw(rng, train_new, n_new),
                _draw(rng, train_old, b - n_new if len(train_old) else 0),
            ]
        )
        old_rows = torch.from_numpy((np.arange(len(rows)) >= n_new).astype(np.float32))
        others = np.setdiff1d(pool, rows, assume_unique=False)
        bank_rows = rng.choice(others, min(config.bank_tasks, len(others)), replace=False)
        x_np, y_np, n = _shuffled(snap, rows, rng)
        s = rng.integers(0, np.minimum(n - 1, config.max_shots) + 1)
        smask, qmask, amask = _masks(n, s, m)
        x, y = _tensors(x_np, y_np)
        keep = torch.from_numpy(
            (rng.random(len(rows)) >= config.neighbour_dropout).astype(np.float32)
        )
        pred, z = _adapt_and_predict(
            student, _Bank(student, snap, bank_rows).z, x, y, smask, config.k_neighbours, keep
        )
        query_loss = _masked_mean(student.train_loss(pred, y), qmask)
        loss = query_loss + config.contrastive_weight * contrastive_loss(
            z, student.embed(x, y, amask)
        )
        if config.distill_weight > 0 and bool(old_rows.any()):
            with torch.no_grad():
                t_pred, _ = _adapt_and_predict(
                    teacher,
                    _Bank(teacher, snap, bank_rows).z,
                    x,
                    y,
                    smask,
                    config.k_neighbours,
                    keep,
                )
            # relative to the teacher's own query loss on the episode: an old task it fits to
            # 1e-3 is kept at that precision, not just within the noise of a 1-shot guess
            t_loss = _masked_mean_rows(student.train_loss(t_pred, y), qmask).detach()
            d = _masked_mean_rows(_distillation(student, pred, t_pred), qmask)
            rel = d / (t_loss + config.distill_floor)
            loss = loss + config.distill_weight * (rel * old_rows).sum() / old_rows.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite meta-update loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        value = float(query_loss.detach())
        ema = value if math.isnan(ema) else 0.95 * ema + 0.05 * value
        if step % 50 == 0 or step == config.steps:
            history.append([step, ema])
    student.eval()
    return student, {
        "steps": config.steps,
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": ema,
        "history": history,
    }


# -- validation -------------------------------------------------------------------------------
@torch.inference_mode()
def validate(
    model: MetaModel,
    snap: ReplaySnapshot,
    rows: NDArray[np.int64],
    bank_rows: NDArray[np.int64],
    config: UpdateConfig,
    shot_weights: dict[str, float] | None = None,
    chunk: int = 512,
) -> dict[str, Any]:
    """Held-out loss of ``rows``: every task adapted at each of ``val_shots`` support sizes
    below its example count, the rest of its examples the query set, for ``val_repeats``
    orders of its examples (one-shot losses are heavy-tailed: one order is a noisy judge),
    each episode's loss capped by :func:`_loss_cap`.
    Returns ``by_shots`` (per support size, the mean over its episodes of their mean query
    loss), ``loss`` (those weighted by ``shot_weights``, how often the stream serves each size:
    the prequential loss the model would have; equal weights without them), ``tasks`` and
    ``episodes``. The episodes depend on ``config.seed`` only, never on the model,
    so two models are compared on the same ones."""
    out: dict[str, Any] = {"loss": None, "tasks": len(rows), "episodes": 0, "by_shots": {}}
    if not len(rows):
        return out
    rng = np.random.default_rng(config.seed + 1)
    bank_z = _Bank(model, snap, bank_rows).z
    m = snap.x.shape[1]
    sums = {s: [0.0, 0] for s in config.val_shots}
    cap = _loss_cap(model, snap)
    for _ in range(config.val_repeats):  # each repeat: another order of every task's examples
        x_np, y_np, n = _shuffled(snap, rows, rng)
        for s in config.val_shots:
            take = np.flatnonzero(n > s)
            for lo in range(0, len(take), chunk):
                t = take[lo : lo + chunk]
                smask, qmask, _ = _masks(n[t], np.full(len(t), s), m)
                x, y = _tensors(x_np[t], y_np[t])
                pred, _ = _adapt_and_predict(model, bank_z, x, y, smask, config.k_neighbours)
                per_point = model.loss(pred, y) * qmask
                episode = (per_point.sum(1) / qmask.sum(1)).double().clamp(max=cap)
                sums[s][0] += float(episode.sum())
                sums[s][1] += len(t)
    out["by_shots"] = {str(s): v[0] / v[1] for s, v in sums.items() if v[1]}
    out["episodes"] = sum(v[1] for v in sums.values())
    out["loss"] = weighted_loss(out["by_shots"], shot_weights)
    return out


@torch.inference_mode()
def expert_passes(
    model: MetaModel,
    snap: ReplaySnapshot,
    rows: NDArray[np.int64],
    bank_rows: NDArray[np.int64],
    config: UpdateConfig,
    chunk: int = 512,
) -> list[dict[str, Any]]:
    """What routing needs of one expert on the held-out ``rows``: per repeat (the episodes of
    :func:`validate`, same seed, same orders), ``dens [T, L]`` the log predictive density of
    each task's example ``t`` given its first ``t`` (``L = max(val_shots)``; NaN where the
    task has no example ``t``), ``out`` the predictions of every example at each validation
    support size, ``y`` and ``n``."""
    rng = np.random.default_rng(config.seed + 1)
    bank_z = _Bank(model, snap, bank_rows).z
    m = snap.x.shape[1]
    top = max(config.val_shots)
    passes = []
    for _ in range(config.val_repeats):
        x_np, y_np, n = _shuffled(snap, rows, rng)
        dens = np.full((len(rows), top), np.nan)
        outs: dict[int, torch.Tensor] = {}
        for t in range(top + 1):
            take = np.flatnonzero(n > t)
            if not len(take):
                break
            level: list[torch.Tensor] = []
            for lo in range(0, len(take), chunk):
                tk = take[lo : lo + chunk]
                smask, _, _ = _masks(n[tk], np.full(len(tk), t), m)
                x, y = _tensors(x_np[tk], y_np[tk])
                z = model.embed(x, y, smask)
                if len(bank_z) and config.k_neighbours:
                    zn, sim, nmask = retrieve(z, bank_z, config.k_neighbours)
                else:
                    zn, sim, nmask = no_neighbours(len(z), z.shape[1])
                w = model.adapt(z, zn, sim, nmask, x, y, smask, posterior=True)
                out, std = model.predict_with_std(x, w)
                if t < top:
                    dens[tk, t] = log_density(
                        model.config.kind,
                        out[:, t],
                        None if std is None else std[:, t],
                        y_np[tk, t],
                    )
                level.append(out)
            if t in config.val_shots:
                full = torch.zeros((len(rows), *level[0].shape[1:]), dtype=level[0].dtype)
                full[torch.from_numpy(take)] = torch.cat(level)
                outs[t] = full
        passes.append({"dens": dens, "out": outs, "y": y_np, "n": n})
    return passes


def routed_validation(
    kind: str,
    passes: Sequence[list[dict[str, Any]]],
    config: UpdateConfig,
    shot_weights: dict[str, float] | None = None,
    cap: float = math.inf,
    share_floor: float = 0.01,
) -> dict[str, Any]:
    """:func:`validate`'s result for a *set* of experts (``passes``: one
    :func:`expert_passes` per expert, on the same rows): each episode is served by the mixture
    of the experts weighted by their evidence on its support examples, times a prior. The prior
    is the one serving would reach on a stream of these tasks: serving's prior is the
    population's share of each expert (:mod:`stream_meta.experts`), which on a stream of such
    tasks settles at their mean routing posterior; here, the tasks' mean posterior given all
    their examples, floored like serving's (``share_floor``). With one expert it is that
    expert's :func:`validate`."""
    rows = len(passes[0][0]["n"]) if passes and passes[0] else 0
    out: dict[str, Any] = {"loss": None, "tasks": rows, "episodes": 0, "by_shots": {}}
    if not rows:
        return out
    log_prior = _group_prior(passes, share_floor)
    sums = {s: [0.0, 0] for s in config.val_shots}
    for r in range(config.val_repeats):
        n, y = passes[0][r]["n"], passes[0][r]["y"]
        m = y.shape[1]
        for s in config.val_shots:
            take = np.flatnonzero(n > s)
            if not len(take) or s not in passes[0][r]["out"]:
                continue
            ev = log_prior + np.stack([p[r]["dens"][take, :s].sum(axis=1) for p in passes], axis=1)
            w = np.exp(ev - ev.max(axis=1, keepdims=True))
            w = torch.from_numpy(w / w.sum(axis=1, keepdims=True))  # [T, K]
            preds = [p[r]["out"][s][torch.from_numpy(take)].double() for p in passes]
            yt = torch.from_numpy(np.ascontiguousarray(y[take]))
            stacked = torch.stack(preds, dim=-1)  # [T, m, K] or [T, m, C, K]
            if kind == "regression":
                mean = (stacked * w[:, None, :]).sum(-1)
                per_point = (mean - yt.double()) ** 2
            else:
                prob = (torch.softmax(stacked, dim=2) * w[:, None, None, :]).sum(-1)
                per_point = -torch.log(
                    prob.gather(-1, yt.long().unsqueeze(-1)).squeeze(-1).clamp(min=1e-12)
                )
            pos = np.arange(m)[None, :]
            qmask = torch.from_numpy(((pos >= s) & (pos < n[take][:, None])).astype(np.float64))
            episode = ((per_point * qmask).sum(1) / qmask.sum(1)).clamp(max=cap)
            sums[s][0] += float(episode.sum())
            sums[s][1] += len(take)
    out["by_shots"] = {str(s): v[0] / v[1] for s, v in sums.items() if v[1]}
    out["episodes"] = sum(v[1] for v in sums.values())
    out["loss"] = weighted_loss(out["by_shots"], shot_weights)
    return out


def _group_prior(passes: Sequence[list[dict[str, Any]]], floor: float) -> np.ndarray:
    """Log prior ``[K]``: the tasks' mean routing posterior given every example of theirs
    (uniform prior; first repeat), floored at ``floor / K`` and renormalised."""
    k = len(passes)
    if k == 1:
        return np.zeros(1)
    ev = np.stack([np.nan_to_num(p[0]["dens"], nan=0.0).sum(axis=1) for p in passes], axis=1)
    post = np.exp(ev - ev.max(axis=1, keepdims=True))
    share = (post / post.sum(axis=1, keepdims=True)).mean(axis=0)
    share = np.maximum(share, floor / k)
    return np.log(share / share.sum())


def decide_experts(
    validation: dict[str, dict[str, Any]], config: UpdateConfig, can_add: bool
) -> tuple[str, str, str | None]:
    """The expert gate: ``(outcome, reason, action)`` from the routed validation of the
    ``served``, ``replace`` and ``add`` sets (see "Experts" in the module docstring)."""
    served = validation["served"]
    if served["new"]["loss"] is None or served["new"]["tasks"] < config.min_val_tasks:
        return (
            "rejected",
            (
                f"too few held-out new tasks to judge ({served['new']['tasks']} < "
                f"{config.min_val_tasks})"
            ),
            None,
        )
    options = ["replace", "add"] if can_add else ["replace"]
    for name in options:
        values = [validation[name][g]["loss"] for g in ("new", "old")]
        if any(v is not None and not math.isfinite(v) for v in values):
            return "failed", f"the {name} set's validation loss is not finite", None
    new_s, old_s = served["new"]["loss"], served["old"]["loss"]
    check_old = old_s is not None and served["old"]["tasks"] >= config.min_val_tasks

    def passes(name: str) -> bool:
        v = validation[name]
        if not v["new"]["loss"] <= new_s * (1.0 - config.expert_min_improvement):
            return False
        return not check_old or v["old"]["loss"] <= old_s * (1.0 + config.expert_old_margin)

    def summary(name: str) -> str:
        v = validation[name]
        text = f"new-task loss {new_s:.4g} -> {v['new']['loss']:.4g}"
        if check_old:
            text += f", old-task loss {old_s:.4g} -> {v['old']['loss']:.4g}"
        return text

    ok = {name: passes(name) for name in options}
    if ok["replace"] and (
        not ok.get("add")
        or validation["replace"]["new"]["loss"] <= validation["add"]["new"]["loss"] * 1.01
    ):
        return "promoted", f"candidate replaces its parent expert: {summary('replace')}", "replace"
    if ok.get("add"):
        return "promoted", f"candidate added as an expert: {summary('add')}", "add"
    tried = "; ".join(f"{name}: {summary(name)}" for name in options)
    return (
        "rejected",
        (
            f"no set of experts lowers the new-task loss by {config.expert_min_improvement:.0%} "
            f"with the old-task loss within +{config.expert_old_margin:.0%} ({tried})"
        ),
        None,
    )


def shot_weights(shot_counts: NDArray[np.int64], levels: tuple[int, ...]) -> dict[str, float]:
    """How often the stream serves each validation level: ``shot_counts[s]`` labelled events
    were predicted with ``s`` support examples; each count goes to the largest level ``<= s``
    (counts below the first level are left out). Returns weights summing to 1 (equal weights
    when the stream has shown nothing yet)."""
    lv = np.asarray(sorted(levels))
    s = np.arange(len(shot_counts))
    keep = s >= lv[0]
    bins = np.searchsorted(lv, s[keep], side="right") - 1
    w = np.bincount(
        bins, weights=np.asarray(shot_counts, dtype=np.float64)[keep], minlength=len(lv)
    ).astype(np.float64)
    if w.sum() <= 0:
        w = np.ones(len(lv), dtype=np.float64)
    return {str(int(level)): float(x) for level, x in zip(lv, w / w.sum(), strict=True)}


def weighted_loss(by_shots: dict[str, float], weights: dict[str, float] | None) -> float | None:
    """The loss the stream would see: per-level losses weighted by ``weights`` (renormalised
    over the levels measured); a plain mean over levels without weights."""
    if not by_shots:
        return None
    w = {k: (weights or {}).get(k, 0.0 if weights else 1.0) for k in by_shots}
    total = sum(w.values())
    if total <= 0:
        w, total = dict.fromkeys(by_shots, 1.0), float(len(by_shots))
    return sum(by_shots[k] * w[k] for k in by_shots) / total


def _loss_cap(model: MetaModel, snap: ReplaySnapshot) -> float:
    """Largest episode loss validation counts (regression: the squared range of every label
    in the replay). A prediction outside that range is wrong by about that much whatever its
    value; without the cap one degenerate few-shot fit (a 3-point support set extrapolated to
    an error of 26 on labels within +-5) outweighed a hundred ordinary episodes."""
    if model.config.kind != "regression" or not len(snap):
        return math.inf
    valid = np.arange(snap.y.shape[1])[None, :] < snap.n[:, None]
    y = snap.y[valid]
    return float(y.max() - y.min()) ** 2 if len(y) else math.inf


def decide(validation: dict[str, dict[str, Any]], config: UpdateConfig) -> tuple[str, str]:
    """The gate: ``("promoted" | "rejected" | "failed", reason)`` from :func:`run_job`'s
    ``validation`` (``served`` and ``candidate``, each with ``new`` and ``old`` results)."""
    served, cand = validation["served"], validation["candidate"]
    values = [cand[g]["loss"] for g in ("new", "old") if cand[g]["loss"] is not None]
    if any(not math.isfinite(v) for v in values):
        return "failed", "the candidate's validation loss is not finite"
    if cand["new"]["loss"] is None or cand["new"]["tasks"] < config.min_val_tasks:
        return "rejected", (
            f"too few held-out new tasks to judge ({cand['new']['tasks']} < {config.min_val_tasks})"
        )
    new_s, new_c = served["new"]["loss"], cand["new"]["loss"]
    if not new_c <= new_s * (1.0 - config.min_improvement):
        return "rejected", (
            f"new-task loss {new_c:.4g} is not {config.min_improvement:.0%} below the served "
            f"model's {new_s:.4g}"
        )
    if cand["old"]["loss"] is None or cand["old"]["tasks"] < config.min_val_tasks:
        return "promoted", (
            f"new-task loss {new_s:.4g} -> {new_c:.4g} (too few held-out old tasks to check "
            f"forgetting: {cand['old']['tasks']})"
        )
    old_s, old_c = served["old"]["loss"], cand["old"]["loss"]
    if not old_c <= old_s * (1.0 + config.old_margin):
        return "rejected", (
            f"old-task loss {old_c:.4g} rises more than {config.old_margin:.0%} above the "
            f"served model's {old_s:.4g} (forgetting)"
        )
    return "promoted", (
        f"new-task loss {new_s:.4g} -> {new_c:.4g}, old-task loss {old_s:.4g} -> {old_c:.4g}"
    )


def _route_sets(
    members: list[MetaModel],
    candidate: MetaModel,
    parent: int,
    retire: int | None,
    snap: ReplaySnapshot,
    split: dict[str, NDArray[np.int64]],
    bank: NDArray[np.int64],
    config: UpdateConfig,
    weights: dict[str, float] | None,
    share_floor: float,
) -> dict[str, dict[str, Any]]:
    """Routed validation of the served set, the set with ``parent`` replaced by the
    candidate, the set with the candidate added (minus ``retire``) and the candidate alone,
    on the held-out new and old tasks (each expert's passes computed once)."""
    k = len(members)
    cap = _loss_cap(candidate, snap)
    kind = candidate.config.kind
    sets = {
        "served": list(range(k)),
        "replace": [k if i == parent else i for i in range(k)],
        "add": [i for i in range(k) if i != retire] + [k],
        "candidate": [k],
    }
    out: dict[str, dict[str, Any]] = {name: {} for name in sets}
    for group in ("new", "old"):
        rows = split[f"val_{group}"]
        passes = [expert_passes(m, snap, rows, bank, config) for m in (*members, candidate)]
        for name, idx in sets.items():
            out[name][group] = routed_validation(
                kind, [passes[i] for i in idx], config, weights, cap, share_floor
            )
    return out


# -- the job ----------------------------------------------------------------------------------
def model_arrays(model: MetaModel) -> dict[str, np.ndarray]:
    """A model's weights as numpy arrays (a job's payload and result)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def model_from_arrays(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> MetaModel:
    model = MetaModel(ModelConfig.from_dict(config))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    return model.eval()


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Train, validate and judge one candidate.

    ``payload``: ``model`` (a :class:`ModelConfig` dict), ``weights`` (:func:`model_arrays`),
    ``replay`` (snapshot arrays), ``new_from`` (first stream position of a *new* task) and
    ``config`` (an :class:`UpdateConfig` dict), optionally ``shot_weights`` (see
    :func:`shot_weights`); ``keep_rejected`` returns a rejected
    candidate's weights too (for ``promote = always``). Returns ``outcome``, ``reason``, ``weights``
    (the candidate's, when promoted), ``validation``, ``train`` and ``split`` sizes; an error
    is returned as ``outcome = "failed"`` with its message, never raised.
    """
    config = UpdateConfig.from_dict(payload["config"])
    started = time.perf_counter()
    result: dict[str, Any] = {"weights": None, "validation": None, "train": None}
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        snap = ReplaySnapshot.from_arrays(payload["replay"])
        keep = np.flatnonzero(snap.n >= config.min_task_examples)
        snap = ReplaySnapshot(
            [snap.task_ids[i] for i in keep.tolist()],
            snap.x[keep],
            snap.y[keep],
            snap.n[keep],
            snap.first_seen[keep],
            snap.recent[keep],
        )
        split = snap.split(int(payload["new_from"]), config.holdout_fraction)
        result["split"] = {k: len(v) for k, v in split.items()}
        experts = payload.get("experts") or []
        if int(payload.get("max_experts", 1)) > 1 and experts:
            members = [model_from_arrays(payload["model"], e["weights"]) for e in experts]
            parent = int(payload.get("parent", 0))
            served = members[parent]
            config = dataclasses.replace(
                config,
                frozen=(*config.frozen, "encoder", "scaling"),
                new_fraction=config.expert_new_fraction,
                distill_weight=config.expert_distill_weight,
                lr=config.expert_lr,
            )
        else:
            members, parent = [], 0
            served = model_from_arrays(payload["model"], payload["weights"])
        if len(split["train_new"]) < 2:
            result.update(
                outcome="rejected",
                reason=f"too few new replay tasks with >= {config.min_task_examples} examples "
                f"to train on ({len(split['train_new'])})",
            )
            return result
        candidate, result["train"] = train_candidate(
            served, snap, split["train_new"], split["train_old"], config
        )
        bank = np.concatenate([split["train_new"], split["train_old"]])
        weights = payload.get("shot_weights")
        if members:
            retire = payload.get("retire")
            can_add = len(members) < int(payload["max_experts"]) or retire is not None
            validation = _route_sets(
                members,
                candidate,
                parent,
                retire,
                snap,
                split,
                bank,
                config,
                weights,
                float(payload.get("share_floor", 0.01)),
            )
            result["validation"] = validation
            outcome, reason, action = decide_experts(validation, config, can_add)
            result.update(outcome=outcome, reason=reason, action=action, parent=parent)
            result["expert_ids"] = [int(e["id"]) for e in experts]  # the set it was judged in
            if action == "add" and len(members) >= int(payload["max_experts"]):
                result["retire"] = retire
            if outcome == "promoted" or (outcome == "rejected" and payload.get("keep_rejected")):
                result["weights"] = model_arrays(candidate)
                result.setdefault("action", None)
                if result["action"] is None:  # promote = always: add when there is room
                    result["action"] = "add" if can_add else "replace"
            return result
        validation = {
            name: {
                "new": validate(model, snap, split["val_new"], bank, config, weights),
                "old": validate(model, snap, split["val_old"], bank, config, weights),
            }
            for name, model in (("served", served), ("candidate", candidate))
        }
        result["validation"] = validation
        outcome, reason = decide(validation, config)
        result.update(outcome=outcome, reason=reason)
        if outcome == "promoted" or (outcome == "rejected" and payload.get("keep_rejected")):
            result["weights"] = model_arrays(candidate)
    except Exception as exc:
        result.update(outcome="failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        result["seconds"] = round(time.perf_counter() - started, 3)
    return result
