"""How much of the attainable gain retrieval realises on related tasks (issue 15).

A :class:`~stream_meta.tasks.RelatedTaskStream` (a history of clustered tasks, then probe tasks
of the same clusters under new ids) is served, event by event and in the same order, by one
fresh :class:`~stream_meta.engine.Engine` per strategy:

* ``no-retrieval``: ``EngineConfig(k_neighbours=0, retrieval=False)``: each task on its own;
* ``attention``: ``EngineConfig(retrieval=False)``: today's neighbour attention;
* ``retrieval``: ``EngineConfig()``: the default, retrieval by evidence included.

Each strategy is scored on the probes' unlabelled queries, whose truth only the simulator knows:
the mean squared error over a probe's queries asked after ``n`` support examples, averaged over
probes (with a 95% interval over probes), for every ``n`` of the stream's shot counts.

Two references bound what retrieval could gain; they are computed outside the engine from the
same model:

* ``oracle-neighbour``: a same-cluster history task chosen at random (seeded), adapted on all its
  examples with no neighbours, is copied as the probe's prediction, whatever ``n``: what knowing
  the cluster and nothing else gives;
* ``bayes-mixture``: the exact Bayes posterior-mean mixture over *all* stored history tasks'
  adapted functions plus a null component, the no-retrieval model itself. A history function's
  weight is its prior times the Gaussian likelihood of the probe's ``n`` support points; the
  null component's likelihood is the product of the no-retrieval model's own *prequential*
  predictive densities (example ``i`` scored by the model adapted on the ``i - 1`` before it),
  which is the marginal likelihood of a sequential predictor and, unlike its in-sample fit,
  does not favour it for having seen the points. The noise variance ``sigma2`` (shared by all
  components) and the null component's prior weight (the rest is spread evenly over the
  history) are chosen, for each shot count, on a separate *calibration* stream of the same kind
  (same arguments, another seed: ``seed + CALIBRATION_SEED_OFFSET``), never on the stream that
  is scored. A grid holds a null prior near 1, so on a stream without relations the mixture
  can fall back to the no-retrieval model.

From these, per shot count: the attainable gain is ``loss(no-retrieval) - min(reference
losses)`` and a strategy's fraction of it realised is ``(loss(no-retrieval) - loss(strategy)) /
attainable`` (undefined when nothing is attainable, as expected on the control stream).

:func:`speed` measures, in one run, what retrieval costs: adaptation latency (a query served one
event at a time right after its task learned, so that it needs fresh weights) and events/s of
``Engine.process`` with ``live_tasks`` tasks live, for each configuration, interleaved.

Regression families only (the losses and likelihoods are Gaussian).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from stream_meta.engine import Engine, EngineConfig
from stream_meta.evaluation.fewshot import adapt_batch
from stream_meta.index import TaskIndex
from stream_meta.model import MetaModel
from stream_meta.tasks import RelatedTaskStream, TaskFamily, TaskStream

__all__ = [
    "CALIBRATION_SEED_OFFSET",
    "REFERENCES",
    "STRATEGIES",
    "Mixture",
    "calibrate_mixture",
    "compare",
    "engine_predictions",
    "fractions",
    "speed",
]

#: the engine configurations compared, by strategy name
STRATEGIES: dict[str, EngineConfig] = {
    "no-retrieval": EngineConfig(k_neighbours=0, retrieval=False),
    "attention": EngineConfig(retrieval=False),
    "retrieval": EngineConfig(),
}
REFERENCES = ("oracle-neighbour", "bayes-mixture")
#: the calibration stream's seed is the scored stream's plus this
CALIBRATION_SEED_OFFSET = 7_919
#: the mixture's noise variance is searched over ``var(history y) * 10 ** VARIANCE_EXPONENTS``
VARIANCE_EXPONENTS = np.linspace(-5.0, 0.0, 26)
#: and its null component's prior weight over these
#: a fraction of the attainable gain is reported where that gain is above this share of the
#: no-retrieval loss
MIN_GAIN = 0.01
NULL_PRIORS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999)


# -- the engine's strategies ---------------------------------------------------------------------
def engine_predictions(
    model: MetaModel, config: EngineConfig, events: Sequence[Mapping[str, Any]], batch: int = 512
) -> np.ndarray:
    """Serve ``events`` in order with a fresh engine; every event's prediction ``[N]``."""
    engine = Engine(model, config)
    out: list[Any] = []
    for start in range(0, len(events), batch):
        result = engine.process(events[start : start + batch])
        if result.rejections:
            raise ValueError(f"the engine rejected an event: {result.rejections[0]}")
        assert result.outputs is not None
        out += result.outputs.values
    return np.asarray(out, dtype=np.float64)


