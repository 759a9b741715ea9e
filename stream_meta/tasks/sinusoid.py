"""Sinusoid regression tasks, the MAML protocol (Finn et al., 2017).

A task is ``y = A * sin(x - phase)`` with amplitude ``A ~ U[0.1, 5.0]``, phase ``~ U[0, pi]``
and inputs ``x ~ U[-5, 5]``; no observation noise unless ``noise_std > 0``. The ranges are
constructor arguments so that drift scenarios can move them.

>>> import numpy as np
>>> family = SinusoidFamily()
>>> rng = np.random.default_rng(0)
>>> params = family.sample_params(3, rng)  # [B, 2]: amplitude, phase
>>> x, y = family.sample(params, 5, rng)
>>> x.shape, y.shape
((3, 5, 1), (3, 5))
>>> bool(np.allclose(y, family.evaluate(params, x)))
True
>>> bool(np.array_equal(family.perturb(params, 0.0, rng), params))
True
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.base import FloatArray, Regression1DFamily, check_range

__all__ = ["SinusoidFamily"]

_TWO_PI = 2.0 * math.pi


class SinusoidFamily(Regression1DFamily):
    """``y = amplitude * sin(x - phase)``; params ``[B, 2]`` = (amplitude, phase).

    Args:
        amplitude: range of the uniform amplitude distribution.
        phase: range of the uniform phase distribution (radians).
        x_range: range of the uniform input distribution.
        noise_std: standard deviation of Gaussian noise added to the sampled ``y``.
    """

    name: ClassVar[str] = "sinusoid"
    param_names = ("amplitude", "phase")

    def __init__(
        self,
        *,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        self.amplitude = check_range("amplitude", amplitude)
        self.phase = check_range("phase", phase)
        self.x_range = check_range("x_range", x_range)
        if not noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = float(noise_std)

    def _describe(self) -> str:
        return (
            f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range}, "
            f"noise_std={self.noise_std}"
        )

    def sample_params(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``[n, 2]`` (amplitude, phase), both uniform over their ranges."""
        out = rng.random((n, 2))
        out[:, 0] = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * out[:, 0]
        out[:, 1] = self.phase[0] + (self.phase[1] - self.phase[0]) * out[:, 1]
        return out

    def perturb(self, params: FloatArray, spread: float, rng: np.random.Generator) -> FloatArray:
        """Gaussian steps of ``spread`` times each range's width.

        The amplitude is clipped to its range. The phase wraps when its range spans a full
        period (``2 pi``, where wrapping keeps the function continuous) and is clipped otherwise.
        """
        params = self.check_params(params)
        if spread < 0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        if spread == 0:
            return params.copy()
        (a_lo, a_hi), (p_lo, p_hi) = self.amplitude, self.phase
        step = rng.standard_normal(params.shape) * (spread * np.array([a_hi - a_lo, p_hi - p_lo]))
        out = params + step
        out[:, 0] = np.clip(out[:, 0], a_lo, a_hi)
        if p_hi - p_lo >= _TWO_PI:
            out[:, 1] = p_lo + np.mod(out[:, 1] - p_lo, _TWO_PI)
        else:
            out[:, 1] = np.clip(out[:, 1], p_lo, p_hi)
        return out

    def function(self, params: FloatArray, x: NDArray[np.floating]) -> NDArray[np.floating]:
        """``params [B, 2]``, ``x [B, n]`` -> ``amplitude * sin(x - phase)`` ``[B, n]``."""
        amplitude, phase = params[:, 0:1], params[:, 1:2]
        return amplitude * np.sin(x - phase)
