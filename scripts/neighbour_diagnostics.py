"""Why neighbour retrieval does (not) help: two diagnostics for a sinusoid checkpoint.

    python -m scripts.neighbour_diagnostics [--checkpoint PATH] [--clusters 20]
        [--spread 0.02] [--events 60000]

1. Retrieval precision: run the engine over the synthetic clustered stream, then for live
   tasks with 1, 2, 5 and 20 examples, the share of their 8 retrieved neighbours that belong
   to the same cluster, beside the share expected by chance.
2. Oracle neighbours: held-out 1- and 2-shot MSE with no neighbour, with the task's own
   full-data embedding (20 examples) as its only neighbour, and with that embedding in place
   of the task's own: how much an ideal retriever could give.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from stream_meta.engine import Engine, EngineConfig
from stream_meta.model import no_neighbours
from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint
from stream_meta.tasks import SinusoidFamily, TaskStream


def retrieval_precision(model, clusters: int, spread: float, events: int) -> None:
    engine = Engine(model, EngineConfig(k_neighbours=8))
    stream = TaskStream(
        SinusoidFamily(), tasks=10_000, clusters=clusters, cluster_spread=spread, seed=0
    )
    cluster_of = stream.task_clusters
    batch = [item.event for item in stream.iter_events(events)]
    for i in range(0, events, 512):
        engine.process(batch[i : i + 512])
    live = list(engine.store)
    sizes = Counter(int(cluster_of[int(s.task_id[1:])]) for s in live)
    print(f"retrieval precision, {clusters} clusters, spread {spread}, {len(live)} live tasks")
    for shots in (1, 2, 5, 20):
        hits = total = 0
        chance = 0.0
        for s in live:
            if s.n != shots:
                continue
            _, keys = engine.index.search(s.embedding[None], 8, exclude=[s.task_id])
            names = [t for t in engine.index.task_id_of(keys[0]) if t]
            own = int(cluster_of[int(s.task_id[1:])])
            hits += sum(int(cluster_of[int(t[1:])]) == own for t in names)
            total += len(names)
            chance += (sizes[own] - 1) / max(1, len(live) - 1) * len(names)
        if total:
            print(
                f"  {shots:>2} shots: {hits / total:.3f} same-cluster (chance "
                f"{chance / total:.3f}) over {total // 8} tasks"
            )


def oracle(model, tasks: int = 500) -> None:
    fam, rng = SinusoidFamily(), np.random.default_rng(3)
    params = fam.sample_params(tasks, rng)
    e = model.config.embed_dim
    print(f"oracle neighbours, {tasks} held-out tasks, MSE on 50 query points")
    with torch.no_grad():
        for shots in (1, 2):
            xs, ys, xq, yq = (
                torch.from_numpy(a) for a in fam.sample_episode(params, shots, 50, rng)
            )
            xf, yf = (torch.from_numpy(a) for a in fam.sample(params, 20, rng))
            mask = torch.ones(ys.shape)
            z = model.embed(xs, ys, mask)
            z_full = model.embed(xf, yf, torch.ones(yf.shape))
            one = torch.ones(tasks, 1)
            cases = {
                "no neighbour": (z, *no_neighbours(tasks, e)),
                "own full-data embedding as neighbour": (z, z_full[:, None], one, one),
                "full-data embedding as own": (z_full, *no_neighbours(tasks, e)),
            }
            for name, (zz, zn, sim, nm) in cases.items():
                w = model.adapt(zz, zn, sim, nm, xs, ys, mask)
                mse = float(((model.predict(xq, w) - yq) ** 2).mean())
                print(f"  {shots} shot(s), {name}: {mse:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--spread", type=float, default=0.02)
    parser.add_argument("--events", type=int, default=60_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(args.checkpoint or shipped_checkpoint("sinusoid"))
    retrieval_precision(model, args.clusters, args.spread, args.events)
    oracle(model)


if __name__ == "__main__":
    main()
