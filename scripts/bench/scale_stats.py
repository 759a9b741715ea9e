"""The arithmetic of the ``scale`` section: pure functions of what was sampled and read back
(unit-tested in tests/scripts/test_bench.py)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from scripts.bench.common import MeasurementError


def cores_between(
    trace: Sequence[tuple[float, list[float | None], float | None]], lo: float, hi: float
) -> dict[str, Any]:
    """Cores each replica and the broker used between epoch seconds ``lo`` and ``hi``, from
    CPU-time samples ``(epoch s, [replica CPU s], broker CPU s)`` (the samples nearest the
    bounds, inside them)."""
    inside = [t for t in trace if lo <= t[0] <= hi and None not in t[1] and t[2] is not None]
    if len(inside) < 2:
        return {"replicas": None, "broker": None}
    (t0, r0, b0), (t1, r1, b1) = inside[0], inside[-1]
    dt = t1 - t0
    return {
        "replicas": [round((b - a) / dt, 3) for a, b in zip(r0, r1, strict=True)],  # type: ignore[operator]
        "broker": round((b1 - b0) / dt, 3),  # type: ignore[operator]
        "seconds": round(dt, 2),
    }


def steady_window(
    rows: Sequence[tuple[int, str]], partitions: Sequence[int], owned: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Throughput while every replica was serving: from the latest of the replicas' first
    predictions to the earliest of their last ones (a replica's predictions are those on the
    partitions it owns: predictions are keyed by task id like the events, so they land on the
    events' partition number). ``rows``: ``(timestamp ms, event id)`` per prediction."""
    firsts, lasts = [], []
    for parts in owned:
        stamps = [ts for (ts, _), p in zip(rows, partitions, strict=True) if p in set(parts)]
        if not stamps:
            raise MeasurementError(f"no prediction on partitions {list(parts)}")
        firsts.append(min(stamps))
        lasts.append(max(stamps))
    lo, hi = max(firsts), min(lasts)
    n = sum(1 for ts, _ in rows if lo <= ts <= hi)
    span = (hi - lo) / 1000.0
    return {
        "from_ms": lo,
        "to_ms": hi,
        "span_s": round(span, 3),
        "events": n,
        "events_per_s": round(n / span, 1) if span > 0 else None,
    }


def cores_in(cpu: Sequence[Sequence[Any]], lo: float, hi: float) -> str:
    """Cores each replica (process tree) and the broker used between ``lo`` and ``hi`` seconds,
    from samples ``(seconds, [replica CPU s], broker CPU s)``: ``"0.31, 0.25 / 0.94"``."""
    inside = [c for c in cpu if lo <= c[0] <= hi]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return "?"
    (t0, r0, b0), (t1, r1, b1) = inside[0], inside[-1]
    dt = t1 - t0
    reps = ", ".join(f"{(b - a) / dt:.2f}" for a, b in zip(r0, r1, strict=True))
    brk = "?" if b0 is None or b1 is None else f"{(b1 - b0) / dt:.2f}"
    return f"{reps} / {brk}"


def cores_text(cpu: Sequence[Sequence[Any]], width_s: float) -> str:
    """Cores each replica and the broker used over the last ``width_s`` (for the progress log)."""
    if not cpu:
        return "?"
    return "replicas / broker " + cores_in(cpu, cpu[-1][0] - width_s, cpu[-1][0])


def span_throughput(stamps_ms: Sequence[int], events: int) -> dict[str, Any]:
    """``events`` over the span of the output timestamps (first to last, ms)."""
    lo, hi = min(stamps_ms), max(stamps_ms)
    span = (hi - lo) / 1000.0
    return {"span_s": round(span, 3), "events_per_s": round(events / span, 1) if span else None}


