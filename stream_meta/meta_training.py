"""Episodic meta-training of the set encoder and hypernetwork, with retrieval in the loop.

Each step draws a *bank* of tasks (half of them members of a few task clusters, half unrelated)
with support sets of varied size, and a batch of *episode* tasks: half new members of the bank's
clusters (their neighbours are informative), half novel tasks (their neighbours are not). Every
episode task is embedded from a support set of a random size in ``[min_shots, max_shots]``, its
``k`` nearest bank tasks are retrieved by exact inner-product search on the current embeddings
(the same search ``IndexFlatIP`` does at serving time), the meta-model adapts in one forward pass,
and the loss is measured on held-out query points of the task. Gradients flow through the
encoder (of both episode and bank tasks), the neighbour attention, the hypernetwork and the
closed-form head. Neighbours are dropped for a fraction of episodes so the model also serves
well with retrieval off or an empty index.

An auxiliary contrastive term pulls a task's few-shot embedding towards the embedding of its
full data, so that retrieval by a few-shot embedding finds the tasks that the full task is like.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stream_meta.model import MetaModel, no_neighbours

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training settings (the CLI fills them from the ``[train]`` settings section)."""

    steps: int = 6000
    batch_tasks: int = 32
    lr: float = 1e-3
    min_shots: int = 0
    max_shots: int = 20
    query_points: int = 32
    bank_tasks: int = 256
    k_neighbours: int = 8
    cluster_members: int = 4
    cluster_spread: float = 0.05
    neighbour_dropout: float = 0.2
    #: experimental (off by default, not in the shipped checkpoints): see docs of episode_loss
    sibling_rate: float = 0.0
    prior_weight: float = 0.0
    contrastive_weight: float = 0.1
    grad_clip: float = 10.0
    seed: int = 0


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    history: list[tuple[int, float]] = field(default_factory=list)
    #: with a validation set: the step whose weights were kept, its loss, every check
    best_step: int | None = None
    best_validation: float | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "final_loss": self.final_loss,
        }
        if self.best_step is not None:
            out["best_step"] = self.best_step
            out["best_validation_loss"] = self.best_validation
        return out


@dataclass(frozen=True)
class EarlyStopping:
    """Validate every ``every`` steps; keep the weights of the best check; stop after
    ``patience`` checks without improvement (0: never stop early).

    ``validate`` returns the validation loss, or the validation tasks' shares of it (an array
    over the tasks that sums to the loss), which ``significance`` needs."""

    validate: Callable[[MetaModel], Any]
    every: int = 100
    patience: int = 0
    #: check the starting weights too (step 0), so that training which never beats its
    #: starting point (e.g. a population fit) ends where it started
    at_start: bool = False
    #: with ``at_start`` and per-task shares: a later check may replace the starting weights
    #: only if it beats them by this many standard errors of the loss difference, the spread
    #: taken over the validation tasks (paired: each task against itself at the start). A few
    #: validation tasks cannot tell a real gain from luck, so the start is kept
    significance: float = 0.0


def _support_masks(shots: np.ndarray, n_max: int) -> np.ndarray:
    return (np.arange(n_max)[None, :] < shots[:, None]).astype(np.float32)


