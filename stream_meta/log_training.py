"""Meta-training on a user's recorded tasks (``stream-meta train --data LOG``).

From a :class:`~stream_meta.tasklog.TaskTable` to a served model, with nothing to tune:

1. the tasks are split by a hash of their id (:func:`~stream_meta.tasklog.split_of`);
2. the :class:`~stream_meta.scaling.Scaling` is fitted on the *training* tasks' rows: feature
   standardisation, the pooled linear (or logistic) fit as the population offset, the residual
   scale. The model learns what a task adds to the population's fit, and starts from it;
3. the model's size follows the data (:func:`model_size`): few tasks get a small network, so
   30 training tasks do not over-fit a hypernetwork made for thousands;
4. regression starts from a linear mixed model of the training tasks' residuals (random
   intercept and slopes, maximum likelihood, ``G``'s structure chosen by BIC: the
   ``task-ridge`` baseline's fit): the closed-form head's prior over its ``[x, 1]`` features is
   the random effects' covariance and the noise is the mixed model's, so the untrained model
   already predicts as that model's BLUP and training only has to find what is not linear;
5. episodes are cut from the training tasks (:class:`~stream_meta.tasks.logged.LoggedEpisodes`)
   and the model is meta-trained with retrieval in the loop, validated at the start and every
   ``validate_every`` steps on fixed episodes of the *validation* tasks, and ends with the
   weights of its best check (early stopping: ``patience`` checks without improvement). A check
   replaces the starting weights only if it beats them by ``significance`` standard errors
   (paired over the validation tasks): a few validation tasks cannot tell a real gain from
   luck, and the mixed model is the safe answer until they can;
6. regression: the predictive variance is calibrated on the validation episodes' held-out
   points (:func:`~stream_meta.meta_training.calibrate_variance`), so the served standard
   deviations give 90% intervals that cover about 90% of the labels.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from stream_meta.meta_training import (
    EarlyStopping,
    TrainConfig,
    calibrate_variance,
    meta_train,
    query_losses,
)
from stream_meta.model import MetaModel, ModelConfig
from stream_meta.scaling import fit_scaling
from stream_meta.tasklog import TaskTable
from stream_meta.tasks.logged import LoggedEpisodes, describe, fixed_episodes

__all__ = [
    "LogTrainConfig",
    "model_size",
    "train_on_log",
    "training_episodes",
    "validation_episodes",
]

log = logging.getLogger(__name__)

#: the fewest training tasks meta-training accepts (fewer: refused with a clear message)
MIN_TRAIN_TASKS = 4


@dataclass(frozen=True)
class LogTrainConfig:
    """Settings of :func:`train_on_log`; every default is meant to be left alone."""

    max_steps: int = 3000
    validate_every: int = 100
    patience: int = 8
    batch_tasks: int = 32
    bank_tasks: int = 64
    max_shots: int = 64
    query_points: int = 16
    k_neighbours: int = 8
    lr: float = 1e-3
    #: the head's starting prior: "mixed" (regression: the [x, 1] block from a linear mixed
    #: model fitted on the training tasks; classification: as "isotropic") or "isotropic"
    #: (``prior_variance`` on every feature)
    head_prior: str = "mixed"
    #: the starting prior variance of the head's features ("mixed": of the body's only)
    prior_variance: float = 0.01
    #: validate the starting weights too (step 0): a run that never beats them keeps them
    validate_at_start: bool = True
    #: a later check replaces the starting weights only if it beats them by this many
    #: standard errors over the validation tasks (0: any improvement)
    significance: float = 2.0
    seed: int = 0
    #: None: the schema's ``time_ordered``
    time_ordered: bool | None = None
    #: ``auto`` (from the data size, :func:`model_size`), or ``small`` / ``medium`` / ``large``
    model_size: str = "auto"


SIZES = ("small", "medium", "large")


def model_size(
    train_tasks: int, train_rows: int, choice: str = "auto"
) -> tuple[str, dict[str, Any]]:
    """The architecture for a data size: ``(name, ModelConfig fields)`` (``choice``: a size
    by name instead).

    ``small`` below 200 training tasks or 5,000 rows, ``medium`` below 2,000 tasks, else
    ``large``. Every size feeds the raw (standardised) features to the closed-form head
    (``skip_input``), so the head is at least a per-task linear model with a learned prior,
    i.e. a linear mixed model, and the body adds what is not linear.

    >>> model_size(40, 900)[0], model_size(600, 6000)[0], model_size(5000, 10**6)[0]
    ('small', 'medium', 'large')
    """
    if choice not in ("auto", *SIZES):
        raise ValueError(f"model size {choice!r}: one of auto, {', '.join(SIZES)}")
    if choice == "small" or (choice == "auto" and (train_tasks < 200 or train_rows < 5000)):
        return "small", {
            "embed_dim": 32,
            "encoder_hidden": 64,
            "target_hidden": (32,),
            "hyper_hidden": 64,
            "skip_input": True,
        }
    if choice == "medium" or (choice == "auto" and train_tasks < 2000):
        return "medium", {
            "embed_dim": 64,
            "encoder_hidden": 128,
            "target_hidden": (40, 40),
            "hyper_hidden": 128,
            "skip_input": True,
        }
    return "large", {
        "embed_dim": 64,
        "encoder_hidden": 128,
        "target_hidden": (64, 64),
        "hyper_hidden": 256,
        "skip_input": True,
    }


def train_on_log(
    table: TaskTable, config: LogTrainConfig | None = None, *, progress: bool = True
) -> tuple[MetaModel, dict[str, Any]]:
    """Meta-train a model on the table's training tasks; returns ``(model, report)``.

    Raises ``ValueError`` (with a message a user can act on) when the log has too few tasks.
    """
    config = config or LogTrainConfig()
    if config.head_prior not in ("mixed", "isotropic"):
        raise ValueError(f"head_prior must be 'mixed' or 'isotropic', got {config.head_prior!r}")
    schema = table.schema
    train, val = table.tasks_in("train"), table.tasks_in("validation")
    if len(train) < MIN_TRAIN_TASKS or len(val) < 1:
        raise ValueError(
            f"too few tasks to meta-train: {len(train)} training and {len(val)} validation "
            f"tasks of {table.n_tasks} (tasks are split 65/15/20 by a hash of their id; "
            f"at least {MIN_TRAIN_TASKS} training tasks and 1 validation task are needed, "
            "~30 training tasks for a useful model)"
        )
    torch.manual_seed(config.seed)
    rows = table.split_rows("train")
    size_name, size = model_size(len(train), len(rows), config.model_size)
    train_sampler, tc = training_episodes(table, config)
    max_shots, time_ordered = train_sampler.max_shots, train_sampler.time_ordered
    model = MetaModel(
        ModelConfig(
            x_dim=schema.x_dim,
            kind=schema.target,
            n_classes=schema.n_classes,
            max_shots=max(max_shots, 8),
            **size,
        )
    )
    stats = fit_scaling(
        table.x[rows], table.y[rows], kind=schema.target, n_classes=schema.n_classes
    )
    model.scaling.set(**stats)
    mixed = None
    if config.head_prior == "mixed" and schema.target == "regression":
        mixed = _mixed_model(model, table, train, seed=config.seed)
    _start_from_population(model, config.prior_variance, mixed=mixed)
    validate = _validator(table, train, val, max_shots, config, time_ordered, tc)
    log.info(
        "meta-training a %s model on %d training tasks (%d rows), validating on %d tasks",
        size_name,
        len(train),
        len(rows),
        len(val),
    )
    result = meta_train(
        model,
        None,
        tc,
        progress=progress,
        sampler=train_sampler,
        early_stopping=EarlyStopping(
            validate,
            every=config.validate_every,
            patience=config.patience,
            at_start=config.validate_at_start,
            significance=config.significance,
        ),
    )
    calibration = {}
    if schema.target == "regression":
        # the predictive variance's calibration, on the validation tasks' held-out points
        calibration = calibrate_variance(model, validate.draws(), tc.k_neighbours)
    report = {
        "model_size": size_name,
        "splits": {
            name: {"tasks": len(table.tasks_in(name)), "rows": len(table.split_rows(name))}
            for name in ("train", "validation", "test")
        },
        "episodes": describe(train_sampler),
        "train": result.to_dict(),
        "validation_checks": [[s, round(v, 6)] for s, v in result.validation],
        # the same validation loss of the pooled fit alone (the model's output 0)
        "validation_pooled_loss": validate.pooled(model),
        "head_prior": None if mixed is None else mixed.describe(),
        "calibration": calibration,
        "settings": asdict(config),
    }
    return model, report


def training_episodes(
    table: TaskTable, config: LogTrainConfig
) -> tuple[LoggedEpisodes, TrainConfig]:
    """The episode sampler of the training tasks and the meta-training settings of
    :func:`train_on_log` (``max_shots``: the largest training task's size less one, at most
    ``config.max_shots``). A new sampler is seeded with ``config.seed``, so it draws the very
    episodes the meta-model was trained on (the gradient baselines of ``train-baseline --data``
    are trained on them too)."""
    train = table.tasks_in("train")
    max_shots = int(max(1, min(config.max_shots, table.counts()[train].max() - 1)))
    schema = table.schema
    time_ordered = schema.time_ordered if config.time_ordered is None else config.time_ordered
    sampler = LoggedEpisodes(
        table,
        train,
        batch_tasks=config.batch_tasks,
        bank_tasks=config.bank_tasks,
        max_shots=max_shots,
        query_points=config.query_points,
        rng=np.random.default_rng(config.seed),
        time_ordered=time_ordered,
    )
    tc = TrainConfig(
        steps=config.max_steps,
        batch_tasks=sampler.batch_tasks,
        lr=config.lr,
        max_shots=max_shots,
        query_points=config.query_points,
        bank_tasks=sampler.bank_tasks,
        k_neighbours=min(config.k_neighbours, sampler.bank_tasks),
        seed=config.seed,
    )
    return sampler, tc


def validation_episodes(
    table: TaskTable, config: LogTrainConfig, max_shots: int, time_ordered: bool
) -> tuple[LoggedEpisodes, dict[str, np.ndarray] | None]:
    """The sampler of the validation tasks and the fixed episodes early stopping compares
    checks on (32 support sizes per task), as :func:`train_on_log` draws them."""
    val = table.tasks_in("validation")
    val_sampler = LoggedEpisodes(
        table,
        np.concatenate([val, val]) if len(val) == 1 else val,
        batch_tasks=config.batch_tasks,
        bank_tasks=config.bank_tasks,
        max_shots=max_shots,
        query_points=config.query_points,
        rng=np.random.default_rng(config.seed + 1),
        time_ordered=time_ordered,
    )
    return val_sampler, fixed_episodes(val_sampler, per_task=32, seed=config.seed + 2)


def _start_from_population(
    model: MetaModel,
    prior_variance: float = 0.1,
    *,
    mixed: MixedModel | None = None,
    mixed_mean: bool = False,
) -> None:
    """Start training from the population's fit: the generated head's prior mean is zero
    (a prediction is the scaling's offset, the pooled linear fit, until training moves it),
    the noise is the residual scale (1 in model units, the scaling's ``y_scale``) and the head's
    prior variance is small (``prior_variance``), so a few examples shrink toward the
    population as a mixed model's do instead of being interpolated.

    With ``mixed`` (a linear mixed model of the model-unit residuals, :func:`_mixed_model`) the
    head starts as that model's BLUP: the prior covariance of the head's ``[x, 1]`` features is
    the random effects' covariance ``G`` and the noise the mixed model's residual variance (and
    with ``mixed_mean`` the prior mean its fixed effects, not the pooled fit's zero); the body's
    features keep ``prior_variance``."""
    n_feat = model.prior_chol.shape[0]
    precision = torch.eye(n_feat, dtype=torch.float64) / prior_variance
    noise = 1.0
    with torch.no_grad():
        model.hyper.base[model.target.n_body :] = 0.0
        if mixed is not None:
            idx = torch.as_tensor(mixed.columns)
            cov = torch.as_tensor(mixed.cov, dtype=torch.float64)
            cov = (cov + cov.T) / 2 + MIXED_COV_FLOOR * torch.eye(len(idx), dtype=torch.float64)
            precision[idx[:, None], idx[None, :]] = torch.linalg.inv(cov)
            noise = mixed.noise
            if mixed_mean and model.config.y_dim == 1:
                head = model.hyper.base[model.target.n_body :]
                head[idx] = torch.as_tensor(mixed.beta, dtype=head.dtype)
        model.log_noise.fill_(0.5 * float(np.log(noise)))
        # prior_precision() is L L' + 1e-3 I
        chol = torch.linalg.cholesky(precision - 1e-3 * torch.eye(n_feat, dtype=torch.float64))
        model.prior_chol.copy_(chol.to(model.prior_chol.dtype))


#: variance added to the diagonal of the mixed model's ``G`` (model units: a coefficient's
#: variance in squared residual scales) before it becomes the head's prior precision, so an
#: effect that does not vary between tasks gets a precision of ~1000, not an infinite one
MIXED_COV_FLOOR = 1e-3


@dataclass(frozen=True)
class MixedModel:
    """A linear mixed model of the residual targets (model units) over the head's features
    ``columns`` (the informative standardised inputs and the constant 1, in the head's
    order): fixed effects ``beta``, random-effect covariance ``cov``, residual variance
    ``noise``, ``G``'s ``structure``."""

    columns: list[int]
    beta: np.ndarray
    cov: np.ndarray
    noise: float
    structure: str

    def describe(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "noise": round(self.noise, 6),
            "effect_variances": [round(float(v), 6) for v in np.diag(self.cov)],
        }


def _mixed_model(
    model: MetaModel, table: TaskTable, train: np.ndarray, *, seed: int, max_tasks: int = 2000
) -> MixedModel:
    """The mixed model the head starts from: :func:`~stream_meta.evaluation.population.
    select_mixed_model` (random intercept and slopes, maximum likelihood by EM, ``G``'s
    structure by BIC) fitted to the training tasks' residuals over the scaling's pooled fit, in
    model units (at most ``max_tasks`` tasks, a seeded sample)."""
    from stream_meta.evaluation.population import select_mixed_model

    tasks = np.asarray(train)
    if len(tasks) > max_tasks:
        tasks = np.random.default_rng(seed).choice(tasks, max_tasks, replace=False)
    parts = [np.arange(table.offsets[t], table.offsets[t + 1]) for t in tasks]
    rows = np.concatenate(parts)
    task_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    with torch.no_grad():
        x_std = model.scaling.inputs(
            torch.as_tensor(np.asarray(table.x[rows]), dtype=torch.float32)
        )
        r = model.scaling.targets(x_std, torch.as_tensor(np.asarray(table.y[rows])))
    xs, rs = x_std.double().numpy(), r.double().numpy()
    informative = np.flatnonzero(xs.std(axis=0) > 1e-6)
    # population's convention: the intercept first
    z = np.concatenate([np.ones((len(xs), 1)), xs[:, informative]], axis=1)
    fit, _ = select_mixed_model(z, rs, task_of)
    bias = model.target.n_features - 1
    keep = list(range(z.shape[1]))
    columns = [bias]
    if model.config.skip_input:  # the head sees the raw inputs: [body, x, 1]
        first_x = model.target.n_features - model.config.x_dim - 1
        columns += [first_x + int(j) for j in informative]
    else:  # the head's only linear feature is the constant: the intercept's block
        keep = [0]
    return MixedModel(
        columns,
        fit.beta[keep],
        fit.cov[np.ix_(keep, keep)],
        float(fit.noise),
        fit.structure,
    )


def _validator(
    table: TaskTable,
    train: np.ndarray,
    val: np.ndarray,
    max_shots: int,
    config: LogTrainConfig,
    time_ordered: bool,
    tc: TrainConfig,
) -> Any:
    """The validation loss (model units) of fixed episodes of the validation tasks, with the
    training tasks as the bank retrieval searches."""
    val_sampler, episodes = validation_episodes(table, config, max_shots, time_ordered)
    rng = val_sampler.rng
    bank_tasks = train if len(train) <= 512 else rng.choice(train, 512, replace=False)
    bx, by, bm = val_sampler.task_sets(bank_tasks, max_shots)
    bank = {"x": torch.from_numpy(bx), "y": torch.from_numpy(by), "mask": torch.from_numpy(bm)}
    assert episodes is not None
    eps = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in episodes.items()}
    n = len(eps["xs"])
    # the validation task of each episode (fixed_episodes cuts min(32, n) of each, in order)
    per_task = np.minimum(val_sampler.counts, 32)
    task_of = np.repeat(np.unique(val_sampler.tasks, return_inverse=True)[1], per_task)
    n_tasks = int(task_of.max()) + 1
    weight = float(eps["qmask"].sum().clamp(min=1.0))

    def validate(model: MetaModel) -> np.ndarray:
        """Each validation task's share of the validation loss (the shares sum to it)."""
        shares = np.zeros(n_tasks)
        for i in range(0, n, 128):
            part = {k: v[i : i + 128] for k, v in eps.items()}
            drop = torch.zeros(len(part["xs"]))
            per_point = query_losses(model, bank, part, tc, drop)
            per_episode = (per_point * part["qmask"]).sum(-1).double().numpy()
            np.add.at(shares, task_of[i : i + 128], per_episode / weight)
        return shares

    def pooled(model: MetaModel) -> float:
        """The same loss of the scaling's pooled fit alone (the model's output 0)."""
        with torch.no_grad():
            x_std = model.scaling.inputs(eps["xq"])
            shape = eps["yq"].shape + ((model.config.y_dim,) if model.config.y_dim > 1 else ())
            out = model.scaling.outputs(x_std, torch.zeros(shape))
            per_point = model.train_loss(out, eps["yq"]) * eps["qmask"]
        return float(per_point.sum() / eps["qmask"].sum().clamp(min=1.0))

    def draws() -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """The validation episodes with their bank, in chunks (for the variance's
        calibration: :func:`~stream_meta.meta_training.calibrate_variance`)."""
        return [(bank, {k: v[i : i + 128] for k, v in eps.items()}) for i in range(0, n, 128)]

    validate.pooled = pooled  # type: ignore[attr-defined]
    validate.draws = draws  # type: ignore[attr-defined]
    return validate
