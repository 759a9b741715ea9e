"""Benchmark the FAISS task index: in-place upsert, remove, exact and IVF search.

``make bench``'s section ``index`` (:func:`measure_index`), and a command of its own:

    python -m scripts.bench.index [--sizes 10000 100000 1000000] [--json]
        [--d 64] [--data sphere|clustered] [--threads N] [--nprobe 16] [--reps 200]

For each size it builds a ``TaskIndex`` of random unit vectors, then times (median and
p90 over ``--reps`` calls, milliseconds):

* ``upsert 1 (overwrite)``: one known task, written in place;
* ``naive remove+add 1``: the same on a raw ``IndexIDMap2(IndexFlatIP)``, for contrast;
* ``upsert 256 (overwrite)``: a batch of 256 known tasks;
* ``remove 1``: one ``remove`` call (the task is put back, untimed, after each);
* ``query 1`` / ``query 256``: exact k=10 search, one query and a batch of 256;
* at sizes >= 1e5, the ``ivf`` kind (defaults nlist=1024, train_size=50k): build time,
  query times and recall@10 against the exact flat index on 256 fresh queries.

``--data clustered`` draws tasks from 1000 "families" (closer to real task embeddings than
uniform on the sphere, which is the worst case for IVF). ``--threads`` sets FAISS's OpenMP
thread count for this process (the library never does); on a small machine shared with
other work, single queries are much faster with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from scripts.bench.common import Check, Context, Section, loadavg, say
from stream_meta.index import TaskIndex, task_keys

K = 10
BATCH = 256


def make_data(rng: np.random.Generator, n: int, d: int, data: str) -> np.ndarray:
    """``[n, d]`` float32 unit vectors: uniform on the sphere, or 1000 noisy clusters."""
    if data == "clustered":
        centers = rng.standard_normal((1000, d)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        x = centers[rng.integers(0, len(centers), size=n)]
        x += rng.standard_normal((n, d)).astype(np.float32) * np.float32(0.6 / np.sqrt(d))
    else:
        x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def time_ms(fn: Callable[[int], Any], reps: int) -> dict[str, float]:
    """Median and p90 wall time of ``fn(i)`` for i in range(reps), in milliseconds."""
    times = np.empty(reps)
    for i in range(reps):
        t0 = time.perf_counter_ns()
        fn(i)
        times[i] = time.perf_counter_ns() - t0
    return {
        "median_ms": float(np.median(times) / 1e6),
        "p90_ms": float(np.quantile(times, 0.9) / 1e6),
    }


def build(index: TaskIndex, ids: list[str], xb: np.ndarray, chunk: int = 100_000) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(ids), chunk):
        index.upsert(ids[s : s + chunk], xb[s : s + chunk])
    return time.perf_counter() - t0


def bench_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    d = args.d
    ids = [f"task-{i}" for i in range(n)]
    xb = make_data(rng, n, d, args.data)
    reps = args.reps
    out: dict[str, Any] = {"n": n}

    flat = TaskIndex(d)
    out["flat_build_s"] = build(flat, ids, xb)
    out["flat_memory_bytes_per_task"] = flat.memory_bytes() / n

    picks = rng.integers(0, n, size=max(reps, BATCH * 4))
    x_new = make_data(rng, max(reps, BATCH), d, args.data)
    out["upsert_1"] = time_ms(lambda i: flat.upsert([ids[picks[i]]], x_new[i : i + 1]), reps)

    batches = [[ids[j] for j in rng.choice(n, size=BATCH, replace=False)] for _ in range(8)]
    out["upsert_256"] = time_ms(lambda i: flat.upsert(batches[i % 8], x_new[:BATCH]), reps // 4)
    out["remove_1"] = remove_then_put_back(flat, ids, xb, picks, min(reps, 50))
    out["naive_remove_add_1"] = naive_upsert_ms(ids, xb, x_new, picks, min(reps, 50))

    xq = make_data(rng, BATCH, d, args.data)
    out["query_1"] = time_ms(
        lambda i: flat.search(xq[i % BATCH : i % BATCH + 1], K, exclude=[ids[picks[i]]]), reps
    )
    out["query_256"] = time_ms(lambda i: flat.search(xq, K), max(reps // 20, 5))

    if n >= args.ivf_min_size:
        out.update(bench_ivf(flat, ids, xb, xq, picks, x_new, args))
    return out


def remove_then_put_back(
    flat: TaskIndex, ids: list[str], xb: np.ndarray, picks: np.ndarray, reps: int
) -> dict[str, float]:
    """``remove`` of one task, timed; the task is put back (untimed) to keep the size."""
    times = np.empty(reps)
    for i in range(reps):
        j = int(picks[i])
        t0 = time.perf_counter_ns()
        flat.remove([ids[j]])
        times[i] = time.perf_counter_ns() - t0
        flat.upsert([ids[j]], xb[j : j + 1])  # untimed: keep the size constant
    return {
        "median_ms": float(np.median(times) / 1e6),
        "p90_ms": float(np.quantile(times, 0.9) / 1e6),
    }


def naive_upsert_ms(
    ids: list[str], xb: np.ndarray, x_new: np.ndarray, picks: np.ndarray, reps: int
) -> dict[str, float]:
    """The same overwrite on a raw ``IndexIDMap2(IndexFlatIP)``: remove, then add."""
    naive = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
    naive.add_with_ids(xb, task_keys(ids))
    keys = task_keys([ids[j] for j in picks[:reps]])

    def naive_upsert(i: int) -> None:
        naive.remove_ids(keys[i : i + 1])
        naive.add_with_ids(x_new[i : i + 1], keys[i : i + 1])

    try:
        return time_ms(naive_upsert, reps)
    finally:
        naive.reset()  # free its memory before the IVF build


def bench_ivf(
    flat: TaskIndex,
    ids: list[str],
    xb: np.ndarray,
    xq: np.ndarray,
    picks: np.ndarray,
    x_new: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The ``ivf`` kind: build time, recall@10 against the exact ``flat`` index, timings."""
    n, reps = len(ids), args.reps
    out: dict[str, Any] = {}
    ivf = TaskIndex(xb.shape[1], kind="ivf", nprobe=args.nprobe, seed=args.seed)
    out["ivf_build_s"] = build(ivf, ids, xb)
    assert not ivf.exact
    out["ivf_nlist"], out["ivf_nprobe"] = 1024, min(args.nprobe, 1024)
    out["ivf_memory_bytes_per_task"] = ivf.memory_bytes() / n
    _, I_exact = flat.search(xq, K)
    _, I_ivf = ivf.search(xq, K)
    hits = sum(len(set(a) & set(b)) for a, b in zip(I_ivf.tolist(), I_exact.tolist(), strict=True))
    out["ivf_recall_at_10"] = hits / I_exact.size
    out["ivf_upsert_1"] = time_ms(lambda i: ivf.upsert([ids[picks[i]]], x_new[i : i + 1]), reps)
    out["ivf_query_1"] = time_ms(lambda i: ivf.search(xq[i % BATCH : i % BATCH + 1], K), reps)
    out["ivf_query_256"] = time_ms(lambda i: ivf.search(xq, K), max(reps // 20, 5))
    return out


ROWS = [
    ("upsert_1", "upsert 1 (overwrite, in place)"),
    ("naive_remove_add_1", "naive remove+add 1 (IndexIDMap2)"),
    ("upsert_256", "upsert 256 (overwrite, in place)"),
    ("remove_1", "remove 1"),
    ("query_1", "exact query 1, k=10"),
    ("query_256", "exact query 256, k=10"),
    ("ivf_upsert_1", "ivf upsert 1 (overwrite)"),
    ("ivf_query_1", "ivf query 1, k=10"),
    ("ivf_query_256", "ivf query 256, k=10"),
]


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def fmt(r: dict[str, Any], key: str) -> str:
        v = r.get(key)
        if v is None:
            return "-"
        if isinstance(v, dict):
            return f"{v['median_ms']:.4g} ({v['p90_ms']:.3g})"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "| ms: median (p90) | " + " | ".join(f"n={r['n']:,}" for r in results) + " |"
    lines = [
        f"d={meta['d']}, data={meta['data']}, faiss {meta['faiss']}, threads={meta['threads']}, "
        f"{meta['cpus']} CPUs, load avg at start {meta['loadavg']}",
        "",
        head,
        "|" + "---|" * (len(results) + 1),
    ]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(r, key) for r in results) + " |")
    extra = [
        ("ivf_recall_at_10", "ivf recall@10 (nprobe)"),
        ("ivf_build_s", "ivf build incl. training, s"),
        ("flat_build_s", "flat build, s"),
        ("flat_memory_bytes_per_task", "flat memory_bytes / task"),
        ("ivf_memory_bytes_per_task", "ivf memory_bytes / task"),
    ]
    for key, label in extra:
        cells = []
        for r in results:
            cell = fmt(r, key)
            if key == "ivf_recall_at_10" and key in r:
                cell = f"{r[key]:.3f} ({r['ivf_nprobe']}/{r['ivf_nlist']})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the section of ``make bench`` ---------------------------------------------------------------
