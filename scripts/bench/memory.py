"""Memory per live task (issue 2): section ``memory``. :func:`memory_worker` runs in a fresh
process (``python -c "from scripts.bench.memory import memory_worker; ..."``), so that the
growth of the resident size is its engine's alone."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.bench.common import (
    ROOT,
    Check,
    Context,
    MeasurementError,
    Section,
    need_checkpoint,
    rel,
    say,
    tail,
)
from scripts.bench.library import build_engine, default_settings, family_for, serving_threads
from stream_meta.testing.processes import clean_env

BYTES_PER_TASK_TARGET = 4096


def measure_memory(ctx: Context, section: Section) -> None:
    target = f"memory per live task <= {BYTES_PER_TASK_TARGET:,} B beside its support buffer"
    if not need_checkpoint(ctx, section, "sinusoid", [target]):
        return
    n = ctx.sizes.memory_tasks
    ck = ctx.checkpoint("sinusoid")
    assert ck is not None
    code = (
        "import json, sys; from scripts.bench.memory import memory_worker; "
        "print(json.dumps(memory_worker(sys.argv[1], int(sys.argv[2]))))"
    )
    cmd = [sys.executable, "-c", code, str(ck), str(n)]
    say(f"memory: {n:,} new tasks in a fresh process")
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise MeasurementError(
            f"memory worker exited with {proc.returncode}:\n{tail(proc.stderr, 15)}"
        )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    section.raw = r
    how_rss = (
        f"`scripts.bench.memory.memory_worker({rel(ck)!r}, {n})` in a fresh process: (RSS "
        "after - RSS before building the engine - support buffers - weights pool) / tasks"
    )
    how_est = "`engine.store.bytes_per_task(embed_dim) + engine.index.memory_bytes() / len(index)`"
    section.checks.append(
        Check(
            f"{target} (from resident memory)",
            f"{r['rss_bytes_per_task']:,.0f} B/task",
            r["rss_bytes_per_task"] <= BYTES_PER_TASK_TARGET,
            how_rss,
        )
    )
    section.checks.append(
        Check(
            "library's own estimate (no target: the RSS one decides)",
            f"{r['estimate_bytes_per_task']:,.0f} B/task "
            f"(store {r['store_bytes_per_task']:,} + index {r['index_bytes_per_task']:,.0f})",
            None,
            how_est,
        )
    )
    section.notes.append(_memory_note(r))


def _memory_note(r: dict[str, Any]) -> str:
    mib = 1 << 20
    return (
        f"{r['tasks']:,} distinct tasks, each sent one labelled event "
        f'(`{{"event_id": ..., "task_id": "t<i>", "x": [...], "y": ...}}`), in '
        f"micro-batches of {r['batch']}, {r['events_per_s']:,.0f} events/s; live tasks at the "
        f"end {r['live_tasks']:,}, index size {r['index_size']:,}. "
        f"RSS before the engine {r['rss_before'] / mib:,.1f} MiB, after building it "
        f"{r['rss_built'] / mib:,.1f} MiB, at the end {r['rss_after'] / mib:,.1f} MiB: growth "
        f"{r['rss_growth'] / mib:,.1f} MiB, minus support buffers "
        f"{r['support_bytes'] / mib:,.1f} MiB ({r['support_size']} x ({r['x_dim']} x 4 + "
        f"{r['y_itemsize']}) B per task, allocated in `stream_meta/state.py`) and the weights "
        f"pool {r['pool_bytes'] / mib:,.1f} MiB ({r['weights_cache_size']:,} rows x "
        f"{r['n_params']:,} params x 4 B, allocated up front) leaves "
        f"{r['residual_bytes'] / mib:,.1f} MiB. A throw-away engine processed "
        f"{r['warm_events']:,} events first, so that one-time allocations (torch kernels, "
        "allocator arenas, imports) are not counted; allocator slack and FAISS's growth "
        "headroom are counted, as they are real."
    )


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; else the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _feed(engine: Any, family: Any, n: int, prefix: str, seed: int, batch: int) -> float:
    """``n`` new tasks, one labelled event each, in micro-batches; the seconds it took."""
    import numpy as np

    classification = family.kind == "classification"
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        b = min(batch, n - lo)
        params = family.sample_params(b, rng)
        x, y = family.sample(params, 1, rng)
        events = [
            {
                "event_id": f"{prefix}e{lo + j}",
                "task_id": f"{prefix}{lo + j}",
                "x": x[j, 0].tolist(),
                "y": int(y[j, 0]) if classification else float(y[j, 0]),
            }
            for j in range(b)
        ]
        engine.process(events)
    return time.perf_counter() - t0


def memory_worker(checkpoint: str, tasks: int, batch: int = 512) -> dict[str, Any]:
    """Feed ``tasks`` new tasks (one labelled event each) to an Engine; memory before/after.

    Meant to run in a fresh process (``measure_memory`` starts one), so that the resident-size
    growth is this engine's alone.
    """
    import numpy as np

    from stream_meta.model_checkpoint import load_checkpoint

    serving_threads()
    model, manifest = load_checkpoint(Path(checkpoint))
    family = family_for(manifest["family"])
    defaults = default_settings()
    live = max(defaults.engine.max_live_tasks, tasks)
    settings = default_settings({"engine": {"max_live_tasks": live}})

    warm_events = 4 * batch
    warm = build_engine(model, settings, manifest)
    _feed(warm, family, warm_events, "w", seed=1, batch=batch)
    del warm
    gc.collect()

    rss_before = rss_bytes()
    engine = build_engine(model, settings, manifest)
    gc.collect()
    rss_built = rss_bytes()
    seconds = _feed(engine, family, tasks, "t", seed=2, batch=batch)
    engine.flush_index()
    gc.collect()
    rss_after = rss_bytes()

    store = engine.store
    y_itemsize = np.dtype(store.y_dtype).itemsize
    support = tasks * store.support_size * (store.x_dim * 4 + y_itemsize)
    n_params = model.target.n_params
    cache_rows = engine.weights_cache_rows
    pool = cache_rows * n_params * 4
    growth = rss_after - rss_before
    residual = growth - support - pool
    store_b = store.bytes_per_task(model.config.embed_dim)
    index_b = engine.index.memory_bytes() / max(len(engine.index), 1)
    return {
        "tasks": tasks,
        "batch": batch,
        "live_tasks": len(store),
        "index_size": len(engine.index),
        "events_per_s": tasks / seconds,
        "warm_events": warm_events,
        "rss_before": rss_before,
        "rss_built": rss_built,
        "rss_after": rss_after,
        "rss_growth": growth,
        "support_size": store.support_size,
        "x_dim": store.x_dim,
        "y_itemsize": y_itemsize,
        "support_bytes": support,
        "weights_cache_size": cache_rows,
        "n_params": n_params,
        "pool_bytes": pool,
        "residual_bytes": residual,
        "rss_bytes_per_task": residual / tasks,
        "store_bytes_per_task": store_b,
        "index_bytes_per_task": index_b,
        "estimate_bytes_per_task": store_b + index_b,
    }
