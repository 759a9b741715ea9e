"""More 1-D regression families (and a mixture of them), for drift scenarios.

The shipped sinusoid model never saw these functions; a scenario switches its stream to them to
make the task distribution change under the model. Every family here has ``x_dim = 1``, draws
``x ~ U[-5, 5]`` (``x_range``) and keeps ``|y|`` within about 5 there with its default ranges,
like :class:`~stream_meta.tasks.SinusoidFamily`:

================  ==========================================  ==============================
family            function                                    default ranges
================  ==========================================  ==============================
linear            ``y = a x + b``                             ``a ~ U[-0.5, 0.5]``,
                                                              ``b ~ U[-2.5, 2.5]``
quadratic         ``y = a x^2 + b x + c``                     ``a ~ U[-0.12, 0.12]``,
                                                              ``b ~ U[-0.3, 0.3]``,
                                                              ``c ~ U[-0.5, 0.5]``
square_wave       ``y = A sign(sin(x - phase))``              ``A ~ U[0.1, 5]``,
                                                              ``phase ~ U[0, pi]``
mixture           each task from one component family         equal weights by default
================  ==========================================  ==============================

(``|y| <= 0.5 * 5 + 2.5 = 5`` for the line, ``<= 0.12 * 25 + 0.3 * 5 + 0.5 = 5`` for the
parabola.) :class:`TransformedDigitsFamily` is :class:`~stream_meta.tasks.DigitsFamily` with some
transform ranges replaced (for example rotations no split ever used).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> family = MixtureFamily([LinearFamily(), QuadraticFamily(), SquareWaveFamily()])
>>> params = family.sample_params(6, rng)  # [B, 1 + 3]: component, then its parameters
>>> params.shape
(6, 4)
>>> x, y = family.sample(params, 50, rng)
>>> x.shape, y.shape, y.dtype.name
((6, 50, 1), (6, 50), 'float32')
>>> bool(np.abs(y).max() <= 5.0 + 1e-5)
True
>>> bool(np.allclose(y, family.evaluate(params, x)))
True
>>> line = LinearFamily()
>>> line.evaluate(np.array([[2.0, 1.0]]), np.array([[[0.0], [1.5]]], dtype=np.float32)).tolist()
[[1.0, 4.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.base import FloatArray, Regression1DFamily, TaskFamily, check_range
from stream_meta.tasks.digits import TRANSFORM_NAMES, DigitsFamily, Split, TransformRange

__all__ = [
    "LinearFamily",
    "MixtureFamily",
    "QuadraticFamily",
    "SquareWaveFamily",
    "TransformedDigitsFamily",
    "UniformRegressionFamily",
]


class UniformRegressionFamily(Regression1DFamily):
    """A 1-D regression family whose parameters are independent uniforms over given ranges.

    Subclasses set ``name`` and ``param_names`` and implement :meth:`function`; the constructor
    takes one ``(low, high)`` range per parameter (``ranges``), the input range and the noise.
    ``perturb`` takes Gaussian steps of ``spread`` times each range's width, clipped to the range.

    Args:
        ranges: ``(low, high)`` per parameter, in ``param_names`` order.
        x_range: range of the uniform input distribution.
        noise_std: standard deviation of Gaussian noise added to the sampled ``y``.
    """

    def __init__(
        self,
        ranges: Sequence[tuple[float, float]],
        *,
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        if len(ranges) != len(self.param_names):
            raise ValueError(
                f"{self.name}: expected {len(self.param_names)} ranges "
                f"({', '.join(self.param_names)}), got {len(ranges)}"
            )
        self.ranges = tuple(
            check_range(n, r) for n, r in zip(self.param_names, ranges, strict=True)
        )
        self.x_range = check_range("x_range", x_range)
        if not noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = float(noise_std)
        self._low = np.array([lo for lo, _ in self.ranges])
        self._width = np.array([hi - lo for lo, hi in self.ranges])

    def _describe(self) -> str:
        fields = ", ".join(f"{n}={r}" for n, r in zip(self.param_names, self.ranges, strict=True))
        return f"{fields}, x_range={self.x_range}, noise_std={self.noise_std}"

    def sample_params(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``[n, p]``, every column uniform over its range."""
        out: FloatArray = self._low + self._width * rng.random((n, self.param_dim))
        return out

    def perturb(self, params: FloatArray, spread: float, rng: np.random.Generator) -> FloatArray:
        """Gaussian steps of ``spread`` times each range's width, clipped to the range."""
        params = self.check_params(params)
        if spread < 0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        if spread == 0:
            return params.copy()
        out = params + rng.standard_normal(params.shape) * (spread * self._width)
        clipped: FloatArray = np.clip(out, self._low, self._low + self._width)
        return clipped


