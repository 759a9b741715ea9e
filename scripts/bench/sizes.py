"""How big each measurement is: ``FULL`` for the report, ``QUICK`` for smoke runs (``--quick``).

A leaf of the package (standard library only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is; ``QUICK`` for smoke runs, ``FULL`` for the report."""

    eval_tasks: int
    ablation_events: int
    ablation_eval_tasks: int
    digits_tasks: int
    latency_tasks: int
    throughput_cli_events: int
    throughput_timed_events: int
    throughput_new_task_rate: float
    memory_tasks: int
    index_sizes: tuple[int, ...]
    index_reps: int
    serve_events: int
    serve_latency_events: int
    serve_startup_events: int
    drift_events: int
    drift_stationary_events: int
    drift_seeds: int
    meta_events: int
    meta_latency_events: int
    scale_events: int
    scale_cycles: int
    soak_s: float
    retrieval_history_tasks: int
    retrieval_probe_tasks: int
    retrieval_live_tasks: int
    retrieval_timed_events: int
    retrieval_latency_samples: int
    bandit_users: int
    bandit_decisions: int
    bandit_log_users: int
    bandit_log_decisions: int
    #: meta-training steps of each harder population's model (the shipped model's recipe: 3000)
    bandit_population_steps: int


FULL = Sizes(
    eval_tasks=1000,
    ablation_events=100_000,
    ablation_eval_tasks=1000,
    digits_tasks=1000,
    latency_tasks=200,
    throughput_cli_events=200_000,
    throughput_timed_events=100_000,
    throughput_new_task_rate=0.1,
    memory_tasks=100_000,
    index_sizes=(10_000, 100_000, 1_000_000),
    index_reps=200,
    # >= 60 s of consuming even at 12,000 events/s; 60 s at 2,000 events/s
    serve_events=800_000,
    serve_latency_events=120_000,
    serve_startup_events=300,
    drift_events=60_000,
    drift_stationary_events=100_000,
    drift_seeds=3,
    meta_events=60_000,
    meta_latency_events=400_000,
    scale_events=300_000,
    scale_cycles=20,
    soak_s=600.0,
    retrieval_history_tasks=1000,
    retrieval_probe_tasks=200,
    retrieval_live_tasks=10_000,
    retrieval_timed_events=60_000,
    retrieval_latency_samples=300,
    bandit_users=500,
    bandit_decisions=200,
    bandit_log_users=200,
    bandit_log_decisions=50,
    bandit_population_steps=3000,
)
QUICK = Sizes(
    eval_tasks=200,
    ablation_events=20_000,
    ablation_eval_tasks=200,
    digits_tasks=200,
    latency_tasks=100,
    throughput_cli_events=30_000,
    throughput_timed_events=20_000,
    throughput_new_task_rate=0.5,
    memory_tasks=20_000,
    index_sizes=(10_000, 100_000),
    index_reps=50,
    serve_events=60_000,
    serve_latency_events=10_000,
    serve_startup_events=300,
    drift_events=26_000,
    drift_stationary_events=20_000,
    drift_seeds=1,
    meta_events=32_000,
    meta_latency_events=100_000,
    scale_events=100_000,  # enough for both replicas to serve at once
    scale_cycles=3,
    soak_s=60.0,
    retrieval_history_tasks=200,
    retrieval_probe_tasks=60,
    retrieval_live_tasks=2000,
    retrieval_timed_events=10_000,
    retrieval_latency_samples=100,
    bandit_users=50,
    bandit_decisions=40,
    bandit_log_users=50,
    bandit_log_decisions=10,
    bandit_population_steps=30,
)
