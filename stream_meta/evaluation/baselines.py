"""Gradient-based baselines: per-task models fitted by gradient steps on the support set.

Every baseline serves a task with the *same target network* as the meta-model (the checkpoint's
:class:`~stream_meta.hypernet.TargetNet`: for the sinusoid, MAML's own 1-40-40-1 ReLU network),
fitted to the task's current support set by an :class:`InnerLoop` from an initialisation ``theta``:

* ``scratch``: a fixed random initialisation (seeded), ``scratch_steps`` steps of Adam;
* ``finetune``: weights *pre-trained* on the family's training tasks by plain multi-task
  learning (one network for all tasks, no adaptation in the loop), then ``k`` steps of SGD;
* ``maml``: weights meta-trained by MAML (Finn et al., 2017) with ``torch.func``: a
  ``vmap`` over tasks of ``k`` inner SGD steps taken by ``grad``, second-order by default
  (``first_order=True`` detaches the inner gradients, FOMAML); ``k`` SGD steps at serving time.

Serving needs no meta-gradient: :func:`fit` steps all tasks as one ``[B, P]`` tensor with
plain autograd, which for small batches costs less than the ``vmap`` of MAML's training loop,
so the baselines are not slowed by the meta-training machinery (``make bench``'s replay
section reports the ``maml`` strategy's one-task adaptation latency).

Pre-training and MAML get the meta-model's training budget: the same episode sampler
(:class:`~stream_meta.meta_training.EpisodeSampler`, so with the same seed the very same task draws,
support sizes ``0..max_shots`` and query points), the same number of steps and tasks per step,
the same optimiser, schedule and gradient clipping. A trained initialisation is saved like a
model checkpoint (safetensors + manifest, no pickle).

Units: the built-in families' baselines work on raw ``x`` and ``y``. An initialisation trained
on a user's log (``train-baseline --data``) works in the *model's units* of the checkpoint it was
trained for, like the meta-model: it carries that checkpoint's :class:`~stream_meta.scaling.Scaling`
(:attr:`GradientInit.scaling`), its network sees standardised inputs and fits the regression
residuals over the pooled linear fit (classification: logits added to the pooled logistic
model's), so MAML and fine-tuning start from the population's fit too, and
:meth:`GradientInit.fit` / :meth:`GradientInit.predict` take and return the user's units.
Recorded tasks have varying sizes: their episodes carry ``qmask`` (queries) and ``amask`` (all
points), and every loss honours them.

Shapes: ``theta [P]``, support ``xs [B, n, x_dim]``, labels ``ys [B, n]``, mask ``smask [B, n]``,
adapted weights ``[B, P]``.

>>> import torch
>>> from stream_meta.model import ModelConfig
>>> net = target_for(ModelConfig(x_dim=1, target_hidden=(8,)))
>>> theta = net.init_flat(torch.Generator().manual_seed(0))
>>> xs = torch.linspace(-1, 1, 6).reshape(1, 6, 1)
>>> ys, m = 3 * xs[..., 0], torch.ones(1, 6)
>>> w = fit(net, "regression", theta, xs, ys, m, InnerLoop(steps=200, lr=0.05, optimizer="adam"))
>>> before = float(((predict(net, "regression", xs, theta[None]) - ys) ** 2).mean())
>>> after = float(((predict(net, "regression", xs, w) - ys) ** 2).mean())
>>> after < 0.05 * before
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from stream_meta.hypernet import TargetNet
from stream_meta.model import ModelConfig
from stream_meta.model_checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    read_manifest,
    write_tensors,
)
from stream_meta.scaling import Scaling

__all__ = [
    "TRAINED",
    "GradientInit",
    "InnerLoop",
    "evaluate_init",
    "fit",
    "load_init",
    "maml_adapt",
    "model_units",
    "predict",
    "save_init",
    "scratch_init",
    "shipped_init",
    "target_for",
    "train_init",
    "tune_lr",
    "tune_lr_on",
]

#: initialisations that are trained (``stream-meta train-baseline --method``)
TRAINED = ("maml", "pretrained")
#: inner-loop learning rate by task kind (MAML's 0.01 for regression)
DEFAULT_INNER_LR = {"regression": 0.01, "classification": 0.1}


@dataclass(frozen=True)
class InnerLoop:
    """How a task's weights are fitted to its support set: ``steps`` steps of ``optimizer``.

    The loss is the mean over the task's support set, so the step size does not depend on how
    many examples the task has; a task with none keeps the initialisation.
    """

    steps: int = 10
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    #: per-task gradient norm cap (None: no cap)
    clip: float | None = None

    def __post_init__(self) -> None:
        if (
            self.steps < 0
            or not self.lr > 0
            or self.optimizer not in ("sgd", "adam")
            or (self.clip is not None and not self.clip > 0)
        ):
            raise ValueError(
                f"bad inner loop {self}: steps >= 0, lr > 0, optimizer sgd|adam, clip > 0"
            )


def target_for(config: ModelConfig) -> TargetNet:
    """The meta-model's target network for ``config`` (the architecture every baseline uses)."""
    return TargetNet(config.x_dim, config.target_hidden, config.y_dim, skip_input=config.skip_input)


