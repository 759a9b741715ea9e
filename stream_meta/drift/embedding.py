"""Task-distribution drift in embedding space: novelty against a calibrated reference, and MMD.

Plain functions do the maths (kernels, the MMD two-sample test, binomial and gamma tails);
two small classes hold state:

* :class:`NoveltyDetector`: a task embedding is *novel* when its distance to its nearest other
  indexed task exceeds the ``quantile`` of those distances in a reference (a warm-up, fixed or
  rolling behind the stream), so a fraction ``1 - quantile`` of reference embeddings is novel
  by construction. The statistic is the novel fraction among the last ``window``
  observations; it alarms when a one-sided binomial test rejects the reference rate at level
  ``alpha`` *and* the fraction is at least ``min_rate_ratio`` times the reference rate (an
  effect-size floor: the same task seen in several batches makes observations overdispersed,
  which a bare binomial test ignores).
* :class:`MMDDetector`: the maximum mean discrepancy (Gretton et al. 2012) between a reference
  sample of embeddings (fixed, or lagging behind the stream) and the most recent ones, with a
  Gaussian kernel whose bandwidth is the median pairwise distance of the reference. Its null
  distribution comes from permutations of the pooled sample, summarised by a moment-matched
  gamma distribution (Gretton et al. 2009), so a tiny level such as 1e-6 can be tested with a
  hundred permutations; the gamma tail uses the Wilson-Hilferty cube-root normal
  approximation (no SciPy at run time; it errs on the conservative side for the skewed nulls
  of small samples).

Embeddings ``[B, E]`` need not be L2-normalised: the kernel works on raw vectors.

Example:
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(128, 16))
    >>> same = mmd_test(X, rng.normal(size=(128, 16)), rng=np.random.default_rng(1))
    >>> shifted = mmd_test(X, rng.normal(size=(128, 16)) + 0.5, rng=np.random.default_rng(1))
    >>> bool(same.p_value > 0.01), bool(shifted.p_value < 1e-6)
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MMDDetector",
    "MMDResult",
    "NoveltyDetector",
    "binomial_sf",
    "gamma_isf",
    "gamma_sf",
    "median_bandwidth",
    "mmd2",
    "mmd_test",
    "rbf_kernel",
]

FloatArray = NDArray[np.float64]
_NORMAL = NormalDist()


# -- tails ------------------------------------------------------------------------------------
def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, exact (log-space pmf recursion).

    >>> round(binomial_sf(3, 10, 0.1), 6)
    0.070191
    """
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return float(_binomial_tails(n, p)[k])


def _binomial_tails(n: int, p: float) -> FloatArray:
    """``P(X >= k)`` for ``k = 0..n`` (``[n + 1]``)."""
    ks = np.arange(1, n + 1, dtype=np.float64)
    steps = np.log((n - ks + 1) / ks) + math.log(p) - math.log1p(-p)
    logpmf = n * math.log1p(-p) + np.concatenate([[0.0], np.cumsum(steps)])
    top = logpmf.max()
    tail = np.cumsum(np.exp(logpmf - top)[::-1])[::-1]
    out: FloatArray = np.minimum(tail * math.exp(top), 1.0)
    return out


def _wh_params(shape: float) -> tuple[float, float]:
    """Mean and sd of ``(X / (shape * scale)) ** (1/3)`` under Wilson-Hilferty."""
    v = 1.0 / (9.0 * shape)
    return 1.0 - v, math.sqrt(v)


def gamma_sf(x: float, shape: float, scale: float) -> float:
    """Upper tail ``P(X > x)`` of a gamma distribution (Wilson-Hilferty approximation).

    >>> round(gamma_sf(10.0, 4.0, 1.0), 4)  # exact: 0.0103
    0.0104
    """
    if x <= 0:
        return 1.0
    mu, sd = _wh_params(shape)
    z = ((x / (shape * scale)) ** (1.0 / 3.0) - mu) / sd
    return float(_NORMAL.cdf(-z))


