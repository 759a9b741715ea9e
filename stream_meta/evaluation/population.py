"""Population baselines: the models a statistician fits first, scored prequentially.

Before a meta-model earns its keep on a user's data it has to beat what needs no tuning: a
pooled fit, a per-task average, and a mixed model that shrinks each task toward the pooled fit.
Every baseline here is fitted once on the *training* tasks (:class:`TrainingData`) and then
serves held-out tasks in stream order, *prequentially*: for each labelled event it predicts
first, is scored, then learns the example into its task (:func:`prequential`). Unlabelled
events are predicted, never learned. numpy and scikit-learn only.

Regression (a prediction is a 0-d array, the loss is the squared error):

* ``pooled-mean``: the mean of the training labels.
* ``pooled-linear``: ridge regression on all training rows (``RidgeCV``, efficient
  leave-one-out over a log grid of penalties on standardised ``x`` and ``y``: the data pick
  the penalty, the user tunes nothing).
* ``task-mean`` / ``task-last``: the task's running mean / last label; the pooled mean before
  its first label.
* ``task-ridge``: the best linear unbiased predictor of a linear mixed model with a random
  intercept and random slopes on every feature,
  ``y = z'(beta + b_task) + e``, ``z = [1, x]``, ``b_task ~ N(0, G)``, ``e ~ N(0, sigma2)``.
  ``beta``, ``G`` and ``sigma2`` are maximum-likelihood estimates made on the training tasks by
  EM (Laird and Ware, 1982; the random effects are the missing data), accelerated by SQUAREM
  (Varadhan and Roland, 2008) with a likelihood check, so the likelihood never decreases. EM
  keeps ``G`` positive semi-definite by construction and needs only the per-task sums ``Z'Z``,
  ``Z'y``, ``y'y``: an iteration costs ``O(T d^3)`` for ``T`` tasks, whatever their rows.
  ``G``'s structure is chosen by BIC (``-2 loglik + k log T``, ``k`` its free entries) among a
  random intercept only, a diagonal ``G`` and a full one, each considered only if it has no
  more free entries than there are training tasks: with few rows per task and many features
  a full ``G`` is barely identified (its slope variances trade off against ``sigma2``).
  A new task's prediction is ``z'(beta + m)``, ``m`` the posterior mean of its random effects
  given its residuals so far: Bayesian linear regression with prior ``N(0, G)``, i.e. a
  per-task ridge shrunk toward the pooled fit, all the way when ``G = 0`` and not at all when
  ``G`` is large. With ``G = L L'`` the posterior is kept as ``(I + L'Z'ZL / sigma2)^-1``
  (updated by Sherman-Morrison) and ``L'Z'r``, so a label costs ``O(d^2)``, no refit.
  Regularised so it does not fail: features constant in the training data are left out of the
  model, ``beta`` gets a ``1e-6``-relative ridge (collinear features), ``sigma2`` a floor, and
  ``G`` is never inverted (``I + L'SL / sigma2`` has eigenvalues >= 1).

Classification (a prediction is ``[C]`` probabilities, the loss is the log loss with the
probability clipped at ``1e-6``):

* ``pooled-frequency``: the training class frequencies, plus half a count per class
  (Krichevsky-Trofimov) so that a class unseen in training is not impossible.
* ``pooled-logistic``: multinomial ``LogisticRegression`` (default ``C = 1``) on standardised x.
* ``task-frequency``: the task's class counts plus a Dirichlet prior ``alpha * pooled``.
  ``alpha`` maximises, over a log grid, the Dirichlet-multinomial likelihood of the training
  tasks' labels, which *is* their prequential likelihood under this very predictor (the product
  of the sequential predictive probabilities does not depend on the order of the labels).

(A per-task shifted logistic model is not here: its per-task fit is iterative, and its prior
scale needs a prequential search over the training tasks.)

All fits are made in standardised units (``x`` per feature, ``y`` for regression; a feature
with zero spread is left unscaled) and predictions are returned in the user's units, so
multiplying ``y`` by 1000 multiplies every prediction by 1000 and every loss by ``10^6``.

>>> rng = np.random.default_rng(0)
>>> task = np.repeat(np.arange(50), 6)
>>> x = rng.normal(size=(300, 1))
>>> y = 2.0 * x[:, 0] + rng.normal(size=50)[task] + 0.1 * rng.normal(size=300)
>>> models = baselines(TrainingData(x, y, task, "regression", None))
>>> [m.name for m in models]
['pooled-mean', 'pooled-linear', 'task-mean', 'task-last', 'task-ridge']
>>> events = [("new", np.array([v]), 2.0 * v + 3.0) for v in rng.normal(size=20)]
>>> out = prequential(models, events)
>>> ridge, pooled = np.mean(out["task-ridge"][5:]), np.mean(out["pooled-linear"][5:])
>>> bool(ridge < 0.1 * pooled)
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import gammaln
from sklearn.linear_model import LogisticRegression, RidgeCV

__all__ = [
    "Baseline",
    "MixedModel",
    "PooledFrequency",
    "PooledLinear",
    "PooledLogistic",
    "PooledMean",
    "TaskFrequency",
    "TaskLast",
    "TaskMean",
    "TaskRidge",
    "TrainingData",
    "baselines",
    "dirichlet_strength",
    "fit_mixed_model",
    "loss",
    "prequential",
    "select_mixed_model",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Label = float | int

KINDS = ("regression", "classification")
#: log loss clips the probability of the true class here
PROB_FLOOR = 1e-6
#: ``pooled-linear``'s penalties (standardised units)
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 17))
#: ``task-frequency``'s prior strengths (pseudo-counts)
PRIOR_STRENGTHS = tuple(float(a) for a in np.logspace(-2, 4, 25))


@dataclass(frozen=True)
class TrainingData:
    """The training tasks: the pooled fits and the population estimates are made on them.

    ``x [N, d]``, ``y [N]`` (floats for regression, class indices ``0..C-1`` for
    classification), ``task [N]`` an integer task index per row (the rows of a task need not be
    contiguous, the indices need not be dense). ``n_classes`` is ``C`` (``None`` for
    regression; for classification ``None`` means ``max(y) + 1``).
    """

    x: FloatArray
    y: NDArray[Any]
    task: IntArray
    kind: str
    n_classes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        x = np.asarray(self.x, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        task = np.asarray(self.task)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must be [N, d] with N, d >= 1, got shape {x.shape}")
        n = x.shape[0]
        if np.shape(self.y) != (n,) or task.shape != (n,):
            raise ValueError(
                f"y and task must be [N] = [{n}], got {np.shape(self.y)} and {task.shape}"
            )
        if not np.issubdtype(task.dtype, np.integer):
            raise ValueError(f"task must hold integer task indices, got dtype {task.dtype}")
        if not np.isfinite(x).all():
            raise ValueError("x has non-finite values")
        if self.kind == "regression":
            y: NDArray[Any] = np.asarray(self.y, dtype=np.float64)
            if not np.isfinite(y).all():
                raise ValueError("y has non-finite values")
        else:
            raw = np.asarray(self.y)
            y = raw.astype(np.int64)
            if not np.array_equal(y, raw) or (y < 0).any():
                raise ValueError("classification labels must be class indices 0..C-1")
            c = int(y.max()) + 1 if self.n_classes is None else int(self.n_classes)
            if c < 1 or int(y.max()) >= c:
                raise ValueError(f"labels up to {int(y.max())} do not fit n_classes={c}")
            object.__setattr__(self, "n_classes", c)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "task", task.astype(np.int64))

    @property
    def d(self) -> int:
        return int(self.x.shape[1])


class Baseline(Protocol):
    """A model that serves every task: predict for an event, then (if labelled) learn it."""

    name: str
    #: "regression" or "classification": which loss scores it
    kind: str

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        """Regression: a 0-d array (user units); classification: ``[C]`` probabilities."""
        ...

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        """Add the labelled example ``(x, y)`` to the task ``task_id``."""
        ...


def loss(kind: str, prediction: ArrayLike, y: Label) -> float:
    """Squared error (regression), or log loss with the true class's probability clipped at
    ``1e-6`` (classification)."""
    p = np.asarray(prediction, dtype=np.float64)
    if kind == "regression":
        return float((float(p) - float(y)) ** 2)
    if kind == "classification":
        c = int(y)
        if c != y or not 0 <= c < p.shape[-1]:
            raise ValueError(f"label {y!r} is not a class index 0..{p.shape[-1] - 1}")
        return -math.log(max(float(p[c]), PROB_FLOOR))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def prequential(
    models: Sequence[Baseline],
    events: Iterable[tuple[str, ArrayLike, Label | None]],
) -> dict[str, list[float | None]]:
    """Run ``models`` over ``events`` ``(task_id, x, y or None)`` in order -> per model name,
    the loss of every event (``None`` for an unlabelled one: predicted, not learned).
    """
    kinds = {m.kind for m in models}
    if len(kinds) != 1 or not kinds <= set(KINDS):
        raise ValueError(f"models must share one kind in {KINDS}, got {sorted(kinds)}")
    k = kinds.pop()
    out: dict[str, list[float | None]] = {m.name: [] for m in models}
    if len(out) != len(models):
        raise ValueError("model names must be distinct")
    for task_id, x, y in events:
        for m in models:
            p = m.predict(task_id, x)
            if y is None:
                out[m.name].append(None)
            else:
                out[m.name].append(loss(k, p, y))
                m.learn(task_id, x, y)
    return out


def baselines(data: TrainingData) -> list[Baseline]:
    """The baselines for ``data.kind``, fitted on ``data``.

    Regression: ``pooled-mean``, ``pooled-linear``, ``task-mean``, ``task-last``,
    ``task-ridge``; classification: ``pooled-frequency``, ``pooled-logistic``,
    ``task-frequency``.
    """
    if data.kind == "regression":
        mean = PooledMean(data)
        return [
            mean,
            PooledLinear(data),
            TaskMean(mean.value),
            TaskLast(mean.value),
            TaskRidge(data),
        ]
    freq = PooledFrequency(data)
    return [freq, PooledLogistic(data), TaskFrequency(data, freq.probs)]


# -- shared pieces ----------------------------------------------------------------------------
class _Scale:
    """Per-feature standardisation fitted on training rows; a zero-spread feature keeps scale 1
    and is marked uninformative."""

    def __init__(self, x: FloatArray) -> None:
        self.mean = x.mean(axis=0)
        sd = x.std(axis=0)
        self.informative = sd > 1e-12 * np.maximum(1.0, np.abs(self.mean))
        self.sd = np.where(self.informative, sd, 1.0)

    def __call__(self, x: FloatArray) -> FloatArray:
        out: FloatArray = (x - self.mean) / self.sd
        return out


def _y_scale(y: FloatArray) -> tuple[float, float]:
    """``(centre, scale)`` of the labels: mean and standard deviation; labels that are all
    equal get scale ``|y|`` (or 1 at zero), so the scale still follows the units."""
    mean, sd = float(y.mean()), float(y.std())
    if not sd > 1e-12 * max(1.0, abs(mean)):
        sd = abs(mean) if mean != 0.0 else 1.0
    return mean, sd


def _vector(x: ArrayLike, d: int) -> FloatArray:
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if v.shape != (d,):
        raise ValueError(f"x must have {d} features, got shape {np.shape(x)}")
    return v


# -- regression -------------------------------------------------------------------------------
class PooledMean:
    """``pooled-mean``: the mean of the training labels, for every task."""

    name = "pooled-mean"
    kind = "regression"

    def __init__(self, data: TrainingData) -> None:
        self.value = float(np.mean(data.y))

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        return np.asarray(self.value)

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        pass


class PooledLinear:
    """``pooled-linear``: ridge on all training rows, penalty chosen by ``RidgeCV``'s efficient
    leave-one-out on standardised ``x`` and ``y`` (grid :data:`RIDGE_ALPHAS`)."""

    name = "pooled-linear"
    kind = "regression"

    def __init__(self, data: TrainingData) -> None:
        self.d = data.d
        self.scale = _Scale(data.x)
        self.y_mean, self.y_sd = _y_scale(data.y)
        y = (data.y - self.y_mean) / self.y_sd
        cols = np.flatnonzero(self.scale.informative)
        self.coef = np.zeros(self.d)
        self.intercept, self.alpha = 0.0, math.inf  # the pooled mean
        # leave-one-out needs a few rows, a feature that varies and labels that do
        if len(y) >= 3 and len(cols) and np.ptp(y) > 0:
            fit = RidgeCV(alphas=RIDGE_ALPHAS).fit(self.scale(data.x)[:, cols], y)
            self.alpha = float(fit.alpha_)
            self.coef[cols] = np.asarray(fit.coef_, dtype=np.float64).reshape(-1)
            self.intercept = float(fit.intercept_)

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        z = self.scale(_vector(x, self.d))
        return np.asarray(self.y_mean + self.y_sd * (self.intercept + float(z @ self.coef)))

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        pass


class TaskMean:
    """``task-mean``: the running mean of the task's labels (``prior`` before the first)."""

    name = "task-mean"
    kind = "regression"

    def __init__(self, prior: float) -> None:
        self.prior = prior
        self.stats: dict[str, tuple[int, float]] = {}

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        _, mean = self.stats.get(task_id, (0, self.prior))
        return np.asarray(mean)

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        n, mean = self.stats.get(task_id, (0, 0.0))
        self.stats[task_id] = (n + 1, mean + (float(y) - mean) / (n + 1))