# -- the references ------------------------------------------------------------------------------
def _history_weights(model: MetaModel, stream: RelatedTaskStream, chunk: int = 256) -> torch.Tensor:
    """Every history task adapted on all its examples, no neighbours: ``[H, n_params]``."""
    h = stream.history
    index = TaskIndex(model.config.embed_dim)
    parts = [
        adapt_batch(model, index, h.x[i : i + chunk].copy(), h.y[i : i + chunk].copy(), 0)
        for i in range(0, h.x.shape[0], chunk)
    ]
    return torch.cat(parts)


def _predict_all(
    model: MetaModel, weights: torch.Tensor, x: np.ndarray, chunk: int = 32
) -> np.ndarray:
    """Every function of ``weights [K, n_params]`` at every point of ``x [M, x_dim]``:
    ``[K, M]``."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(weights.device)
    out = []
    for i in range(0, weights.shape[0], chunk):
        w = weights[i : i + chunk]
        out.append(model.predict(xt.expand(w.shape[0], *xt.shape), w).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


class Mixture:
    """What the Bayes mixture needs of one stream, precomputed (shapes in the docstrings).

    Args:
        history_support: history functions at the probes' support points ``[H, P, S]``.
        history_query: history functions at the probes' queries ``[H, P, len(shots), Q]``.
        null_support: the null component's prequential predictions of the support ``[P, S]``
            (example ``i`` predicted from the ``i`` before it).
        null_query: the null component's query predictions ``[P, len(shots), Q]``.
        support_y: the support labels ``[P, S]``.
        shots: the support size of each query slot.
    """

    def __init__(
        self,
        history_support: np.ndarray,
        history_query: np.ndarray,
        null_support: np.ndarray,
        null_query: np.ndarray,
        support_y: np.ndarray,
        shots: Sequence[int],
    ) -> None:
        self.history_query = history_query
        self.null_query = null_query
        self.shots = tuple(shots)
        # squared residuals summed over the first n support points, n = 0..S: [H + 1, P, S + 1]
        res = np.concatenate([null_support[None], history_support]) - support_y[None]
        sse = np.cumsum(res**2, axis=2)
        self.sse = np.concatenate([np.zeros((*sse.shape[:2], 1)), sse], axis=2)

    def predict(
        self, variance: Sequence[float] | np.ndarray, null_prior: Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """The posterior-mean predictions of every query ``[P, len(shots), Q]``, with one noise
        variance and one null prior weight per shot count (``[len(shots)]`` each)."""
        out = np.empty_like(self.null_query)
        for slot in range(len(self.shots)):
            out[:, slot] = self.predict_slot(slot, float(variance[slot]), float(null_prior[slot]))
        return out

    def predict_slot(self, slot: int, variance: float, null_prior: float) -> np.ndarray:
        """The posterior-mean predictions of the queries of one shot count ``[P, Q]``."""
        n_hist = self.sse.shape[0] - 1
        log_prior = np.full(n_hist + 1, math.log((1.0 - null_prior) / n_hist))
        log_prior[0] = math.log(null_prior)
        n = self.shots[slot]
        logw = log_prior[:, None] - 0.5 * self.sse[:, :, n] / variance  # [H + 1, P]
        logw -= logw.max(axis=0, keepdims=True)
        w = np.exp(logw)
        w /= w.sum(axis=0, keepdims=True)
        hist = np.einsum("hp,hpq->pq", w[1:], self.history_query[:, :, slot])
        return np.asarray(hist + w[0][:, None] * self.null_query[:, slot])


def calibrate_mixture(
    mixture: Mixture, truth: np.ndarray, y_var: float
) -> tuple[list[float], list[float]]:
    """Per shot count, the ``(variance, null_prior)`` of the grid (:data:`VARIANCE_EXPONENTS`
    times ``y_var``, :data:`NULL_PRIORS`) with the lowest query loss against a calibration
    stream's ``truth [P, len(shots), Q]``; two lists ``[len(shots)]``. Each shot count gets its
    own: the reference is then the best such mixture for every support size."""
    variances, priors = [], []
    for slot, n in enumerate(mixture.shots):
        best, best_loss = (y_var, 0.5), math.inf
        for e in VARIANCE_EXPONENTS if n > 0 else (0.0,):  # no likelihood at 0 shots
            for prior in NULL_PRIORS:
                var = y_var * 10.0**e
                loss = float(
                    ((mixture.predict_slot(slot, var, prior) - truth[:, slot]) ** 2).mean()
                )
                if loss < best_loss:
                    best, best_loss = (var, prior), loss
        variances.append(best[0])
        priors.append(best[1])
    return variances, priors


def _references(
    model: MetaModel, stream: RelatedTaskStream, null_events: np.ndarray
) -> tuple[np.ndarray, Mixture]:
    """The oracle neighbour's query predictions ``[P, len(shots), Q]`` and the mixture's
    inputs, for ``stream`` whose no-retrieval predictions of every event are ``null_events``."""
    p, qx = stream.probes, stream.probe_query_x
    n_probe, n_slots, n_q = qx.shape[:3]
    n_sup = max(stream.shots)
    with torch.inference_mode():
        weights = _history_weights(model, stream)
        points = np.concatenate(
            [p.x[:, :n_sup].reshape(-1, p.x.shape[2]), qx.reshape(-1, qx.shape[3])]
        )
        f = _predict_all(model, weights, points)  # [H, P * S + P * slots * Q]
    h_sup = f[:, : n_probe * n_sup].reshape(f.shape[0], n_probe, n_sup)
    h_query = f[:, n_probe * n_sup :].reshape(f.shape[0], n_probe, n_slots, n_q)
    rng = np.random.default_rng(np.random.SeedSequence([stream.seed, 15]))
    hc = stream.history.clusters
    oracle = np.empty((n_probe, n_slots, n_q))
    for i, c in enumerate(p.clusters.tolist()):
        members = np.flatnonzero(hc == c)
        if len(members):
            oracle[i] = h_query[rng.choice(members), i]
        else:  # no history task of this cluster: the oracle knows nothing more
            oracle[i] = null_events[stream.query_positions()[i]]
    null_sup = null_events[stream.support_positions()] if n_sup else np.zeros((n_probe, 0))
    null_query = null_events[stream.query_positions()]
    mixture = Mixture(h_sup, h_query, null_sup, null_query, p.y[:, :n_sup], stream.shots)
    return oracle, mixture


# -- scoring -------------------------------------------------------------------------------------
def _per_shot(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean query loss per shot count and its 95% interval over probes: ``[len(shots)]`` each."""
    per_probe = ((pred - truth) ** 2).mean(axis=2)  # [P, slots]
    n = per_probe.shape[0]
    ci = 1.96 * per_probe.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(n, np.nan)
    return per_probe.mean(axis=0), ci


