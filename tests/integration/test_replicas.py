"""Several ``serve`` replicas in one consumer group: load shared, neighbours across replicas."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from stream_meta.packing import unpack_strings
from tests.integration.test_cli import cli
from tests.kafka_tools import FAST_GROUP_SETS, Serve, create_topics, new_prefix, read_topic

pytestmark = pytest.mark.kafka


def _assigned(serve: Serve) -> list[str]:
    """The partitions of the replica's latest assignment, from its log."""
    lines = re.findall(r"partitions assigned: (.*)", serve.stderr())
    return [] if not lines or lines[-1].strip() == "none" else lines[-1].split(", ")


def _wait_split(replicas: list[Serve], partitions: int, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        parts = [_assigned(r) for r in replicas]
        if all(parts) and sum(len(p) for p in parts) == partitions:
            return
        for r in replicas:
            if r.proc.poll() is not None:
                raise AssertionError(f"a replica exited:\n{r.stderr()}")
        time.sleep(0.2)
    raise TimeoutError(f"partitions not split: {[_assigned(r) for r in replicas]}")


def _checkpoint(state_dir: Path) -> tuple[set[str], set[str]]:
    """``(tasks in the replica's store, tasks in its index)`` from its newest checkpoint."""
    newest = sorted(state_dir.glob("state-*.npz"))[-1]
    with np.load(newest, allow_pickle=False) as z:
        store = unpack_strings(z["store.ids_utf8"], z["store.ids_offsets"])
        index = unpack_strings(z["index.names_utf8"], z["index.names_offsets"])
    return set(store), set(index)


def test_replicas_share_the_load_and_find_neighbours_across_partitions(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    common = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix,
              "--metrics-port", "0", *FAST_GROUP_SETS]  # fmt: skip
    replicas = [Serve(tmp_path, f"r{i}", *common, "--group", f"{prefix}-g", "--state-dir",
                      str(tmp_path / f"state{i}")) for i in range(2)]  # fmt: skip
    try:
        _wait_split(replicas, 2)
        produced = cli("produce", "--bootstrap-servers", kafka_bootstrap, "--topic-prefix",
                       prefix, "--events", "3000", "--tasks", "60", "--json", "-q")  # fmt: skip
        assert produced.returncode == 0, produced.stderr.decode()
        predictions = read_topic(kafka_bootstrap, f"{prefix}.predictions",
                                 until=lambda rs: len(rs) >= 3000, timeout=120)  # fmt: skip
        # every replica published its tasks' embeddings; give the others a moment to read them
        read_topic(kafka_bootstrap, f"{prefix}.task-embeddings", until=lambda rs: len(rs) >= 60)
        time.sleep(2.0)
    finally:
        results = [r.stop() for r in replicas]
    assert len({json.loads(p.value)["event_id"] for p in predictions}) == 3000
    consumed = []
    for code, summary in results:
        assert code == 0 and summary is not None
        consumed.append(summary["consumed"])
    assert all(c > 0 for c in consumed) and sum(consumed) == 3000  # the load is shared
    (store0, index0), (store1, index1) = (_checkpoint(tmp_path / f"state{i}") for i in range(2))
    assert store0 and store1 and not store0 & store1  # each replica owns its tasks
    everyone = store0 | store1
    assert len(everyone) == 60
    # each replica's index covers the other replica's tasks too: neighbours across partitions
    assert index0 >= everyone and index1 >= everyone