class TaskLast:
    """``task-last``: the task's last label (``prior`` before the first)."""

    name = "task-last"
    kind = "regression"

    def __init__(self, prior: float) -> None:
        self.prior = prior
        self.last: dict[str, float] = {}

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        return np.asarray(self.last.get(task_id, self.prior))

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        self.last[task_id] = float(y)


@dataclass(frozen=True)
class MixedModel:
    """A fitted random-intercept-and-slopes model, in standardised units: ``z = [1, x~]`` over
    the informative features, ``y~ = z'(beta + b) + e``, ``b ~ N(0, cov)``,
    ``e ~ N(0, noise)``."""

    beta: FloatArray
    cov: FloatArray
    noise: float
    iterations: int
    converged: bool
    loglik: float
    structure: str = "full"


def _task_sums(
    z: FloatArray, y: FloatArray, task: IntArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Per task (non-empty ones, in index order): ``Z'Z [T, p, p]``, ``Z'y [T, p]``,
    ``y'y [T]``, row counts ``[T]``."""
    _, inv = np.unique(task, return_inverse=True)
    t, p = int(inv.max()) + 1, z.shape[1]
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(t + 1))
    zz = np.empty((t, p, p))
    zy = np.empty((t, p))
    for i in range(t):
        rows = order[bounds[i] : bounds[i + 1]]
        zi = z[rows]
        zz[i] = zi.T @ zi
        zy[i] = zi.T @ y[rows]
    yy = np.bincount(inv, weights=y * y, minlength=t).astype(np.float64)
    n = np.bincount(inv, minlength=t).astype(np.float64)
    return zz, zy, yy, n


