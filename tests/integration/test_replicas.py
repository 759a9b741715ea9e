"""Several ``serve`` replicas in one consumer group: load shared, neighbours across replicas."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_meta.packing import unpack_strings
from stream_meta.testing.kafka import (
    FAST_GROUP_SETS,
    committed_offsets,
    create_topics,
    end_offsets,
    new_prefix,
    read_topic,
)
from stream_meta.testing.processes import Serve, cli
from stream_meta.testing.timeouts import scaled

pytestmark = pytest.mark.kafka


def _assigned(serve: Serve) -> list[str]:
    """The partitions of the replica's latest assignment, from its log."""
    lines = re.findall(r"partitions assigned: (.*)", serve.stderr())
    return [] if not lines or lines[-1].strip() == "none" else lines[-1].split(", ")


def _wait_split(replicas: list[Serve], partitions: int, timeout: float = 180.0) -> None:
    deadline = time.time() + scaled(timeout)
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
    common = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        "--metrics-port",
        "0",
        *FAST_GROUP_SETS,
    ]
    replicas = [
        Serve(
            tmp_path,
            f"r{i}",
            *common,
            "--group",
            f"{prefix}-g",
            "--state-dir",
            str(tmp_path / f"state{i}"),
        )
        for i in range(2)
    ]
    try:
        _wait_split(replicas, 2)
        produced = cli(
            "produce",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic-prefix",
            prefix,
            "--events",
            "3000",
            "--tasks",
            "60",
            "--json",
            "-q",
        )
        assert produced.returncode == 0, produced.stderr.decode()
        predictions = read_topic(
            kafka_bootstrap, f"{prefix}.predictions", until=lambda rs: len(rs) >= 3000, timeout=120
        )
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


def _store_seen(state_dir: Path) -> dict[str, int]:
    """Examples ever learned per task, from the replica's newest checkpoint."""
    newest = sorted(state_dir.glob("state-*.npz"))[-1]
    with np.load(newest, allow_pickle=False) as z:
        ids = unpack_strings(z["store.ids_utf8"], z["store.ids_offsets"])
        return dict(zip(ids, z["store.seen"].tolist(), strict=True))


def test_a_killed_replicas_tasks_move_with_every_example_they_learned(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    common = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        "--metrics-port",
        "0",
        "--group",
        f"{prefix}-g",
        *FAST_GROUP_SETS,
    ]
    produce = [
        "produce",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        "--events",
        "2000",
        "--tasks",
        "40",
        "--json",
        "-q",
    ]
    replicas = [
        Serve(
            tmp_path,
            f"r{i}",
            *common,
            "--state-dir",
            str(tmp_path / f"state{i}"),
            "--set",
            "service.checkpoint_every_s=3600",
        )
        for i in range(2)
    ]
    try:
        _wait_split(replicas, 2)
        assert cli(*produce, "--run-id", "a").returncode == 0
        read_topic(
            kafka_bootstrap, f"{prefix}.predictions", until=lambda rs: len(rs) >= 2000, timeout=120
        )
        # between two batches (every event served, its batch committed: a commit per batch)
        ends = end_offsets(
            read_topic(kafka_bootstrap, f"{prefix}.events", until=lambda rs: len(rs) >= 2000)
        )
        # no checkpoint is due (an hour apart): only the per-batch commits can move them
        deadline = time.time() + scaled(120)
        while committed_offsets(kafka_bootstrap, f"{prefix}-g", f"{prefix}.events") != ends:
            assert time.time() < deadline, "offsets not committed after the batches"
            time.sleep(0.1)
        replicas[1].kill()  # no checkpoint, no commit on the way out
        _wait_split(replicas[:1], 2)  # the survivor takes both partitions...
        replicas[0].wait_for_log("changelog:")  # ...and loads the dead replica's tasks
        assert cli(*produce, "--run-id", "b").returncode == 0
        outputs = read_topic(
            kafka_bootstrap,
            f"{prefix}.predictions",
            until=lambda rs: len({json.loads(r.value)["event_id"] for r in rs}) >= 4000,
            timeout=120,
        )
    finally:
        code, summary = replicas[0].stop()
        if replicas[1].proc.poll() is None:
            replicas[1].kill()
    assert code == 0 and summary is not None
    # every event has exactly one output: the dead replica's committed batches are not
    # served again (one killed within a batch would leave that batch served twice)
    ids = [json.loads(r.value)["event_id"] for r in outputs]
    assert len(set(ids)) == 4000 and len(ids) == 4000
    events = read_topic(kafka_bootstrap, f"{prefix}.events", until=lambda rs: len(rs) >= 4000)
    labelled: dict[str, int] = {}
    for r in events:
        e = json.loads(r.value)
        if e.get("y") is not None:
            labelled[e["task_id"]] = labelled.get(e["task_id"], 0) + 1
    # the survivor holds every task, each having learned each of its examples exactly once
    assert _store_seen(tmp_path / "state0") == labelled


def test_a_published_model_is_adopted_by_every_replica_and_a_corrupt_one_refused(
    kafka_bootstrap: str, tmp_path: Path, model_keys: Any
) -> None:
    from kafka import KafkaProducer

    from stream_meta.kafka.model_topic import chunk_messages
    from stream_meta.model_checkpoint import shipped_checkpoint

    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    kafka = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix]
    common = [
        *kafka,
        "--metrics-port",
        "0",
        "--group",
        f"{prefix}-g",
        *FAST_GROUP_SETS,
        "--set",
        "meta_update.enabled=false",
        "--set",
        f"models.trusted_keys_dir={model_keys.dir}",
    ]
    produce = ["produce", *kafka, "--events", "400", "--tasks", "20", "--json", "-q"]
    replicas = [Serve(tmp_path, f"r{i}", *common) for i in range(2)]
    try:
        _wait_split(replicas, 2)
        model = str(shipped_checkpoint("sinusoid"))
        published = cli(
            "publish-model",
            *kafka,
            "--checkpoint",
            model,
            "--version",
            "7",
            "--signing-key",
            str(model_keys.private),
            "--json",
            "-q",
        )
        assert published.returncode == 0, published.stderr.decode()
        assert json.loads(published.stdout)["chunks"] >= 2  # the checkpoint is cut in chunks
        for r in replicas:
            r.wait_for_log("serving published model version 7")
        # a corrupt version 8: one byte of the checkpoint changed, the announced sha256 kept
        blob = bytearray(shipped_checkpoint("sinusoid").read_bytes())
        good = chunk_messages(bytes(blob), version=8, signer=model_keys.signer)
        blob[len(blob) // 2] ^= 0xFF
        bad = chunk_messages(bytes(blob), version=8, signer=model_keys.signer)
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        head = 48 + 8 + 64  # the signed header (SMM2): sha256, key id and signature of intact
        for i, value in enumerate(bad):  # the hash of the intact checkpoint, corrupt bytes
            producer.send(f"{prefix}.models", value=good[i][:head] + value[head:], partition=0)
        producer.send(f"{prefix}.models", value=b"not a model chunk", partition=0)
        producer.flush()
        producer.close()
        for r in replicas:
            r.wait_for_log("sha256 mismatch")
        assert cli(*produce, "--run-id", "a").returncode == 0
        outputs = read_topic(
            kafka_bootstrap, f"{prefix}.predictions", until=lambda rs: len(rs) >= 400
        )
    finally:
        results = [r.stop() for r in replicas]
    assert all(code == 0 for code, _ in results)
    versions = {json.loads(r.value)["model_version"] for r in outputs}
    assert versions == {7}  # both replicas (both partitions) serve 7, never the corrupt 8
