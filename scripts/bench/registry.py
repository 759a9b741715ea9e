"""The sections of ``make bench``, in the order of the report: name -> (title, measurement).
``--only`` takes these names."""

from __future__ import annotations

from collections.abc import Callable

from scripts.bench.bandits import measure_bandits
from scripts.bench.common import Context, Section
from scripts.bench.decisions import measure_decisions
from scripts.bench.drift import measure_drift
from scripts.bench.experts import measure_experts
from scripts.bench.fewshot import (
    measure_digits,
    measure_latency,
    measure_neighbours,
    measure_sinusoid,
)
from scripts.bench.index import measure_index
from scripts.bench.labels import measure_labels
from scripts.bench.memory import measure_memory
from scripts.bench.meta_update import measure_meta_update
from scripts.bench.real import measure_real
from scripts.bench.replay import measure_replay
from scripts.bench.retrieval import measure_retrieval
from scripts.bench.scale import measure_scale
from scripts.bench.serve import measure_serve
from scripts.bench.throughput import measure_throughput

#: a measurement fills its section (checks, notes, tables, raw results) or raises
Measurement = Callable[[Context, Section], None]

MEASUREMENTS: dict[str, tuple[str, Measurement]] = {
    "sinusoid": ("Sinusoid few-shot regression", measure_sinusoid),
    "neighbours": ("Neighbour retrieval ablation", measure_neighbours),
    "digits": ("Digits 5-way classification", measure_digits),
    "latency": ("Adaptation latency", measure_latency),
    "throughput": ("Engine throughput", measure_throughput),
    "memory": ("Memory per task", measure_memory),
    "index": ("Task index micro-benchmarks", measure_index),
    "serve": ("Kafka service (`stream-meta serve`)", measure_serve),
    "drift": ("Drift detection", measure_drift),
    "meta_update": ("Meta-updates: recovery, forgetting, latency", measure_meta_update),
    "replay": ("Replay evaluation: strategies and baselines", measure_replay),
    "scale": ("Replicas: scale-out, kill-and-restart, soak", measure_scale),
    "real": ("Bring your own tasks: real data sets", measure_real),
    "retrieval": ("Retrieval by evidence: related tasks and a control", measure_retrieval),
    "experts": ("Experts: meta-updates that add instead of overwrite", measure_experts),
    "labels": ("Label requests: which labels to ask for, on a budget", measure_labels),
    "decisions": ("Decisions: what they add to the per-event cost", measure_decisions),
    "bandits": ("Bandits: regret of new users and off-policy evaluation", measure_bandits),
}