def windows(
    events: Sequence[tuple[int, str]], predictions: Sequence[tuple[int, str]], width_s: float
) -> list[dict[str, Any]]:
    """Per window of ``width_s`` from the first event: events produced, end-to-end latency p50 /
    p99 of the events produced in it (first prediction of each), and the backlog at its end
    (events produced so far minus events predicted so far). Inputs: ``(timestamp_ms, event_id)``."""
    first: dict[str, int] = {}
    for ts, eid in predictions:
        if eid not in first or ts < first[eid]:
            first[eid] = ts
    ev = sorted(events)
    t0 = ev[0][0]
    width = width_s * 1000.0
    predicted = np.sort(np.array(list(first.values()), dtype=np.int64))
    produced = np.array([ts for ts, _ in ev], dtype=np.int64)
    out = []
    k = 0
    while t0 + k * width <= ev[-1][0]:
        lo, hi = t0 + k * width, t0 + (k + 1) * width
        lat = np.array([first[e] - ts for ts, e in ev if lo <= ts < hi and e in first], float)
        backlog = int((produced < hi).sum() - (predicted < hi).sum())
        row: dict[str, Any] = {
            "from_s": round(k * width_s, 1),
            "events": len(lat),
            "backlog_at_end": backlog,
        }
        if len(lat):
            p50, p99 = np.percentile(lat, [50, 99])
            row.update(p50_ms=float(p50), p99_ms=float(p99), max_ms=float(lat.max()))
        out.append(row)
        k += 1
    return out


def rss_growth(
    samples: Sequence[tuple[float, int]], warm_s: float, width_s: float = 30.0
) -> dict[str, Any]:
    """Memory growth after warm-up: the median of the samples in the ``width_s`` after ``warm_s``
    against the median of the last ``width_s``. ``samples``: ``(seconds since start, bytes)``."""
    end = samples[-1][0]
    start = [b for t, b in samples if warm_s <= t < warm_s + width_s]
    last = [b for t, b in samples if t > end - width_s]
    if not start or not last:
        raise MeasurementError(f"too few memory samples after {warm_s:g} s of warm-up")
    a, b = float(np.median(start)), float(np.median(last))
    return {
        "warm_s": warm_s,
        "after_warm_up_bytes": int(a),
        "end_bytes": int(b),
        "growth": round(b / a - 1.0, 4),
        "max_bytes": max(x for _, x in samples),
    }


def changelog_check(labels: dict[str, list[float]], newest: dict[str, Any]) -> dict[str, Any]:
    """Every task's newest changelog record (``newest``: task id -> record with ``seen`` and
    ``ys``) against its labels in stream order (``labels``): ``seen`` equals the number of its
    labelled events and its support set holds the newest of their labels (the default
    ``recent`` buffer is a ring: compared as multisets)."""
    wrong_seen, wrong_set, missing = [], [], []
    for task, ys in labels.items():
        rec = newest.get(task)
        if rec is None:
            missing.append(task)
            continue
        if rec.seen != len(ys):
            wrong_seen.append((task, rec.seen, len(ys)))
        n = len(rec.ys)  # a ring buffer: the newest n labels, rotated
        if n > len(ys) or not np.allclose(np.sort(rec.ys), np.sort(ys[len(ys) - n :])):
            wrong_set.append(task)
    return {
        "labelled_tasks": len(labels),
        "labelled_events": sum(map(len, labels.values())),
        "tasks_missing": len(missing),
        "seen_mismatch": len(wrong_seen),
        "seen_mismatch_examples": wrong_seen[:5],
        "support_set_mismatch": len(wrong_set),
        "support_set_mismatch_examples": wrong_set[:5],
    }


def labels_in_order(events: Sequence[Any]) -> dict[str, list[float]]:
    """Each task's labels in stream order (its events share a partition: offset order)."""
    labels: dict[str, list[float]] = defaultdict(list)
    for r in sorted(events, key=lambda r: (r.partition, r.offset)):
        e = json.loads(r.value)
        if e.get("y") is not None:
            labels[e["task_id"]].append(float(e["y"]))
    return dict(labels)


def log_errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if " ERROR " in ln or ln.startswith("Traceback")]
