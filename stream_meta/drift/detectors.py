"""Change detectors for streams of numbers: Page-Hinkley (one stream or a bank) and ADWIN.

River's vocabulary: ``update(x)`` returns ``None`` and ``drift_detected`` says whether the last
value was a detection; ``update_many(xs)`` takes an array and returns the detector's statistic
after each value, computed with a constant number of numpy passes (no Python loop per value).
Configuration is constructor-only; ``clone()`` gives a fresh detector with the same settings.

Why not River's own detectors (``river.drift.PageHinkley`` / ``ADWIN``)? They are the same
algorithms, but (1) only per-value Python calls exist (1-3 us each; the drift monitor updates one
Page-Hinkley test per task cluster, hundreds, and wants a batch of 512 events in well under a
millisecond); (2) they restart themselves after a detection and expose no test statistic, while
the monitor's hysteresis needs the statistic to keep its evidence and its alarms report the
statistic, the threshold and the cut; (3) their state is not JSON. The maths here is short and
tested against the textbook recursions and the known properties (detection delay, no alarm on
long stationary streams, ADWIN's window shrinking to the post-change data).

Unlike River's, a detector here does not restart itself after a detection; the caller decides
(``reset()``). Page-Hinkley's statistic keeps growing while a shift persists; ADWIN forgets the
pre-change part of its window by itself, as the algorithm specifies.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ADWIN", "PageHinkley", "PageHinkleyBank"]

Mode = Literal["up", "down", "both"]
_MODES = ("up", "down", "both")
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _segmented_cummin(v: FloatArray, seg: IntArray) -> tuple[FloatArray, NDArray[np.bool_]]:
    """Running minimum of ``v`` restarted at every segment (``seg`` sorted, 0, 1, 2, ...), and
    where ``v`` attains it (exactly: compared before the shift is undone).

    Each segment is shifted below every earlier one by more than the range of ``v``, so one
    ``np.minimum.accumulate`` never carries a value across a boundary.
    """
    span = float(v.max() - v.min()) + 1.0 if v.size else 1.0
    off = seg.astype(np.float64) * span
    w = v - off
    cw = np.minimum.accumulate(w)
    out: FloatArray = cw + off
    return out, w <= cw


def _cummin(v: FloatArray) -> tuple[FloatArray, NDArray[np.bool_]]:
    cw: FloatArray = np.minimum.accumulate(v)
    return cw, v <= cw


class PageHinkleyBank:
    """Independent Page-Hinkley tests on many streams, updated together (vectorised).

    For stream ``s`` with values ``x_1..x_T`` and running mean ``xbar_t`` (of ``x_1..x_t``):
    ``m_T = sum_t (x_t - xbar_t - delta)`` and the "up" statistic is ``m_T - min(0, m_1..m_T)``
    (Page 1954, Hinkley 1971; the running-mean form of Gama et al. and River). It grows while
    the stream's mean sits above its past mean by more than ``delta`` and is 0 otherwise;
    "down" is the same test on ``-x``; "both" takes the larger. ``delta`` is the tolerated
    shift and ``threshold`` (lambda) trades false alarms against delay: for a shift of ``d``
    (in the values' units) detection takes about ``threshold / (d - delta)`` values. The
    statistic reads 0 until a stream has ``min_instances`` values.

    Streams are small non-negative integers (slots); the bank grows as new ones appear.

    Args:
        delta: tolerated change of the mean, in the values' units.
        threshold: alarm level of the statistic.
        min_instances: values a stream needs before its statistic counts.
        mode: ``"up"`` (increases), ``"down"`` or ``"both"``.

    Example (two streams interleaved; only stream 1 shifts, by +3, at its 50th value):
        >>> rng = np.random.default_rng(0)
        >>> streams = np.tile([0, 1], 100)
        >>> xs = rng.standard_normal(200) + np.where((streams == 1) & (np.arange(200) >= 100), 3, 0)
        >>> bank = PageHinkleyBank(delta=0.5, threshold=10.0, min_instances=10)
        >>> stat = bank.update_many(streams, xs)
        >>> int(np.flatnonzero(stat > 10.0)[0]), bool((stat[streams == 0] > 10.0).any())
        (109, False)
        >>> [int(n) for n in bank.counts]
        [100, 100]
    """

    def __init__(
        self,
        delta: float = 0.005,
        threshold: float = 50.0,
        min_instances: int = 30,
        mode: Mode = "up",
    ) -> None:
        _check_mode(mode)
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if min_instances < 1:
            raise ValueError(f"min_instances must be >= 1, got {min_instances}")
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.min_instances = int(min_instances)
        self.mode: Mode = mode
        self._alloc(0)
        self.last_change_points: IntArray = np.zeros(0, dtype=np.int64)
        self.last_counts: IntArray = np.zeros(0, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(delta={self.delta}, threshold={self.threshold}, "
            f"min_instances={self.min_instances}, mode={self.mode!r})"
        )

    def clone(self) -> PageHinkleyBank:
        """A fresh bank with the same settings (no state)."""
        return PageHinkleyBank(self.delta, self.threshold, self.min_instances, self.mode)

    # -- state ---------------------------------------------------------------------------
    def _alloc(self, size: int) -> None:
        self._streams = 0  # largest stream seen + 1
        self._n = np.zeros(size, dtype=np.int64)
        self._sum = np.zeros(size)
        # "up" and "down" cumulative sums, their extremes, and the count when each extreme was
        # reached (the change-point estimate: values after it belong to the new regime)
        self._m = np.zeros((2, size))
        self._min = np.zeros((2, size))
        self._at = np.zeros((2, size), dtype=np.int64)
        self._stat = np.zeros(size)

    def _grow(self, size: int) -> None:
        old = len(self._n)
        self._streams = max(self._streams, size)
        if size <= old:
            return
        streams = self._streams
        size = max(size, 2 * old, 8)
        keep = (self._n, self._sum, self._m, self._min, self._at, self._stat)
        self._alloc(size)
        self._streams = streams
        self._n[:old], self._sum[:old], self._stat[:old] = keep[0], keep[1], keep[5]
        self._m[:, :old], self._min[:, :old], self._at[:, :old] = keep[2], keep[3], keep[4]

    def reset(self, stream: int | None = None) -> None:
        """Forget one stream (or every stream, when ``stream`` is None)."""
        if stream is None:
            self._alloc(0)
            return
        if 0 <= stream < self._streams:
            self._n[stream] = 0
            self._sum[stream] = 0.0
            self._m[:, stream] = self._min[:, stream] = 0.0
            self._at[:, stream] = 0
            self._stat[stream] = 0.0

    @property
    def size(self) -> int:
        """Number of streams: the largest stream seen + 1."""
        return self._streams

    @property
    def counts(self) -> IntArray:
        """Values seen per stream ``[size]`` (a copy)."""
        return self._n[: self._streams].copy()

    @property
    def statistics(self) -> FloatArray:
        """Current statistic per stream ``[size]`` (a copy; 0 below ``min_instances``)."""
        return self._stat[: self._streams].copy()

    def means(self) -> FloatArray:
        """Running mean per stream ``[size]`` (0 for an empty stream)."""
        n = self._n[: self._streams]
        out: FloatArray = self._sum[: self._streams] / np.maximum(n, 1)
        return out

    def change_points(self) -> IntArray:
        """Per stream, the count at which the current statistic's cumulative sum was at its
        extreme: the values after it are the estimated new regime ``[size]``."""
        k = self._streams
        if self.mode == "both":
            up = self._m[0, :k] - self._min[0, :k] >= self._m[1, :k] - self._min[1, :k]
            return np.where(up, self._at[0, :k], self._at[1, :k])
        return self._at[0 if self.mode == "up" else 1, :k].copy()

    # -- updates -------------------------------------------------------------------------
    def update_many(self, streams: ArrayLike, xs: ArrayLike) -> FloatArray:
        """Add ``xs[i]`` to stream ``streams[i]``, in order; the statistic after each ``[n]``.

        After the call, :attr:`last_counts` holds, for each value, its stream's count with it,
        and :attr:`last_change_points` the stream's change-point estimate at that moment (see
        :meth:`change_points`).
        """
        s_in = np.asarray(streams, dtype=np.int64).ravel()
        x_in = np.asarray(xs, dtype=np.float64).ravel()
        if s_in.shape != x_in.shape:
            raise ValueError(f"streams and xs differ in length: {s_in.size} vs {x_in.size}")
        if x_in.size == 0:
            self.last_change_points = np.zeros(0, dtype=np.int64)
            self.last_counts = np.zeros(0, dtype=np.int64)
            return np.zeros(0)
        if s_in.min() < 0:
            raise ValueError("streams must be >= 0")
        if not np.isfinite(x_in).all():
            raise ValueError("xs must be finite")
        self._grow(int(s_in.max()) + 1)
        g = _Segments(s_in, x_in, self._n)
        stats, at = self._both_directions(g)
        if self.mode == "both":
            up = stats[0] >= stats[1]
            stat = np.where(up, stats[0], stats[1])
            cp = np.where(up, at[0], at[1])
        else:
            d = 0 if self.mode == "up" else 1
            stat, cp = stats[d], at[d]
        stat = np.where(g.counts >= self.min_instances, stat, 0.0)
        self._n[g.last] = g.counts[g.ends]
        self._sum[g.last] += g.total
        self._stat[g.last] = stat[g.ends]
        self.last_change_points = g.in_input_order(cp)
        self.last_counts = g.in_input_order(g.counts)
        return g.in_input_order(stat)

    def _both_directions(self, g: _Segments) -> tuple[FloatArray, IntArray]:
        """The upward (row 0) and downward (row 1) statistics and change points of every
        value (in ``g``'s order), with the per-stream sums carried to the segments' ends."""
        s, k = g.s, g.x.size
        means = (self._sum[s] + g.csum(g.x)) / g.counts
        dev = g.x - means
        stats = np.zeros((2, k))
        at = np.zeros((2, k), dtype=np.int64)
        for d, sign in ((0, 1.0), (1, -1.0)):
            if self.mode == ("down" if d == 0 else "up"):
                continue
            m = self._m[d, s] + g.csum(sign * dev - self.delta)
            prev_min = self._min[d, s]
            seg_min, attained = g.cmin(m)
            run_min = np.minimum(prev_min, seg_min)
            stats[d] = m - np.minimum(run_min, 0.0)
            # count at the running extreme: where m touches its running minimum (ties: latest)
            hit = np.where(attained & (m <= prev_min), g.counts, 0).astype(np.float64)
            at[d] = np.maximum(self._at[d, s], g.cmax(hit).astype(np.int64))
            self._m[d, g.last] = m[g.ends]
            self._min[d, g.last] = np.minimum(run_min[g.ends], 0.0)
            self._at[d, g.last] = at[d, g.ends]
        return stats, at

    # -- persistence ---------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """JSON-ready state (settings and per-stream sums)."""
        return {
            "delta": self.delta,
            "threshold": self.threshold,
            "min_instances": self.min_instances,
            "mode": self.mode,
            "n": self._n[: self._streams].tolist(),
            "sum": self._sum[: self._streams].tolist(),
            "m": self._m[:, : self._streams].tolist(),
            "min": self._min[:, : self._streams].tolist(),
            "at": self._at[:, : self._streams].tolist(),
            "stat": self._stat[: self._streams].tolist(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PageHinkleyBank:
        bank = cls(state["delta"], state["threshold"], state["min_instances"], state["mode"])
        size = len(state["n"])
        bank._alloc(size)
        bank._streams = size
        bank._n[:] = state["n"]
        bank._sum[:] = state["sum"]
        bank._stat[:] = state["stat"]
        if size:
            bank._m[:] = state["m"]
            bank._min[:] = state["min"]
            bank._at[:] = state["at"]
        return bank


class PageHinkley:
    """The Page-Hinkley test on one stream (see :class:`PageHinkleyBank` for the maths).

    Defaults are River's (``delta=0.005``, ``threshold=50``, ``min_instances=30``), for values
    of order 1; the drift monitor feeds standardised window means and sets its own.

    Args:
        delta: tolerated change of the mean, in the values' units.
        threshold: alarm level (lambda) of the statistic.
        min_instances: values needed before the statistic counts.
        mode: ``"up"``, ``"down"`` or ``"both"``.

    Example (a seeded Gaussian stream whose mean goes from 0 to 1 at index 1000):
        >>> rng = np.random.default_rng(42)
        >>> stream = np.concatenate([rng.normal(0, 1, 1000), rng.normal(1, 1, 1000)])
        >>> ph = PageHinkley(delta=0.5, threshold=20.0, mode="up")
        >>> for i, x in enumerate(stream):
        ...     ph.update(x)
        ...     if ph.drift_detected:
        ...         print(f"Change detected at index {i}; estimated start {ph.change_point}")
        ...         break
        Change detected at index 1038; estimated start 990
    """

    def __init__(
        self,
        delta: float = 0.005,
        threshold: float = 50.0,
        min_instances: int = 30,
        mode: Mode = "both",
    ) -> None:
        self._bank = PageHinkleyBank(delta, threshold, min_instances, mode)
        self._bank._grow(1)
        self.delta, self.threshold = self._bank.delta, self._bank.threshold
        self.min_instances, self.mode = self._bank.min_instances, self._bank.mode

    def __repr__(self) -> str:
        return repr(self._bank).replace("PageHinkleyBank", "PageHinkley")

    def clone(self) -> PageHinkley:
        """A fresh detector with the same settings (no state)."""
        return PageHinkley(self.delta, self.threshold, self.min_instances, self.mode)

    def reset(self) -> None:
        self._bank.reset(0)

    @property
    def n(self) -> int:
        """Values seen since the last reset."""
        return int(self._bank._n[0])

    @property
    def mean(self) -> float:
        """Running mean of the values seen."""
        return float(self._bank.means()[0])

    @property
    def statistic(self) -> float:
        """Current statistic (0 below ``min_instances``)."""
        return float(self._bank._stat[0])

    @property
    def drift_detected(self) -> bool:
        """Whether the statistic is above the threshold after the last value."""
        return self.statistic > self.threshold

    @property
    def change_point(self) -> int:
        """Values seen when the statistic's cumulative sum was at its extreme: the values after
        it are the estimated new regime (the index of the first of them, counting from 0)."""
        return int(self._bank.change_points()[0])

    @property
    def last_change_points(self) -> IntArray:
        """Per value of the last :meth:`update_many` call, :attr:`change_point` at that time."""
        return self._bank.last_change_points

    @property
    def last_counts(self) -> IntArray:
        """Per value of the last :meth:`update_many` call, :attr:`n` with it."""
        return self._bank.last_counts

    def update(self, x: float) -> None:
        """Add one value."""
        self._bank.update_many(np.zeros(1, dtype=np.int64), np.array([x], dtype=np.float64))

    def update_many(self, xs: ArrayLike) -> FloatArray:
        """Add values in order; the statistic after each ``[n]``."""
        x = np.asarray(xs, dtype=np.float64).ravel()
        return self._bank.update_many(np.zeros(x.size, dtype=np.int64), x)

    def to_state(self) -> dict[str, Any]:
        return self._bank.to_state()

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PageHinkley:
        ph = cls(state["delta"], state["threshold"], state["min_instances"], state["mode"])
        ph._bank = PageHinkleyBank.from_state(state)
        ph._bank._grow(1)
        return ph


def _cut_sizes(min_len: int, max_window: int, per_doubling: int) -> IntArray:
    """Sizes of the recent sub-window ADWIN tests: every size up to ``2 * min_len``, then about
    ``per_doubling`` per doubling, as ADWIN2's exponential histogram (M buckets of each size)
    places its bucket boundaries."""
    top = max(max_window - min_len, min_len)
    steps = np.arange(0, per_doubling * (math.log2(top / min_len) + 1) + 1)
    geo = np.floor(min_len * 2.0 ** (steps / per_doubling)).astype(np.int64)
    small = np.arange(min_len, 2 * min_len + 1, dtype=np.int64)
    sizes = np.unique(np.concatenate([small, geo]))
    out: IntArray = sizes[sizes <= top]
    return out


class ADWIN:
    """ADWIN, adaptive windowing (Bifet & Gavaldà 2007), on a bounded window, vectorised.

    The window holds the most recent values among which no change was found. After each value
    every cut of the window into an older part ``W0`` (``n0`` values, mean ``mu0``) and a
    recent part ``W1`` (``n1``, ``mu1``) is tested; a cut is a change when
    ``|mu1 - mu0| > eps = sqrt(2 m v ln(2 ln(n)/delta)) + 2/3 m ln(2 ln(n)/delta)``, with ``v``
    the window's variance and ``m = 1/(n0 - L + 1) + 1/(n1 - L + 1)`` (``L`` the minimum
    sub-window length): the bound MOA and River use. On a change the window keeps only the
    recent side of the smallest significant cut: it shrinks to post-change data.

    Two deliberate differences with ADWIN2: sums are exact (numpy cumulative sums of a window
    capped at ``max_window`` values, not an exponential histogram), and the tested cut sizes
    follow ADWIN2's bucket boundaries (every size up to ``2L``, then ``cuts_per_doubling`` per
    doubling), checked after every value (River's ``clock=1``).

    An optional effect-size floor ``min_shift`` (0 in ADWIN) makes the test ``|mu1 - mu0| -
    min_shift > eps``: with a long window ADWIN otherwise resolves arbitrarily small changes,
    such as the slow wander of a mean over a heterogeneous population, which may not matter.

    :attr:`statistic` is the largest ``(mu1 - mu0 - min_shift) / eps`` over the cuts (``|.|``
    in "both" mode, ``mu0 - mu1`` in "down"): a change is detected above 1. The window adapts
    to changes in either direction; ``drift_detected`` and the statistic count the ``mode``'s.

    Args:
        delta: confidence parameter (smaller: fewer false alarms, slower detection).
        max_window: most values kept.
        min_window_length: ``L``, the smallest sub-window tested.
        grace_period: values needed before any test.
        mode: ``"up"``, ``"down"`` or ``"both"``.
        cuts_per_doubling: density of the tested cut sizes.
        min_shift: smallest change of the mean that counts (the values' units).

    Example (a seeded Gaussian stream whose mean goes from 0 to 1 at index 1000):
        >>> rng = np.random.default_rng(42)
        >>> stream = np.concatenate([rng.normal(0, 1, 1000), rng.normal(1, 1, 1000)])
        >>> adwin = ADWIN()
        >>> for i, x in enumerate(stream):
        ...     adwin.update(x)
        ...     if adwin.drift_detected:
        ...         print(f"Change detected at index {i}; window {adwin.width}")
        ...         break
        Change detected at index 1030; window 40
    """

    def __init__(
        self,
        delta: float = 0.002,
        *,
        max_window: int = 4096,
        min_window_length: int = 5,
        grace_period: int = 10,
        mode: Mode = "both",
        cuts_per_doubling: int = 5,
        min_shift: float = 0.0,
    ) -> None:
        _check_mode(mode)
        if min_shift < 0:
            raise ValueError(f"min_shift must be >= 0, got {min_shift}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if min_window_length < 1:
            raise ValueError(f"min_window_length must be >= 1, got {min_window_length}")
        if max_window < 2 * min_window_length:
            raise ValueError("max_window must be >= 2 * min_window_length")
        if cuts_per_doubling < 1:
            raise ValueError(f"cuts_per_doubling must be >= 1, got {cuts_per_doubling}")
        self.delta = float(delta)
        self.max_window = int(max_window)
        self.min_window_length = int(min_window_length)
        self.grace_period = max(int(grace_period), 2 * self.min_window_length)
        self.mode: Mode = mode
        self.cuts_per_doubling = int(cuts_per_doubling)
        self.min_shift = float(min_shift)
        self._sizes = _cut_sizes(self.min_window_length, self.max_window, self.cuts_per_doubling)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"ADWIN(delta={self.delta}, max_window={self.max_window}, "
            f"min_window_length={self.min_window_length}, grace_period={self.grace_period}, "
            f"mode={self.mode!r}, cuts_per_doubling={self.cuts_per_doubling}, "
            f"min_shift={self.min_shift})"
        )

    def clone(self) -> ADWIN:
        """A fresh detector with the same settings (no state)."""
        return ADWIN(
            self.delta,
            max_window=self.max_window,
            min_window_length=self.min_window_length,
            grace_period=self.grace_period,
            mode=self.mode,
            cuts_per_doubling=self.cuts_per_doubling,
            min_shift=self.min_shift,
        )

    def reset(self) -> None:
        self._window: FloatArray = np.zeros(0)
        self._stat = 0.0
        self._detected = False
        self.n_detections = 0
        # the latest change (window drop), and every change of the last update_many call:
        # sub-window sizes and means at the cut, eps, and "index" (position in that call)
        self.last_change: dict[str, Any] | None = None
        self.last_changes: list[dict[str, Any]] = []

    @property
    def width(self) -> int:
        """Values in the window."""
        return int(self._window.size)

    @property
    def estimation(self) -> float:
        """Mean of the window (0 when empty)."""
        return float(self._window.mean()) if self._window.size else 0.0

    @property
    def variance(self) -> float:
        """Variance of the window (0 when empty)."""
        return float(self._window.var()) if self._window.size else 0.0

    @property
    def window(self) -> FloatArray:
        """The values in the window, oldest first (a copy)."""
        return self._window.copy()

    @property
    def statistic(self) -> float:
        """Largest ``(mu1 - mu0) / eps`` over the cuts after the last value (see class doc)."""
        return self._stat

    @property
    def drift_detected(self) -> bool:
        """Whether the last value completed a change in the ``mode``'s direction."""
        return self._detected

    def update(self, x: float) -> None:
        """Add one value."""
        self.update_many(np.array([x], dtype=np.float64))

    def update_many(self, xs: ArrayLike) -> FloatArray:
        """Add values in order; the statistic after each ``[n]``.

        Each call tests the cuts of every intermediate window at once (a ``[n, cuts]`` array);
        Python only loops over the changes found.
        """
        x = np.asarray(xs, dtype=np.float64).ravel()
        if not np.isfinite(x).all():
            raise ValueError("xs must be finite")
        out = np.zeros(x.size)
        i = 0
        last_detection = -1
        self.last_changes = []
        while i < x.size:
            j = min(x.size, i + 4096)  # bounds the [n, cuts] arrays
            found = self._scan(x[i:j], out[i:j])
            if found is None:
                i = j
            else:
                assert self.last_change is not None
                self.last_change["index"] = i + found
                self.last_changes.append(self.last_change)
                if out[i + found] > 1.0:
                    last_detection = i + found
                i += found + 1
        if x.size:
            self._stat = float(out[-1])
            self._detected = last_detection == x.size - 1
        return out

    def _ratios(
        self, cs: FloatArray, cs2: FloatArray, end: IntArray, start: IntArray
    ) -> dict[str, Any]:
        """Every tested cut of the windows ``[start, end)`` (one per row; cumulative sums
        ``cs``/``cs2`` with a leading 0): ``(|diff| - min_shift) / eps`` and its signed
        (``mode``) version ``[rows, cuts]``, with the pieces they are made of."""
        width = end - start
        n1 = self._sizes[None, :]
        n0 = width[:, None] - n1
        L = self.min_window_length
        valid = (n0 >= L) & (width[:, None] >= self.grace_period)
        s_all = cs[end] - cs[start]
        s1 = cs[end][:, None] - cs[np.maximum(end[:, None] - n1, 0)]
        with np.errstate(divide="ignore", invalid="ignore"):
            mu1 = s1 / n1
            mu0 = (s_all[:, None] - s1) / np.maximum(n0, 1)
            w = np.maximum(width, 1).astype(np.float64)
            var = np.maximum((cs2[end] - cs2[start]) / w - (s_all / w) ** 2, 0.0)
            dd = np.log(2.0 * np.log(np.maximum(w, 3.0)) / self.delta)
            m = 1.0 / np.maximum(n0 - L + 1, 1) + 1.0 / np.maximum(n1 - L + 1, 1)
            eps = np.sqrt(2.0 * m * (var * dd)[:, None]) + (2.0 / 3.0) * dd[:, None] * m
            diff = mu1 - mu0
            g = self.min_shift
            r_abs = np.where(valid, (np.abs(diff) - g) / eps, 0.0)
            if self.mode == "both":
                r_mode = r_abs
            else:
                sign = 1.0 if self.mode == "up" else -1.0
                r_mode = np.where(valid, (sign * diff - g) / eps, 0.0)
        return {"r_abs": r_abs, "r_mode": r_mode, "mu0": mu0, "mu1": mu1, "eps": eps, "var": var}

    def _scan(self, new: FloatArray, out: FloatArray) -> int | None:
        """Append ``new`` until the first change (its index in ``new``), writing statistics."""
        old = self._window
        ext = np.concatenate([old, new])
        cs = np.concatenate([[0.0], np.cumsum(ext)])
        cs2 = np.concatenate([[0.0], np.cumsum(ext * ext)])
        end = np.arange(old.size + 1, ext.size + 1)  # exclusive end of the window after each
        start = np.maximum(end - self.max_window, 0)
        cuts = self._ratios(cs, cs2, end, start)
        stat = np.maximum(cuts["r_mode"].max(axis=1), 0.0)
        change = np.flatnonzero(cuts["r_abs"].max(axis=1) > 1.0)
        if change.size == 0:
            out[:] = stat
            self._window = ext[max(ext.size - self.max_window, 0) :]
            return None
        r = int(change[0])
        out[: r + 1] = stat[: r + 1]
        e, s0 = int(end[r]), int(start[r])
        width = e - s0
        c = int(np.argmax(cuts["r_abs"][r]))
        # keep the recent side of the smallest significant cut: data of the new regime only
        # (MOA drops one bucket at a time instead, and fires again and again while the new
        # regime grows; the most significant cut often reaches back into the old regime)
        k1 = int(self._sizes[int(np.argmax(cuts["r_abs"][r] > 1.0))])
        k0 = width - k1
        mean_new = float(ext[e - k1 : e].mean())
        mean_old = float(ext[s0 : e - k1].mean())
        self.last_change = {
            "width_before": width,
            "n_old": k0,
            "n_new": k1,
            "mean_old": mean_old,
            "mean_new": mean_new,
            "direction": "up" if mean_new > mean_old else "down",
            "cut_n_new": int(self._sizes[c]),  # the most significant cut
            "cut_mean_old": float(cuts["mu0"][r, c]),
            "cut_mean_new": float(cuts["mu1"][r, c]),
            "epsilon": float(cuts["eps"][r, c]),
            "variance": float(cuts["var"][r]),
        }
        self.n_detections += 1
        self._window = ext[e - k1 : e]
        return r

    def to_state(self) -> dict[str, Any]:
        """JSON-ready state (settings and the window)."""
        return {
            "delta": self.delta,
            "max_window": self.max_window,
            "min_window_length": self.min_window_length,
            "grace_period": self.grace_period,
            "mode": self.mode,
            "cuts_per_doubling": self.cuts_per_doubling,
            "min_shift": self.min_shift,
            "window": self._window.tolist(),
            "n_detections": self.n_detections,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ADWIN:
        adwin = cls(
            state["delta"],
            max_window=state["max_window"],
            min_window_length=state["min_window_length"],
            grace_period=state["grace_period"],
            mode=state["mode"],
            cuts_per_doubling=state["cuts_per_doubling"],
            min_shift=state.get("min_shift", 0.0),
        )
        adwin._window = np.asarray(state["window"], dtype=np.float64)
        adwin.n_detections = int(state["n_detections"])
        return adwin


class _Segments:
    """A batch of ``(stream, value)`` pairs as runs of equal streams, each stream's values in
    their order (a stable sort), with cumulative operations that restart at every run; one
    stream needs no sort and uses the plain cumulative operations."""

    def __init__(self, s_in: IntArray, x_in: FloatArray, n: IntArray) -> None:
        k = x_in.size
        self.order: IntArray | None = None
        if bool((s_in == s_in[0]).all()):
            self.s: Any = int(s_in[0])
            self.x = x_in
            self.ends: Any = k - 1
            self.last: Any = self.s
            self.counts: IntArray = n[self.s] + np.arange(1, k + 1)
            self.total: Any = x_in.sum()
            self._starts: IntArray | None = None
            return
        self.order = np.argsort(s_in, kind="stable")
        self.s, self.x = s_in[self.order], x_in[self.order]
        new_seg = np.empty(k, dtype=bool)
        new_seg[0] = True
        np.not_equal(self.s[1:], self.s[:-1], out=new_seg[1:])
        self._starts = np.flatnonzero(new_seg)
        self._seg = np.cumsum(new_seg) - 1
        self.ends = np.append(self._starts[1:] - 1, k - 1)
        self.last = self.s[self.ends]
        self.counts = n[self.s] + (np.arange(k) - self._starts[self._seg]) + 1
        self.total = np.add.reduceat(self.x, self._starts)

    def csum(self, v: FloatArray) -> FloatArray:
        c = np.cumsum(v)
        if self._starts is None:
            return c
        out: FloatArray = c - (c[self._starts] - v[self._starts])[self._seg]
        return out

    def cmin(self, v: FloatArray) -> tuple[FloatArray, NDArray[np.bool_]]:
        if self._starts is None:
            return _cummin(v)
        return _segmented_cummin(v, self._seg)

    def cmax(self, v: FloatArray) -> FloatArray:
        if self._starts is None:
            out: FloatArray = np.maximum.accumulate(v)
            return out
        return -_segmented_cummin(-v, self._seg)[0]

    def in_input_order(self, values: NDArray[Any]) -> NDArray[Any]:
        """``values`` (in this order) back in the batch's input order."""
        if self.order is None:
            return values
        out = np.empty_like(values)
        out[self.order] = values
        return out