def fractions(
    losses: Mapping[str, Sequence[float]],
    strategies: Sequence[str] = ("attention", "retrieval"),
    min_gain: float = MIN_GAIN,
) -> dict[str, Any]:
    """The attainable gain per shot count and each strategy's fraction of it realised.

    ``losses`` holds ``no-retrieval``, the references present of :data:`REFERENCES`, and
    ``strategies``, each a loss per shot count. A fraction is ``None`` where the attainable gain
    is not above ``min_gain`` times the no-retrieval loss: a share of a gain that is nothing or
    within the noise (5 shots of a sinusoid: 3e-3 % of the loss) says nothing.

    >>> out = fractions({"no-retrieval": [2.0, 1.0], "oracle-neighbour": [1.0, 0.75],
    ...                  "bayes-mixture": [0.5, 1.5], "retrieval": [1.25, 1.125]},
    ...                 strategies=("retrieval",))
    >>> out["attainable"], out["fraction"]["retrieval"]
    ([1.5, 0.25], [0.5, -0.5])
    >>> fractions({"no-retrieval": [1.0], "bayes-mixture": [1.0], "retrieval": [0.9]},
    ...           strategies=("retrieval",))["fraction"]
    {'retrieval': [None]}
    """
    base = np.asarray(losses["no-retrieval"], dtype=np.float64)
    refs = np.stack([np.asarray(losses[r], dtype=np.float64) for r in REFERENCES if r in losses])
    attainable = base - refs.min(axis=0)
    out: dict[str, Any] = {"attainable": [float(a) for a in attainable], "fraction": {}}
    material = (attainable > 0) & (attainable > min_gain * base)
    for name in strategies:
        if name not in losses:
            continue
        gain = base - np.asarray(losses[name], dtype=np.float64)
        out["fraction"][name] = [
            float(g / a) if ok else None
            for g, a, ok in zip(gain, attainable, material, strict=True)
        ]
    return out


