"""Predictive uncertainty: the head posterior's variance, its calibration, and how it is scored.

The closed-form head is a Bayesian linear regression on the body's features ``phi(x) [F]``:
with ``G = beta Phi^T Phi + Lambda0`` (the posterior precision, ``G = L L^T``) its predictive
variance in model units is ``phi^T G^{-1} phi + 1 / beta``: what the head does not know yet
(*epistemic*, ``||L^{-1} phi||^2``) plus the observation noise. Three things make the raw
value a poor interval: the meta-trained noise ``1 / beta`` is the *average* squared error over
the training shots (0.1 for the shipped sinusoid model, whose tasks have no noise and whose
20-shot error is 0.001); the prior ``Lambda0`` was trained for the mean, not for the spread
(the raw 0-shot variance is 40x the 0-shot error); and one noise level cannot fit tasks whose
own spread differs (a shifted family). So the served variance is (:class:`Calibration`)::

    var = s * (a * phi^T G^{-1} phi + c / beta)     (a: ``var_scale``, c: ``noise_scale``)

where ``s`` is the task's own scale, estimated from how far its examples stray from what the
prior expected (Normal-inverse-gamma regression: ``s = (1 + k M) / (1 + k n)`` for the support
set's Mahalanobis misfit ``M`` over ``n`` examples, ``k``: ``scale_rate``), widened to the
Student-t's central 90% interval that an estimated scale implies at few examples
(:func:`t_interval_factor`). ``a``, ``c`` and ``k`` are fitted by maximum Gaussian likelihood
on held-out query points of episodes across support sizes (:func:`fit_variance_calibration`;
at the end of ``stream-meta train`` and ``train --data``), and the standard deviation is served
in user units (``y_scale * sqrt(var)``). The defaults (1, 1, 0) are the exact Bayesian
predictive: a checkpoint from before calibration existed loads as that.

Measured on the shipped sinusoid model (``scripts/calibrate_checkpoints.py``, 300 held-out
tasks per shot count in 0, 1, 2, 5, 10, 20, 40): the central 90% interval covers 93.0% of the
labels in distribution, 89.8% with the phase in ``[pi, 2 pi]`` and 84.5% with the amplitude
in ``[5, 10]`` (63% of those at 0 shots, where nothing shows the task is wilder; 73-96% from 1
shot on), where the uncalibrated variance covers 100% everywhere. Two variants fitted worse:
``a`` and ``c`` alone (no task scale) cover 87% in distribution but 55% on the amplitude
shift; the scale without the t tails covers 1-shot labels only 72% of the time.

A cached weight row carries the posterior beside the weights: ``L`` (``F x F``) and the
task's scale ``s``. Serving a query is then one triangular solve, ``var_epi = ||L^{-1}
phi||^2``, never a negative variance. A prediction that
averages several heads (candidates, experts) must report the mixture's variance, not the mean
of theirs (:func:`mixture_moments`).

Scoring (the replay report and the calibration checks): a regression label's standardised
residual ``z = (y - mean) / std`` is inside the central ``p`` interval when
``|z| <= Phi^{-1}((1 + p) / 2)`` (1.645 for 90%); the *calibration error* is the mean
``|empirical - nominal|`` coverage over the levels 0.1, ..., 0.9. A classifier's is the
expected calibration error of its top-class probability over 15 equal-width bins.

>>> import numpy as np
>>> z = np.array([0.1, -0.5, 1.0, 2.0, -3.0])
>>> central_coverage(z, 0.9)
0.6
>>> expected_calibration_error(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 1, 1, 0]))
0.1
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch
from torch import nn

__all__ = [
    "CALIBRATION_LEVELS",
    "Z90",
    "Calibration",
    "central_coverage",
    "expected_calibration_error",
    "fit_variance_calibration",
    "mixture_moments",
    "regression_calibration_error",
    "t_interval_factor",
]

#: the central levels whose coverage the calibration error averages over
CALIBRATION_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))
#: half-width of the central 90% interval of a standard normal
Z90 = NormalDist().inv_cdf(0.95)
#: the 95% quantile of Student's t with 1..32 degrees of freedom (beyond: Cornish-Fisher)
T95 = (
    6.3138, 2.92, 2.3534, 2.1318, 2.015, 1.9432, 1.8946, 1.8595, 1.8331, 1.8125, 1.7959,
    1.7823, 1.7709, 1.7613, 1.7531, 1.7459, 1.7396, 1.7341, 1.7291, 1.7247, 1.7207, 1.7171,
    1.7139, 1.7109, 1.7081, 1.7056, 1.7033, 1.7011, 1.6991, 1.6973, 1.6955, 1.6939,
)  # fmt: skip


def t_interval_factor(dof: torch.Tensor) -> torch.Tensor:
    """``(t_dof(0.95) / z(0.95))**2``: what a Gaussian variance is multiplied by so that its
    central 90% interval is a Student-t's with ``dof`` degrees of freedom (linear between the
    tabulated integers; 1 where ``dof < 1``, where the caller has no estimate to be unsure of).

    >>> t_interval_factor(torch.tensor([0.0, 1.0, 1.5, 100.0])).round(decimals=3).tolist()
    [1.0, 14.734, 7.879, 1.019]
    """
    dof = dof.to(torch.float64)
    table = torch.tensor(T95, dtype=torch.float64, device=dof.device)
    n = dof.clamp(1.0, float(len(T95)))
    lo = n.floor().long().clamp(max=len(T95) - 1)
    frac = n - lo.to(n.dtype)
    hi = (lo + 1).clamp(max=len(T95))
    t_tab = table[lo - 1] * (1 - frac) + table[hi - 1] * frac
    z = Z90
    big = dof.clamp(min=1.0)
    t_cf = (
        z + (z**3 + z) / (4 * big) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * big**2)
    )  # Cornish-Fisher: within 1e-4 of the exact quantile beyond 32
    t = torch.where(dof > len(T95), t_cf, t_tab)
    return torch.where(dof < 1.0, torch.ones_like(dof), (t / z) ** 2)


class Calibration(nn.Module):
    """The fitted numbers of the served variance (buffers, so they travel in every
    checkpoint): ``var = s * (var_scale * epistemic + noise_scale / beta)``, ``s`` the task's
    scale (:meth:`task_scale`, from its support set's misfit and ``scale_rate``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("var_scale", torch.ones(()))
        self.register_buffer("noise_scale", torch.ones(()))
        self.register_buffer("scale_rate", torch.zeros(()))

    var_scale: torch.Tensor
    noise_scale: torch.Tensor
    scale_rate: torch.Tensor

    def set(self, var_scale: float, noise_scale: float, scale_rate: float = 0.0) -> None:
        values = (("var_scale", var_scale), ("noise_scale", noise_scale))
        for name, value in values:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"calibration {name} must be finite and > 0, got {value}")
        if not (math.isfinite(scale_rate) and scale_rate >= 0):
            raise ValueError(f"calibration scale_rate must be finite and >= 0, got {scale_rate}")
        for name, value in (*values, ("scale_rate", scale_rate)):
            getattr(self, name).fill_(float(value))

    def task_scale(self, misfit: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
        """The task's variance scale ``(1 + k * misfit) / (1 + k * shots)`` (``k``:
        ``scale_rate``), times :func:`t_interval_factor` of ``shots``.

        The first part is the posterior mean of a per-task noise scale under an inverse-gamma
        prior of ``1 / k`` pseudo-examples centred on 1 (Normal-inverse-gamma regression).
        ``misfit`` is chi-squared with ``shots`` degrees of freedom when the task is as the
        prior says, so the scale stays 1 for such a task and follows a task that its examples
        show to be wilder (a shifted family) or tamer than the training tasks were on average.
        With the scale estimated from ``shots`` examples the predictive is a Student-t (``1/k
        + shots`` degrees of freedom; the fitted ``1/k`` is ~0.02, so ``shots``): the factor
        widens the Gaussian so its central 90% interval is the t's (x14.7 at one example,
        x1.5 at five, x1.1 at twenty). ``k = 0``: always 1 (the Gaussian predictive)."""
        k = self.scale_rate
        scale = (1.0 + k * misfit) / (1.0 + k * shots)
        if float(k) == 0.0:
            return scale
        return scale * t_interval_factor(shots).to(scale.dtype)

    def variance(
        self, epistemic: torch.Tensor, noise_var: torch.Tensor, scale: torch.Tensor | float = 1.0
    ) -> torch.Tensor:
        """Calibrated predictive variance (model units) from the head's epistemic variance."""
        return scale * (self.var_scale * epistemic + self.noise_scale * noise_var)

    def to_dict(self) -> dict[str, float]:
        return {name: float(buf) for name, buf in self.named_buffers()}


def fit_variance_calibration(
    epistemic: np.ndarray,
    noise_var: float,
    sq_err: np.ndarray,
    misfit: np.ndarray | None = None,
    shots: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """``(var_scale, noise_scale, scale_rate)`` maximising the Gaussian likelihood of
    held-out squared errors ``sq_err [M]`` under :class:`Calibration`'s variance (model
    units), each point with its head's ``epistemic`` variance and its task's support
    ``misfit`` and ``shots`` (without them ``scale_rate`` stays 0).

    Not convex, but smooth in the parameters' logarithms: L-BFGS from the best point of a
    coarse grid (so it cannot start in a flat corner). Non-finite points are ignored.

    >>> rng = np.random.default_rng(0)
    >>> epi = rng.uniform(0.0, 2.0, 20000)
    >>> err = rng.normal(0.0, np.sqrt(3.0 * epi + 0.5 * 0.2)) ** 2
    >>> a, c, k = fit_variance_calibration(epi, 0.2, err)
    >>> round(a, 1), round(c, 1), k
    (3.0, 0.5, 0.0)
    """
    epi = np.asarray(epistemic, dtype=np.float64)
    err = np.asarray(sq_err, dtype=np.float64)
    with_scale = misfit is not None and shots is not None
    fit = np.asarray(misfit if with_scale else np.zeros_like(epi), dtype=np.float64)
    n = np.asarray(shots if with_scale else np.zeros_like(epi), dtype=np.float64)
    keep = np.isfinite(epi) & np.isfinite(err) & np.isfinite(fit) & np.isfinite(n)
    if not keep.any():
        raise ValueError("no finite held-out error to calibrate on")
    e_t, r_t, f_t, n_t = (torch.from_numpy(np.maximum(v[keep], 0.0)) for v in (epi, err, fit, n))
    nv = max(float(noise_var), 1e-12)

    tails = t_interval_factor(n_t) if with_scale else torch.ones_like(n_t)

    def nll(t: torch.Tensor) -> torch.Tensor:
        k = torch.exp(t[2]) if with_scale else t.new_zeros(())
        scale = tails * (1 + k * f_t) / (1 + k * n_t)
        v = (torch.exp(t[0]) * e_t + torch.exp(t[1]) * nv) * scale
        v = v.clamp(min=1e-30)
        return torch.mean(torch.log(v) + r_t / v)

    grid = np.linspace(-9.0, 5.0, 15)
    rates = np.linspace(-6.0, 6.0, 7) if with_scale else np.zeros(1)
    with torch.no_grad():
        start = min(
            ((u, w, q) for u in grid for w in grid for q in rates),
            key=lambda p: float(nll(torch.tensor(p, dtype=torch.float64))),
        )
    t = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [t], max_iter=500, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(t)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    best = t.detach()
    with torch.no_grad():
        first = torch.tensor(start, dtype=torch.float64)
        # L-BFGS can step off a cliff on a few points (seen: 110 training rows): keep the
        # grid's best point unless the refinement is finite and no worse
        if not (torch.isfinite(best).all() and float(nll(best)) <= float(nll(first))):
            best = first
    a, c, k = (float(v) for v in torch.exp(best))
    return a, c, k if with_scale else 0.0


# -- scoring ---------------------------------------------------------------------------------
def _finite(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z[np.isfinite(z)]


def central_coverage(z: np.ndarray, level: float = 0.9) -> float | None:
    """Share of standardised residuals ``z = (y - mean) / std`` inside the central ``level``
    interval of a normal (``None`` without any finite one)."""
    z = _finite(z)
    if len(z) == 0:
        return None
    half = NormalDist().inv_cdf(0.5 + level / 2)
    return float(np.mean(np.abs(z) <= half))


def regression_calibration_error(
    z: np.ndarray, levels: tuple[float, ...] = CALIBRATION_LEVELS
) -> float | None:
    """Mean ``|empirical - nominal|`` coverage of the central intervals at ``levels``.

    >>> regression_calibration_error(np.zeros(10))  # every interval covers everything
    0.5
    """
    z = _finite(z)
    if len(z) == 0:
        return None
    errs = [abs(float(np.mean(np.abs(z) <= NormalDist().inv_cdf(0.5 + p / 2))) - p) for p in levels]
    return round(float(np.mean(errs)), 12)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15
) -> float | None:
    """Expected calibration error of top-class probabilities ``confidence [M]`` against
    whether the top class was right ``correct [M]``: the count-weighted mean over ``bins``
    equal-width bins of ``|accuracy - mean confidence|`` (Guo et al., 2017)."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if len(conf) == 0:
        return None
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(idx).tolist():
        sel = idx == b
        total += float(sel.sum()) * abs(float(hit[sel].mean()) - float(conf[sel].mean()))
    return round(total / len(conf), 12)


def mixture_moments(
    means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a mixture of Gaussians over its last axis (law of total
    variance): ``E[var] + Var[mean]``; what a prediction averaged over candidate heads or
    experts must report as its variance, not the average of theirs.

    >>> m, v = mixture_moments(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]]),
    ...                        torch.tensor([[0.5, 0.5]]))
    >>> m.tolist(), v.tolist()
    ([1.0], [2.0])
    """
    w = weights / weights.sum(dim=-1, keepdim=True)
    mean = (w * means).sum(dim=-1)
    var = (w * (variances + (means - mean.unsqueeze(-1)) ** 2)).sum(dim=-1)
    return mean, var
