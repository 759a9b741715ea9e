"""Feeds what the engine produced, batch by batch, to a :class:`DriftMonitor`.

For every batch: the prequential losses of its labelled events, with the support size each was
predicted with and its task's cluster (the nearest of ``clusters`` k-means centroids of the
task embeddings, fitted once the warm-up is over), go to the loss detectors; the embeddings of
the tasks it updated, with each one's cosine distance to its nearest other indexed task, go to
the embedding detectors. It also keeps the prequential loss per window of events for the run
summary, counts alarms in Prometheus and appends them to a JSON-lines log.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from stream_meta.drift.monitor import Alarm, DriftMonitor
from stream_meta.engine import BatchResult, Engine
from stream_meta.metrics import EngineMetrics

log = logging.getLogger(__name__)

#: task clusters are fitted once there are this many indexed tasks per cluster
_MIN_POINTS_PER_CLUSTER = 20


class DriftWatch:
    """Watch ``engine``'s batches with ``monitor``; see the module docstring.

    Parameters
    ----------
    clusters:
        k-means centroids over task embeddings for per-cluster loss detectors (0: none).
    warmup_events:
        Events after which the centroids are fitted (the monitor's warm-up).
    window:
        Events per window of :meth:`loss_windows`.
    log_path:
        JSON-lines file every alarm is appended to (None: none).
    """

    def __init__(
        self,
        engine: Engine,
        monitor: DriftMonitor,
        *,
        clusters: int = 16,
        warmup_events: int = 2000,
        window: int = 1000,
        metrics: EngineMetrics | None = None,
        log_path: str | None = None,
        max_novelty: int = 64,
        seed: int = 0,
    ) -> None:
        self.engine, self.monitor = engine, monitor
        self.clusters, self.warmup_events, self.window = clusters, warmup_events, window
        self.metrics = metrics
        self.seed, self.max_novelty = seed, max_novelty
        self._rng = np.random.default_rng(seed)
        self.seen = 0  # events observed (valid or not): the stream position
        self.centroids: np.ndarray | None = None
        self._win_loss = np.zeros(0, dtype=np.float64)
        self._win_count = np.zeros(0, dtype=np.int64)
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def model_changed(self) -> None:
        """The engine serves another model: losses have another level and embeddings live in
        another space, so the monitor recalibrates (a new warm-up) and the task clusters are
        fitted again on the re-encoded index."""
        self.monitor.reset(recalibrate=True)
        self.centroids = None

    # -- per batch ---------------------------------------------------------------------------
    def observe(self, result: BatchResult) -> list[Alarm]:
        """Observe one processed batch (the engine's :class:`BatchResult`); new alarms."""
        n = len(result.order)
        out = result.outputs
        alarms: list[Alarm] = []
        if out is not None and len(out):
            pos = np.flatnonzero(np.asarray(result.order) >= 0)  # input position of output j
            index = self.seen + pos
            labelled = np.asarray(out.labelled, dtype=bool)
            if labelled.any():
                losses = np.asarray(out.losses, dtype=np.float64)[labelled]
                shots = np.asarray(out.shots, dtype=np.int64)[labelled]
                task_ids = [t for t, lab in zip(out.task_ids, out.labelled, strict=True) if lab]
                self._add_windows(index[labelled], losses)
                # each task's embedding is looked up once (after the batch: the state it left)
                unique = list(dict.fromkeys(task_ids))
                z_unique = self._embeddings(unique)
                row = {t: i for i, t in enumerate(unique)}
                clusters = self._assign(z_unique[[row[t] for t in task_ids]])
                alarms += self.monitor.observe_losses(index[labelled], losses, shots, clusters)
                alarms += self._novelty(unique, z_unique, self.seen + n - 1)
        self.seen += n
        if self.centroids is None and self.clusters and self.seen >= self.warmup_events:
            self._fit_clusters()
        self._report(alarms)
        return alarms

    def _embeddings(self, task_ids: list[str]) -> np.ndarray:
        """Current embeddings ``[B, E]`` of the tasks (NaN rows for a task without one)."""
        store = self.engine.store
        d = self.engine.model.config.embed_dim
        z = np.full((len(task_ids), d), np.nan, dtype=np.float32)
        for i, t in enumerate(task_ids):
            state = store.get(t)
            if state is not None and state.embedding is not None:
                z[i] = state.embedding
        return z

    def _assign(self, z: np.ndarray) -> np.ndarray | None:
        if self.centroids is None:
            return None
        sims = np.nan_to_num(z, nan=0.0) @ self.centroids.T
        out = sims.argmax(axis=1).astype(np.int64)
        out[np.isnan(z).any(axis=1)] = -1
        return out

    def _fit_clusters(self) -> None:
        import faiss

        vectors = self.engine.index.vectors()
        k = min(self.clusters, len(vectors) // _MIN_POINTS_PER_CLUSTER)
        if k < 2:
            return
        km = faiss.Kmeans(
            vectors.shape[1],
            k,
            niter=20,
            seed=self.seed,
            spherical=True,
            # FAISS warns below its own default of 39 points a centroid; ours is the rule above
            min_points_per_centroid=_MIN_POINTS_PER_CLUSTER,
        )
        km.train(np.ascontiguousarray(vectors, dtype=np.float32))
        self.centroids = np.asarray(km.centroids, dtype=np.float32)
        log.info("drift: %d task clusters fitted on %d embeddings", k, len(vectors))

    def _novelty(self, unique: list[str], z: np.ndarray, end: int) -> list[Alarm]:
        """The updated tasks' embeddings (``z``, rows of ``unique``) and cosine distances to
        their nearest other task (at most ``max_novelty`` tasks a batch, a seeded sample: the
        embedding tests are statistical, and the search costs as much as the engine's own)."""
        if len(unique) > self.max_novelty:
            pick = np.sort(self._rng.choice(len(unique), self.max_novelty, replace=False))
            unique, z = [unique[i] for i in pick], z[pick]
        keep = ~np.isnan(z).any(axis=1)
        if not keep.any() or len(self.engine.index) == 0:
            return []
        z, ids = z[keep], [t for t, k in zip(unique, keep.tolist(), strict=True) if k]
        sim, nearest = self.engine.index.search(z, 1, exclude=ids)
        dist = np.where(nearest[:, 0] >= 0, 1.0 - sim[:, 0], np.nan)
        return self.monitor.observe_embeddings(end, z, dist)

    def _add_windows(self, index: np.ndarray, losses: np.ndarray) -> None:
        w = index // self.window
        need = int(w.max()) + 1
        if need > len(self._win_loss):
            grow = need - len(self._win_loss)
            self._win_loss = np.concatenate([self._win_loss, np.zeros(grow)])
            self._win_count = np.concatenate([self._win_count, np.zeros(grow, dtype=np.int64)])
        np.add.at(self._win_loss, w, losses)
        np.add.at(self._win_count, w, 1)

    def log_record(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the JSON-lines log (when there is one)."""
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def _report(self, alarms: list[Alarm]) -> None:
        for a in alarms:  # (the monitor logs each alarm)
            self.log_record({"type": "drift_alarm", **a.to_dict()})
        if self.metrics is not None:
            for a in alarms:
                self.metrics.drift_alarms.labels(_detector_kind(a.detector)).inc()
            for name, value in self.monitor.statistics().items():
                if not _cluster_detector(name):
                    self.metrics.drift_statistic.labels(name).set(value)

    # -- summary -----------------------------------------------------------------------------
    def loss_windows(self) -> list[dict[str, Any]]:
        """Prequential loss of the labelled events of each window of ``window`` events."""
        out = []
        for w, (total, count) in enumerate(zip(self._win_loss, self._win_count, strict=True)):
            out.append(
                {
                    "start": w * self.window,
                    "end": min((w + 1) * self.window, self.seen),
                    "labelled": int(count),
                    "loss": float(total / count) if count else None,
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "alarms": [
                {
                    "event_index": a.event_index,
                    "detector": a.detector,
                    "statistic": a.statistic,
                    "threshold": a.threshold,
                }
                for a in self.monitor.alarms
            ],
            "loss_windows": self.loss_windows(),
        }


def _cluster_detector(name: str) -> bool:
    return "_cluster_" in name


def _detector_kind(name: str) -> str:
    """Metric label for a detector: per-cluster detectors share one label (bounded labels)."""
    if _cluster_detector(name):
        head, _, rest = name.partition("_cluster_")
        return f"{head}_cluster_{rest.partition('_')[2]}"
    return name