def gamma_isf(q: float, shape: float, scale: float) -> float:
    """``x`` with ``gamma_sf(x) == q`` (Wilson-Hilferty approximation).

    >>> round(gamma_isf(0.0103, 4.0, 1.0), 2)  # exact: 10.0
    10.02
    """
    mu, sd = _wh_params(shape)
    z = _NORMAL.inv_cdf(1.0 - q)
    return float(shape * scale * max(mu + sd * z, 0.0) ** 3)


# -- kernels and MMD --------------------------------------------------------------------------
def _as_matrix(x: ArrayLike, name: str) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be [n, d], got shape {a.shape}")
    return a


def _sq_dists(X: FloatArray, Y: FloatArray) -> FloatArray:
    d2 = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2.0 * (X @ Y.T)
    out: FloatArray = np.maximum(d2, 0.0)
    return out


def median_bandwidth(X: ArrayLike) -> float:
    """Median pairwise Euclidean distance between the rows of ``X`` ``[n, d]`` (the median
    heuristic for a Gaussian kernel's bandwidth); 1.0 when it is 0 or undefined."""
    A = _as_matrix(X, "X")
    if len(A) < 2:
        return 1.0
    d2 = _sq_dists(A, A)[np.triu_indices(len(A), k=1)]
    med = float(np.sqrt(np.median(d2)))
    return med if med > 0 and math.isfinite(med) else 1.0


def rbf_kernel(X: ArrayLike, Y: ArrayLike, bandwidth: float) -> FloatArray:
    """``exp(-|x - y|^2 / (2 bandwidth^2))`` for every pair ``[n, m]``."""
    d2 = _sq_dists(_as_matrix(X, "X"), _as_matrix(Y, "Y"))
    out: FloatArray = np.exp(-d2 / (2.0 * bandwidth * bandwidth))
    return out


def mmd2(X: ArrayLike, Y: ArrayLike, bandwidth: float) -> float:
    """Biased (V-statistic) squared MMD between samples ``X [n, d]`` and ``Y [m, d]``."""
    kxx = rbf_kernel(X, X, bandwidth).mean()
    kyy = rbf_kernel(Y, Y, bandwidth).mean()
    kxy = rbf_kernel(X, Y, bandwidth).mean()
    return float(kxx + kyy - 2.0 * kxy)


@dataclass(frozen=True)
class MMDResult:
    """One MMD two-sample test.

    Attributes:
        mmd2: the biased squared MMD between the reference and the window.
        p_value: gamma-approximated permutation p-value.
        threshold: the ``1 - alpha`` quantile of the (gamma-approximated) null.
        alpha: the level ``threshold`` is for.
        null_mean, null_std: moments of the permutation null.
        permutation_p: the raw permutation p-value ``(1 + #{null >= mmd2}) / (1 + P)``.
        bandwidth: the Gaussian kernel's bandwidth.
        n_reference, n_window, permutations: sample sizes and permutations used.
        mean_shift: Euclidean distance between the two samples' mean embeddings.
    """

    mmd2: float
    p_value: float
    threshold: float
    alpha: float
    null_mean: float
    null_std: float
    permutation_p: float
    bandwidth: float
    n_reference: int
    n_window: int
    permutations: int
    mean_shift: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mmd_test(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    bandwidth: float | None = None,
    permutations: int = 100,
    alpha: float = 1e-6,
    rng: np.random.Generator | None = None,
    kxx: FloatArray | None = None,
) -> MMDResult:
    """Permutation MMD test of ``X [n, d]`` (reference) against ``Y [m, d]``.

    The pooled kernel matrix ``K [n+m, n+m]`` is computed once; a permutation's statistic is
    ``s^T K s`` with ``s`` holding ``1/n`` for one group and ``-1/m`` for the other, so all
    permutations cost one ``[P, n+m] @ [n+m, n+m]`` product. ``kxx`` may pass the reference's
    own kernel block when it is reused across tests.
    """
    A, B = _as_matrix(X, "X"), _as_matrix(Y, "Y")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"X and Y differ in dimension: {A.shape[1]} vs {B.shape[1]}")
    n, m = len(A), len(B)
    if n < 2 or m < 2:
        raise ValueError("mmd_test needs at least 2 rows in each sample")
    if permutations < 2:
        raise ValueError(f"permutations must be >= 2, got {permutations}")
    rng = rng if rng is not None else np.random.default_rng(0)
    bw = median_bandwidth(A) if bandwidth is None else float(bandwidth)
    K = np.empty((n + m, n + m))
    K[:n, :n] = rbf_kernel(A, A, bw) if kxx is None else kxx
    K[:n, n:] = rbf_kernel(A, B, bw)
    K[n:, :n] = K[:n, n:].T
    K[n:, n:] = rbf_kernel(B, B, bw)
    s0 = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    observed = float(s0 @ K @ s0)
    S = rng.permuted(np.broadcast_to(s0, (permutations, n + m)), axis=1)
    null = np.einsum("pi,pi->p", S @ K, S)
    mean, var = float(null.mean()), float(null.var(ddof=1))
    if mean > 0 and var > 0:
        shape, scale = mean * mean / var, var / mean
        p = gamma_sf(observed, shape, scale)
        thr = gamma_isf(alpha, shape, scale)
    else:  # degenerate (identical rows): any positive discrepancy is significant
        p, thr = (0.0 if observed > 1e-12 else 1.0), 1e-12
    perm_p = float((1 + np.count_nonzero(null >= observed)) / (1 + permutations))
    return MMDResult(
        mmd2=observed,
        p_value=p,
        threshold=thr,
        alpha=alpha,
        null_mean=mean,
        null_std=math.sqrt(var),
        permutation_p=perm_p,
        bandwidth=bw,
        n_reference=n,
        n_window=m,
        permutations=permutations,
        mean_shift=float(np.linalg.norm(A.mean(0) - B.mean(0))),
    )


