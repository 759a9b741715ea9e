"""The drift monitor: alarms from prequential losses and task embeddings, with their evidence.

What it watches
---------------
* **Loss drift, global and per task cluster.** Per-event losses are heavy-tailed: a task's
  first predictions are guesses (squared errors 0.1-10) while converged tasks score ~1e-3, and
  squared errors are chi-square-like even then. Three steps make them fit for mean-shift tests:

  1. *Support filter*: only events whose task had ``min_shots`` examples count; first shots
     measure the arrival of new tasks, not the world.
  2. *Log transform with a calibrated floor*: ``y = log(loss + floor)``, ``floor`` the
     ``loss_floor_quantile`` quantile of warm-up losses. A ``x50`` shift of the loss level is
     a shift of ``log 50 = 3.9`` in ``y`` whatever the level; the log compresses the upper
     tail (a loss of 10 weighs 2.3, not 10,000 times a converged one) and the floor bounds
     the lower one (``log`` of a near-zero chi-square draw has a long left tail).
  3. *Window means*: consecutive ``y`` are averaged in blocks of ``loss_block_size`` (16),
     nearly Gaussian by the central limit theorem, and standardised by a scale calibrated on
     the warm-up: ``max(sd(y) / sqrt(b), sd(block means))``, the larger of the independent
     and the observed block spread, so that tasks recurring within a block (popular tasks)
     cannot make the scale optimistic. Detectors then see 30-60 values per 1,000 events,
     which is also what makes per-cluster detectors cheap.

  On the standardised block means ``z``, increases only (a falling loss needs no action):

  * **Page-Hinkley**, ``ph_delta = 1.5``, ``ph_threshold = 12`` (units: calibrated block
    standard deviations). For ``z ~ N(0, 1)`` its false-alarm run length (Siegmund) is
    ``exp(2 delta (lambda + 1.166)) / (2 delta^2)`` = 3e16 blocks, and still 4e7 blocks (1e9
    events) if the true scale were 1.5 times the calibrated one. The large ``delta`` is for
    what is not noise but not drift either: the mean of a heterogeneous population wanders
    (a new popular, hard task can hold a few percent of the events for thousands of them).
    On engine-shaped synthetic streams (``tests/unit/drift/test_detectors.py``) the largest
    statistic in 40 stationary 100k-event streams was 2.0 with ``delta = 1.5`` but 23 with
    ``delta = 1``; on the shipped sinusoid model's stationary scenario, 0.4. A ``x50`` loss
    shift moves ``z`` by ~8-12 per block: alarm after 2-3 blocks (synthetic, 12 seeds:
    median 78 events, max 112; x10: 153 / 245; x5: 334 / 483).
  * **ADWIN**, ``adwin_delta = 1e-3`` with an effect-size floor ``adwin_min_shift = 1``
    (without it ADWIN's long windows resolve that slow wander: with ``delta = 1e-4``, 3 false
    alarms in 6 synthetic 100k streams), minimum sub-window ``adwin_min_window = 4`` blocks.
    Slower than Page-Hinkley (x50: ~150 events), but it forgets the pre-change data by
    itself, so after a cooldown it can report a second shift, and its cut gives the levels
    before and after.
  * **Per cluster**, one Page-Hinkley test each (a :class:`PageHinkleyBank`: all clusters in
    one vectorised update), calibrated on the cluster's own first
    ``cluster_calibration_blocks`` blocks, with ``cluster_ph_delta = 2`` and
    ``cluster_ph_threshold = 20``: a cluster is small, so one popular task can move its mean
    for long (largest stationary statistic in 20 synthetic streams: 2.8 with ``delta = 2``,
    29.7 with ``delta = 1``). It finds drift confined to a cluster (a ``x50`` shift of one
    cluster in 16: ~800 events) that the global tests cannot see.

* **Task-distribution drift in embedding space** (:mod:`stream_meta.drift.embedding`):

  * *Novelty*: an updated task is novel when its distance to its nearest other indexed task
    exceeds the ``novelty_quantile`` of a reference; the statistic is the novel fraction of
    the last ``novelty_window`` embeddings, tested (binomial, ``novelty_alpha``, and at
    least ``novelty_min_rate_ratio`` times the reference rate) against ``1 -
    novelty_quantile``. The reference is calibrated on the warm-up and then *rolls*,
    ``novelty_lag`` embeddings behind: nearest-neighbour distances shrink as the index fills
    (median 0.34 after 2,000 events, 0.07 after 60,000 on the sinusoid stream), so a frozen
    warm-up quantile is never exceeded again.
  * *MMD*: every ``mmd_every_events``, the last ``mmd_window`` embeddings against the
    ``mmd_reference_size`` before the last ``mmd_lag`` (Gaussian kernel, median bandwidth,
    permutation null with a gamma tail, level ``mmd_alpha``). A lagged reference also sees
    a return to an old task distribution, which a warm-up reference takes for normality,
    and not the slow maturation of embeddings as tasks gather examples.

Alarm discipline
----------------
No alarm before ``warmup_events`` events have been observed (since construction or the last
``reset``): the warm-up calibrates everything. Each detector (each cluster's too) alarms when
its statistic exceeds its threshold, then stays silent for ``cooldown_events`` and, by
hysteresis, until its statistic has fallen to ``rearm_fraction`` of the threshold (or the
monitor is reset). Page-Hinkley keeps accumulating while a shift persists, so it re-arms when
the loss is back to normal or after ``reset()`` (the model swap that answers the alarm); ADWIN
drops the pre-change part of its window by itself, so it re-arms on its own and can report a
second, later shift. Every alarm is kept in :attr:`DriftMonitor.alarms` with JSON-ready
evidence.

Cost: a batch is a fixed number of numpy calls, no Python loop per event or per cluster:
``observe_losses`` takes ~0.3 ms for 512 events with 16 clusters, ``observe_embeddings``
~0.1 ms, plus ~1.3 ms for an MMD test every ``mmd_every_events`` (2 shared cores).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from stream_meta.drift.detectors import ADWIN, PageHinkley, PageHinkleyBank
from stream_meta.drift.embedding import MMDDetector, NoveltyDetector

__all__ = ["Alarm", "DriftConfig", "DriftMonitor"]

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
_NEVER = -(2**62)
_FOREVER = 2**62
_HISTORY = 256  # recent blocks kept per loss stream, for the evidence of an alarm


@dataclass(frozen=True)
class DriftConfig:
    """Settings of a :class:`DriftMonitor` (see the module docstring for the reasoning).

    Attributes:
        warmup_events: no alarm before this many observed events; the warm-up calibrates.
        cooldown_events: after an alarm, the same detector stays silent this long (events).
        min_shots: losses of events whose task had fewer examples are ignored.
        per_cluster: also one loss detector per task cluster (ids given by the caller).
        novelty_quantile: reference quantile of nearest-neighbour distances marking novelty.
        rearm_fraction: hysteresis: after an alarm a detector re-arms once its statistic is
            at most this fraction of its threshold.
        loss_block_size: losses averaged per block (window mean) before the detectors.
        loss_calibration_blocks: blocks the global loss calibration needs at least (it waits
            past the warm-up if the warm-up had fewer).
        loss_floor_quantile: quantile of warm-up losses used as the floor of ``log(loss +
            floor)``.
        ph_delta: Page-Hinkley's tolerated shift, in calibrated standard deviations of a
            block mean.
        ph_threshold: Page-Hinkley's alarm level (lambda), same units.
        adwin_delta: ADWIN's confidence parameter.
        adwin_max_window: most blocks in ADWIN's window.
        adwin_min_window: smallest sub-window (blocks) ADWIN tests.
        adwin_min_shift: smallest change of the mean (block standard deviations) ADWIN
            counts.
        cluster_calibration_blocks: blocks a cluster's loss detector calibrates on.
        cluster_ph_delta: per-cluster Page-Hinkley tolerated shift.
        cluster_ph_threshold: per-cluster Page-Hinkley alarm level.
        novelty_window: embeddings in the novelty detector's sliding window.
        novelty_alpha: level of the novelty binomial test.
        novelty_min_rate_ratio: the novel fraction must also be this multiple of the
            reference rate ``1 - novelty_quantile``.
        novelty_reference_size: reference distances kept (the latest).
        novelty_min_reference: reference distances needed to calibrate (at the warm-up's
            end; the calibration waits past it while there are fewer).
        novelty_lag: embeddings between the novelty window and its rolling reference (None:
            the reference stays the warm-up's).
        mmd_reference_size: reference embeddings.
        mmd_window: recent embeddings compared with them.
        mmd_lag: embeddings between the newest one and the newest of the rolling MMD
            reference (None: the reference is the end of the warm-up, fixed).
        mmd_every_events: events between two MMD tests.
        mmd_permutations: permutations per MMD test.
        mmd_alpha: level of the MMD test.
        calibration_buffer: most eligible losses kept for the calibration (the latest).
    """

    warmup_events: int = 2000
    cooldown_events: int = 2000
    min_shots: int = 3
    per_cluster: bool = True
    novelty_quantile: float = 0.99
    rearm_fraction: float = 0.5
    loss_block_size: int = 16
    loss_calibration_blocks: int = 32
    loss_floor_quantile: float = 0.05
    ph_delta: float = 1.5
    ph_threshold: float = 12.0
    adwin_delta: float = 1e-3
    adwin_max_window: int = 1024
    adwin_min_window: int = 4
    adwin_min_shift: float = 1.0
    cluster_calibration_blocks: int = 16
    cluster_ph_delta: float = 2.0
    cluster_ph_threshold: float = 20.0
    novelty_window: int = 256
    novelty_alpha: float = 1e-6
    novelty_min_rate_ratio: float = 5.0
    novelty_reference_size: int = 2048
    novelty_min_reference: int = 128
    novelty_lag: int | None = 1024
    mmd_reference_size: int = 128
    mmd_window: int = 128
    mmd_lag: int | None = 1024
    mmd_every_events: int = 2048
    mmd_permutations: int = 100
    mmd_alpha: float = 1e-6
    calibration_buffer: int = 65536

    def __post_init__(self) -> None:
        for name in ("warmup_events", "cooldown_events", "min_shots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        positive_ints = (
            "loss_block_size",
            "loss_calibration_blocks",
            "adwin_max_window",
            "adwin_min_window",
            "cluster_calibration_blocks",
            "novelty_window",
            "novelty_reference_size",
            "novelty_min_reference",
            "mmd_reference_size",
            "mmd_window",
            "mmd_every_events",
            "mmd_permutations",
            "calibration_buffer",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unit = ("novelty_quantile", "loss_floor_quantile", "adwin_delta", "novelty_alpha")
        for name in (*unit, "mmd_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.rearm_fraction < 1.0:
            raise ValueError(f"rearm_fraction must be in [0, 1), got {self.rearm_fraction}")
        for name in ("ph_delta", "cluster_ph_delta", "adwin_min_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("ph_threshold", "cluster_ph_threshold", "novelty_min_rate_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.novelty_lag is not None and self.novelty_lag < self.novelty_window:
            raise ValueError("novelty_lag must be >= novelty_window")
        if self.mmd_lag is not None and self.mmd_lag < self.mmd_window:
            raise ValueError("mmd_lag must be >= mmd_window")
        if self.calibration_buffer < self.loss_calibration_blocks * self.loss_block_size:
            raise ValueError("calibration_buffer must hold loss_calibration_blocks blocks")


@dataclass(frozen=True)
class Alarm:
    """One drift alarm.

    Attributes:
        event_index: stream position (0-based count of events observed) when raised.
        detector: e.g. ``"loss_page_hinkley"``, ``"loss_adwin"``,
            ``"loss_cluster_3_page_hinkley"``, ``"embedding_novelty"``, ``"embedding_mmd"``.
        statistic: the detector's statistic at the alarm.
        threshold: the level it exceeded.
        evidence: JSON-ready details (levels before/after, window sizes, p-values, ...).
    """

    event_index: int
    detector: str
    statistic: float
    threshold: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_index": self.event_index,
            "detector": self.detector,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "evidence": dict(self.evidence),
        }


def _json(v: Any) -> Any:
    """Numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class _Gate:
    """Warm-up, cooldown and hysteresis for one detector on each of several slots."""

    def __init__(self, cooldown: int, rearm_fraction: float) -> None:
        self.cooldown = cooldown
        self.rearm_fraction = rearm_fraction
        self.armed = np.ones(0, dtype=bool)
        self.last = np.zeros(0, dtype=np.int64)

    def _grow(self, size: int) -> None:
        old = len(self.armed)
        if size > old:
            size = max(size, 2 * old, 8)
            self.armed = np.concatenate([self.armed, np.ones(size - old, dtype=bool)])
            self.last = np.concatenate([self.last, np.full(size - old, _NEVER, dtype=np.int64)])

    def check(
        self,
        slots: IntArray,
        stats: FloatArray,
        threshold: float | FloatArray,
        positions: IntArray,
        earliest: int,
    ) -> list[int]:
        """Indices (into the arrays, in order) of the values that raise an alarm."""
        if stats.size == 0:
            return []
        self._grow(int(slots.max()) + 1)
        thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), stats.shape)
        high = stats > thr
        if not high.any() and self.armed.all():  # the common case
            return []
        low = stats <= self.rearm_fraction * thr
        hot = np.zeros(len(self.armed), dtype=bool)
        hot[slots[high]] = True
        hot |= ~self.armed
        candidates = np.flatnonzero(high | (low & hot[slots]))
        fired: list[int] = []
        for i in candidates.tolist():
            s = int(slots[i])
            if not self.armed[s]:
                if low[i]:
                    self.armed[s] = True
                continue
            if (
                high[i]
                and positions[i] >= earliest
                and positions[i] - self.last[s] >= self.cooldown
            ):
                fired.append(i)
                self.armed[s] = False
                self.last[s] = positions[i]
        return fired


