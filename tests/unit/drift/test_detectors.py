"""Drift detection: the detectors against their textbook recursions and known properties, the
monitor on engine-shaped heavy-tailed loss streams, embedding novelty and MMD, alarm discipline
(warm-up, cooldown, hysteresis, reset) and the evidence alarms carry. Seeded data, no mocks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from scipy import stats

from stream_meta.drift import (
    ADWIN,
    Alarm,
    DriftConfig,
    DriftMonitor,
    MMDDetector,
    NoveltyDetector,
    PageHinkley,
    PageHinkleyBank,
    mmd_test,
)
from stream_meta.drift.embedding import binomial_sf, gamma_isf, gamma_sf

# -- factories --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossStream:
    """Labelled events of an engine-like stream: positions, losses, support sizes, clusters."""

    index: np.ndarray
    losses: np.ndarray
    shots: np.ndarray
    clusters: np.ndarray
    n_events: int

    def until(self, stop: int) -> LossStream:
        """The events before position ``stop``."""
        k = int(np.searchsorted(self.index, stop))
        return LossStream(self.index[:k], self.losses[:k], self.shots[:k], self.clusters[:k], stop)


def engine_like_losses(
    n_events: int,
    *,
    seed: int,
    levels: tuple[tuple[int, float], ...] = ((0, 1e-3),),
    clusters: int = 16,
    cluster_shift: tuple[int, int, float] | None = None,
) -> LossStream:
    """Prequential squared errors shaped like the engine's.

    A new task every ~20 events (Zipf popularity over the tasks so far, as ``TaskStream``),
    70% of events labelled; a task's ``s``-th labelled event has squared error
    ``difficulty * (level + 3 * 0.2**s) * chi2_1``: 0.1-10 for first shots, ~``level`` once
    converged, per-task difficulty lognormal(0, 0.5). ``levels`` gives the converged level from
    each position on; ``cluster_shift = (cluster, at, factor)`` multiplies one cluster's level.
    """
    rng = np.random.default_rng(seed)
    new = rng.random(n_events) < 0.05
    new[:5] = True
    n_tasks = np.cumsum(new)
    cw = np.cumsum((rng.permutation(int(n_tasks[-1])) + 1.0) ** -1.1)
    existing = np.maximum(n_tasks - new, 1)
    pick = np.searchsorted(cw, rng.random(n_events) * cw[existing - 1], side="right")
    task = np.where(new, n_tasks - 1, np.minimum(pick, existing - 1))
    index = np.flatnonzero(rng.random(n_events) < 0.7)
    t = task[index]
    order = np.argsort(t, kind="stable")
    first = np.r_[True, t[order][1:] != t[order][:-1]]
    starts = np.flatnonzero(first)
    shots = np.empty(t.size, dtype=np.int64)
    shots[order] = np.arange(t.size) - starts[np.cumsum(first) - 1]
    level = np.zeros(index.size)
    for at, value in levels:
        level[index >= at] = value
    cluster = rng.integers(0, clusters, int(n_tasks[-1]))[t]
    if cluster_shift is not None:
        c, at, factor = cluster_shift
        level[(cluster == c) & (index >= at)] *= factor
    difficulty = rng.lognormal(0.0, 0.5, int(n_tasks[-1]))[t]
    losses = difficulty * (level + 3.0 * 0.2**shots) * rng.standard_normal(index.size) ** 2
    return LossStream(index, losses, shots, cluster, n_events)


def feed_losses(
    monitor: DriftMonitor, s: LossStream, *, start: int = 0, batch: int = 512
) -> list[Alarm]:
    """Events ``start..`` of the stream in micro-batches of ``batch`` events, as the engine's
    watch feeds them."""
    alarms: list[Alarm] = []
    bounds = np.searchsorted(s.index, np.arange(start, s.n_events + batch, batch))
    for a, b in pairwise(bounds):
        alarms += monitor.observe_losses(s.index[a:b], s.losses[a:b], s.shots[a:b], s.clusters[a:b])
    return alarms


def first(alarms: list[Alarm], detector: str) -> Alarm | None:
    return next((a for a in alarms if a.detector == detector), None)


@dataclass(frozen=True)
class EmbeddingWorld:
    """Task embeddings around Gaussian cluster centres, and an index of earlier tasks."""

    centres: np.ndarray  # [K, E]
    bank: np.ndarray  # [N, E], L2-normalised: the indexed tasks
    spread: float

    def sample(self, rng: np.random.Generator, n: int, clusters: np.ndarray) -> np.ndarray:
        k = rng.choice(clusters, size=n)
        return self.centres[k] + self.spread * rng.standard_normal((n, self.centres.shape[1]))

    def nn_distance(self, X: np.ndarray) -> np.ndarray:
        """Cosine distance to the nearest indexed task (as the engine's watch computes it)."""
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        out: np.ndarray = 1.0 - (Xn @ self.bank.T).max(axis=1)
        return out


def make_world(seed: int, *, k: int = 20, dim: int = 32, tasks: int = 3000) -> EmbeddingWorld:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    world = EmbeddingWorld(centres, np.zeros((0, dim)), spread=0.35)
    bank = world.sample(rng, tasks, np.arange(k))
    return replace(world, bank=bank / np.linalg.norm(bank, axis=1, keepdims=True))


def feed_embeddings(
    monitor: DriftMonitor,
    world: EmbeddingWorld,
    *,
    seed: int,
    batches: int,
    shift_at: int | None = None,
    shifted: EmbeddingWorld | None = None,
    shifted_clusters: np.ndarray | None = None,
    rows: int = 100,
    batch_events: int = 512,
) -> list[Alarm]:
    """One ``observe_embeddings`` per micro-batch of ``batch_events`` events (``rows`` updated
    tasks each); from batch ``shift_at`` on, tasks come from ``shifted`` (other centres) or
    from ``shifted_clusters`` of the same world (another task mix)."""
    rng = np.random.default_rng(seed)
    all_clusters = np.arange(len(world.centres))
    alarms: list[Alarm] = []
    for b in range(batches):
        src, clusters = world, all_clusters
        if shift_at is not None and b >= shift_at:
            src = shifted if shifted is not None else world
            clusters = shifted_clusters if shifted_clusters is not None else all_clusters
        X = src.sample(rng, rows, clusters)
        end = (b + 1) * batch_events - 1
        alarms += monitor.observe_embeddings(end, X.astype(np.float32), world.nn_distance(X))
    return alarms


def textbook_page_hinkley(xs: np.ndarray, delta: float, mode: str) -> np.ndarray:
    """Page-Hinkley as River's ``PageHinkley(alpha=1)`` computes it, one value at a time."""
    out = np.zeros(xs.size)
    total = up = down = 0.0
    up_min = down_max = 0.0
    for t, x in enumerate(xs, start=1):
        total += x
        dev = x - total / t
        up += dev - delta
        down += dev + delta
        up_min, down_max = min(up_min, up), max(down_max, down)
        s_up, s_down = up - up_min, down_max - down
        out[t - 1] = {"up": s_up, "down": s_down, "both": max(s_up, s_down)}[mode]
    return out


# -- Page-Hinkley -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["up", "down", "both"])
def test_page_hinkley_matches_textbook_recursion_when_fed_in_uneven_batches(mode: str) -> None:
    rng = np.random.default_rng(7)
    xs = np.concatenate([rng.normal(0, 1, 300), rng.normal(0.8, 1, 200), rng.normal(-1, 1, 200)])
    ph = PageHinkley(delta=0.1, threshold=1e9, min_instances=1, mode=mode)  # type: ignore[arg-type]
    got = []
    for part in np.split(xs, [1, 2, 50, 51, 333, 600]):
        got.append(ph.update_many(part))
    np.testing.assert_allclose(np.concatenate(got), textbook_page_hinkley(xs, 0.1, mode), atol=1e-9)
    assert ph.n == xs.size and ph.mean == pytest.approx(xs.mean())


def test_page_hinkley_bank_matches_one_detector_per_stream_when_streams_interleave() -> None:
    rng = np.random.default_rng(3)
    streams = rng.integers(0, 5, 2000)
    xs = rng.standard_normal(2000) + (streams == 2) * (np.arange(2000) > 1000) * 2.0
    bank = PageHinkleyBank(delta=0.5, threshold=10.0, min_instances=5, mode="both")
    stat = np.concatenate(
        [bank.update_many(streams[a:b], xs[a:b]) for a, b in [(0, 7), (7, 1500), (1500, 2000)]]
    )
    for s in range(5):
        ph = PageHinkley(delta=0.5, threshold=10.0, min_instances=5, mode="both")
        np.testing.assert_allclose(stat[streams == s], ph.update_many(xs[streams == s]), atol=1e-9)
        assert bank.counts[s] == ph.n and bank.change_points()[s] == ph.change_point


@pytest.mark.parametrize("seed", range(5))
def test_page_hinkley_detects_mean_shift_within_bounded_delay_when_stream_is_gaussian(
    seed: int,
) -> None:
    """A +1 sd shift at 5,000: detection takes about threshold / (shift - delta) = 50 values."""
    rng = np.random.default_rng(seed)
    xs = np.concatenate([rng.normal(0, 1, 5000), rng.normal(1, 1, 1000)])
    ph = PageHinkley(delta=0.5, threshold=25.0, mode="up")
    stat = ph.update_many(xs)
    hit = int(np.flatnonzero(stat > 25.0)[0])
    assert 5000 <= hit <= 5000 + 120
    ph2 = PageHinkley(delta=0.5, threshold=25.0, mode="up")
    ph2.update_many(xs[: hit + 1])
    assert abs(ph2.change_point - 5000) <= 40  # the estimated start of the new regime


@pytest.mark.parametrize("seed", range(3))
def test_page_hinkley_stays_silent_when_100k_gaussian_values_are_stationary(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    ph = PageHinkley(delta=0.5, threshold=25.0, mode="both")
    stat = ph.update_many(rng.standard_normal(100_000))
    assert stat.max() < 25.0 / 2  # silent, with a margin
    assert not ph.drift_detected


# -- ADWIN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_adwin_drops_the_pre_change_window_when_the_mean_shifts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    adwin = ADWIN()  # River's defaults: delta=0.002, min_window_length=5
    adwin.update_many(rng.normal(0, 1, 3000))
    assert adwin.width == 3000 and adwin.n_detections == 0  # grows while stationary
    stat = adwin.update_many(rng.normal(1, 1, 500))
    hit = int(np.flatnonzero(stat > 1.0)[0])
    assert hit <= 100  # detection delay, in values after the change (measured: 33, 33, 33)
    change = adwin.last_changes[0]
    assert change["index"] == hit and change["direction"] == "up"
    assert change["width_before"] == 3000 + hit + 1
    assert change["n_new"] <= 100 and 0.4 <= change["mean_new"] - change["mean_old"] <= 2.0
    # one detection, and from then on the window holds (about) the new regime only
    assert adwin.n_detections == 1
    assert adwin.width < 600 and adwin.estimation == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("seed", range(3))
def test_adwin_stays_silent_when_100k_gaussian_values_are_stationary(seed: int) -> None:
    """ADWIN bounds the false-positive probability per step, not per stream: with River's
    delta=0.002, 4 of 20 seeded 100k-value streams had a false detection, none with 1e-4."""
    rng = np.random.default_rng(200 + seed)
    adwin = ADWIN(1e-4)
    stat = adwin.update_many(rng.standard_normal(100_000))
    assert adwin.n_detections == 0 and stat.max() < 1.0
    assert adwin.width == adwin.max_window  # the window is capped, not reset


def test_adwin_gives_the_same_result_when_fed_one_value_at_a_time() -> None:
    rng = np.random.default_rng(5)
    xs = np.concatenate([rng.normal(0, 1, 400), rng.normal(2, 1, 200), rng.normal(0, 1, 200)])
    batch, single = ADWIN(max_window=256), ADWIN(max_window=256)
    stat = batch.update_many(xs)
    one = []
    for x in xs:
        single.update(x)
        one.append(single.statistic)
    np.testing.assert_allclose(stat, one, atol=1e-12)
    assert batch.n_detections == single.n_detections >= 2  # the rise and the fall
    np.testing.assert_array_equal(batch.window, single.window)


def test_adwin_ignores_changes_below_min_shift_when_it_is_set() -> None:
    rng = np.random.default_rng(9)
    xs = np.concatenate([rng.normal(0, 1, 3000), rng.normal(0.5, 1, 3000)])
    assert ADWIN(mode="up").update_many(xs).max() > 1.0
    assert ADWIN(mode="up", min_shift=1.0).update_many(xs).max() < 1.0


# -- embedding maths --------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p"), [(10, 0.1), (256, 0.01), (128, 0.3)])
def test_binomial_tail_matches_scipy_when_computed_in_log_space(n: int, p: float) -> None:
    for k in range(n + 1):
        assert binomial_sf(k, n, p) == pytest.approx(
            stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300
        )


@pytest.mark.parametrize("shape", [0.5, 1.0, 2.0, 5.0, 20.0, 100.0])
def test_gamma_tail_is_conservative_at_small_levels_when_approximated(shape: float) -> None:
    """Wilson-Hilferty: the 1e-6 quantile is never below the exact one (no extra false
    alarms) and within a factor 1.2 of it; moderate tails within 10%."""
    exact = stats.gamma.isf(1e-6, shape, scale=2.0)
    approx = gamma_isf(1e-6, shape, 2.0)
    assert exact <= approx <= 1.2 * exact
    x = stats.gamma.isf(0.05, shape, scale=2.0)
    assert gamma_sf(x, shape, 2.0) == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("seed", range(8))
def test_mmd_test_keeps_p_values_large_when_samples_share_a_distribution(seed: int) -> None:
    world = make_world(seed, tasks=0)
    rng = np.random.default_rng(seed)
    X, Y = (world.sample(rng, 128, np.arange(20)) for _ in range(2))
    res = mmd_test(X, Y, rng=rng)
    assert res.p_value > 1e-3 and res.mmd2 < res.threshold


def test_mmd_test_rejects_when_the_mean_shifts() -> None:
    world = make_world(0, tasks=0)
    rng = np.random.default_rng(0)
    X, Y = (world.sample(rng, 128, np.arange(20)) for _ in range(2))
    res = mmd_test(X, Y + 0.3, rng=rng)
    assert res.p_value < 1e-6 and res.mmd2 > res.threshold
    assert res.mean_shift == pytest.approx(0.3 * np.sqrt(32), rel=0.25)


def test_novelty_reference_catches_up_when_it_rolls() -> None:
    """A lagged reference absorbs a lasting change (the rate falls back); a fixed one does not."""
    rng = np.random.default_rng(0)
    fixed, rolling = (
        NoveltyDetector(window=100),
        NoveltyDetector(window=100, lag=200, reference_size=400),
    )
    for det in (fixed, rolling):
        det.learn_reference(rng.gamma(4.0, 0.05, 400))
        assert det.calibrate()
    rates: dict[str, list[float]] = {"fixed": [], "rolling": []}
    for _ in range(20):
        d = rng.gamma(4.0, 0.1, 100)  # twice as far from their neighbours
        rates["fixed"].append(fixed.update(d))
        rates["rolling"].append(rolling.update(d))
    assert rates["fixed"][0] > 0.1 and rates["rolling"][0] > 0.1
    assert rates["fixed"][-1] > 0.1 and rates["rolling"][-1] < 0.05


def test_rolling_mmd_flags_a_return_to_the_old_distribution_when_a_fixed_one_cannot() -> None:
    """Task mix A, then B (5 of 20 clusters), then A again: a reference frozen on A sees only
    the first change; a lagged one sees both."""
    world = make_world(0, tasks=0)
    rng = np.random.default_rng(1)
    fixed = MMDDetector(reference_size=128, window=128, seed=0)
    rolling = MMDDetector(reference_size=128, window=128, lag=256, seed=0)
    mixes = [np.arange(20)] * 8 + [np.arange(5)] * 8 + [np.arange(20)] * 8
    p: dict[str, list[float]] = {"fixed": [], "rolling": []}
    for b, clusters in enumerate(mixes):
        X = world.sample(rng, 64, clusters)
        if b < 2:
            fixed.learn_reference(X)
            rolling.learn_reference(X)
            continue
        if b == 2:
            assert fixed.calibrate() and not rolling.calibrated
        fixed.update(X)
        rolling.update(X)
        for name, det in (("fixed", fixed), ("rolling", rolling)):
            res = det.test()
            p[name].append(1.0 if res is None else res.p_value)
    # batches 2..7: A, 8..15: B, 16..23: A (index b - 2)
    assert min(p["fixed"][:6]) > 1e-3 and min(p["rolling"][:6]) > 1e-3
    assert min(p["fixed"][7:14]) < 1e-6 and min(p["rolling"][7:14]) < 1e-6
    assert min(p["fixed"][16:]) > 1e-3  # back to the reference: nothing to see
    assert min(p["rolling"][15:19]) < 1e-6  # the return is a change too


# -- the monitor: losses ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_monitor_detects_loss_shift_within_300_events_when_losses_are_heavy_tailed(
    seed: int,
) -> None:
    """Converged losses 1e-3 -> 5e-2 at event 20,000 of 60,000 (measured delays, seeds 0-2:
    91, 115, 103 events; the 30-seed median is 82, the maximum 117)."""
    s = engine_like_losses(60_000, seed=seed, levels=((0, 1e-3), (20_000, 5e-2)))
    monitor = DriftMonitor()
    alarms = feed_losses(monitor, s)
    assert alarms and all(a.event_index >= 20_000 for a in alarms)
    assert alarms[0].detector == "loss_page_hinkley"
    assert alarms[0].event_index - 20_000 <= 300
    adwin = first(alarms, "loss_adwin")
    assert adwin is not None and adwin.event_index - 20_000 <= 300
    ev = alarms[0].evidence
    assert ev["typical_loss_after"] > 10 * ev["typical_loss_before"]
    assert 19_800 <= ev["change_event_index"] <= 20_100


@pytest.mark.parametrize("seed", range(3))
def test_monitor_raises_no_alarm_when_loss_stream_is_stationary(seed: int) -> None:
    s = engine_like_losses(100_000, seed=10 + seed)
    monitor = DriftMonitor()
    assert feed_losses(monitor, s) == []
    stat = monitor.statistics()
    assert stat["loss_page_hinkley"] < monitor.config.ph_threshold / 2
    assert len([k for k in stat if k.startswith("loss_cluster_")]) == 16


def test_monitor_alarms_for_the_drifting_cluster_when_only_it_shifts() -> None:
    s = engine_like_losses(60_000, seed=4, cluster_shift=(3, 20_000, 50.0))
    alarms = feed_losses(DriftMonitor(), s)
    assert [a.detector for a in alarms] == ["loss_cluster_3_page_hinkley"]
    assert alarms[0].event_index >= 20_000 and alarms[0].evidence["cluster"] == 3


def test_monitor_ignores_clusters_when_per_cluster_is_off() -> None:
    s = engine_like_losses(30_000, seed=4, cluster_shift=(3, 10_000, 50.0))
    monitor = DriftMonitor(DriftConfig(per_cluster=False))
    assert feed_losses(monitor, s) == []
    assert not any(k.startswith("loss_cluster_") for k in monitor.statistics())


def test_monitor_raises_no_alarm_during_warmup_when_loss_shifts_early() -> None:
    s = engine_like_losses(20_000, seed=1, levels=((0, 1e-3), (1_000, 5e-2)))
    late = DriftMonitor(DriftConfig(warmup_events=5_000))
    assert all(a.event_index >= 5_000 for a in feed_losses(late, s))
    early = DriftMonitor(DriftConfig(warmup_events=500))  # control: the shift is detectable
    assert any(1_000 <= a.event_index < 5_000 for a in feed_losses(early, s))


def test_monitor_calibrates_past_warmup_when_warmup_has_too_few_losses() -> None:
    s = engine_like_losses(20_000, seed=2)
    config = DriftConfig(warmup_events=100, loss_calibration_blocks=64)
    monitor = DriftMonitor(config)
    bounds = np.searchsorted(s.index, [0, 600, 20_000])
    monitor.observe_losses(s.index[: bounds[1]], s.losses[: bounds[1]], s.shots[: bounds[1]])
    assert not monitor.calibrated["loss"]  # past the warm-up, fewer than 64 * 16 losses
    rest = slice(bounds[1], bounds[2])
    monitor.observe_losses(s.index[rest], s.losses[rest], s.shots[rest])
    assert monitor.calibrated["loss"] and monitor.alarms == []


def test_cooldown_silences_a_detector_when_a_second_shift_follows_soon() -> None:
    """ADWIN forgets the old window by itself: two shifts 1,000 events apart give two alarms
    without cooldown, one with a 5,000-event cooldown."""
    s = engine_like_losses(30_000, seed=6, levels=((0, 1e-3), (20_000, 1e-2), (21_000, 1e-1)))
    counts = {}
    for cooldown in (0, 5_000):
        alarms = feed_losses(DriftMonitor(DriftConfig(cooldown_events=cooldown)), s)
        counts[cooldown] = [a.event_index for a in alarms if a.detector == "loss_adwin"]
    assert len(counts[0]) == 2 and 20_000 <= counts[0][0] < 21_000 <= counts[0][1] < 22_000
    assert counts[5_000] == counts[0][:1]


def test_hysteresis_gives_one_alarm_per_excursion_when_cooldown_is_zero() -> None:
    """A lasting shift keeps Page-Hinkley above its threshold: one alarm, not one per block;
    after the loss is back to normal the statistic falls, the detector re-arms and a second
    shift raises a second alarm."""
    config = DriftConfig(cooldown_events=0)
    lasting = engine_like_losses(40_000, seed=8, levels=((0, 1e-3), (20_000, 5e-2)))
    alarms = feed_losses(DriftMonitor(config), lasting)
    assert len([a for a in alarms if a.detector == "loss_page_hinkley"]) == 1
    twice = engine_like_losses(
        60_000, seed=8, levels=((0, 1e-3), (20_000, 5e-2), (22_000, 1e-3), (45_000, 5e-2))
    )
    monitor = DriftMonitor(config)
    feed_losses(monitor, twice.until(44_032))
    assert monitor.statistics()["loss_page_hinkley"] <= config.rearm_fraction * config.ph_threshold
    feed_losses(monitor, twice, start=44_032)
    ph = [a.event_index for a in monitor.alarms if a.detector == "loss_page_hinkley"]
    assert len(ph) == 2 and 20_000 <= ph[0] < 20_300 and 45_000 <= ph[1] < 45_300


def test_reset_rearms_and_recalibrates_when_the_model_is_swapped() -> None:
    s = engine_like_losses(60_000, seed=3, levels=((0, 1e-3), (20_000, 5e-2)))
    monitor = DriftMonitor()
    feed_losses(monitor, s.until(25_088))
    before = monitor.alarms
    assert first(before, "loss_page_hinkley") is not None
    # without recalibration the detectors restart from the old calibration: the shift is
    # still there, so Page-Hinkley alarms again at once
    monitor.reset(recalibrate=False)
    new = feed_losses(monitor, s.until(26_112), start=25_088)
    assert [a.detector for a in new][:1] == ["loss_page_hinkley"]
    assert new[0].event_index < 25_400
    # with recalibration (the model swap) the references are rebuilt and the new level is
    # the new normal
    monitor.reset()
    assert monitor.calibrated == {"loss": False, "novelty": False, "mmd": False}
    assert monitor.statistics()["loss_page_hinkley"] == 0.0
    assert feed_losses(monitor, s, start=26_112) == []
    first_after = int(s.index[np.searchsorted(s.index, 26_112)])
    assert monitor.warmup_end == first_after + monitor.config.warmup_events
    assert monitor.calibrated["loss"]
    assert monitor.alarms[: len(before)] == before  # the history is kept
    assert len(monitor.alarms) == len(before) + len(new)  # nothing new after the swap


def test_observe_losses_costs_well_under_a_millisecond_when_batches_have_512_events() -> None:
    """Vectorised: measured ~0.3 ms median per 512-event batch with 16 clusters (2 shared
    cores); the bound leaves room for a loaded test machine, not for a per-event loop."""
    s = engine_like_losses(60_000, seed=0)
    monitor = DriftMonitor()
    bounds = np.searchsorted(s.index, np.arange(0, 60_001, 512))
    times = []
    for a, b in pairwise(bounds):
        t0 = time.perf_counter()
        monitor.observe_losses(s.index[a:b], s.losses[a:b], s.shots[a:b], s.clusters[a:b])
        times.append(time.perf_counter() - t0)
    assert float(np.median(times[10:])) < 1.5e-3


def test_observe_losses_rejects_inputs_when_they_are_inconsistent() -> None:
    monitor = DriftMonitor()
    with pytest.raises(ValueError, match="lengths differ"):
        monitor.observe_losses([0, 1], [0.1], [5, 5])
    with pytest.raises(ValueError, match="non-decreasing"):
        monitor.observe_losses([3, 1], [0.1, 0.2], [5, 5])
    with pytest.raises(ValueError, match="warmup_events"):
        DriftConfig(warmup_events=-1)
    assert monitor.observe_losses([], [], []) == []


# -- the monitor: embeddings ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_novelty_alarms_when_task_embeddings_come_from_new_clusters(seed: int) -> None:
    world = make_world(seed)
    shifted = replace(world, centres=make_world(100 + seed, tasks=0).centres)
    monitor = DriftMonitor(seed=seed)
    alarms = feed_embeddings(monitor, world, seed=seed, batches=50, shift_at=40, shifted=shifted)
    nov = first(alarms, "embedding_novelty")
    assert nov is not None and 40 * 512 <= nov.event_index < 42 * 512
    assert all(a.event_index >= 40 * 512 for a in alarms)
    assert nov.evidence["novel_rate"] > 5 * nov.evidence["reference_rate"]


@pytest.mark.parametrize("seed", range(3))
def test_embedding_detectors_stay_silent_when_task_distribution_is_stationary(seed: int) -> None:
    world = make_world(seed)
    monitor = DriftMonitor(seed=seed)
    assert feed_embeddings(monitor, world, seed=seed, batches=100) == []
    assert monitor.calibrated["novelty"] and monitor.calibrated["mmd"]
    stat = monitor.statistics()
    assert stat["embedding_mmd"] > 0.0 and stat["embedding_novelty"] < 0.05


@pytest.mark.parametrize("seed", range(2))
def test_mmd_alarms_when_the_task_mix_changes_without_novel_tasks(seed: int) -> None:
    """Tasks from 3 of the 20 clusters only: every embedding is near indexed tasks (no
    novelty), but their distribution changed."""
    world = make_world(seed)
    monitor = DriftMonitor(seed=seed)
    alarms = feed_embeddings(
        monitor, world, seed=seed, batches=50, shift_at=40, shifted_clusters=np.arange(3)
    )
    assert [a.detector for a in alarms] == ["embedding_mmd"]
    mmd = alarms[0]
    assert 40 * 512 <= mmd.event_index < 45 * 512
    assert mmd.statistic > mmd.threshold and mmd.evidence["p_value"] < 1e-6


def test_embedding_references_are_rebuilt_when_reset() -> None:
    world = make_world(0)
    monitor = DriftMonitor()
    feed_embeddings(monitor, world, seed=0, batches=20)
    assert monitor.calibrated["novelty"] and monitor.calibrated["mmd"]
    monitor.reset()
    assert not monitor.calibrated["novelty"] and not monitor.calibrated["mmd"]
    # a new model's embeddings live in another space (here: another dimension)
    other = make_world(1, dim=16)
    rng = np.random.default_rng(0)
    X = other.sample(rng, 100, np.arange(20))
    assert monitor.observe_embeddings(20 * 512, X, other.nn_distance(X)) == []
    assert monitor.warmup_end == 20 * 512 + monitor.config.warmup_events


# -- evidence ---------------------------------------------------------------------------------


def test_alarms_carry_json_ready_evidence_when_any_detector_fires() -> None:
    losses, embeddings = DriftMonitor(), DriftMonitor()
    feed_losses(losses, engine_like_losses(30_000, seed=0, levels=((0, 1e-3), (20_000, 5e-2))))
    world = make_world(0)
    shifted = replace(world, centres=make_world(100, tasks=0).centres)
    feed_embeddings(embeddings, world, seed=0, batches=50, shift_at=40, shifted=shifted)
    alarms = losses.alarms + embeddings.alarms
    kinds = {a.detector for a in alarms}
    assert {"loss_page_hinkley", "loss_adwin", "embedding_novelty", "embedding_mmd"} <= kinds
    assert any(k.startswith("loss_cluster_") for k in kinds)
    for alarm in alarms:
        d: dict[str, Any] = json.loads(json.dumps(alarm.to_dict(), allow_nan=False))
        assert d["detector"] == alarm.detector and d["statistic"] > d["threshold"]
        assert d["evidence"]
    ph, adwin = first(alarms, "loss_page_hinkley"), first(alarms, "loss_adwin")
    assert ph is not None and adwin is not None
    assert {"mean_loss_before", "mean_loss_after", "change_event_index"} <= ph.evidence.keys()
    assert adwin.evidence["n_new"] < adwin.evidence["window_before"]
    assert adwin.evidence["typical_loss_after"] > adwin.evidence["typical_loss_before"]