def _factor(cov: FloatArray) -> FloatArray:
    """``L`` with ``L L' = cov`` (eigenvalues clipped at 0)."""
    lam, u = np.linalg.eigh((cov + cov.T) / 2)
    out: FloatArray = u * np.sqrt(np.clip(lam, 0.0, None))
    return out


@dataclass
class _Sums:
    """Per-task sufficient statistics of the mixed model: ``S = Z'Z [T, p, p]``,
    ``u = Z'y [T, p]``, ``yy = y'y [T]``, row counts ``n [T]``."""

    s: FloatArray
    u: FloatArray
    yy: FloatArray
    n: FloatArray


def _em_step(
    sums: _Sums,
    beta: FloatArray,
    cov: FloatArray,
    noise: float,
    ridge: float,
    floor: float,
    mask: FloatArray,
) -> tuple[FloatArray, FloatArray, float, float]:
    """One EM step from ``(beta, cov, noise)`` -> the next ones and the log likelihood of the
    current ones (it shares the E-step's factorisations)."""
    s, u, yy, n = sums.s, sums.u, sums.yy, sums.n
    t, p = u.shape
    n_rows = float(n.sum())
    lf = _factor(cov)
    a = np.eye(p) + (lf.T @ s @ lf) / noise  # [T, p, p], eigenvalues >= 1
    a_inv = np.linalg.inv(a)
    logdet = 2 * np.log(np.diagonal(np.linalg.cholesky(a), axis1=1, axis2=2)).sum(1)
    zr = u - s @ beta  # Z'r  [T, p]
    rr = yy - 2 * u @ beta + np.einsum("tj,j->t", s @ beta, beta)  # r'r
    h = zr @ lf  # L'Z'r
    ah = (a_inv @ h[..., None])[..., 0]
    # the log likelihood (determinant lemma, Woodbury) of the current parameters
    quad = rr / noise - np.sum(h * ah, 1) / noise**2
    loglik = -0.5 * float(np.sum(n * math.log(2 * math.pi * noise) + logdet + quad))
    # E-step: posterior means m = L A^-1 L'Z'r / sigma2, covariances C = L A^-1 L'
    m = ah @ lf.T / noise
    c_sum = lf @ a_inv.sum(0) @ lf.T
    sm = np.einsum("tij,tj->ti", s, m)
    # M-step; tr(S C) = tr(L'SL A^-1) = sigma2 (p - tr A^-1)
    new_cov = (m.T @ m + c_sum) / t
    new_cov = mask * (new_cov + new_cov.T) / 2  # the M-step of a structured G: its entries
    rss = rr - 2 * np.sum(m * zr, 1) + np.sum(m * sm, 1)
    trace = noise * (p - np.trace(a_inv, axis1=1, axis2=2))
    new_noise = max(float(np.sum(rss + trace)) / n_rows, floor)
    s_all = s.sum(0) + ridge * n_rows * np.eye(p)
    new_beta = np.linalg.solve(s_all, (u - sm).sum(0))
    return new_beta, new_cov, new_noise, loglik


