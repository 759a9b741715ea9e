"""The task-family contract shared by training, evaluation and the stream.

A *family* is a distribution over tasks. Each task is described by one row of a float parameter
array (``[B, p]``), so that whole batches of tasks are drawn, perturbed and sampled in one
vectorised call. Every method takes its randomness from an explicit ``np.random.Generator``.

>>> import numpy as np
>>> from stream_meta.tasks import SinusoidFamily, TaskFamily
>>> family = SinusoidFamily()
>>> rng = np.random.default_rng(0)
>>> params = family.sample_params(4, rng)  # [B, p]
>>> params.shape
(4, 2)
>>> x, y = family.sample(params, 10, rng)
>>> x.shape, x.dtype.name, y.shape, y.dtype.name
((4, 10, 1), 'float32', (4, 10), 'float32')
>>> isinstance(family, TaskFamily), family.y_dim, family.loss_name, family.metric_name
(True, 1, 'mse', 'mse')
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = ["FloatArray", "Kind", "Regression1DFamily", "TaskFamily"]

Kind = Literal["regression", "classification"]
FloatArray = NDArray[np.float64]


class TaskFamily(abc.ABC):
    """A distribution over tasks; tasks are rows of a ``[B, p]`` float parameter array.

    Attributes:
        name: registry name of the family (``"sinusoid"``, ``"digits"``).
        x_dim: dimension of one input ``x``.
        kind: ``"regression"`` (``y`` float32) or ``"classification"`` (``y`` int64 labels).
        n_classes: number of classes of a task (its n-way), ``None`` for regression.
        param_names: one name per column of the parameter array.
    """

    name: ClassVar[str]
    x_dim: int
    kind: Kind
    n_classes: int | None
    param_names: tuple[str, ...]

    @property
    def param_dim(self) -> int:
        """``p``, the number of columns of a parameter array."""
        return len(self.param_names)

    @property
    def y_dim(self) -> int:
        """Width of a model's output: 1 for regression, ``n_classes`` (one-hot) otherwise."""
        return 1 if self.n_classes is None else self.n_classes

    @property
    def loss_name(self) -> str:
        """The training loss: ``"mse"`` or ``"cross_entropy"``."""
        return "mse" if self.kind == "regression" else "cross_entropy"

    @property
    def metric_name(self) -> str:
        """The reported metric: ``"mse"`` (lower is better) or ``"accuracy"``."""
        return "mse" if self.kind == "regression" else "accuracy"

    @abc.abstractmethod
    def sample_params(self, n: int, rng: np.random.Generator) -> FloatArray:
        """Draw ``n`` task descriptors ``[n, p]`` from the family's distribution."""

    @abc.abstractmethod
    def perturb(self, params: FloatArray, spread: float, rng: np.random.Generator) -> FloatArray:
        """Similar tasks ``[n, p]``: each row moved by ``spread`` (relative; 0 = the same task)."""

    @abc.abstractmethod
    def sample(
        self,
        params: FloatArray,
        n: int,
        rng: np.random.Generator,
        *,
        per_class: bool = False,
    ) -> tuple[NDArray[np.float32], NDArray[Any]]:
        """Draw examples of each task.

        Args:
            params: ``[B, p]`` task descriptors.
            n: examples per task, or per class and task when ``per_class`` is true.
            rng: the only source of randomness.
            per_class: classification only: ``n`` examples of every class (a balanced K-shot
                set, ``n_total = n * n_classes``), in shuffled order.

        Returns:
            ``x [B, n_total, x_dim]`` float32 and ``y [B, n_total]``: float32 targets
            (regression) or int64 labels in ``[0, n_classes)`` (classification).
        """

    def sample_episode(
        self, params: FloatArray, shots: int, queries: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[Any], NDArray[np.float32], NDArray[Any]]:
        """A support set and a query set for each task, drawn together.

        Classification episodes are balanced (``shots`` / ``queries`` examples of every class),
        and support and query hold distinct draws (for digits: distinct images while the split
        has enough of them).

        Returns:
            ``xs [B, S, x_dim]``, ``ys [B, S]``, ``xq [B, Q, x_dim]``, ``yq [B, Q]`` with
            ``S = shots`` and ``Q = queries`` (times ``n_classes`` for classification).
        """
        if shots < 0 or queries < 0:
            raise ValueError(f"shots and queries must be >= 0, got {shots} and {queries}")
        if self.n_classes is None:
            x, y = self.sample(params, shots + queries, rng)
            return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]
        x, y = self.sample(params, shots + queries, rng, per_class=True)
        b, c, m = x.shape[0], self.n_classes, shots + queries
        # Group by label (stable: the within-class order is already random), then split.
        order = np.argsort(y, axis=1, kind="stable")
        x = np.take_along_axis(x, order[..., None], axis=1).reshape(b, c, m, self.x_dim)
        y = np.take_along_axis(y, order, axis=1).reshape(b, c, m)

        def part(sl: slice, k: int) -> tuple[NDArray[np.float32], NDArray[Any]]:
            xp = x[:, :, sl].reshape(b, c * k, self.x_dim)
            yp = y[:, :, sl].reshape(b, c * k)
            perm = rng.permuted(np.broadcast_to(np.arange(c * k), (b, c * k)), axis=1)
            return np.take_along_axis(xp, perm[..., None], axis=1), np.take_along_axis(yp, perm, 1)

        xs, ys = part(slice(0, shots), shots)
        xq, yq = part(slice(shots, m), queries)
        return xs, ys, xq, yq

    def check_params(self, params: FloatArray) -> FloatArray:
        """Validate a ``[B, p]`` parameter array once, where it enters; returns it as float64."""
        arr = np.asarray(params, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.param_dim:
            raise ValueError(
                f"{self.name}: params must have shape [B, {self.param_dim}] "
                f"({', '.join(self.param_names)}), got {arr.shape}"
            )
        return arr

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""


def check_range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    """Validate a ``(low, high)`` pair with ``low <= high``; returns it as floats."""
    lo, hi = (float(v) for v in bounds)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name} must be a finite (low, high) with low <= high, got {bounds}")
    return lo, hi