def _stream_args(stream: RelatedTaskStream) -> dict[str, Any]:
    return {k: v for k, v in asdict(stream).items() if k != "family"} | {
        "family": repr(stream.family)
    }


def compare(
    model: MetaModel,
    stream: RelatedTaskStream,
    *,
    strategies: Mapping[str, EngineConfig] = STRATEGIES,
    calibration: RelatedTaskStream | None = None,
    batch: int = 512,
) -> dict[str, Any]:
    """Every strategy and both references on ``stream``; the JSON-ready report.

    ``strategies`` must include ``no-retrieval`` (the null component and the base of the
    fractions). ``calibration`` defaults to ``stream`` with ``seed + CALIBRATION_SEED_OFFSET``.
    Returns ``{"stream", "shots", "loss", "ci95", "attainable", "fraction", "mixture",
    "seconds"}``, losses per shot count in the order of ``shots``.
    """
    if stream.family.kind != "regression":
        raise ValueError("the retrieval comparison scores regression families only")
    if "no-retrieval" not in strategies:
        raise ValueError("strategies must include 'no-retrieval'")
    model.eval()
    if calibration is None:
        from dataclasses import replace

        calibration = replace(stream, seed=stream.seed + CALIBRATION_SEED_OFFSET)
    t0 = time.perf_counter()
    # calibration: the mixture's variance and null prior, on other events of the same kind
    cal_null = engine_predictions(
        model, strategies["no-retrieval"], [e.event for e in calibration.events()], batch
    )
    _, cal_mixture = _references(model, calibration, cal_null)
    cal_truth = calibration.probe_query_y.astype(np.float64)
    y_var = float(np.var(calibration.history.y))
    variance, null_prior = calibrate_mixture(cal_mixture, cal_truth, y_var)
    seconds: dict[str, float] = {"calibration": time.perf_counter() - t0}

    events = [e.event for e in stream.events()]
    qpos = stream.query_positions()
    truth = stream.probe_query_y.astype(np.float64)
    loss: dict[str, list[float]] = {}
    ci: dict[str, list[float]] = {}
    null_events = None
    for name, config in strategies.items():
        t = time.perf_counter()
        pred = engine_predictions(model, config, events, batch)
        seconds[name] = time.perf_counter() - t
        if name == "no-retrieval":
            null_events = pred
        m, c = _per_shot(pred[qpos], truth)
        loss[name], ci[name] = m.tolist(), c.tolist()
    assert null_events is not None
    t = time.perf_counter()
    oracle, mixture = _references(model, stream, null_events)
    for name, pred_q in (
        ("oracle-neighbour", oracle),
        ("bayes-mixture", mixture.predict(variance, null_prior)),
    ):
        m, c = _per_shot(pred_q, truth)
        loss[name], ci[name] = m.tolist(), c.tolist()
    seconds["references"] = time.perf_counter() - t
    gains = fractions(loss, [n for n in strategies if n != "no-retrieval"])
    return {
        "stream": _stream_args(stream),
        "shots": list(stream.shots),
        "loss": loss,
        "ci95": ci,
        "attainable": gains["attainable"],
        "fraction": gains["fraction"],
        "mixture": {
            "variance": variance,
            "null_prior": null_prior,
            "calibration_seed": calibration.seed,
            "history_y_variance": y_var,
        },
        "seconds": seconds,
    }