#: random-effect covariance structures: which entries of ``G`` are free
STRUCTURES = ("intercept", "diagonal", "full")


def _structure_mask(structure: str, p: int) -> FloatArray:
    if structure == "full":
        return np.ones((p, p))
    if structure == "diagonal":
        return np.eye(p)
    if structure == "intercept":
        out = np.zeros((p, p))
        out[0, 0] = 1.0
        return out
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")


def _pack(beta: FloatArray, cov: FloatArray, noise: float) -> FloatArray:
    return np.concatenate([beta, cov.ravel(), [noise]])


def _unpack(theta: FloatArray, p: int, floor: float) -> tuple[FloatArray, FloatArray, float]:
    """Parameters from a vector, made valid: ``cov`` symmetric PSD, ``noise >= floor``."""
    cov = theta[p : p + p * p].reshape(p, p)
    lf = _factor(cov)
    return theta[:p].copy(), lf @ lf.T, max(float(theta[-1]), floor)


def fit_mixed_model(
    z: FloatArray,
    y: FloatArray,
    task: IntArray,
    *,
    structure: str = "full",
    max_iter: int = 300,
    tol: float = 1e-6,
    ll_tol: float = 1e-8,
    noise_floor: float = 1e-6,
    ridge: float = 1e-6,
) -> MixedModel:
    """Maximum-likelihood ``beta``, full ``G`` and ``sigma2`` of ``y = Z(beta + b_task) + e`` by
    EM (Laird and Ware, 1982) from the per-task sums, accelerated by SQUAREM.

    E-step, per task: ``A = I + L'SL / sigma2`` (``G = LL'``, ``S = Z'Z``), posterior
    covariance ``C = L A^-1 L'`` and mean ``m = C Z'r / sigma2`` (``r = y - Z beta``);
    M-step: ``G = mean(m m' + C)``, ``sigma2 = sum(|r - Z m|^2 + tr(S C)) / N``,
    ``beta = (sum S + ridge N)^-1 sum Z'(y - Z m)``.

    EM crawls when a task's rows say little about its effects (few rows, many features, ``G``
    near zero), so every cycle takes two EM steps, extrapolates along them (SQUAREM, Varadhan
    and Roland 2008, scheme S3), projects ``G`` back onto the PSD matrices, and keeps the
    extrapolation only if its likelihood is no worse than the cycle's start (else the two
    plain steps): the likelihood never decreases. Stops when no parameter moves by more than
    ``tol`` in a cycle (the data are standardised, so ``tol`` is absolute), when a cycle gains
    less than ``ll_tol`` nats per row (a likelihood flat along some direction: slope variances
    that trade off against ``sigma2``), or after ``max_iter`` cycles; ``sigma2`` is floored at
    ``noise_floor`` (data a linear model fits exactly).
    """
    sums = _Sums(*_task_sums(z, y, task))
    p = z.shape[1]
    n_rows = float(sums.n.sum())
    beta = np.linalg.solve(sums.s.sum(0) + ridge * n_rows * np.eye(p), sums.u.sum(0))
    resid = float(np.sum((y - z @ beta) ** 2)) / n_rows
    noise = max(0.5 * resid, noise_floor)
    mask = _structure_mask(structure, p)
    cov = 0.5 * max(resid, noise_floor) * np.eye(p) * mask

    def step(th: FloatArray) -> tuple[FloatArray, float]:
        b, g, s2, ll = _em_step(sums, *_unpack(th, p, noise_floor), ridge, noise_floor, mask)
        return _pack(b, g, s2), ll

    theta = _pack(beta, cov, noise)
    converged, cycle, last = False, 0, -math.inf
    for cycle in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        t1, ll0 = step(theta)
        t2, _ = step(t1)
        r, v = t1 - theta, t2 - 2 * t1 + theta
        nv = float(np.linalg.norm(v))
        alpha = min(-float(np.linalg.norm(r)) / nv, -1.0) if nv > 0 else -1.0
        new = t2
        if alpha < -1.0:
            jump = _pack(*_unpack(theta - 2 * alpha * r + alpha**2 * v, p, noise_floor))
            t3, ll_jump = step(jump)
            if np.isfinite(ll_jump) and ll_jump >= ll0:
                new = t3
        moved = float(np.abs(new - theta).max())
        theta = new
        # parameters that stand still, or a likelihood that no longer climbs (a flat ridge)
        if moved < tol or ll0 - last < ll_tol * n_rows:
            converged = True
            break
        last = ll0
    beta, cov, noise = _unpack(theta, p, noise_floor)
    *_, loglik = _em_step(sums, beta, cov, noise, ridge, noise_floor, mask)
    return MixedModel(beta, cov, noise, cycle, converged, loglik, structure)


