"""The per-family accuracy matrix of a replay: what a strategy can do for each family, over time.

A task's *family* is the prefix of its id before ``sep`` (``":"``): the shipped scenarios name
their tasks ``base:t000001``, ``shifted:t000002``, ``new:...``. A log whose ids have no prefix is
one family, and the matrix is then skipped.

*Phases*: the log is cut into windows of ``window`` events; each window's dominant family (most
labelled events) is noted, and consecutive windows with the same one form a phase (so a family
that comes back starts a new phase). A family's *own* phase is the first it dominates.

*Probes*: for every family, up to ``tasks`` tasks of the log with at least ``shots + queries``
labelled examples; each probe adapts the task from its first ``shots`` examples with the
strategy's state *at that moment* (its model, its index, the task itself never retrieved) and is
scored on its next ``queries`` examples. At the end of every phase (the first batch boundary at
or after it) every family is probed: ``R[i][j]`` is family ``j``'s mean probe score after phase
``i``, as in GEM (Lopez-Paz and Ranzato, 2017).

Scores are accuracies for classification and mean squared errors for regression. Summaries use
``perf = accuracy`` or ``perf = -mse`` so that one convention holds for both:

* ``average``: the mean over families of the final row;
* ``backward_transfer``: mean over families whose own phase is not the last of
  ``perf[last][j] - perf[own(j)][j]`` (negative: the family got worse after it passed, i.e.
  forgetting);
* ``forgetting`` (Chaudhry et al., 2018): mean over the same families of the best ``perf`` after
  their own phase (before the last) minus the final ``perf`` (positive: forgotten).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["FamilyProbes", "build_probes", "matrix_summary", "phases"]


def family_of(task_id: str, sep: str = ":") -> str | None:
    head, found, _ = task_id.partition(sep)
    return head if found else None


def phases(events: list[dict[str, Any] | None], window: int, sep: str = ":") -> list[dict]:
    """``[{"family", "start", "end"}]``: runs of windows dominated by the same family."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(events), window):
        counts = Counter(
            fam
            for e in events[start : start + window]
            if e is not None
            and e.get("y") is not None
            and (fam := family_of(str(e["task_id"]), sep)) is not None
        )
        if not counts:
            continue
        top = max(sorted(counts), key=lambda f: counts[f])
        end = min(start + window, len(events))
        if out and out[-1]["family"] == top:
            out[-1]["end"] = end
        else:
            out.append({"family": top, "start": start, "end": end})
    return out


@dataclass
class FamilyProbes:
    """Probe episodes per family: ``xs [T, shots, d], ys [T, shots], xq [T, q, d], yq [T, q]``
    and the probe tasks' ids."""

    families: list[str]
    episodes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]]
    phases: list[dict[str, Any]]
    kind: str

    def score(self, adapt: Callable[..., torch.Tensor]) -> dict[str, float]:
        """Every family's mean probe score with the strategy's current state."""
        row = {}
        for fam in self.families:
            xs, ys, xq, yq, ids = self.episodes[fam]
            out = adapt(xs, ys, xq, ids)
            if self.kind == "regression":
                row[fam] = float(((out.numpy().astype(np.float64) - yq) ** 2).mean())
            else:
                row[fam] = float((out.argmax(-1).numpy() == yq).mean())
        return row


def build_probes(
    events: list[dict[str, Any] | None],
    kind: str,
    *,
    window: int = 1000,
    tasks: int = 50,
    shots: int = 10,
    queries: int = 10,
    sep: str = ":",
) -> FamilyProbes | None:
    """Probe episodes from the log's own labelled events; None when the log has < 2 families
    or a family has no task with ``shots + queries`` examples."""
    by_task: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    for e in events:
        if e is None or e.get("y") is None or family_of(str(e["task_id"]), sep) is None:
            continue
        by_task[str(e["task_id"])].append((e["x"], e["y"]))
    need = shots + queries
    chosen: dict[str, list[str]] = defaultdict(list)
    for task_id, examples in by_task.items():  # in order of first appearance
        fam = family_of(task_id, sep)
        if len(examples) >= need and fam is not None and len(chosen[fam]) < tasks:
            chosen[fam].append(task_id)
    if len(chosen) < 2:
        return None
    y_dtype = np.float32 if kind == "regression" else np.int64
    episodes = {}
    for fam, ids in sorted(chosen.items()):
        try:
            x = np.array([[ex[0] for ex in by_task[t][:need]] for t in ids], dtype=np.float32)
            y = np.array([[ex[1] for ex in by_task[t][:need]] for t in ids], dtype=y_dtype)
        except (TypeError, ValueError):
            return None  # ragged or malformed examples: the engine rejects those events anyway
        episodes[fam] = (x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], ids)
    return FamilyProbes(sorted(chosen), episodes, phases(events, window, sep), kind)


def matrix_summary(probes: FamilyProbes, rows: list[dict[str, float]]) -> dict[str, Any]:
    """The matrix (one row per phase end) with average, backward transfer and forgetting."""
    metric = "mse" if probes.kind == "regression" else "accuracy"
    sign = -1.0 if metric == "mse" else 1.0
    fams = probes.families
    perf = np.array([[sign * r[f] for f in fams] for r in rows])
    last = len(rows) - 1
    own = {
        f: next((i for i, p in enumerate(probes.phases) if p["family"] == f), None) for f in fams
    }
    past = {j: i for j, f in enumerate(fams) if (i := own[f]) is not None and i < last}
    bwt = [perf[last, j] - perf[i, j] for j, i in past.items()]
    forgetting = [perf[i:last, j].max() - perf[last, j] for j, i in past.items()]
    return {
        "metric": metric,
        "families": fams,
        "phases": probes.phases,
        "matrix": [[round(r[f], 6) for f in fams] for r in rows],
        "average": round(float(np.mean([rows[-1][f] for f in fams])), 6),
        "backward_transfer": round(float(np.mean(bwt)), 6) if bwt else None,
        "forgetting": round(float(np.mean(forgetting)), 6) if forgetting else None,
        "probe_tasks": {f: len(probes.episodes[f][4]) for f in fams},
    }


def parse_events(raws: list[Any]) -> list[dict[str, Any] | None]:
    """Each raw event as a dict (None when it is not a JSON object with a task id)."""
    out: list[dict[str, Any] | None] = []
    for raw in raws:
        try:
            e = raw if isinstance(raw, dict) else json.loads(raw)
        except (ValueError, TypeError):
            e = None
        out.append(e if isinstance(e, dict) and "task_id" in e and "x" in e else None)
    return out