def measure_index(ctx: Context, section: Section) -> None:
    threads = 1  # as `stream-meta run` sets FAISS
    faiss.omp_set_num_threads(threads)
    args = argparse.Namespace(
        d=64, data="sphere", nprobe=16, ivf_min_size=100_000, reps=ctx.sizes.index_reps, seed=0
    )
    results = []
    for n in ctx.sizes.index_sizes:
        say(f"index: n={n:,}")
        results.append(bench_size(n, args))
    meta = {
        "d": args.d,
        "data": args.data,
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(),
        "loadavg": loadavg(),
    }
    section.raw = {"meta": meta, "args": vars(args), "results": results}
    sizes = " ".join(map(str, ctx.sizes.index_sizes))
    cmd = f"python -m scripts.bench.index --sizes {sizes} --reps {args.reps} --threads {threads}"
    section.checks.append(
        Check(
            "FAISS task index micro-benchmarks (no target)",
            "table below",
            None,
            f"`scripts.bench.index.bench_size` (same as `{cmd}`)",
        )
    )
    section.tables.append(markdown(results, meta))


def main(argv: list[str] | None = None) -> None:
    """``python -m scripts.bench.index``: the table (and ``--json``) on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench.index", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--data", choices=["sphere", "clustered"], default="sphere")
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ivf-min-size", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON after the table")
    args = parser.parse_args(argv)
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    meta = {
        "d": args.d,
        "data": args.data,
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(),
        "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": platform.python_version(),
    }
    results = [bench_size(n, args) for n in args.sizes]
    print(markdown(results, meta))
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
