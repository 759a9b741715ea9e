"""Drift detection for the stream: loss and task-distribution drift, alarms with evidence.

* :mod:`stream_meta.drift.detectors`: Page-Hinkley (one stream or a bank) and ADWIN.
* :mod:`stream_meta.drift.embedding`: embedding novelty and the MMD two-sample test.
* :mod:`stream_meta.drift.monitor`: :class:`DriftMonitor`, which feeds them the engine's
  prequential losses and task embeddings, with warm-up, cooldown and hysteresis.
"""

from stream_meta.drift.detectors import ADWIN, PageHinkley, PageHinkleyBank
from stream_meta.drift.embedding import MMDDetector, MMDResult, NoveltyDetector, mmd_test
from stream_meta.drift.monitor import Alarm, DriftConfig, DriftMonitor

__all__ = [
    "ADWIN",
    "Alarm",
    "DriftConfig",
    "DriftMonitor",
    "MMDDetector",
    "MMDResult",
    "NoveltyDetector",
    "PageHinkley",
    "PageHinkleyBank",
    "mmd_test",
]