class _Blocks:
    """Consecutive values of each stream (slot) averaged in blocks: window means."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.n = np.zeros(0, dtype=np.int64)  # values pending in the open block
        self.s = np.zeros(0)  # their sum, sum of squares, sum of raw losses
        self.q = np.zeros(0)
        self.r = np.zeros(0)

    def _grow(self, size: int) -> None:
        old = len(self.n)
        if size > old:
            size = max(size, 2 * old, 8)
            self.n = np.concatenate([self.n, np.zeros(size - old, dtype=np.int64)])
            for name in ("s", "q", "r"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(size - old)]))

    def add(
        self, slots: IntArray, y: FloatArray, raw: FloatArray, pos: IntArray
    ) -> tuple[IntArray, FloatArray, FloatArray, FloatArray, IntArray]:
        """Add values in stream order; the blocks they complete, ordered by their last event:
        slot, mean of ``y``, mean of ``y**2``, mean raw loss, position of the last event."""
        k = y.size
        if k == 0:
            return (
                np.zeros(0, dtype=np.int64),
                np.zeros(0),
                np.zeros(0),
                np.zeros(0),
                np.zeros(0, dtype=np.int64),
            )
        self._grow(int(slots.max()) + 1)
        b = self.size
        if bool((slots == slots[0]).all()):
            return self._add_single(int(slots[0]), y, raw, pos)
        order = np.argsort(slots, kind="stable")
        s, yy, rr, pp = slots[order], y[order], raw[order], pos[order]
        new_seg = np.empty(k, dtype=bool)
        new_seg[0] = True
        np.not_equal(s[1:], s[:-1], out=new_seg[1:])
        starts = np.flatnonzero(new_seg)
        seg = np.cumsum(new_seg) - 1
        rank = self.n[s] + (np.arange(k) - starts[seg])
        blk = rank // b
        new_grp = new_seg.copy()
        new_grp[1:] |= blk[1:] != blk[:-1]
        gstart = np.flatnonzero(new_grp)
        gend = np.append(gstart[1:] - 1, k - 1)
        gslot, gblk = s[gstart], blk[gstart]
        gs = np.add.reduceat(yy, gstart)
        gq = np.add.reduceat(yy * yy, gstart)
        gr = np.add.reduceat(rr, gstart)
        gc = gend - gstart + 1
        first = gblk == 0
        fs = gslot[first]
        gs[first] += self.s[fs]
        gq[first] += self.q[fs]
        gr[first] += self.r[fs]
        gc[first] += self.n[fs]
        complete = gc == b
        # the open block of each stream after the batch: its last group, unless complete
        seg_end = np.append(starts[1:] - 1, k - 1)
        lg = np.cumsum(new_grp)[seg_end] - 1
        lslot = s[starts]
        open_ = ~complete[lg]
        self.n[lslot] = np.where(open_, gc[lg], 0)
        self.s[lslot] = np.where(open_, gs[lg], 0.0)
        self.q[lslot] = np.where(open_, gq[lg], 0.0)
        self.r[lslot] = np.where(open_, gr[lg], 0.0)
        idx = np.flatnonzero(complete)
        end_pos = pp[gend[idx]]
        o = np.argsort(end_pos, kind="stable")
        idx, end_pos = idx[o], end_pos[o]
        return gslot[idx], gs[idx] / b, gq[idx] / b, gr[idx] / b, end_pos

    def _add_single(
        self, slot: int, y: FloatArray, raw: FloatArray, pos: IntArray
    ) -> tuple[IntArray, FloatArray, FloatArray, FloatArray, IntArray]:
        """:meth:`add` for values of one stream (the global one): plain ``reduceat``."""
        b, n0, k = self.size, int(self.n[slot]), y.size
        full = (n0 + k) // b
        cut = full * b - n0  # values that complete blocks
        if full:
            starts = np.maximum(np.arange(full) * b - n0, 0)
            sums = np.add.reduceat(y[:cut], starts)
            sq = np.add.reduceat(y[:cut] * y[:cut], starts)
            rs = np.add.reduceat(raw[:cut], starts)
            sums[0] += self.s[slot]
            sq[0] += self.q[slot]
            rs[0] += self.r[slot]
            self.n[slot], self.s[slot], self.q[slot], self.r[slot] = 0, 0.0, 0.0, 0.0
        rest = slice(max(cut, 0), None)
        self.n[slot] += k - max(cut, 0)
        self.s[slot] += y[rest].sum()
        self.q[slot] += (y[rest] * y[rest]).sum()
        self.r[slot] += raw[rest].sum()
        if not full:
            empty = np.zeros(0)
            return np.zeros(0, dtype=np.int64), empty, empty, empty, np.zeros(0, dtype=np.int64)
        ends = pos[np.arange(1, full + 1) * b - n0 - 1]
        return np.full(full, slot, dtype=np.int64), sums / b, sq / b, rs / b, ends

    def reset(self) -> None:
        self.n[:] = 0
        self.s[:] = self.q[:] = self.r[:] = 0.0


@dataclass
class _Scale:
    """Calibration of one loss stream: location and scale of its block means."""

    mu: float
    sd: float
    raw_mean: float
    blocks: int
    z: FloatArray  # the calibration blocks, standardised (replayed into fresh detectors)

    @classmethod
    def fit(cls, means: FloatArray, meansq: FloatArray, raw: FloatArray, b: int) -> _Scale:
        mu = float(means.mean())
        n = means.size * b
        var_y = max(float(meansq.mean()) - mu * mu, 0.0) * n / max(n - 1, 1)
        sd_iid = math.sqrt(var_y / b)
        sd_blocks = float(means.std(ddof=1)) if means.size > 1 else 0.0
        sd = max(sd_iid, sd_blocks, 1e-9)
        return cls(mu, sd, float(raw.mean()), int(means.size), (means - mu) / sd)


class DriftMonitor:
    """Drift alarms from a stream's prequential losses and task embeddings.

    See the module docstring for what is watched and why. ``observe_*`` return the alarms
    they raised (also appended to :attr:`alarms`).

    Args:
        config: thresholds and windows (default: ``DriftConfig()``).
        seed: seeds the MMD permutations.

    Example (engine-like losses: first shots ignored; the loss level of converged tasks
    jumps from 1e-3 to 5e-2 at event 6,000):
        >>> rng = np.random.default_rng(0)
        >>> idx = np.arange(12_000)
        >>> shots = rng.integers(0, 30, idx.size)
        >>> level = np.where(idx < 6_000, 1e-3, 5e-2) + 3.0 * 0.2 ** shots
        >>> losses = level * rng.standard_normal(idx.size) ** 2
        >>> monitor = DriftMonitor(DriftConfig(warmup_events=2000))
        >>> for lo in range(0, idx.size, 512):
        ...     sl = slice(lo, lo + 512)
        ...     for alarm in monitor.observe_losses(idx[sl], losses[sl], shots[sl]):
        ...         print(alarm.event_index, alarm.detector)
        6046 loss_page_hinkley
        6096 loss_adwin
    """

    def __init__(self, config: DriftConfig | None = None, *, seed: int = 0) -> None:
        self.config = config if config is not None else DriftConfig()
        self.seed = int(seed)
        self._alarms: list[Alarm] = []
        c = self.config
        self._novelty = NoveltyDetector(
            c.novelty_quantile,
            window=c.novelty_window,
            alpha=c.novelty_alpha,
            min_rate_ratio=c.novelty_min_rate_ratio,
            reference_size=c.novelty_reference_size,
            min_reference=c.novelty_min_reference,
            lag=c.novelty_lag,
        )
        self._mmd = MMDDetector(
            reference_size=c.mmd_reference_size,
            window=c.mmd_window,
            permutations=c.mmd_permutations,
            alpha=c.mmd_alpha,
            seed=self.seed,
            lag=c.mmd_lag,
        )
        self._start(recalibrate=True)

    def __repr__(self) -> str:
        return f"DriftMonitor({self.config!r}, seed={self.seed})"

    # -- lifecycle -------------------------------------------------------------------------
    def _start(self, *, recalibrate: bool) -> None:
        c = self.config
        if recalibrate:
            self._origin: int | None = None
            self._last_pos = -1
            self._floor: float | None = None  # of log(loss + floor); None until calibrated
            self._g_scale: _Scale | None = None
            self._buf: list[tuple[IntArray, FloatArray, IntArray]] = []
            self._buf_n = 0
            self._c_slot: dict[int, int] = {}  # cluster id -> slot
            self._c_id: list[int] = []  # slot -> cluster id
            self._c_scale: list[_Scale | None] = []
            self._c_calib: dict[int, list[tuple[float, float, float]]] = {}
        self._novelty.reset(keep_reference=not recalibrate)
        self._mmd.reset(keep_reference=not recalibrate)
        self._mmd_due: int | None = None
        self._mmd_stat = 0.0
        self._g_blocks = _Blocks(c.loss_block_size)
        self._g_hist: deque[tuple[int, int, float, float]] = deque(maxlen=_HISTORY)
        self._ph = PageHinkley(c.ph_delta, c.ph_threshold, min_instances=1, mode="up")
        self._adwin = ADWIN(
            c.adwin_delta,
            max_window=c.adwin_max_window,
            min_window_length=c.adwin_min_window,
            grace_period=2 * c.adwin_min_window,
            mode="up",
            min_shift=c.adwin_min_shift,
        )
        self._c_blocks = _Blocks(c.loss_block_size)
        self._bank = PageHinkleyBank(c.cluster_ph_delta, c.cluster_ph_threshold, 1, mode="up")
        self._c_hist: dict[int, deque[tuple[int, int, float, float]]] = {}
        self._gates = {
            name: _Gate(c.cooldown_events, c.rearm_fraction)
            for name in ("ph", "adwin", "cluster", "novelty", "mmd")
        }
        if self._g_scale is not None:  # reset without recalibration: replay the calibration
            self._replay_global(self._g_scale)
            for slot, scale in enumerate(self._c_scale):
                if scale is not None:
                    self._replay_cluster(slot, scale)

    def reset(self, *, recalibrate: bool = True) -> None:
        """Restart every detector (hysteresis and cooldowns included); past alarms are kept.

        With ``recalibrate`` (after a model swap: losses have another level and a new model's
        embeddings live in another space) the warm-up starts again from the next observed
        event and every reference is rebuilt. Without it the calibrations are kept and the
        detectors restart from them, armed at once.
        """
        self._start(recalibrate=recalibrate)

    @property
    def alarms(self) -> list[Alarm]:
        """Every alarm so far, oldest first."""
        return list(self._alarms)

    @property
    def warmup_end(self) -> int | None:
        """First stream position at which an alarm is possible (None before any event)."""
        return None if self._origin is None else self._origin + self.config.warmup_events

    @property
    def calibrated(self) -> dict[str, bool]:
        """Which references are calibrated: ``loss``, ``novelty``, ``mmd``."""
        return {
            "loss": self._g_scale is not None,
            "novelty": self._novelty.calibrated,
            "mmd": self._mmd.calibrated,
        }

    def _see(self, first: int, last: int) -> int:
        """Record observed positions; the warm-up's end."""
        if self._origin is None:
            self._origin = int(first)
        self._last_pos = max(self._last_pos, int(last))
        return self._origin + self.config.warmup_events

    def statistics(self) -> dict[str, float]:
        """Current statistic of each detector, per-cluster ones included (0 until calibrated)."""
        out = {
            "loss_page_hinkley": self._ph.statistic,
            "loss_adwin": self._adwin.statistic,
            "embedding_novelty": self._novelty.statistic,
            "embedding_mmd": self._mmd_stat,
        }
        stats = self._bank.statistics
        for slot, cid in enumerate(self._c_id):
            stat = float(stats[slot]) if slot < stats.size else 0.0
            out[f"loss_cluster_{cid}_page_hinkley"] = stat
        return out

    def _record(self, pos: int, name: str, stat: float, thr: float, ev: dict[str, Any]) -> Alarm:
        alarm = Alarm(int(pos), name, float(stat), float(thr), _json(ev))
        log.warning("drift: %s at event %d (%.4g > %.4g)", name, pos, stat, thr)
        return alarm

    def _keep(self, alarms: list[Alarm]) -> list[Alarm]:
        """The alarms of one call in stream order, appended to the history."""
        alarms.sort(key=lambda a: a.event_index)
        self._alarms += alarms
        return alarms

    # -- losses ----------------------------------------------------------------------------
    def observe_losses(
        self,
        event_index: ArrayLike,
        losses: ArrayLike,
        shots: ArrayLike,
        clusters: ArrayLike | None = None,
    ) -> list[Alarm]:
        """Observe a batch of labelled events, in stream order; the alarms raised (by position).

        Args:
            event_index: stream position of each event ``[B]`` (non-decreasing).
            losses: its prequential loss ``[B]`` (non-finite or negative ones are ignored).
            shots: the support size it was predicted with ``[B]``.
            clusters: its task's cluster ``[B]`` (negative: unknown), or None.
        """
        pos = np.asarray(event_index, dtype=np.int64).ravel()
        loss = np.asarray(losses, dtype=np.float64).ravel()
        shot = np.asarray(shots).ravel()
        n = pos.size
        if loss.size != n or shot.size != n:
            raise ValueError(
                f"lengths differ: {n} positions, {loss.size} losses, {shot.size} shots"
            )
        use_clusters = clusters is not None and self.config.per_cluster
        cl = np.asarray(clusters, dtype=np.int64).ravel() if use_clusters else np.full(n, -1)
        if cl.size != n:
            raise ValueError(f"lengths differ: {n} positions, {cl.size} clusters")
        if n == 0:
            return []
        if n > 1 and (pos[1:] < pos[:-1]).any():
            raise ValueError("event_index must be non-decreasing (stream order)")
        warm_end = self._see(int(pos[0]), int(pos[-1]))
        keep = (shot >= self.config.min_shots) & np.isfinite(loss) & (loss >= 0)
        if not keep.all():
            pos, loss, cl = pos[keep], loss[keep], cl[keep]
        if self._floor is None:
            pos, loss, cl = self._calibration_step(pos, loss, cl, warm_end)
            if self._floor is None or pos.size == 0:
                return []
        y = np.log(loss + self._floor)
        alarms = self._global_losses(pos, y, loss, warm_end)
        if self.config.per_cluster:
            alarms += self._cluster_losses(pos, y, loss, cl, warm_end)
        return self._keep(alarms)

    def _calibration_step(
        self, pos: IntArray, loss: FloatArray, cl: IntArray, warm_end: int
    ) -> tuple[IntArray, FloatArray, IntArray]:
        """Buffer warm-up losses; calibrate once the warm-up is over and enough are buffered
        (waiting past the warm-up if needed). Returns the rest of the batch, to process live."""
        c = self.config
        need = c.loss_calibration_blocks * c.loss_block_size
        cut = max(int(np.searchsorted(pos, warm_end)), min(pos.size, need - self._buf_n))
        if cut:
            self._buf.append((pos[:cut], loss[:cut], cl[:cut]))
            self._buf_n += cut
            if self._buf_n > c.calibration_buffer:
                p, lo, k = (np.concatenate(a) for a in zip(*self._buf, strict=True))
                last = slice(-c.calibration_buffer, None)
                self._buf, self._buf_n = [(p[last], lo[last], k[last])], c.calibration_buffer
        if self._last_pos >= warm_end - 1 and self._buf_n >= need:
            self._calibrate_losses()
        return pos[cut:], loss[cut:], cl[cut:]

    def _calibrate_losses(self) -> None:
        c = self.config
        pos, loss, cl = (np.concatenate(a) for a in zip(*self._buf, strict=True))
        self._buf, self._buf_n = [], 0
        positive = loss[loss > 0]
        q = float(np.quantile(positive, c.loss_floor_quantile)) if positive.size else 0.0
        self._floor = max(q, 1e-12)
        y = np.log(loss + self._floor)
        _, means, meansq, raw, end = self._g_blocks.add(np.zeros(y.size, np.int64), y, loss, pos)
        scale = self._g_scale = _Scale.fit(means, meansq, raw, c.loss_block_size)
        for i in range(means.size):
            self._g_hist.append((i + 1, int(end[i]), float(raw[i]), float(scale.z[i])))
        self._replay_global(scale)
        log.info(
            "drift: losses calibrated on %d events (%d blocks): floor %.3g, typical loss %.3g",
            loss.size,
            means.size,
            self._floor,
            self._typical(scale, 0.0),
        )
        if c.per_cluster and (cl >= 0).any():  # warm-up losses start the clusters' calibration
            self._cluster_losses(pos, y, loss, cl, warm_end=_FOREVER)

    def _replay_global(self, scale: _Scale) -> None:
        """Start the global detectors from the calibration blocks (no alarm from them)."""
        self._ph.update_many(scale.z)
        self._adwin.update_many(scale.z)

    def _replay_cluster(self, slot: int, scale: _Scale) -> None:
        self._bank.reset(slot)
        self._bank.update_many(np.full(scale.z.size, slot, dtype=np.int64), scale.z)

    def _typical(self, scale: _Scale, z: float) -> float:
        """The loss level a standardised block mean ``z`` stands for: ``exp(mean of log(loss +
        floor)) - floor``, a geometric-mean-like level that outliers barely move."""
        assert self._floor is not None
        return math.exp(scale.mu + scale.sd * z) - self._floor

    def _global_losses(
        self, pos: IntArray, y: FloatArray, raw: FloatArray, warm_end: int
    ) -> list[Alarm]:
        scale = self._g_scale
        assert scale is not None
        zeros = np.zeros(y.size, np.int64)
        _, means, _, raw_means, end = self._g_blocks.add(zeros, y, raw, pos)
        if means.size == 0:
            return []
        z = (means - scale.mu) / scale.sd
        ph_stat = self._ph.update_many(z)
        counts, cps = self._ph.last_counts, self._ph.last_change_points
        ad_stat = self._adwin.update_many(z)
        changes = {ch["index"]: ch for ch in self._adwin.last_changes}
        for i in range(z.size):
            self._g_hist.append((int(counts[i]), int(end[i]), float(raw_means[i]), float(z[i])))
        c, slot = self.config, zeros[: z.size]
        alarms = []
        for i in self._gates["ph"].check(slot, ph_stat, c.ph_threshold, end, warm_end):
            ev = self._ph_evidence(self._g_hist, int(counts[i]), int(cps[i]), scale)
            ev.update(stream="global", delta=c.ph_delta)
            alarms.append(
                self._record(int(end[i]), "loss_page_hinkley", ph_stat[i], c.ph_threshold, ev)
            )
        for i in self._gates["adwin"].check(slot, ad_stat, 1.0, end, warm_end):
            ev = self._adwin_evidence(changes.get(i), int(counts[i]), scale)
            alarms.append(self._record(int(end[i]), "loss_adwin", ad_stat[i], 1.0, ev))
        return alarms

    def _ph_evidence(
        self, hist: deque[tuple[int, int, float, float]], count: int, change: int, scale: _Scale
    ) -> dict[str, Any]:
        """Levels before (the calibration) and after the estimated change point."""
        since = [h for h in hist if change < h[0] <= count]
        z_after = float(np.mean([h[3] for h in since])) if since else None
        return {
            "blocks": count,
            "blocks_since_change": count - change,
            "change_event_index": since[0][1] if since and since[0][0] == change + 1 else None,
            "mean_loss_before": scale.raw_mean,
            "mean_loss_after": float(np.mean([h[2] for h in since])) if since else None,
            "typical_loss_before": self._typical(scale, 0.0),
            "typical_loss_after": None if z_after is None else self._typical(scale, z_after),
            "mean_z_after": z_after,
            "block_size": self.config.loss_block_size,
            "min_shots": self.config.min_shots,
            "loss_floor": self._floor,
            "scale": scale.sd,
        }

    def _adwin_evidence(
        self, change: dict[str, Any] | None, count: int, scale: _Scale
    ) -> dict[str, Any]:
        """The cut ADWIN found: sub-window sizes and levels."""
        ev: dict[str, Any] = {
            "stream": "global",
            "blocks": count,
            "window": self._adwin.width,
            "block_size": self.config.loss_block_size,
            "min_shots": self.config.min_shots,
            "delta": self.config.adwin_delta,
            "loss_floor": self._floor,
            "scale": scale.sd,
        }
        if change is not None:
            n_new = int(change["n_new"])
            recent = [h for h in self._g_hist if count - n_new < h[0] <= count]
            ev.update(
                window_before=change["width_before"],
                n_old=change["n_old"],
                n_new=n_new,
                mean_z_old=change["mean_old"],
                mean_z_new=change["mean_new"],
                epsilon=change["epsilon"],
                typical_loss_before=self._typical(scale, change["mean_old"]),
                typical_loss_after=self._typical(scale, change["mean_new"]),
                mean_loss_after=float(np.mean([h[2] for h in recent])) if recent else None,
                change_event_index=recent[0][1] if len(recent) == n_new else None,
            )
        return ev

    def _cluster_slots(self, cl: IntArray) -> IntArray:
        ids, inv = np.unique(cl, return_inverse=True)
        slots = np.empty(ids.size, dtype=np.int64)
        for j, cid in enumerate(ids.tolist()):
            slot = self._c_slot.get(cid)
            if slot is None:
                slot = self._c_slot[cid] = len(self._c_id)
                self._c_id.append(cid)
                self._c_scale.append(None)
            slots[j] = slot
        out: IntArray = slots[inv.ravel()]
        return out

    def _cluster_losses(
        self, pos: IntArray, y: FloatArray, raw: FloatArray, cl: IntArray, warm_end: int
    ) -> list[Alarm]:
        known = cl >= 0
        if not known.any():
            return []
        if not known.all():
            pos, y, raw, cl = pos[known], y[known], raw[known], cl[known]
        bslot, means, meansq, raw_means, end = self._c_blocks.add(
            self._cluster_slots(cl), y, raw, pos
        )
        if bslot.size == 0:
            return []
        c = self.config
        scales = [self._c_scale[s] for s in bslot.tolist()]
        ready = np.array([sc is not None for sc in scales], dtype=bool)
        if not ready.all():  # calibration of new clusters (rare: Python is fine)
            touched = set()
            for i in np.flatnonzero(~ready).tolist():
                s = int(bslot[i])
                self._c_calib.setdefault(s, []).append((means[i], meansq[i], raw_means[i]))
                touched.add(s)
            for s in touched:
                cal = np.asarray(self._c_calib[s], dtype=np.float64)
                if len(cal) >= c.cluster_calibration_blocks:
                    del self._c_calib[s]
                    scale = _Scale.fit(cal[:, 0], cal[:, 1], cal[:, 2], c.loss_block_size)
                    self._c_scale[s] = scale
                    self._replay_cluster(s, scale)
            live = np.flatnonzero(ready)
            bslot, means, raw_means, end = bslot[live], means[live], raw_means[live], end[live]
            scales = [scales[i] for i in live.tolist()]
            if bslot.size == 0:
                return []
        mu = np.array([sc.mu for sc in scales if sc is not None])
        sd = np.array([sc.sd for sc in scales if sc is not None])
        z = (means - mu) / sd
        stats = self._bank.update_many(bslot, z)
        counts, cps = self._bank.last_counts, self._bank.last_change_points
        for i, s in enumerate(bslot.tolist()):
            hist = self._c_hist.get(s)
            if hist is None:
                hist = self._c_hist[s] = deque(maxlen=_HISTORY // 4)
            hist.append((int(counts[i]), int(end[i]), float(raw_means[i]), float(z[i])))
        alarms = []
        thr = c.cluster_ph_threshold
        for i in self._gates["cluster"].check(bslot, stats, thr, end, warm_end):
            s = int(bslot[i])
            scale = scales[i]
            assert scale is not None
            ev = self._ph_evidence(self._c_hist[s], int(counts[i]), int(cps[i]), scale)
            ev.update(stream="cluster", cluster=self._c_id[s], delta=c.cluster_ph_delta)
            name = f"loss_cluster_{self._c_id[s]}_page_hinkley"
            alarms.append(self._record(int(end[i]), name, stats[i], thr, ev))
        return alarms

    # -- embeddings ------------------------------------------------------------------------
    def observe_embeddings(
        self, event_index: int, embeddings: ArrayLike, nn_distance: ArrayLike
    ) -> list[Alarm]:
        """Observe the tasks updated in the batch ending at ``event_index``; the alarms raised.

        Until the warm-up is over (and enough were seen) they build the references: the
        novelty quantile and the MMD reference sample.

        Args:
            event_index: stream position of the batch's last event.
            embeddings: the updated tasks' embeddings ``[B, E]`` (rows with non-finite
                entries are ignored).
            nn_distance: each one's distance to its nearest *other* indexed task ``[B]``
                (``np.nan`` when there is none: ignored by the novelty test).
        """
        X = np.asarray(embeddings, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"embeddings must be [B, E], got shape {X.shape}")
        d = np.asarray(nn_distance, dtype=np.float64).ravel()
        if d.size != len(X):
            raise ValueError(f"{len(X)} embeddings but {d.size} distances")
        pos = int(event_index)
        warm_end = self._see(pos, pos)
        one, at = np.zeros(1, np.int64), np.array([pos], dtype=np.int64)
        alarms = []
        nov = self._novelty
        if nov.calibrated or (pos >= warm_end and nov.calibrate()):
            stat = nov.update(d)
            if nov.n >= nov.window // 2:
                thr = nov.threshold
                if self._gates["novelty"].check(one, np.array([stat]), thr, at, warm_end):
                    ev = nov.evidence()
                    alarms.append(self._record(pos, "embedding_novelty", stat, thr, ev))
        else:
            nov.learn_reference(d)
            if pos >= warm_end:
                nov.calibrate()
        mmd = self._mmd
        if mmd.calibrated or (pos >= warm_end and mmd.calibrate()):
            mmd.update(X)
            due = self._mmd_due if self._mmd_due is not None else pos
            if pos >= due and mmd.n >= mmd.window:
                res = mmd.test()
                assert res is not None
                self._mmd_due = pos + self.config.mmd_every_events
                self._mmd_stat = res.mmd2
                stat_a = np.array([res.mmd2])
                if self._gates["mmd"].check(one, stat_a, res.threshold, at, warm_end):
                    ev = res.to_dict()
                    alarms.append(self._record(pos, "embedding_mmd", res.mmd2, res.threshold, ev))
        else:
            mmd.learn_reference(X)
            if pos >= warm_end:
                mmd.calibrate()
        return self._keep(alarms)