class EpisodeSampler:
    """Draws banks and episodes from a task family (``sample_params``, ``perturb``, ``sample``)."""

    def __init__(self, family: Any, config: TrainConfig, rng: np.random.Generator) -> None:
        self.family, self.config, self.rng = family, config, rng

    def bank(self) -> dict[str, np.ndarray]:
        c, rng, fam = self.config, self.rng, self.family
        n_clustered = c.bank_tasks // 2
        n_centres = max(1, n_clustered // c.cluster_members)
        centres = fam.sample_params(n_centres, rng)
        members = fam.perturb(np.repeat(centres, c.cluster_members, axis=0), c.cluster_spread, rng)
        others = fam.sample_params(c.bank_tasks - len(members), rng)
        params = np.concatenate([members, others])
        x, y = fam.sample(params, c.max_shots, rng)
        shots = rng.integers(max(1, c.max_shots // 4), c.max_shots + 1, size=len(params))
        return {"centres": centres, "x": x, "y": y, "mask": _support_masks(shots, c.max_shots)}

    def episodes(self, centres: np.ndarray) -> dict[str, np.ndarray]:
        c, rng, fam = self.config, self.rng, self.family
        n_near = c.batch_tasks // 2
        near = fam.perturb(
            centres[rng.integers(0, len(centres), size=n_near)], c.cluster_spread, rng
        )
        params = np.concatenate([near, fam.sample_params(c.batch_tasks - n_near, rng)])
        x, y = fam.sample(params, c.max_shots + c.query_points, rng)
        siblings: dict[str, np.ndarray] = {}
        if c.sibling_rate > 0 or c.prior_weight > 0:
            # a sibling of each near task (same cluster), as a retriever that finds it would
            sib = fam.perturb(near, c.cluster_spread, rng)
            siblings["x_sib"], siblings["y_sib"] = fam.sample(sib, c.max_shots, rng)
        shots = rng.integers(c.min_shots, c.max_shots + 1, size=len(params))
        return {
            "xs": x[:, : c.max_shots],
            "ys": y[:, : c.max_shots],
            "smask": _support_masks(shots, c.max_shots),
            "xq": x[:, c.max_shots :],
            "yq": y[:, c.max_shots :],
            "x_all": x,
            "y_all": y,
            **siblings,
        }


def retrieve(
    z: torch.Tensor, bank: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inner-product k-NN of ``z [B, E]`` in ``bank [M, E]`` -> ``(zn, sim, mask)``."""
    k = min(k, bank.shape[0])
    scores = z @ bank.T
    top = scores.detach().topk(k, dim=-1).indices
    return bank[top], scores.gather(1, top), torch.ones_like(top, dtype=z.dtype)


def episode_loss(
    model: MetaModel,
    bank: dict[str, torch.Tensor],
    ep: dict[str, torch.Tensor],
    config: TrainConfig,
    drop: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query loss of one batch of episodes (and the contrastive term)."""
    per_point, z, z_sib = _query_losses(model, bank, ep, config, drop)
    qmask = ep.get("qmask")  # recorded tasks have queries of varying number
    query_loss = (
        per_point.mean()
        if qmask is None
        else (per_point * qmask).sum() / qmask.sum().clamp(min=1.0)
    )
    if config.prior_weight > 0 and z_sib is not None:
        query_loss = query_loss + config.prior_weight * _prior_only_loss(
            model, ep, z, z_sib, config
        )
    amask = ep.get("amask")
    if amask is None:
        amask = torch.ones_like(ep["y_all"], dtype=z.dtype)
    z_full = model.embed(ep["x_all"], ep["y_all"], amask)
    return query_loss, contrastive_loss(z, z_full)


def query_losses(
    model: MetaModel,
    bank: dict[str, torch.Tensor],
    ep: dict[str, torch.Tensor],
    config: TrainConfig,
    drop: torch.Tensor,
) -> torch.Tensor:
    """The loss of every query point of a batch of episodes ``[B, Q]`` (padding included:
    weigh by ``qmask``)."""
    return _query_losses(model, bank, ep, config, drop)[0]


def _query_losses(
    model: MetaModel,
    bank: dict[str, torch.Tensor],
    ep: dict[str, torch.Tensor],
    config: TrainConfig,
    drop: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-point query losses ``[B, Q]``, the episodes' embeddings and their siblings'."""
    z_bank = model.embed(bank["x"], bank["y"], bank["mask"])
    z = model.embed(ep["xs"], ep["ys"], ep["smask"])
    zn, sim, nmask = retrieve(z, z_bank, config.k_neighbours)
    z_sib = None
    if "x_sib" in ep:
        z_sib = model.embed(ep["x_sib"], ep["y_sib"], torch.ones_like(ep["y_sib"], dtype=z.dtype))
        # for some near tasks the retriever "finds" a sibling (the last neighbour slot), so the
        # hypernetwork learns what a truly similar neighbour is worth at few shots
        rows = torch.rand(len(z_sib), device=z.device) < config.sibling_rate
        take = rows.nonzero()[:, 0]
        if len(take):
            zn, sim = zn.clone(), sim.clone()
            zn[take, -1] = z_sib[take]
            sim[take, -1] = (z[take] * z_sib[take]).sum(-1)
    nmask = nmask * (1.0 - drop).unsqueeze(-1)
    weights = model.adapt(z, zn, sim, nmask, ep["xs"], ep["ys"], ep["smask"])
    per_point = model.train_loss(model.predict(ep["xq"], weights), ep["yq"])
    return per_point, z, z_sib


def contrastive_loss(
    z: torch.Tensor, z_full: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """InfoNCE between few-shot embeddings ``z [B, E]`` and the same tasks' full-data ones."""
    logits = z @ z_full.T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(len(z), device=z.device))


def _prior_only_loss(
    model: MetaModel,
    ep: dict[str, torch.Tensor],
    z: torch.Tensor,
    z_sib: torch.Tensor,
    config: TrainConfig,
) -> torch.Tensor:
    """Query loss of prior-only predictions (no example): a near task from its sibling
    neighbour alone, any task from its own full-data embedding alone. Teaches the
    hypernetwork to turn an informative embedding into a sharp prior."""
    n_sib, b = z_sib.shape[0], z.shape[0]
    empty_x, empty_y = ep["xs"][:, :0], ep["ys"][:, :0]
    empty_m = torch.zeros(b, 0, device=z.device)
    z0 = model.embed(empty_x, empty_y, empty_m)
    zf = model.embed(
        ep["x_all"][:, : config.max_shots],
        ep["y_all"][:, : config.max_shots],
        torch.ones_like(ep["ys"], dtype=z.dtype),
    )
    one = torch.ones(n_sib, 1, device=z.device)
    w_sib = model.adapt(
        z0[:n_sib],
        z_sib[:, None],
        (z0[:n_sib] * z_sib).sum(-1, keepdim=True),
        one,
        empty_x[:n_sib],
        empty_y[:n_sib],
        empty_m[:n_sib],
    )
    w_own = model.adapt(zf, *no_neighbours(b, zf.shape[1], z.device), empty_x, empty_y, empty_m)
    prior_loss = model.train_loss(model.predict(ep["xq"][:n_sib], w_sib), ep["yq"][:n_sib]).mean()
    return prior_loss + model.train_loss(model.predict(ep["xq"], w_own), ep["yq"]).mean()


def make_optimizer(
    params: Any, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam with a one-cycle schedule (5% warm-up); a run too short for one keeps the rate flat.

    Shared by :func:`meta_train` and the baselines trained on the same budget."""
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.05
        )
        if config.steps >= 40
        else None
    )
    return opt, sched


def meta_train(
    model: MetaModel,
    family: Any,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    sampler: Any = None,
    early_stopping: EarlyStopping | None = None,
) -> TrainResult:
    """Meta-train ``model`` in place on episodes of ``family`` (or of ``sampler``: any object
    with the :class:`EpisodeSampler` interface, e.g. recorded tasks); returns the summary.

    With ``early_stopping`` the model ends with the weights of its best validation check."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device).train()
    sampler = sampler if sampler is not None else EpisodeSampler(family, config, rng)
    best: tuple[float, int, dict[str, torch.Tensor], np.ndarray | None] | None = None
    checks: list[tuple[int, float]] = []
    opt, sched = make_optimizer(model.parameters(), config)
    if early_stopping is not None and early_stopping.at_start:
        best = _check(model, early_stopping, 0, best, checks)
    bar = _progress(config.steps, progress)
    start, ema, history = time.perf_counter(), math.nan, []
    for step in range(1, config.steps + 1):
        bank_np = sampler.bank()
        bank = _to_tensors(bank_np, device, skip=("centres",))
        ep = _to_tensors(sampler.episodes(bank_np["centres"]), device)
        drop = torch.from_numpy(
            (rng.random(config.batch_tasks) < config.neighbour_dropout).astype(np.float32)
        ).to(device)
        query_loss, contrastive = episode_loss(model, bank, ep, config, drop)
        loss = query_loss + config.contrastive_weight * contrastive
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        value = float(query_loss.detach())
        ema = value if math.isnan(ema) else 0.98 * ema + 0.02 * value
        if step % 50 == 0 or step == config.steps:
            history.append((step, ema))
            if bar is not None:
                bar.set_postfix(loss=f"{ema:.4g}")
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(step, value)
        if early_stopping is not None and (
            step % early_stopping.every == 0 or step == config.steps
        ):
            best = _check(model, early_stopping, step, best, checks)
            if bar is not None:
                bar.set_postfix(loss=f"{ema:.4g}", val=f"{best[0]:.4g}@{best[1]}")
            stale = sum(1 for s, _ in checks if s > best[1])
            if early_stopping.patience and stale >= early_stopping.patience:
                log.info("early stop at step %d: best validation at step %d", step, best[1])
                break
    if bar is not None:
        bar.close()
    result = TrainResult(step, time.perf_counter() - start, ema, history)
    if best is not None:
        model.load_state_dict(best[2])
        result.best_validation, result.best_step, result.validation = best[0], best[1], checks
    model.eval()
    return result


def _check(
    model: MetaModel,
    stopping: EarlyStopping,
    step: int,
    best: tuple[float, int, dict[str, torch.Tensor], np.ndarray | None] | None,
    checks: list[tuple[int, float]],
) -> tuple[float, int, dict[str, torch.Tensor], np.ndarray | None]:
    """One validation check; returns the best ``(loss, step, weights, shares)`` so far (the
    shares: the per-task parts of the loss when ``validate`` gives them, else ``None``)."""
    model.eval()
    with torch.no_grad():
        out = stopping.validate(model)
    model.train()
    shares = None if np.ndim(out) == 0 else np.asarray(out, dtype=np.float64)
    value = float(out) if shares is None else float(shares.sum())
    checks.append((step, value))
    if best is not None:
        if not value < best[0]:
            return best
        gated = best[1] == 0 and stopping.at_start and stopping.significance > 0
        if gated and not _significant(best[3], shares, stopping.significance):
            return best
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return value, step, state, shares


def _significant(start: np.ndarray | None, now: np.ndarray | None, z: float) -> bool:
    """Whether ``now`` beats ``start`` (per-task shares of a loss) by ``z`` standard errors of
    the difference of their sums; ``False`` when fewer than 2 tasks say (or none)."""
    if start is None or now is None or len(now) < 2:
        return False
    d = now - start
    se = float(np.sqrt(len(d) / (len(d) - 1) * np.sum((d - d.mean()) ** 2)))
    return float(d.sum()) < -z * se


def _to_tensors(
    arrays: dict[str, np.ndarray], device: str | torch.device, skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
        for k, v in arrays.items()
        if k not in skip
    }


def _progress(total: int, enabled: bool, desc: str = "meta-train") -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


# -- the predictive variance's calibration -----------------------------------------------------
def variance_evidence(
    model: MetaModel, bank: dict[str, torch.Tensor], ep: dict[str, torch.Tensor], k: int
) -> dict[str, np.ndarray]:
    """What :func:`~stream_meta.uncertainty.fit_variance_calibration` fits on, for every real
    query point of a batch of episodes (retrieval in the loop as in training, no dropout):
    the head's ``epistemic`` variance, its task's support ``misfit`` and ``shots``, and the
    squared error ``sq_err``, all in model units."""
    with torch.no_grad():
        z_bank = model.embed(bank["x"], bank["y"], bank["mask"])
        z = model.embed(ep["xs"], ep["ys"], ep["smask"])
        zn, sim, nmask = retrieve(z, z_bank, k)
        generated = model.hyper(z, zn, sim, nmask, ep["smask"].sum(dim=-1))
        post = model.head_posterior(generated, ep["xs"], ep["ys"], ep["smask"])
        weights = model.with_head(generated, post.mean)
        x_std = model.scaling.inputs(ep["xq"])
        phi = model.target.features(x_std, weights)
        eye = torch.eye(phi.shape[-1], dtype=phi.dtype, device=phi.device)
        inv = torch.linalg.solve_triangular(post.chol, eye.expand_as(post.chol), upper=False)
        epistemic = (torch.bmm(inv, phi.transpose(1, 2)) ** 2).sum(dim=1)  # [B, Q]
        sq_err = model.train_loss(model.predict(ep["xq"], weights), ep["yq"])
    qmask = ep.get("qmask")
    real = (torch.ones_like(sq_err) if qmask is None else qmask) > 0
    per_task = lambda t: t.unsqueeze(-1).expand_as(sq_err)[real].double().numpy()  # noqa: E731
    return {
        "epistemic": epistemic[real].double().numpy(),
        "sq_err": sq_err[real].double().numpy(),
        "misfit": per_task(post.misfit),
        "shots": per_task(post.shots),
    }


def calibrate_variance(
    model: MetaModel, draws: Any, k: int, *, task_scale: bool = True
) -> dict[str, Any]:
    """Fit ``model``'s :class:`~stream_meta.uncertainty.Calibration` (in place) on held-out
    query points of ``draws``, an iterable of ``(bank, episodes)`` tensor dicts (see
    :func:`variance_evidence`); returns the fitted numbers and the points' 90% coverage before
    and after. A classifier is left alone (its probabilities are its uncertainty)."""
    from stream_meta.uncertainty import central_coverage, fit_variance_calibration

    if model.config.kind != "regression":
        return {}
    model.eval()
    parts = [variance_evidence(model, bank, ep, k) for bank, ep in draws]
    ev = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    noise = float(model.noise_variance().detach())

    def coverage() -> float | None:
        scale = model.calibration.task_scale(
            torch.from_numpy(ev["misfit"]), torch.from_numpy(ev["shots"])
        ).numpy()
        cal = model.calibration
        var = scale * (float(cal.var_scale) * ev["epistemic"] + float(cal.noise_scale) * noise)
        return central_coverage(np.sqrt(ev["sq_err"] / var))

    before = coverage()
    a, c, rate = fit_variance_calibration(
        ev["epistemic"],
        noise,
        ev["sq_err"],
        ev["misfit"] if task_scale else None,
        ev["shots"] if task_scale else None,
    )
    model.calibration.set(a, c, rate)
    return {
        **model.calibration.to_dict(),
        "points": len(ev["sq_err"]),
        "coverage_90_before": before,
        "coverage_90": coverage(),
    }


def family_draws(
    family: Any, config: TrainConfig, batches: int = 20, seed: int = 1
) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``batches`` fresh ``(bank, episodes)`` of ``family`` as training draws them (support
    sizes over ``[min_shots, max_shots]``), from a seed training does not use."""
    sampler = EpisodeSampler(family, config, np.random.default_rng(config.seed + 10_007 * seed))
    out = []
    for _ in range(batches):
        bank_np = sampler.bank()
        out.append(
            (
                _to_tensors(bank_np, "cpu", skip=("centres",)),
                _to_tensors(sampler.episodes(bank_np["centres"]), "cpu"),
            )
        )
    return out
