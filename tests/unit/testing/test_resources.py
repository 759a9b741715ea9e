"""``stream_meta.testing.resources``: CPU time and resident memory of a process tree (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stream_meta.testing.resources import (
    children_cpu_seconds,
    cpu_seconds,
    rss_bytes,
    tree_cpu_seconds,
    tree_pids,
    tree_rss_bytes,
)
from stream_meta.testing.timeouts import wait_until

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

#: a process that starts a child, and both sleep
PARENT = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
)


def test_tree_sums_a_process_and_its_child_when_both_live() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        pids = wait_until(
            lambda: len(tree_pids(proc.pid)) == 2 and tree_pids(proc.pid),
            timeout=30,
            what="the child",
        )
        assert pids[0] == proc.pid
        main, tree = rss_bytes(proc.pid), tree_rss_bytes(proc.pid)
        assert main is not None and tree is not None and tree > main > 0
        own = cpu_seconds(proc.pid)
        assert own is not None and tree_cpu_seconds(proc.pid) >= own >= 0
    finally:
        for pid in tree_pids(proc.pid)[1:]:  # the child this test started
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_a_gone_process_has_no_memory_or_cpu_and_reaped_children_count() -> None:
    before = children_cpu_seconds()
    proc = subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)
    assert proc.returncode == 0
    assert children_cpu_seconds() > before
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert rss_bytes(gone.pid) is None and tree_rss_bytes(gone.pid) is None
    assert cpu_seconds(gone.pid) is None and tree_cpu_seconds(gone.pid) == 0
