"""What decisions add to ``stream-meta run``'s per-event cost (issue 16): section
``decisions``.

Two streams of the same length from one seeded sinusoid population (500 tasks, 70% labelled):
plain events only, and the same stream where a share of the events are decisions over 8
actions and up to as many are rewards of earlier decisions (each at least 600 events after
its decision). Each is pushed through the pipeline ``run`` uses (default settings, drift
watch and meta-updates off, micro-batches of 512), interleaved, ``REPEATS`` times; the
process CPU time of the fastest repeat of each is compared (CPU time, not wall time: the
machine may be shared). The target compares the mixed stream with the plain stream served
without a decider (what ``run`` costs without the feature); the plain stream with a decider
(the cost of recognising that a batch holds no decision) is context.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from scripts.bench.common import Check, Context, Section
from stream_meta.app import build_decider, build_engine
from stream_meta.config import Settings
from stream_meta.metrics import EngineMetrics
from stream_meta.model import MetaModel
from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint
from stream_meta.pipeline import Pipeline


def streams(n: int, share: float, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    rng = np.random.default_rng(seed)
    tasks = 500
    amp, phase = rng.uniform(0.1, 5, tasks), rng.uniform(0, np.pi, tasks)
    plain: list[bytes] = []
    mixed: list[bytes] = []
    waiting: list[tuple[str, int]] = []
    for i in range(n):
        t = int(rng.integers(tasks))
        x = float(rng.uniform(-5, 5))
        ev: dict = {"event_id": f"e{i}", "task_id": f"t{t}", "x": [x], "ts": float(i)}
        if rng.random() < 0.7:
            ev["y"] = float(amp[t] * np.sin(x - phase[t]))
        plain.append(json.dumps(ev).encode())
        u = rng.random()
        if u < share:
            xs = rng.uniform(-5, 5, 8)
            actions = [{"action_id": f"a{k}", "x": [float(v)]} for k, v in enumerate(xs)]
            waiting.append((f"d{i}", t))
            decision = {"event_id": f"d{i}", "task_id": f"t{t}", "ts": float(i), "actions": actions}
            mixed.append(json.dumps(decision).encode())
        elif u < 2 * share and len(waiting) > 600:
            did, t2 = waiting.pop(0)
            reward = {"event_id": f"r{i}", "decision_id": did, "reward": float(amp[t2]), "ts": i}
            mixed.append(json.dumps(reward).encode())
        else:
            mixed.append(plain[-1])
    return plain, mixed


def cpu_seconds(model: MetaModel, raws: list[bytes], decider: bool) -> float:
    settings = Settings()
    engine = build_engine(model, settings, metrics=EngineMetrics(CollectorRegistry()))
    pipeline = Pipeline(engine, decider=build_decider(settings, engine) if decider else None)
    t0 = time.process_time()
    for lo in range(0, len(raws), 512):
        pipeline.step(raws[lo : lo + 512])
    return time.process_time() - t0


EVENTS = 20_000
SHARE = 0.1
REPEATS = 5
COST_LIMIT = 1.20  # decisions add at most 20% to the per-event cost


def measure_decisions(ctx: Context, section: Section) -> None:
    events = EVENTS // (4 if ctx.quick else 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = load_checkpoint(shipped_checkpoint("sinusoid"))
        plain, mixed = streams(events, SHARE)
        runs = {"plain, no decider": (plain, False), "plain": (plain, True), "mixed": (mixed, True)}
        best = {name: float("inf") for name in runs}
        for _ in range(REPEATS):
            for name, (raws, decider) in runs.items():
                best[name] = min(best[name], cpu_seconds(model, raws, decider))
    finally:
        torch.set_num_threads(threads)
    n_dec = sum(b'"actions"' in r for r in mixed)
    n_rew = sum(b'"decision_id"' in r for r in mixed)
    us = {k: v / events * 1e6 for k, v in best.items()}
    ratio = best["mixed"] / best["plain, no decider"]
    how = (
        f"`python -m scripts.bench --only decisions`: {events:,} events, fastest of {REPEATS} "
        "interleaved repeats, process CPU time, one torch thread"
    )
    section.checks.append(
        Check(
            f"decisions add <= {COST_LIMIT - 1:.0%} to the per-event cost of `run`'s pipeline",
            f"{ratio:.3f}x: {us['mixed']:.0f} us per event with {n_dec:,} decisions over 8 "
            f"actions and {n_rew:,} rewards against {us['plain, no decider']:.0f} us for the "
            "same stream's plain events served without a decider",
            ratio <= COST_LIMIT,
            how,
        )
    )
    per_decision = (best["mixed"] - best["plain"]) / max(n_dec, 1) / (best["plain"] / events)
    section.checks.append(
        Check(
            "context: the decider on a stream without decisions; one decision in plain events",
            f"{best['plain'] / best['plain, no decider']:.3f}x (the batch search for decision "
            f"and reward events); a decision costs about {per_decision + 1:.1f} plain events "
            "(its task's adaptation, 8 actions, 256 posterior draws)",
            None,
            how,
        )
    )
    section.raw.update(
        events=events,
        decisions=n_dec,
        rewards=n_rew,
        cpu_us_per_event={k: round(v, 1) for k, v in us.items()},
        mixed_over_plain_without_decider=round(ratio, 4),
    )