# -- stateful detectors -----------------------------------------------------------------------
class NoveltyDetector:
    """Rate of novel task embeddings in a sliding window against a calibrated reference.

    Feed reference nearest-neighbour distances with :meth:`learn_reference`, fix the
    reference with :meth:`calibrate`, then :meth:`update` with new distances. See the module
    docstring for the test.

    With ``lag=None`` the reference is what :meth:`learn_reference` gave (e.g. a warm-up).
    With ``lag=L`` it also *rolls*: every observation joins the reference once ``L`` newer
    ones have arrived (the reference keeps the latest ``reference_size``), so the window is
    compared with the recent past. Distances to the nearest indexed task shrink as the index
    fills (the shipped sinusoid stream: median 0.34 after 2,000 events, 0.07 after 60,000), so
    a quantile frozen at the warm-up stops meaning anything after a few thousand events; a
    lagged reference follows that slow densification while a change of the task distribution
    shows up as a burst of novel embeddings, until the reference has caught up with it.

    Args:
        quantile: reference quantile of the distances above which an embedding is novel.
        window: observations in the sliding window.
        alpha: level of the one-sided binomial test against the reference rate.
        min_rate_ratio: the novel fraction must also reach this multiple of the reference rate.
        reference_size: most reference distances kept (the latest).
        min_reference: distances needed to calibrate.
        lag: observations between the window's newest and the reference's newest (None: a
            fixed reference); at least ``window``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> nov = NoveltyDetector(window=200)
        >>> nov.learn_reference(rng.gamma(4.0, 0.05, 2000))
        >>> nov.calibrate()
        True
        >>> round(nov.update(rng.gamma(4.0, 0.05, 200)), 3), nov.drift_detected
        (0.005, False)
        >>> round(nov.update(rng.gamma(4.0, 0.10, 100)), 3), nov.drift_detected
        (0.16, True)
    """

    def __init__(
        self,
        quantile: float = 0.99,
        *,
        window: int = 256,
        alpha: float = 1e-6,
        min_rate_ratio: float = 5.0,
        reference_size: int = 4096,
        min_reference: int = 128,
        lag: int | None = None,
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if min_reference < 2 or reference_size < min_reference:
            raise ValueError("need 2 <= min_reference <= reference_size")
        if lag is not None and lag < window:
            raise ValueError(f"lag must be >= window ({window}), got {lag}")
        self.quantile = float(quantile)
        self.window = int(window)
        self.alpha = float(alpha)
        self.min_rate_ratio = float(min_rate_ratio)
        self.reference_size = int(reference_size)
        self.min_reference = int(min_reference)
        self.lag = None if lag is None else int(lag)
        self.reference_rate = 1.0 - self.quantile
        self._critical: dict[int, int] = {}
        self.reset()

    def clone(self) -> NoveltyDetector:
        return NoveltyDetector(
            self.quantile,
            window=self.window,
            alpha=self.alpha,
            min_rate_ratio=self.min_rate_ratio,
            reference_size=self.reference_size,
            min_reference=self.min_reference,
            lag=self.lag,
        )

    def reset(self, *, keep_reference: bool = False) -> None:
        """Forget the window and, unless ``keep_reference``, the reference."""
        if not keep_reference:
            self._reference: FloatArray = np.zeros(0)
            self._delay: FloatArray = np.zeros(0)  # observations not yet old enough (lag)
            self.distance_threshold: float | None = None
        self._dist = np.zeros(self.window)
        self._pos = 0
        self._filled = 0
        self._stat = 0.0
        self._novel = 0

    @property
    def calibrated(self) -> bool:
        return self.distance_threshold is not None

    @property
    def n_reference(self) -> int:
        return int(self._reference.size)

    def _add_reference(self, d: FloatArray) -> None:
        if d.size:
            self._reference = np.concatenate([self._reference, d])[-self.reference_size :]

    def learn_reference(self, nn_distance: ArrayLike) -> None:
        """Add reference distances (non-finite ones are ignored)."""
        d = np.asarray(nn_distance, dtype=np.float64).ravel()
        self._add_reference(d[np.isfinite(d)])

    def calibrate(self) -> bool:
        """Fix the distance threshold from the reference; False while it is too small."""
        if self._reference.size < self.min_reference:
            return False
        self.distance_threshold = float(np.quantile(self._reference, self.quantile))
        return True

    def update(self, nn_distance: ArrayLike) -> float:
        """Add observations (non-finite distances are skipped); the novel fraction after."""
        if self.distance_threshold is None:
            raise RuntimeError("calibrate() the NoveltyDetector before update()")
        d = np.asarray(nn_distance, dtype=np.float64).ravel()
        d = d[np.isfinite(d)]
        if self.lag is not None and d.size:
            self._delay = np.concatenate([self._delay, d])
            old = self._delay.size - self.lag
            if old > 0:
                self._add_reference(self._delay[:old])
                self._delay = self._delay[old:]
                self.distance_threshold = float(np.quantile(self._reference, self.quantile))
        d = d[-self.window :]
        b = d.size
        if b:
            idx = (self._pos + np.arange(b)) % self.window
            self._dist[idx] = d
            self._pos = (self._pos + b) % self.window
            self._filled = min(self.window, self._filled + b)
        n = self._filled
        self._novel = int(np.count_nonzero(self._dist[:n] > self.distance_threshold))
        self._stat = self._novel / n if n >= self.window // 2 else 0.0
        return self._stat

    @property
    def n(self) -> int:
        """Observations in the window."""
        return self._filled

    @property
    def novel(self) -> int:
        """Novel observations in the window."""
        return self._novel

    @property
    def statistic(self) -> float:
        """Novel fraction of the window (0 until it is half full)."""
        return self._stat

    @property
    def threshold(self) -> float:
        """The novel fraction that alarms at the window's current size: the smallest with a
        binomial p-value below ``alpha``, and at least ``min_rate_ratio`` x the reference."""
        n = max(self._filled, self.window // 2)
        if n not in self._critical:
            tails = _binomial_tails(n, self.reference_rate)
            below = np.flatnonzero(tails < self.alpha)
            self._critical[n] = int(below[0]) if below.size else n + 1
        return max(self._critical[n] / n, self.min_rate_ratio * self.reference_rate)

    @property
    def drift_detected(self) -> bool:
        return self._filled >= self.window // 2 and self._stat >= self.threshold

    def p_value(self) -> float:
        """Binomial p-value of the window's novel count under the reference rate."""
        return binomial_sf(self._novel, self._filled, self.reference_rate)

    def evidence(self) -> dict[str, Any]:
        """JSON-ready summary of the window against the reference."""
        n = self._filled
        ref = self._reference
        return {
            "novel": self._novel,
            "window": n,
            "novel_rate": self._stat,
            "reference_rate": self.reference_rate,
            "p_value": self.p_value(),
            "distance_threshold": self.distance_threshold,
            "quantile": self.quantile,
            "window_median_distance": float(np.median(self._dist[:n])) if n else None,
            "reference_median_distance": float(np.median(ref)) if ref.size else None,
            "n_reference": int(ref.size),
            "lag": self.lag,
        }


class MMDDetector:
    """MMD two-sample test between reference embeddings and a sliding window of recent ones.

    With ``lag=None`` the reference is the latest ``reference_size`` rows given to
    :meth:`learn_reference`, fixed (with the kernel bandwidth) by :meth:`calibrate`, and
    :meth:`update` fills the window. With ``lag=L`` the reference *rolls*: it is the
    ``reference_size`` rows that precede the newest ``L`` (every row, whether given to
    :meth:`learn_reference` or :meth:`update`, goes through one history), and the window is
    the newest ``window`` rows. A lagged reference compares the present with the recent past:
    it fires on a change of the task distribution in either direction (a new family, and also
    the return of an old one), while the slow maturation of embeddings as tasks gather
    examples, which a reference frozen at the warm-up would eventually flag, stays below the
    threshold. :meth:`test` costs one ``[P, n+m] @ [n+m, n+m]`` product (~1.3 ms at the
    defaults on one core).

    Args:
        reference_size: reference rows.
        window: recent rows compared with them.
        permutations: permutations for the null distribution.
        alpha: level of the test.
        seed: seeds the permutations.
        lag: rows between the reference and the newest row (None: a fixed reference); at
            least ``window``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> det = MMDDetector(reference_size=64, window=64, seed=0)
        >>> det.learn_reference(rng.normal(size=(64, 8)))
        >>> det.calibrate()
        True
        >>> det.update(rng.normal(size=(64, 8)))
        >>> det.test().p_value > 1e-6
        True
        >>> det.update(rng.normal(size=(64, 8)) + 1.0)
        >>> det.test().p_value < 1e-6
        True
    """

    def __init__(
        self,
        *,
        reference_size: int = 128,
        window: int = 128,
        permutations: int = 100,
        alpha: float = 1e-6,
        seed: int = 0,
        lag: int | None = None,
    ) -> None:
        if reference_size < 2 or window < 2:
            raise ValueError("reference_size and window must be >= 2")
        if permutations < 2:
            raise ValueError(f"permutations must be >= 2, got {permutations}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if lag is not None and lag < window:
            raise ValueError(f"lag must be >= window ({window}), got {lag}")
        self.reference_size = int(reference_size)
        self.window = int(window)
        self.permutations = int(permutations)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.lag = None if lag is None else int(lag)
        self._dim: int | None = None
        self.reset()

    def clone(self) -> MMDDetector:
        return MMDDetector(
            reference_size=self.reference_size,
            window=self.window,
            permutations=self.permutations,
            alpha=self.alpha,
            seed=self.seed,
            lag=self.lag,
        )

    def reset(self, *, keep_reference: bool = False) -> None:
        """Forget the window and, unless ``keep_reference``, the reference (the permutations
        restart from the seed). A rolling detector keeps its whole history with the reference."""
        self._rng = np.random.default_rng(self.seed)
        self.last: MMDResult | None = None
        if keep_reference and self.lag is not None:
            return
        if not keep_reference:
            self._dim = None
            self._ref: FloatArray | None = None  # fixed mode: reference rows so far
            self._reference: FloatArray | None = None  # fixed mode: the calibrated reference
            self._kxx: FloatArray | None = None
            self.bandwidth: float | None = None
            self._hist: FloatArray | None = None  # rolling mode: ring of the latest rows
            self._hist_n = 0
            self._hist_pos = 0
        self._win: FloatArray | None = None  # fixed mode: ring of the window's rows
        self._filled = 0
        self._pos = 0

    @property
    def calibrated(self) -> bool:
        """A reference is ready: fixed by :meth:`calibrate`, or (rolling) enough history."""
        if self.lag is None:
            return self._reference is not None
        return self._hist_n >= self.lag + self.reference_size

    @property
    def n(self) -> int:
        """Rows in the window."""
        return min(self._hist_n, self.window) if self.lag is not None else self._filled

    def _rows(self, X: ArrayLike) -> FloatArray:
        A = _as_matrix(X, "embeddings")
        A = A[np.isfinite(A).all(axis=1)]
        if self._dim is None:
            self._dim = int(A.shape[1])
        elif A.shape[1] != self._dim:
            raise ValueError(f"embeddings of dimension {A.shape[1]}, expected {self._dim}")
        return A

    @staticmethod
    def _push(ring: FloatArray, pos: int, rows: FloatArray) -> int:
        cap = len(ring)
        rows = rows[-cap:]
        idx = (pos + np.arange(len(rows))) % cap
        ring[idx] = rows
        return (pos + len(rows)) % cap

    def _push_history(self, A: FloatArray) -> None:
        assert self.lag is not None
        if self._hist is None:
            self._hist = np.zeros((self.lag + self.reference_size, A.shape[1]))
        self._hist_pos = self._push(self._hist, self._hist_pos, A)
        self._hist_n = min(len(self._hist), self._hist_n + len(A))

    def learn_reference(self, X: ArrayLike) -> None:
        """Add reference rows ``[B, E]`` (rows with non-finite entries are ignored)."""
        A = self._rows(X)
        if not len(A):
            return
        if self.lag is not None:
            self._push_history(A)
            return
        self._ref = A if self._ref is None else np.concatenate([self._ref, A])
        self._ref = self._ref[-self.reference_size :]

    def calibrate(self) -> bool:
        """Fix the reference and the bandwidth (fixed mode); False while fewer than
        ``reference_size`` reference rows (rolling: ``lag + reference_size`` rows) were seen."""
        if self.lag is not None:
            return self.calibrated
        if self._ref is None or len(self._ref) < self.reference_size:
            return False
        self._reference = self._ref
        self.bandwidth = median_bandwidth(self._reference)
        self._kxx = rbf_kernel(self._reference, self._reference, self.bandwidth)
        return True

    def update(self, X: ArrayLike) -> None:
        """Add recent rows ``[B, E]`` to the window (rolling: to the history)."""
        A = self._rows(X)
        if self.lag is not None:
            if len(A):
                self._push_history(A)
            return
        if self._reference is None:
            raise RuntimeError("calibrate() the MMDDetector before update()")
        if self._win is None:
            self._win = np.zeros((self.window, self._reference.shape[1]))
        if len(A):
            self._pos = self._push(self._win, self._pos, A)
            self._filled = min(self.window, self._filled + len(A))

    def _ordered(self, newest: int, count: int) -> FloatArray:
        """``count`` history rows ending ``newest`` rows before the newest one, oldest first."""
        assert self._hist is not None
        start = self._hist_pos - newest - count
        out: FloatArray = self._hist[(start + np.arange(count)) % len(self._hist)]
        return out

    def test(self) -> MMDResult | None:
        """Test the window against the reference; None until both are full."""
        bandwidth: float | None
        kxx: FloatArray | None
        if self.lag is not None:
            if not self.calibrated:
                return None
            reference = self._ordered(self.lag, self.reference_size)
            window = self._ordered(0, self.window)
            bandwidth, kxx = median_bandwidth(reference), None
            self.bandwidth = bandwidth
        else:
            if self._win is None or self._reference is None or self._filled < self.window:
                return None
            reference, window, bandwidth, kxx = (
                self._reference,
                self._win,
                self.bandwidth,
                self._kxx,
            )
        self.last = mmd_test(
            reference,
            window,
            bandwidth=bandwidth,
            permutations=self.permutations,
            alpha=self.alpha,
            rng=self._rng,
            kxx=kxx,
        )
        return self.last