def select_mixed_model(
    z: FloatArray, y: FloatArray, task: IntArray
) -> tuple[MixedModel, dict[str, float]]:
    """The covariance structure with the lowest BIC, ``-2 loglik + k log T`` (``k`` free
    entries of ``G``, ``T`` tasks), among those with no more free entries than tasks ->
    ``(model, {structure: BIC})``."""
    t = len(np.unique(task))
    p = z.shape[1]
    free = {"intercept": 1, "diagonal": p, "full": p * (p + 1) // 2}
    fits, bic = {}, {}
    for name in STRUCTURES:
        if name == "intercept" or free[name] <= t:
            fits[name] = fit_mixed_model(z, y, task, structure=name)
            bic[name] = -2 * fits[name].loglik + free[name] * math.log(t)
    best = min(bic, key=lambda k: bic[k])
    return fits[best], bic


class TaskRidge:
    """``task-ridge``: the mixed model's prediction for each task (see the module docstring).

    Fitted attributes in the user's units: :attr:`fixed_effects` (intercept at ``x = 0``, then
    one slope per feature), :attr:`task_covariance` (``G`` over the same ``1 + d``
    coefficients; zero rows for features constant in training), :attr:`noise_variance`.
    """

    name = "task-ridge"
    kind = "regression"

    def __init__(self, data: TrainingData, structure: str | None = None) -> None:
        self.d = data.d
        self.scale = _Scale(data.x)
        self.cols = np.flatnonzero(self.scale.informative)
        self.y_mean, self.y_sd = _y_scale(data.y)
        z = self._design(data.x)
        y = (data.y - self.y_mean) / self.y_sd
        if structure is None:
            self.model, self.candidates = select_mixed_model(z, y, data.task)
        else:
            self.model = fit_mixed_model(z, y, data.task, structure=structure)
            self.candidates = {structure: math.nan}
        self.factor = _factor(self.model.cov)
        self.noise = self.model.noise
        p = z.shape[1]
        # per task: (I + L'Z'ZL / sigma2)^-1 and L'Z'r / sigma2
        self.tasks: dict[str, tuple[FloatArray, FloatArray]] = {}
        self._prior = (np.eye(p), np.zeros(p))

    def _design(self, x: FloatArray) -> FloatArray:
        x2 = np.atleast_2d(x)
        xs = self.scale(x2)[:, self.cols]
        return np.concatenate([np.ones((x2.shape[0], 1)), xs], axis=1)

    def _effects(self, task_id: str) -> FloatArray:
        a_inv, h = self.tasks.get(task_id, self._prior)
        out: FloatArray = self.model.beta + self.factor @ (a_inv @ h)
        return out

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        z = self._design(_vector(x, self.d))[0]
        return np.asarray(self.y_mean + self.y_sd * float(z @ self._effects(task_id)))

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        z = self._design(_vector(x, self.d))[0]
        r = (float(y) - self.y_mean) / self.y_sd - float(z @ self.model.beta)
        a_inv, h = self.tasks.get(task_id, self._prior)
        w = self.factor.T @ z / math.sqrt(self.noise)
        aw = a_inv @ w
        a_inv = a_inv - np.outer(aw, aw) / (1.0 + float(w @ aw))  # Sherman-Morrison
        h = h + w * (r / math.sqrt(self.noise))
        self.tasks[task_id] = (a_inv, h)

    # -- the estimates in user units --------------------------------------------------------
    def _to_user(self) -> FloatArray:
        """``[1 + d, p]``: standardised coefficients -> (intercept at x = 0, slopes)."""
        p = 1 + len(self.cols)
        t = np.zeros((1 + self.d, p))
        t[0, 0] = 1.0
        for k, j in enumerate(self.cols):
            t[1 + j, 1 + k] = 1.0 / self.scale.sd[j]
            t[0, 1 + k] = -self.scale.mean[j] / self.scale.sd[j]
        out: FloatArray = self.y_sd * t
        return out

    @property
    def fixed_effects(self) -> FloatArray:
        out = self._to_user() @ self.model.beta
        out[0] += self.y_mean
        return out

    @property
    def task_covariance(self) -> FloatArray:
        t = self._to_user()
        out: FloatArray = t @ self.model.cov @ t.T
        return out

    @property
    def noise_variance(self) -> float:
        return self.noise * self.y_sd**2


# -- classification ---------------------------------------------------------------------------
class PooledFrequency:
    """``pooled-frequency``: training class frequencies (plus half a count per class)."""

    name = "pooled-frequency"
    kind = "classification"

    def __init__(self, data: TrainingData) -> None:
        assert data.n_classes is not None
        counts = np.bincount(data.y, minlength=data.n_classes) + 0.5
        self.probs: FloatArray = counts / counts.sum()

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        return self.probs.copy()

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        pass


class PooledLogistic:
    """``pooled-logistic``: multinomial logistic regression (``C = 1``) on standardised x.
    Classes absent from training get probability 0 (the loss clips it); with a single class
    in training it predicts the pooled frequencies."""

    name = "pooled-logistic"
    kind = "classification"

    def __init__(self, data: TrainingData) -> None:
        assert data.n_classes is not None
        self.d, self.c = data.d, data.n_classes
        self.scale = _Scale(data.x)
        seen = np.unique(data.y)
        self.fallback = PooledFrequency(data).probs
        self.classes = seen
        self.coef: FloatArray | None = None
        self.intercept = np.zeros(len(seen))
        if len(seen) >= 2:
            fit = LogisticRegression(max_iter=1000).fit(self.scale(data.x), data.y)
            coef = np.asarray(fit.coef_, dtype=np.float64)
            icpt = np.asarray(fit.intercept_, dtype=np.float64)
            if len(seen) == 2:  # binary: one logit for the second class
                coef = np.concatenate([np.zeros_like(coef), coef])
                icpt = np.concatenate([np.zeros(1), icpt])
            self.coef, self.intercept = coef, icpt

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        if self.coef is None:
            return self.fallback.copy()
        logits = self.coef @ self.scale(_vector(x, self.d)) + self.intercept
        e = np.exp(logits - logits.max())
        out = np.zeros(self.c)
        out[self.classes] = e / e.sum()
        return out

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        pass


def dirichlet_strength(
    counts: NDArray[Any], prior: FloatArray, grid: Sequence[float] = PRIOR_STRENGTHS
) -> tuple[float, dict[float, float]]:
    """The prior strength ``alpha`` in ``grid`` that maximises the Dirichlet-multinomial log
    likelihood of the tasks' class ``counts [T, C]`` under ``Dir(alpha * prior)``: the log of
    the product of the sequential predictions ``(n_c + alpha prior_c) / (n + alpha)``, whatever
    the order -> ``(alpha, {alpha: log likelihood})``."""
    n = counts.sum(1)
    table = {}
    for a in grid:
        ap = a * prior
        ll = (gammaln(counts + ap) - gammaln(ap)).sum(1) - (gammaln(n + a) - gammaln(a))
        table[a] = float(ll.sum())
    best = max(grid, key=lambda a: table[a])
    return best, table


class TaskFrequency:
    """``task-frequency``: the task's class counts plus ``alpha * prior`` pseudo-counts,
    ``alpha`` from :func:`dirichlet_strength` on the training tasks."""

    name = "task-frequency"
    kind = "classification"

    def __init__(self, data: TrainingData, prior: FloatArray) -> None:
        assert data.n_classes is not None
        self.prior = prior
        _, inv = np.unique(data.task, return_inverse=True)
        counts = np.zeros((int(inv.max()) + 1, data.n_classes))
        np.add.at(counts, (inv, data.y), 1.0)
        self.strength, self.likelihoods = dirichlet_strength(counts, prior)
        self.counts: dict[str, FloatArray] = {}

    def predict(self, task_id: str, x: ArrayLike) -> FloatArray:
        pseudo = self.strength * self.prior
        n = self.counts.get(task_id)
        total = pseudo if n is None else pseudo + n
        out: FloatArray = total / total.sum()
        return out

    def learn(self, task_id: str, x: ArrayLike, y: Label) -> None:
        n = self.counts.setdefault(task_id, np.zeros(len(self.prior)))
        n[int(y)] += 1.0
