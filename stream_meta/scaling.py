"""User units <-> the meta-model's units: the scaling a checkpoint carries.

Users send raw features and labels (grams, counts, prices); the meta-model learns and adapts in
standardised units. :class:`Scaling` holds the map between the two as buffers of the model, so
it travels inside every checkpoint, every published model version and every meta-update (a
candidate is a copy of the served model: same scaling), and every prediction and loss the
service reports is in the user's units.

* inputs: ``x_std = (x - x_shift) / x_scale`` per feature;
* an *offset*, the population's linear prediction ``y_shift + x_std @ y_coef`` (``[y_dim]``),
  fitted on the training tasks (a pooled ridge for regression, a pooled logistic regression's
  logits for classification);
* regression targets are the residuals over the offset in units of ``y_scale``:
  ``y_std = (y - offset) / y_scale``, and a prediction ``out`` maps back to
  ``offset + y_scale * out``. The model therefore learns what a task adds to the population's
  linear fit, and with no example (its prior) starts from that fit: cold start is the pooled
  linear model, not a guess;
* classification logits get the offset added (the pooled logistic model's log-odds).

The defaults are the identity (shift 0, scale 1, no offset): the shipped families' checkpoints,
trained before scaling existed, load unchanged.

>>> import torch
>>> s = Scaling(x_dim=2, y_dim=1)
>>> s.set(x_shift=[1.0, 2.0], x_scale=[2.0, 4.0], y_shift=[10.0], y_coef=[[3.0], [0.0]],
...       y_scale=5.0)
>>> x, y = torch.tensor([[3.0, 6.0]]), torch.tensor([18.0])
>>> x_std = s.inputs(x)
>>> x_std.tolist(), s.targets(x_std, y).tolist()
([[1.0, 1.0]], [1.0])
>>> s.outputs(x_std, s.targets(x_std, y)).tolist()
[18.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Scaling"]


class Scaling(nn.Module):
    """Feature standardisation and the population offset of the labels (buffers only)."""

    def __init__(self, x_dim: int, y_dim: int, *, regression: bool = True) -> None:
        super().__init__()
        self.regression = regression
        self.register_buffer("x_shift", torch.zeros(x_dim))
        self.register_buffer("x_scale", torch.ones(x_dim))
        self.register_buffer("y_shift", torch.zeros(y_dim))
        self.register_buffer("y_coef", torch.zeros(x_dim, y_dim))
        self.register_buffer("y_scale", torch.ones(()))

    x_shift: torch.Tensor
    x_scale: torch.Tensor
    y_shift: torch.Tensor
    y_coef: torch.Tensor
    y_scale: torch.Tensor

    def set(self, **values: Any) -> None:
        """Set some of the statistics (lists or tensors of the buffers' shapes)."""
        for name, value in values.items():
            buf = getattr(self, name)
            new = torch.as_tensor(value, dtype=buf.dtype).reshape(buf.shape)
            if not bool(torch.isfinite(new).all()):
                raise ValueError(f"scaling {name} must be finite")
            if name in ("x_scale", "y_scale") and not bool((new > 0).all()):
                raise ValueError(f"scaling {name} must be > 0")
            buf.copy_(new)

    def to_dict(self) -> dict[str, Any]:
        """The statistics as JSON-ready lists (for a checkpoint's manifest)."""
        return {name: buf.tolist() for name, buf in self.named_buffers()}

    @property
    def is_identity(self) -> bool:
        return bool(
            (self.x_shift == 0).all()
            and (self.x_scale == 1).all()
            and (self.y_shift == 0).all()
            and (self.y_coef == 0).all()
            and self.y_scale == 1
        )

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., x_dim]`` user features -> standardised features."""
        return (x - self.x_shift) / self.x_scale

    def offset(self, x_std: torch.Tensor) -> torch.Tensor:
        """The population's linear prediction ``[..., y_dim]`` of standardised inputs."""
        return x_std @ self.y_coef + self.y_shift

    def targets(self, x_std: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Labels -> the model's targets: regression residuals over the offset in ``y_scale``
        units; class labels unchanged."""
        if not self.regression:
            return y
        return (y.to(x_std.dtype) - self.offset(x_std)[..., 0]) / self.y_scale

    def outputs(self, x_std: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The model's outputs -> user units: a regression value ``[...]``, or class logits
        ``[..., C]`` with the population's log-odds added."""
        if self.regression:
            return self.offset(x_std)[..., 0] + self.y_scale * out
        return out + self.offset(x_std)

    def loss_scale(self) -> torch.Tensor:
        """What a squared error in user units is divided by to be in the model's units."""
        return self.y_scale**2 if self.regression else torch.ones(())


def fit_scaling(
    x: Any,
    y: Any,
    *,
    kind: str,
    n_classes: int | None = None,
    max_rows: int = 200_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The statistics of a :class:`Scaling`, fitted on training rows ``x [N, d]``, ``y [N]``.

    Features: mean and standard deviation (a constant feature keeps scale 1). Regression: a
    pooled ridge on the standardised features (the penalty chosen by leave-one-out, scikit-learn's
    ``RidgeCV``), ``y_scale`` the standard deviation of its residuals. Classification: a pooled
    multinomial logistic regression's coefficients and intercepts (``y_scale`` 1). At most
    ``max_rows`` rows (a seeded random subset) are used: plenty for ``d + 1`` coefficients.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(5.0, 2.0, size=(500, 1))
    >>> stats = fit_scaling(x, 1000.0 + 30.0 * x[:, 0] + rng.normal(0, 3.0, 500), kind="regression")
    >>> bool(np.isclose(stats["x_shift"][0], x.mean()) and np.isclose(stats["x_scale"][0], x.std()))
    True
    >>> slope = stats["y_coef"][0][0] / stats["x_scale"][0]  # per unit of x: the true 30
    >>> round(slope, 1), round(stats["y_scale"])
    (30.0, 3)
    """
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if len(x) > max_rows:
        keep = np.random.default_rng(seed).choice(len(x), max_rows, replace=False)
        x, y = x[keep], y[keep]
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    xs = (x - mean) / std
    stats: dict[str, Any] = {"x_shift": mean.tolist(), "x_scale": std.tolist()}
    if kind == "regression":
        from sklearn.linear_model import RidgeCV

        yf = y.astype(np.float64)
        ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(xs, yf)
        resid = yf - ridge.predict(xs)
        scale = float(resid.std())
        floor = 1e-6 * max(1.0, float(np.abs(yf).max()))
        stats.update(
            y_shift=[float(ridge.intercept_)],
            y_coef=[[float(c)] for c in np.ravel(ridge.coef_)],
            y_scale=max(scale, floor),
        )
        return stats
    from sklearn.linear_model import LogisticRegression

    c = int(n_classes or 0)
    labels = y.astype(np.int64)
    present = np.unique(labels)
    shift = np.zeros(c)
    coef = np.zeros((xs.shape[1], c))
    if len(present) >= 2:
        lr = LogisticRegression(max_iter=1000).fit(xs, labels)
        if len(lr.classes_) == 2:  # one decision function: logits [0, z]
            coef[:, lr.classes_[1]] = lr.coef_[0]
            shift[lr.classes_[1]] = lr.intercept_[0]
        else:
            coef[:, lr.classes_] = lr.coef_.T
            shift[lr.classes_] = lr.intercept_
    counts = np.bincount(labels, minlength=c)
    absent = counts == 0  # never seen: a small prior probability, not -inf
    shift[absent] = float(np.log(0.5 / (len(labels) + 1)))
    stats.update(y_shift=shift.tolist(), y_coef=coef.tolist(), y_scale=1.0)
    return stats
