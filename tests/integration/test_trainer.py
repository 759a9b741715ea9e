"""``stream-meta trainer``: one active trainer trains meta-updates centrally and publishes them;
every replica adopts the published version; a standby trainer takes over."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stream_meta.testing.kafka import FAST_GROUP_SETS, create_topics, new_prefix, read_topic
from stream_meta.testing.processes import Serve, clean_env, cli, free_port, wait_for_updater_events
from stream_meta.testing.timeouts import scaled

pytestmark = pytest.mark.kafka

QUICK = [
    "--set",
    "meta_update.steps=20",
    "--set",
    "meta_update.promote=always",
    "--set",
    "meta_update.min_val_tasks=1",
    "--set",
    "trainer.sample=1.0",
]


class Trainer(Serve):
    """``stream-meta trainer`` as a child process (the ``Serve`` helpers apply)."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.log = tmp / f"{name}.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_meta", "trainer", "--json", "-q", *args],
            stdout=subprocess.PIPE,
            stderr=self._fh,
            env=clean_env(),
        )


def test_the_trainer_publishes_an_update_that_the_replica_serves(
    kafka_bootstrap: str, tmp_path: Path, model_keys: Any
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    kafka = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix]
    port = free_port()
    trainer = Trainer(
        tmp_path,
        "trainer",
        *kafka,
        *FAST_GROUP_SETS,
        *QUICK,
        "--group",
        f"{prefix}-g",
        "--metrics-port",
        "0",
        "--admin-port",
        str(port),
        "--set",
        f"models.signing_key_file={model_keys.private}",
        "--set",
        f"models.trusted_keys_dir={model_keys.dir}",
    )
    replica = Serve(
        tmp_path,
        "replica",
        *kafka,
        *FAST_GROUP_SETS,
        "--group",
        f"{prefix}-g",
        "--metrics-port",
        "0",
        "--set",
        "meta_update.enabled=false",
        "--set",
        f"models.trusted_keys_dir={model_keys.dir}",
    )
    try:
        trainer.wait_for_log("trainer active")
        replica.wait_for_log("partitions assigned")
        produce = ["produce", *kafka, "--events", "3000", "--tasks", "150", "-q"]
        assert cli(*produce, "--run-id", "a").returncode == 0
        wait_for_updater_events(port, 2500, trainer)
        asked = cli(
            "meta-update",
            "--url",
            f"http://127.0.0.1:{port}",
            "--wait",
            "90",
            "--json",
            timeout=120,
        )
        assert asked.returncode == 0, asked.stderr.decode() + trainer.stderr()
        outcome = json.loads(asked.stdout)
        assert outcome["outcome"] == "promoted" and outcome["version"] == 2, outcome
        trainer.wait_for_log("published model version 2")
        replica.wait_for_log("serving published model version 2")
        assert cli(*produce, "--run-id", "b", "--events", "300").returncode == 0
        outputs = read_topic(
            kafka_bootstrap,
            f"{prefix}.predictions",
            until=lambda rs: (
                sum(json.loads(r.value)["event_id"].startswith("b-") for r in rs) >= 300
            ),
        )
        drift = read_topic(kafka_bootstrap, f"{prefix}.drift", until=lambda rs: len(rs) >= 1)
    finally:
        code, _ = replica.stop()
        tcode, summary = trainer.stop()
    assert code == 0 and tcode == 0, trainer.stderr()
    assert summary is not None and summary["published"] == 1 and summary["active"]
    late = [json.loads(r.value) for r in outputs if json.loads(r.value)["event_id"][:2] == "b-"]
    assert {p["model_version"] for p in late} == {2}  # the replica serves what was published
    outcomes = [json.loads(r.value) for r in drift if r.key == b"meta_update"]
    assert [o["outcome"] for o in outcomes] == ["promoted"]


def _state(trainer: Trainer) -> str | None:
    """The trainer's latest state from its log: "active", "standby" or None yet."""
    states = [
        line
        for line in trainer.stderr().splitlines()
        if "trainer active" in line or "trainer on standby" in line
    ]
    return None if not states else ("active" if "active" in states[-1] else "standby")


def _active_gauge(port: int) -> float | None:
    """``stream_meta_trainer_active`` from a trainer's own /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r"^stream_meta_trainer_active (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def test_one_trainer_is_active_and_a_standby_takes_over(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    create_topics(kafka_bootstrap, prefix, partitions=2)
    args = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        *FAST_GROUP_SETS,
        "--group",
        f"{prefix}-g",
    ]
    ports = [free_port(), free_port()]
    trainers = [Trainer(tmp_path, "t1", *args, "--metrics-port", str(ports[0]))]
    try:
        trainers[0].wait_for_log("trainer active")
        trainers.append(Trainer(tmp_path, "t2", *args, "--metrics-port", str(ports[1])))
        # the group settles with exactly one active trainer (whichever the assignor picks)
        deadline = time.time() + scaled(180)
        while time.time() < deadline:
            states = [_state(t) for t in trainers]
            if sorted(map(str, states)) == ["active", "standby"]:
                break
            time.sleep(0.3)
        assert sorted(map(str, states)) == ["active", "standby"], states
        time.sleep(2.0)
        assert sorted(map(str, (_state(t) for t in trainers))) == ["active", "standby"]
        active = states.index("active")
        # each says so on its metrics (what StreamMetaNoActiveTrainer watches)
        assert [_active_gauge(p) for p in ports] == [1.0 if i == active else 0.0 for i in (0, 1)]
        trainers[active].kill()
        standby = trainers[1 - active]
        deadline = time.time() + scaled(180)
        while _state(standby) != "active" and time.time() < deadline:
            time.sleep(0.3)
        assert _state(standby) == "active"  # the standby took over
        # and says so on its metrics (what StreamMetaNoActiveTrainer watches)
        assert _active_gauge(ports[1 - active]) == 1.0
    finally:
        for t in trainers:
            if t.proc.poll() is None:
                code, _ = t.stop()
                assert code == 0, t.stderr()