class LinearFamily(UniformRegressionFamily):
    """``y = a x + b``; params ``[B, 2]`` = (slope, intercept); see the module docstring."""

    name: ClassVar[str] = "linear"
    param_names = ("slope", "intercept")

    def __init__(
        self,
        *,
        slope: tuple[float, float] = (-0.5, 0.5),
        intercept: tuple[float, float] = (-2.5, 2.5),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        super().__init__((slope, intercept), x_range=x_range, noise_std=noise_std)

    def function(self, params: FloatArray, x: NDArray[np.floating]) -> NDArray[np.floating]:
        out: NDArray[np.floating] = params[:, 0:1] * x + params[:, 1:2]
        return out


class QuadraticFamily(UniformRegressionFamily):
    """``y = a x^2 + b x + c``; params ``[B, 3]`` = (a, b, c); see the module docstring."""

    name: ClassVar[str] = "quadratic"
    param_names = ("a", "b", "c")

    def __init__(
        self,
        *,
        a: tuple[float, float] = (-0.12, 0.12),
        b: tuple[float, float] = (-0.3, 0.3),
        c: tuple[float, float] = (-0.5, 0.5),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        super().__init__((a, b, c), x_range=x_range, noise_std=noise_std)

    def function(self, params: FloatArray, x: NDArray[np.floating]) -> NDArray[np.floating]:
        out: NDArray[np.floating] = (params[:, 0:1] * x + params[:, 1:2]) * x + params[:, 2:3]
        return out


class SquareWaveFamily(UniformRegressionFamily):
    """``y = amplitude * sign(sin(x - phase))``; params ``[B, 2]`` = (amplitude, phase).

    The sinusoid's ranges by default, so each task is the square wave of a sinusoid task.
    """

    name: ClassVar[str] = "square_wave"
    param_names = ("amplitude", "phase")

    def __init__(
        self,
        *,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        super().__init__((amplitude, phase), x_range=x_range, noise_std=noise_std)

    def function(self, params: FloatArray, x: NDArray[np.floating]) -> NDArray[np.floating]:
        out: NDArray[np.floating] = params[:, 0:1] * np.sign(np.sin(x - params[:, 1:2]))
        return out


class MixtureFamily(TaskFamily):
    """Each task comes from one of several families of the same kind and ``x_dim``.

    A parameter row is ``[component, *component params, 0-padding]``: the component's index
    (as a float) followed by its own parameters, padded to the widest component. ``perturb``
    keeps every task's component (a cluster stays within one family).

    Args:
        components: the families (at least one; all of one ``kind``, ``x_dim`` and
            ``n_classes``).
        weights: probability of each component for a new task (default: equal).
    """

    name: ClassVar[str] = "mixture"

    def __init__(
        self, components: Sequence[TaskFamily], weights: Sequence[float] | None = None
    ) -> None:
        comps = tuple(components)
        if not comps:
            raise ValueError("a mixture needs at least one component")
        first = comps[0]
        for c in comps[1:]:
            if (c.kind, c.x_dim, c.n_classes) != (first.kind, first.x_dim, first.n_classes):
                raise ValueError(
                    f"components must share kind, x_dim and n_classes; {c!r} differs from {first!r}"
                )
        w = np.ones(len(comps)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(comps),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be {len(comps)} finite non-negative numbers with a positive sum"
            )
        self.components = comps
        self.weights = w / w.sum()
        self.kind = first.kind
        self.x_dim = first.x_dim
        self.n_classes = first.n_classes
        width = max(c.param_dim for c in comps)
        self.param_names = ("component", *(f"p{i}" for i in range(width)))

    def _describe(self) -> str:
        return f"[{', '.join(map(repr, self.components))}], weights={self.weights.tolist()}"

    def component_of(self, params: FloatArray) -> NDArray[np.int64]:
        """The component behind each task: ``[B]`` int64."""
        params = self.check_params(params)
        comp = np.rint(params[:, 0]).astype(np.int64)
        if comp.size and (comp.min() < 0 or comp.max() >= len(self.components)):
            raise ValueError(f"component ids in params must lie in [0, {len(self.components)})")
        return comp

    def sample_params(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``[n, 1 + max p]``: a component per task (by ``weights``), then its parameters."""
        comp = rng.choice(len(self.components), size=n, p=self.weights)
        out = np.zeros((n, self.param_dim))
        out[:, 0] = comp
        for k, fam in enumerate(self.components):
            rows = np.flatnonzero(comp == k)
            if rows.size:
                out[rows, 1 : 1 + fam.param_dim] = fam.sample_params(rows.size, rng)
        return out

    def perturb(self, params: FloatArray, spread: float, rng: np.random.Generator) -> FloatArray:
        """Each row perturbed by its own component; the component itself never changes."""
        comp = self.component_of(params)
        params = self.check_params(params)
        if spread < 0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        out = params.copy()
        if spread == 0:
            return out
        for k, fam in enumerate(self.components):
            rows = np.flatnonzero(comp == k)
            if rows.size:
                own = params[rows, 1 : 1 + fam.param_dim]
                out[rows, 1 : 1 + fam.param_dim] = fam.perturb(own, spread, rng)
        return out

    def sample(
        self,
        params: FloatArray,
        n: int,
        rng: np.random.Generator,
        *,
        per_class: bool = False,
    ) -> tuple[NDArray[np.float32], NDArray[Any]]:
        """Each task's examples from its component: ``x [B, n_total, x_dim]``, ``y [B, n_total]``
        (float32 targets for regression, int64 labels for classification)."""
        comp = self.component_of(params)
        params = self.check_params(params)
        b = params.shape[0]
        total = n * self.n_classes if per_class and self.n_classes is not None else n
        x = np.empty((b, total, self.x_dim), dtype=np.float32)
        y_dtype = np.float32 if self.kind == "regression" else np.int64
        y: NDArray[Any] = np.empty((b, total), dtype=y_dtype)
        for k, fam in enumerate(self.components):
            rows = np.flatnonzero(comp == k)
            if rows.size:
                own = params[rows, 1 : 1 + fam.param_dim]
                x[rows], y[rows] = fam.sample(own, n, rng, per_class=per_class)
        return x, y

    def evaluate(self, params: FloatArray, x: NDArray[np.floating]) -> NDArray[np.float32]:
        """Regression only: each task's true function, ``x [B, n, 1]`` -> ``y [B, n]``."""
        comp = self.component_of(params)
        params = self.check_params(params)
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != params.shape[0] or x.shape[2] != self.x_dim:
            raise ValueError(
                f"x must have shape [{params.shape[0]}, n, {self.x_dim}], got {x.shape}"
            )
        y = np.empty(x.shape[:2], dtype=np.float32)
        for k, fam in enumerate(self.components):
            evaluate = getattr(fam, "evaluate", None)
            if evaluate is None:
                raise TypeError(f"{fam!r} has no evaluate()")
            rows = np.flatnonzero(comp == k)
            if rows.size:
                y[rows] = evaluate(params[rows, 1 : 1 + fam.param_dim], x[rows])
        return y


class TransformedDigitsFamily(DigitsFamily):
    """:class:`~stream_meta.tasks.DigitsFamily` with some of its split's transform ranges replaced.

    Images still come from ``split``; every transform not named in ``overrides`` keeps the
    split's range (``TRANSFORM_RANGES[split]``).

    >>> family = TransformedDigitsFamily(
    ...     "test", overrides={"rotation_deg": TransformRange(0.0, 30.0, 45.0)}
    ... )
    >>> params = family.sample_params(1000, np.random.default_rng(0))
    >>> rotation = np.abs(params[:, family.n_way])
    >>> bool(rotation.min() > 30.0 and rotation.max() <= 45.0)
    True

    Args:
        split: ``"train"`` or ``"test"``: which images, and the ranges not overridden.
        overrides: transform name (one of ``TRANSFORM_NAMES``) -> its new range.
        n_way: classes per task (2 to 10).
        seed: seed of the image split.
    """

    def __init__(
        self,
        split: Split = "test",
        *,
        overrides: Mapping[str, TransformRange],
        n_way: int = 5,
        seed: int = 0,
    ) -> None:
        super().__init__(split, n_way=n_way, seed=seed)
        unknown = set(overrides) - set(TRANSFORM_NAMES)
        if unknown:
            raise ValueError(
                f"unknown transforms {sorted(unknown)}; known: {', '.join(TRANSFORM_NAMES)}"
            )
        self.overrides = dict(overrides)
        self.ranges = {**self.ranges, **self.overrides}

    def _describe(self) -> str:
        return f"{super()._describe()}, overrides={self.overrides}"