def predict(net: TargetNet, kind: str, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[B, n, x_dim], [B, P] -> [B, n]`` values, or ``[B, n, C]`` class logits."""
    out = net.forward(x, weights)
    return out.squeeze(-1) if kind == "regression" else out


def _targets(kind: str, ys: torch.Tensor, n_out: int) -> torch.Tensor:
    """Labels as the loss wants them: ``[B, n]`` floats, or one-hot ``[B, n, C]``."""
    if kind == "regression":
        return ys.to(torch.float32)
    return nn.functional.one_hot(ys.long(), n_out).to(torch.float32)


def _task_loss(
    net: TargetNet,
    kind: str,
    w: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss of one task's masked examples (unbatched: ``w [P], x [n, d], m [n]``; ``base``
    ``[n, C]``: logits the network's are added to)."""
    out = net.forward(x.unsqueeze(0), w.unsqueeze(0))[0]  # [n, out]
    if base is not None:
        out = out + base
    if kind == "regression":
        per = (out[:, 0] - y) ** 2
    else:
        per = -(torch.log_softmax(out, dim=-1) * y).sum(-1)
    return (per * m).sum() / m.sum().clamp(min=1.0)


def fit(
    net: TargetNet,
    kind: str,
    theta: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    smask: torch.Tensor,
    loop: InnerLoop,
    *,
    keep_best: bool = True,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fit ``theta [P]`` to every support set -> ``[B, P]`` (serving: no graph is kept).

    All tasks step together as one ``[B, P]`` tensor: the gradient of the sum of the tasks'
    mean losses is each task's own gradient, so every task is fitted alone. With ``keep_best``
    each task gets the iterate with the lowest support loss (the initialisation included), so
    a step that diverges on some task never serves a worse fit than the start. ``base``
    ``[B, n, C]`` (classification in model units): logits the network's are added to.
    """
    y = _targets(kind, ys, net.out_dim)
    adam = loop.optimizer == "adam"
    w = theta.detach().expand(xs.shape[0], -1).clone()
    best_w, best_l = w.clone(), torch.full((xs.shape[0],), math.inf)
    m1, m2 = torch.zeros_like(w), torch.zeros_like(w)
    with torch.enable_grad():
        for t in range(1, loop.steps + 1):
            w.requires_grad_(True)
            per = _task_losses(net, kind, w, xs, y, smask, base)
            (g,) = torch.autograd.grad(per.sum(), w)
            w, per = w.detach(), per.detach()
            if keep_best:
                _keep(best_w, best_l, w, per)
            if loop.clip is not None:
                g = g * torch.clamp(loop.clip / (g.norm(dim=1, keepdim=True) + 1e-12), max=1.0)
            if adam:  # Adam's update, elementwise (so per task)
                m1.mul_(0.9).add_(g, alpha=0.1)
                m2.mul_(0.999).addcmul_(g, g, value=0.001)
                g = (m1 / (1 - 0.9**t)) / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8)
            w = w - loop.lr * g
    if not keep_best:
        return w
    with torch.no_grad():
        _keep(best_w, best_l, w, _task_losses(net, kind, w, xs, y, smask, base))
    return best_w


def _keep(best_w: torch.Tensor, best_l: torch.Tensor, w: torch.Tensor, loss: torch.Tensor) -> None:
    better = loss < best_l  # False for NaN
    torch.where(better[:, None], w, best_w, out=best_w)
    torch.where(better, loss, best_l, out=best_l)


def _task_losses(
    net: TargetNet,
    kind: str,
    w: torch.Tensor,
    xs: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each task's mean loss over its masked support set ``[B]``."""
    out = net.forward(xs, w)  # [B, n, out]
    if base is not None:
        out = out + base
    if kind == "regression":
        per = (out[..., 0] - y) ** 2
    else:
        per = -(torch.log_softmax(out, dim=-1) * y).sum(-1)
    return (per * m).sum(1) / m.sum(1).clamp(min=1.0)


def maml_adapt(
    net: TargetNet,
    kind: str,
    theta: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    smask: torch.Tensor,
    loop: InnerLoop,
    *,
    first_order: bool = False,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAML's inner loop, differentiable with respect to ``theta`` -> ``[B, P]``.

    A ``torch.func.vmap`` over tasks of ``loop.steps`` SGD steps taken by ``torch.func.grad``;
    the meta-gradient flows through them (second order), or not through the inner gradients
    with ``first_order`` (FOMAML). ``base`` as in :func:`fit`.
    """
    y = _targets(kind, ys, net.out_dim)
    if base is None:
        grad = torch.func.grad(lambda w, x_, y_, m_: _task_loss(net, kind, w, x_, y_, m_))

        def inner(w: torch.Tensor, x: torch.Tensor, y_: torch.Tensor, m: torch.Tensor) -> Any:
            for _ in range(loop.steps):
                g = grad(w, x, y_, m)
                w = w - loop.lr * (g.detach() if first_order else g)
            return w

        return torch.func.vmap(inner, in_dims=(None, 0, 0, 0))(theta, xs, y, smask)
    grad_b = torch.func.grad(lambda w, x_, y_, m_, b_: _task_loss(net, kind, w, x_, y_, m_, b_))

    def inner_b(
        w: torch.Tensor, x: torch.Tensor, y_: torch.Tensor, m: torch.Tensor, b: torch.Tensor
    ) -> Any:
        for _ in range(loop.steps):
            g = grad_b(w, x, y_, m, b)
            w = w - loop.lr * (g.detach() if first_order else g)
        return w

    return torch.func.vmap(inner_b, in_dims=(None, 0, 0, 0, 0))(theta, xs, y, smask, base)


def scratch_init(config: ModelConfig, seed: int = 0) -> torch.Tensor:
    """The fixed random initialisation of the ``scratch`` baseline ``[P]``."""
    return target_for(config).init_flat(torch.Generator().manual_seed(seed))


def model_units(
    scaling: Scaling | None, x: torch.Tensor, y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """User units -> the network's: ``(x_std, targets, base)``.

    ``x_std = scaling.inputs(x)``; regression ``targets`` are the residuals over the pooled
    linear fit (``scaling.targets``), classes are unchanged and ``base [..., C]`` holds the
    pooled logistic model's logits, which the network's are added to (regression: None).
    ``scaling`` None (the built-in families): everything as it is.
    """
    if scaling is None:
        return x, y, None
    x_std = scaling.inputs(x)
    if scaling.regression:
        return x_std, None if y is None else scaling.targets(x_std, y), None
    return x_std, y, scaling.offset(x_std)


# -- trained initialisations ------------------------------------------------------------------
@dataclass(frozen=True)
class GradientInit:
    """A trained initialisation with what it needs to serve: the network, kind and inner loop,
    and the scaling of the units it works in (None: raw units, the built-in families').

    :meth:`fit` and :meth:`predict` take and return the user's units: the support set is
    standardised and the regression targets made residuals over the scaling's pooled fit,
    and predictions are mapped back (``scaling.outputs``)."""

    method: str
    family: str
    kind: str
    theta: torch.Tensor
    net: TargetNet
    loop: InnerLoop
    manifest: dict[str, Any]
    scaling: Scaling | None = None

    def fit(
        self,
        xs: torch.Tensor,
        ys: torch.Tensor,
        smask: torch.Tensor,
        loop: InnerLoop | None = None,
    ) -> torch.Tensor:
        """:func:`fit` of the support sets (user units) from ``theta`` -> ``[B, P]``."""
        x_std, y_t, base = model_units(self.scaling, xs, ys)
        assert y_t is not None
        return fit(self.net, self.kind, self.theta, x_std, y_t, smask, loop or self.loop, base=base)

    def predict(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[B, n, x_dim], [B, P] ->`` predictions ``[B, n]`` in user units, or logits."""
        if self.scaling is None:
            return predict(self.net, self.kind, x, weights)
        x_std = self.scaling.inputs(x)
        return self.scaling.outputs(x_std, predict(self.net, self.kind, x_std, weights))


def train_init(
    method: str,
    family: Any,
    model_config: ModelConfig,
    train_config: Any,
    loop: InnerLoop,
    *,
    first_order: bool = False,
    progress: bool = True,
    sampler: Any = None,
    scaling: Scaling | None = None,
    validation: dict[str, np.ndarray] | None = None,
    validate_every: int = 100,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train the ``maml`` or ``pretrained`` initialisation on ``family`` -> ``(theta, summary)``.

    ``train_config`` is a :class:`~stream_meta.meta_training.TrainConfig`: its steps, tasks per
    step, learning rate, schedule, clipping, episode shapes and seed are the meta-model's budget.
    Each step draws exactly the episodes :func:`~stream_meta.meta_training.meta_train` draws.

    A user's tasks (``train-baseline --data``): ``sampler`` is the meta-model's
    :class:`~stream_meta.tasks.logged.LoggedEpisodes` of the training tasks (built with the
    same seed, it draws the very episodes the meta-model was trained on), ``scaling`` the
    checkpoint's (the network learns in the model's units, see :func:`model_units`), and the
    losses honour the episodes' ``qmask`` (MAML's queries) and ``amask`` (pre-training's
    points). With ``validation`` (fixed episodes of the validation tasks, user units) the
    initialisation is scored every ``validate_every`` steps and the best check's ``theta`` is
    returned, as the meta-model keeps its best check: MAML by its query loss after ``loop``'s
    adaptation, pre-training by its own objective (every point, no adaptation).
    """
    from stream_meta.meta_training import EpisodeSampler, _progress, make_optimizer

    if method not in TRAINED:
        raise ValueError(f"unknown method {method!r}; trained ones: {', '.join(TRAINED)}")
    c = train_config
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    net, kind = target_for(model_config), model_config.kind
    theta = net.init_flat(torch.Generator().manual_seed(c.seed)).requires_grad_()
    opt, sched = make_optimizer([theta], c)
    own_sampler = sampler is None
    if own_sampler:
        sampler = EpisodeSampler(family, c, rng)
    bar = _progress(c.steps, progress, desc=f"train {method}")
    start, ema = time.perf_counter(), math.nan
    best: tuple[float, int, torch.Tensor] | None = None
    checks: list[list[float]] = []
    for step in range(1, c.steps + 1):
        # the same draws as meta_train: a bank (its cluster centres place half the episode
        # tasks), the episodes, then the neighbour-dropout coin flips (on meta_train's own rng,
        # which a family's sampler shares)
        bank = sampler.bank()
        ep = {
            k: torch.from_numpy(np.ascontiguousarray(v))
            for k, v in sampler.episodes(bank["centres"]).items()
        }
        if own_sampler:
            rng.random(c.batch_tasks)
        loss = _episode_loss(method, net, kind, theta, ep, loop, scaling, first_order)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {method} training loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([theta], c.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        value = float(loss.detach())
        ema = value if math.isnan(ema) else 0.98 * ema + 0.02 * value
        if validation is not None and (step % validate_every == 0 or step == c.steps):
            v = _validation_loss(method, net, kind, theta.detach(), validation, loop, scaling)
            checks.append([step, round(v, 6)])
            if best is None or v < best[0]:
                best = (v, step, theta.detach().clone())
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{ema:.4g}")
    if bar is not None:
        bar.close()
    summary: dict[str, Any] = {
        "steps": c.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": ema,
    }
    if best is not None:
        summary.update(best_step=best[1], best_validation_loss=best[0], validation=checks)
        return best[2], summary
    return theta.detach(), summary


def _episode_loss(
    method: str,
    net: TargetNet,
    kind: str,
    theta: torch.Tensor,
    ep: dict[str, torch.Tensor],
    loop: InnerLoop,
    scaling: Scaling | None,
    first_order: bool = False,
) -> torch.Tensor:
    """One batch of episodes' training loss: MAML's query loss after its inner loop, or
    pre-training's loss on every point of each task (no adaptation); masked where the episodes
    carry ``qmask`` / ``amask``."""
    if method == "maml":
        xs, ys, bs = model_units(scaling, ep["xs"], ep["ys"])
        assert ys is not None
        w = maml_adapt(
            net, kind, theta, xs, ys, ep["smask"], loop, first_order=first_order, base=bs
        )
        x, y, base = model_units(scaling, ep["xq"], ep["yq"])
        mask = ep.get("qmask")
    else:  # one network for every task: fitted to all of each task's points
        w = theta.expand(ep["x_all"].shape[0], -1)
        x, y, base = model_units(scaling, ep["x_all"], ep["y_all"])
        mask = ep.get("amask")
    assert y is not None
    out = predict(net, kind, x, w)
    if base is not None:
        out = out + base
    return _batch_loss(kind, out, y, mask)


def _validation_loss(
    method: str,
    net: TargetNet,
    kind: str,
    theta: torch.Tensor,
    episodes: dict[str, np.ndarray],
    loop: InnerLoop,
    scaling: Scaling | None,
    chunk: int = 256,
) -> float:
    """The loss (model units) of fixed episodes: MAML's on the queries after ``loop``'s serving
    fit of the support, pre-training's on every point without adaptation; masked, pooled."""
    total, weight = 0.0, 0.0
    n = len(episodes["xs"])
    for i in range(0, n, chunk):
        ep = {
            k: torch.from_numpy(np.ascontiguousarray(v[i : i + chunk])) for k, v in episodes.items()
        }
        mask = ep["qmask"] if method == "maml" else ep["amask"]
        if method == "maml":
            xs, ys, bs = model_units(scaling, ep["xs"], ep["ys"])
            assert ys is not None
            w = fit(net, kind, theta, xs, ys, ep["smask"], loop, base=bs)
            x, y, base = model_units(scaling, ep["xq"], ep["yq"])
        else:
            w = theta.expand(len(ep["xs"]), -1)
            x, y, base = model_units(scaling, ep["x_all"], ep["y_all"])
        assert y is not None
        with torch.no_grad():
            out = predict(net, kind, x, w)
            if base is not None:
                out = out + base
            part = float(_batch_loss(kind, out, y, mask))
        w_part = float(mask.sum())
        total, weight = total + part * w_part, weight + w_part
    return total / max(weight, 1.0) if math.isfinite(total) else math.inf


def _batch_loss(
    kind: str, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean loss over every point, or over the points ``mask [B, n]`` keeps."""
    if mask is None:
        if kind == "regression":
            return ((out - y) ** 2).mean()
        return nn.functional.cross_entropy(out.transpose(1, 2), y.long())
    if kind == "regression":
        per = (out - y) ** 2
    else:
        per = nn.functional.cross_entropy(out.transpose(1, 2), y.long(), reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def evaluate_init(
    init: GradientInit,
    family: Any,
    *,
    shots: list[int],
    tasks: int = 1000,
    queries: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Few-shot MSE (or accuracy) of ``init`` with its inner loop on held-out tasks."""
    from stream_meta.evaluation.fewshot import EVAL_SEED_OFFSET, _mean_ci

    rng = np.random.default_rng(EVAL_SEED_OFFSET + seed)
    report: dict[str, Any] = {
        "tasks": tasks,
        "metric": family.metric_name,
        "inner_loop": asdict(init.loop),
    }
    per_class = init.kind == "classification"
    for s in shots:
        params = family.sample_params(tasks, rng)
        q = max(1, queries // family.y_dim) if per_class else queries
        xs, ys, xq, yq = (torch.from_numpy(a) for a in family.sample_episode(params, s, q, rng))
        w = fit(init.net, init.kind, init.theta, xs, ys, torch.ones(ys.shape), init.loop)
        with torch.no_grad():
            out = predict(init.net, init.kind, xq, w)
        score = (out.argmax(-1) == yq).float() if per_class else (out - yq) ** 2
        report[str(s)] = _mean_ci(score.mean(1).numpy())
    return report


def tune_lr(
    init: GradientInit,
    family: Any,
    candidates: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1),
    *,
    shots: tuple[int, ...] = (1, 2, 5, 10, 20),
    tasks: int = 200,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """The serving step size with the lowest mean loss on *training* tasks at ``shots``
    (the held-out tasks are never looked at) -> ``(best lr, {lr: loss})``."""
    rng = np.random.default_rng(seed + 7919)
    episodes = []
    for s in shots:
        params = family.sample_params(tasks, rng)
        xs, ys, xq, yq = family.sample_episode(params, s, 20, rng)
        episodes.append({"xs": xs, "ys": ys, "xq": xq, "yq": yq})
    return tune_lr_on(init, episodes, candidates)


def tune_lr_on(
    init: GradientInit,
    episodes: Sequence[dict[str, np.ndarray]],
    candidates: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1),
) -> tuple[float, dict[str, float]]:
    """The serving step size with the lowest loss on ``episodes`` (user units; ``smask`` and
    ``qmask`` where their tasks vary in size) -> ``(best lr, {lr: loss})``: each batch's mean
    query loss in user units, averaged over the batches."""
    batches = [
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in e.items()} for e in episodes
    ]
    losses: dict[str, float] = {}
    for lr in candidates:
        loop = replace(init.loop, lr=lr)
        total = 0.0
        for ep in batches:
            smask = ep.get("smask", torch.ones(ep["ys"].shape))
            w = init.fit(ep["xs"], ep["ys"], smask, loop)
            with torch.no_grad():
                out = init.predict(ep["xq"], w.detach())
                total += float(_batch_loss(init.kind, out, ep["yq"], ep.get("qmask")))
        losses[str(lr)] = total / len(batches) if math.isfinite(total) else math.inf
    best = min(candidates, key=lambda lr: losses[str(lr)])
    return best, losses


def save_init(
    path: Path,
    theta: torch.Tensor,
    *,
    method: str,
    family: str,
    model_config: ModelConfig,
    loop: InnerLoop,
    training: dict[str, Any],
    metrics: dict[str, Any],
    first_order: bool = False,
    scaling: Scaling | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save a trained initialisation (safetensors + manifest); returns the manifest.

    ``scaling`` (an initialisation trained in a checkpoint's units) is stored with it, as the
    tensors ``scaling.<buffer>`` and as the manifest's ``scaling``; ``extra``: more manifest
    keys (where the data came from)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "baseline": method,
        "family": family,
        "model": model_config.to_dict(),
        "inner_loop": asdict(loop),
        "first_order": first_order,
        "training": training,
        "metrics": metrics,
        "created_unix": time.time(),
        **(extra or {}),
    }
    tensors = {"theta": theta}
    if scaling is not None:
        manifest["scaling"] = scaling.to_dict()
        tensors.update({f"scaling.{k}": v for k, v in scaling.named_buffers()})
    return write_tensors(Path(path), tensors, manifest)


def load_init(path: Path, *, steps: int | None = None) -> GradientInit:
    """Load and validate a trained initialisation; ``steps`` overrides its serving steps.

    An initialisation saved with a scaling gets it back (:attr:`GradientInit.scaling`); one
    without (the built-in families') works in raw units (None).

    Raises :class:`~stream_meta.model_checkpoint.CheckpointError` for a missing, corrupt, foreign or
    non-finite file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    try:
        method = manifest["baseline"]
        config = ModelConfig.from_dict(manifest["model"])
        loop = InnerLoop(**manifest["inner_loop"])
        tensors = load_file(str(path))
        theta = tensors["theta"]
        scaling = _scaling_of(tensors, config)
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a baseline initialisation: {exc}") from exc
    net = target_for(config)
    if theta.shape != (net.n_params,) or not bool(torch.isfinite(theta).all()):
        raise CheckpointError(
            f"{path}: theta must be {net.n_params} finite values, got shape {tuple(theta.shape)}"
        )
    if steps is not None:
        loop = replace(loop, steps=steps)
    return GradientInit(
        method, manifest["family"], config.kind, theta, net, loop, manifest, scaling
    )


def _scaling_of(tensors: dict[str, torch.Tensor], config: ModelConfig) -> Scaling | None:
    """The ``scaling.*`` tensors of an initialisation as a :class:`Scaling` (None: none)."""
    prefix = "scaling."
    values = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not values:
        return None
    scaling = Scaling(config.x_dim, config.y_dim, regression=config.kind == "regression")
    names = {name for name, _ in scaling.named_buffers()}
    if set(values) != names:
        raise ValueError(f"scaling tensors {sorted(values)}, expected {sorted(names)}")
    scaling.set(**values)  # shapes and finiteness checked
    return scaling


def shipped_init(family: str, method: str) -> Path:
    """Path of the initialisation shipped for ``family`` (``<family>-<method>.safetensors``)."""
    name = f"{family}-{method}.safetensors"
    path = Path(str(resources.files("stream_meta") / "checkpoints" / name))
    if not path.is_file():
        raise CheckpointError(
            f"no shipped {method} initialisation for family {family!r} ({name}); build it "
            f"with `stream-meta train-baseline --family {family} --method {method} --out PATH` "
            f"and pass --baseline-dir"
        )
    return path