class Regression1DFamily(TaskFamily):
    """A 1-d regression family: ``x ~ U[x_range]``, ``y = function(params, x)`` plus Gaussian
    noise of ``noise_std``. Subclasses set ``x_range`` and ``noise_std`` and define
    :meth:`function`; ``sample`` and the validated ``evaluate`` come from here."""

    x_dim = 1
    kind: Kind = "regression"
    n_classes = None
    x_range: tuple[float, float]
    noise_std: float

    @abc.abstractmethod
    def function(self, params: FloatArray, x: NDArray[np.floating]) -> NDArray[np.floating]:
        """The task functions: ``params [B, p]``, ``x [B, n]`` -> ``y [B, n]``."""

    def evaluate(self, params: FloatArray, x: NDArray[np.floating]) -> NDArray[np.float32]:
        """The true, noiseless function: ``params [B, p]``, ``x [B, n, 1]`` -> ``y [B, n]``."""
        params = self.check_params(params)
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != params.shape[0] or x.shape[2] != 1:
            raise ValueError(f"x must have shape [{params.shape[0]}, n, 1], got {x.shape}")
        return np.asarray(self.function(params, x[..., 0]), dtype=np.float32)

    def sample(
        self,
        params: FloatArray,
        n: int,
        rng: np.random.Generator,
        *,
        per_class: bool = False,
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """``x [B, n, 1]`` uniform over ``x_range`` and ``y [B, n]`` (plus noise if set)."""
        if per_class:
            raise ValueError("per_class sampling needs a classification family")
        params = self.check_params(params)
        lo, hi = self.x_range
        x = rng.random((params.shape[0], n, 1), dtype=np.float32)
        x *= np.float32(hi - lo)
        x += np.float32(lo)
        y = self.evaluate(params, x)
        if self.noise_std > 0:
            y += np.float32(self.noise_std) * rng.standard_normal(y.shape, dtype=np.float32)
        return x, y