# -- speed ---------------------------------------------------------------------------------------
def speed(
    model: MetaModel,
    family: TaskFamily,
    configs: Mapping[str, EngineConfig],
    *,
    live_tasks: int = 10_000,
    timed_events: int = 60_000,
    latency_samples: int = 300,
    batch: int = 512,
    window_batches: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Adaptation latency and events/s of each configuration with ``live_tasks`` tasks live.

    Every engine is warmed on the same synthetic stream (:class:`~stream_meta.tasks.TaskStream`,
    ``tasks=live_tasks``, clustered, new tasks at rate 0.1) until ``live_tasks`` are live, then
    fed the next ``timed_events`` in windows of ``window_batches`` micro-batches, the engines
    taking turns window by window (the first of a turn rotates), so that a disturbance of a
    shared machine falls on all of them; events/s counts the time inside ``Engine.process``,
    and each window's time is kept (``window_seconds``) for ratios window by window. Latency:
    ``latency_samples`` new tasks, each given ``1 + i % 5`` labelled examples in one untimed
    call, then one query alone, timed: it needs fresh weights (an adaptation, with whatever
    retrieval the configuration does) and a prediction. The engines take turns sample by
    sample; the first 10 samples are warm-up.
    """
    model.eval()
    stream = TaskStream(family, tasks=live_tasks, new_task_rate=0.1, seed=seed)
    source = iter(stream)
    engines = {name: Engine(model, cfg) for name, cfg in configs.items()}
    warm = 0
    while any(len(e.store) < live_tasks for e in engines.values()):
        chunk = [next(source).event for _ in range(batch)]
        for e in engines.values():
            e.process(chunk)
        warm += batch
        if warm > 50 * live_tasks:
            raise RuntimeError(f"{warm} warm-up events did not make {live_tasks} tasks live")
    windows: dict[str, list[float]] = {name: [] for name in engines}
    done, turn = 0, 0
    while done < timed_events:
        window = [
            [next(source).event for _ in range(batch)]
            for _ in range(min(window_batches, -(-(timed_events - done) // batch)))
        ]
        for name, e in _taking_turns(engines, turn):
            t0 = time.perf_counter()
            for chunk in window:
                e.process(chunk)
            windows[name].append(time.perf_counter() - t0)
        done += sum(len(c) for c in window)
        turn += 1
    rng = np.random.default_rng(np.random.SeedSequence([seed, 42]))
    params = family.sample_params(latency_samples, rng)
    x, y = family.sample(params, 6, rng)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(latency_samples):
        tid, n = f"latency{i}", 1 + i % 5
        learn = [
            {"event_id": f"l{i}-{k}", "task_id": tid, "x": x[i, k].tolist(), "y": float(y[i, k])}
            for k in range(n)
        ]
        query = [{"event_id": f"l{i}-q", "task_id": tid, "x": x[i, n].tolist()}]
        for name, e in _taking_turns(engines, i):
            e.process(learn)
            t0 = time.perf_counter()
            e.process(query)
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "live_tasks": {n: len(e.store) for n, e in engines.items()},
        "warm_events": warm,
        "timed_events": done,
        "batch": batch,
        "torch_threads": torch.get_num_threads(),
        "configs": {n: asdict(c) for n, c in configs.items()},
    }
    for name in engines:
        ms = np.array(times[name][10:] or times[name]) * 1e3
        out[name] = {
            "events_per_s": done / sum(windows[name]),
            "window_seconds": windows[name],
            "adapt_latency_ms_p50": float(np.percentile(ms, 50)),
            "adapt_latency_ms_p99": float(np.percentile(ms, 99)),
        }
    return out


def _taking_turns(engines: Mapping[str, Engine], turn: int) -> list[tuple[str, Engine]]:
    """The engines in the order of this turn: rotated by one each turn, so that none is always
    first (warm caches) or last."""
    items = list(engines.items())
    k = turn % len(items)
    return items[k:] + items[:k]
