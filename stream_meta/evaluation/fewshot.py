"""Few-shot evaluation of a checkpoint on held-out tasks (``stream-meta evaluate``).

Protocol: tasks are drawn from the family's held-out distribution (the ``test`` split where the
family has one) with a seed that training never uses. A bank of held-out tasks with full
support sets is embedded into a FAISS :class:`~stream_meta.index.TaskIndex`, as a live
deployment's index would hold them; each evaluated task is embedded from its ``k``-shot support
set, retrieves its nearest bank tasks from that index (unless ``neighbours=False``), adapts in one
forward pass and is scored on fresh query points: MSE for regression (and the share of labels
inside the served central 90% interval), accuracy for classification, with a 95% confidence
interval over tasks. Classification also reports a nearest-centroid baseline in raw input space
on the very same episodes.

Latency is measured for one task at a time on one thread (embed, k-NN, generate weights,
predict one point); throughput as batched predictions per second with adapted weights.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from stream_meta.index import TaskIndex, neighbour_arrays
from stream_meta.model import MetaModel
from stream_meta.tasks import TaskFamily
from stream_meta.uncertainty import central_coverage

#: offset between any training seed and the evaluation seeds (never used in training)
EVAL_SEED_OFFSET = 1_000_003


def _mean_ci(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    ci = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": float(values.mean()), "ci95": float(ci)}


def build_bank(
    model: MetaModel, family: TaskFamily, n_tasks: int, shots: int, rng: np.random.Generator
) -> TaskIndex:
    """Embed ``n_tasks`` held-out tasks with ``shots`` examples each into a fresh index."""
    index = TaskIndex(model.config.embed_dim)
    if n_tasks == 0:
        return index
    params = family.sample_params(n_tasks, rng)
    per_class = family.kind == "classification"
    k = max(1, shots // family.y_dim) if per_class else shots
    x, y = family.sample(params, k, rng, per_class=per_class)
    dev = _device_of(model)
    with torch.inference_mode():
        z = model.embed(
            torch.from_numpy(x).to(dev),
            torch.from_numpy(y).to(dev),
            torch.ones(y.shape, device=dev),
        )
    index.upsert([f"bank{i}" for i in range(n_tasks)], z.cpu().numpy())
    return index


def adapt_batch(
    model: MetaModel,
    index: TaskIndex,
    xs: np.ndarray,
    ys: np.ndarray,
    k: int,
    exclude: list[str | None] | None = None,
    *,
    posterior: bool = False,
) -> torch.Tensor:
    """Embed, retrieve and adapt a batch of support sets -> weights ``[B, n_params]`` (with
    ``posterior``: rows that carry the head's posterior too, for ``predict_with_std``).

    ``exclude[i]``: a task id row ``i`` must not retrieve (itself, when it is indexed). Runs on
    the model's device; the FAISS index lives on the CPU.
    """
    dev = _device_of(model)
    xs_t, ys_t = torch.from_numpy(xs).to(dev), torch.from_numpy(ys).to(dev)
    smask = torch.ones(ys.shape, dtype=torch.float32, device=dev)
    z = model.embed(xs_t, ys_t, smask)
    arrays = neighbour_arrays(index, z.cpu().numpy(), k, exclude)
    zn, sim, nmask = (torch.from_numpy(a).to(dev) for a in arrays)
    return model.adapt(z, zn, sim, nmask, xs_t, ys_t, smask, posterior=posterior)


def _device_of(model: MetaModel) -> torch.device:
    return next(model.parameters()).device


def _predict(model: MetaModel, x: np.ndarray, weights: torch.Tensor) -> torch.Tensor:
    return model.predict(torch.from_numpy(x).to(weights.device), weights).cpu()


def evaluate(
    model: MetaModel,
    family: TaskFamily,
    *,
    shots: list[int],
    tasks: int = 1000,
    queries: int = 100,
    k_neighbours: int = 8,
    bank_tasks: int = 1000,
    bank_shots: int = 20,
    seed: int = 0,
    batch: int = 250,
    latency_samples: int = 300,
) -> dict[str, Any]:
    """Run the protocol of the module docstring; returns the JSON-ready report."""
    rng = np.random.default_rng(EVAL_SEED_OFFSET + seed)
    model.eval()
    classification = family.kind == "classification"
    report: dict[str, Any] = {
        "family": family.name,
        "metric": family.metric_name,
        "tasks": tasks,
        "queries_per_task": queries,
        "neighbours": k_neighbours,
        "device": str(_device_of(model)),
        "shots": {},
    }
    with torch.inference_mode():
        index = build_bank(model, family, bank_tasks if k_neighbours else 0, bank_shots, rng)
        baseline: dict[str, Any] = {}
        for s in shots:
            scores, base_scores, zs = [], [], []
            for start in range(0, tasks, batch):
                b = min(batch, tasks - start)
                params = family.sample_params(b, rng)
                if classification:
                    q = max(1, queries // family.y_dim)
                    xs, ys, xq, yq = family.sample_episode(params, s, q, rng)
                else:
                    xs, ys, xq, yq = family.sample_episode(params, s, queries, rng)
                w = adapt_batch(model, index, xs, ys, k_neighbours, posterior=True)
                out_t, std = model.predict_with_std(torch.from_numpy(xq).to(w.device), w)
                out = out_t.cpu()
                if std is not None:
                    zs.append(((yq - out.numpy()) / std.cpu().numpy()).ravel())
                if classification:
                    acc = (out.argmax(-1).numpy() == yq).mean(axis=1)
                    scores.append(acc)
                    if s > 0:
                        from stream_meta.tasks.digits import nearest_centroid_accuracy

                        base_scores.append(
                            [
                                nearest_centroid_accuracy(xs[i], ys[i], xq[i], yq[i])
                                for i in range(b)
                            ]
                        )
                else:
                    scores.append(((out.numpy() - yq) ** 2).mean(axis=1))
            report["shots"][str(s)] = _mean_ci(np.concatenate(scores))
            if zs:  # the served standard deviations: share of labels in the 90% interval
                report["shots"][str(s)]["coverage_90"] = central_coverage(np.concatenate(zs))
            if base_scores:
                baseline[str(s)] = _mean_ci(np.concatenate(base_scores))
        if baseline:
            report["baseline_nearest_centroid"] = baseline
        if latency_samples > 0:  # 0: losses only
            report.update(_latency(model, family, index, k_neighbours, latency_samples, rng))
            report["predictions_per_s"] = _throughput(model, family, index, k_neighbours, rng)
    return report


def uncertainty_report(
    model: MetaModel,
    family: TaskFamily,
    *,
    shots: list[int],
    tasks: int = 300,
    queries: int = 50,
    k_neighbours: int = 8,
    bank_tasks: int = 500,
    bank_shots: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """How calibrated the served uncertainty is on held-out tasks of ``family`` (the protocol
    of :func:`evaluate`): per shot count and over all of them, regression's coverage of the
    central 90% interval ``mean +- 1.645 std`` and its calibration error over the central
    levels 0.1..0.9; a classifier's expected calibration error of the top-class probability
    (15 bins) and accuracy."""
    from stream_meta.uncertainty import expected_calibration_error, regression_calibration_error

    rng = np.random.default_rng(EVAL_SEED_OFFSET + seed)
    model.eval()
    classification = family.kind == "classification"
    report: dict[str, Any] = {"family": family.name, "tasks": tasks, "shots": {}}
    pooled: list[np.ndarray] = []
    with torch.inference_mode():
        index = build_bank(model, family, bank_tasks if k_neighbours else 0, bank_shots, rng)
        for s in shots:
            params = family.sample_params(tasks, rng)
            q = max(1, queries // family.y_dim) if classification else queries
            xs, ys, xq, yq = family.sample_episode(params, s, q, rng)
            w = adapt_batch(model, index, xs, ys, k_neighbours, posterior=True)
            out, std = model.predict_with_std(torch.from_numpy(xq).to(w.device), w)
            if classification:
                p = torch.softmax(out, dim=-1).cpu().numpy().reshape(-1, family.y_dim)
                hit = (p.argmax(-1) == yq.reshape(-1)).astype(np.float64)
                pooled.append(np.stack([p.max(-1), hit], axis=1))
                report["shots"][str(s)] = {
                    "ece": expected_calibration_error(p.max(-1), hit),
                    "accuracy": float(hit.mean()),
                }
                continue
            assert std is not None
            z = ((yq - out.cpu().numpy()) / std.cpu().numpy()).ravel()
            pooled.append(z)
            report["shots"][str(s)] = {
                "coverage_90": central_coverage(z, 0.9),
                "calibration_error": regression_calibration_error(z),
                "mse": float(((out.cpu().numpy() - yq) ** 2).mean()),
            }
    if classification:
        both = np.concatenate(pooled)
        report["ece"] = expected_calibration_error(both[:, 0], both[:, 1])
    else:
        z = np.concatenate(pooled)
        report["coverage_90"] = central_coverage(z, 0.9)
        report["calibration_error"] = regression_calibration_error(z)
    return report


def _latency(
    model: MetaModel,
    family: TaskFamily,
    index: TaskIndex,
    k: int,
    samples: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """One task at a time, one thread: embed + k-NN + generate + predict one point."""
    shots = 5
    params = family.sample_params(samples, rng)
    per_class = family.kind == "classification"
    x, y = family.sample(params, shots, rng, per_class=per_class)
    xq, _ = family.sample(params, 1, rng)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for i in range(samples):
            t0 = time.perf_counter()
            w = adapt_batch(model, index, x[i : i + 1], y[i : i + 1], k)
            _predict(model, xq[i : i + 1, :1], w)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return latency_summary(times, warmup=10)


def latency_summary(times: list[float], warmup: int) -> dict[str, float]:
    """p50 / p99 in ms of ``times`` (seconds) after the first ``warmup`` calls."""
    ms = np.array(times[warmup:] or times) * 1e3
    return {
        "adapt_latency_ms_p50": round(float(np.percentile(ms, 50)), 4),
        "adapt_latency_ms_p99": round(float(np.percentile(ms, 99)), 4),
    }


def _throughput(
    model: MetaModel, family: TaskFamily, index: TaskIndex, k: int, rng: np.random.Generator
) -> float:
    """Batched predictions per second with already-adapted weights (1000 tasks x 100 points)."""
    params = family.sample_params(1000, rng)
    per_class = family.kind == "classification"
    xs, ys = family.sample(params, 5, rng, per_class=per_class)
    xq, _ = family.sample(
        params, 100 // (family.y_dim if per_class else 1), rng, per_class=per_class
    )
    w = adapt_batch(model, index, xs, ys, k)
    xq_t = torch.from_numpy(xq).to(w.device)
    model.predict(xq_t, w)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        model.predict(xq_t, w).cpu()  # .cpu() waits for an asynchronous device
        reps += 1
    return round(reps * xq.shape[0] * xq.shape[1] / (time.perf_counter() - t0), 1)
