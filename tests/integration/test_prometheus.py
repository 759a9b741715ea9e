"""A real Prometheus (Debian's package) scrapes a running ``serve``; its HTTP API must report
the service's metrics with values that match the events sent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from stream_meta.testing.kafka import FAST_GROUP_SETS, create_topics, new_prefix, read_topic
from stream_meta.testing.processes import Serve, cli, free_port
from stream_meta.testing.timeouts import scaled

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("TEST_REQUIRE_PROMETHEUS"):
            pytest.fail(f"{name} not on PATH (install Debian's prometheus package: make deps)")
        pytest.skip(f"{name} not on PATH (Debian's prometheus package; `make test` installs it)")
    return path


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _query(port: int, expr: str) -> float | None:
    """The value of an instant query with one series, or None when it has none."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = _get(url)
    assert status == 200, body
    result = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_serve_and_reports_what_was_sent(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prometheus = _binary("prometheus")
    prefix, events = new_prefix(), 600
    create_topics(kafka_bootstrap, prefix)
    produced = cli(
        "produce",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        "--events",
        str(events),
        "--tasks",
        "30",
        "--bad-fraction",
        "0.05",
        "--seed",
        "11",
        "--json",
        "-q",
    )
    assert produced.returncode == 0, produced.stderr.decode()
    bad = json.loads(produced.stdout)["bad"]
    assert bad > 5

    metrics_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: stream-meta\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    serve = Serve(
        tmp_path,
        "serve",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic-prefix",
        prefix,
        "--group",
        f"g-{prefix}",
        "--metrics-port",
        str(metrics_port),
        "--state-dir",
        str(tmp_path / "state"),
        *FAST_GROUP_SETS,
    )
    try:
        read_topic(
            kafka_bootstrap,
            f"{prefix}.predictions",
            until=lambda r: len(r) >= events - bad,
            timeout=90,
        )
        base = f"http://127.0.0.1:{metrics_port}"
        assert _get(f"{base}/healthz") == (200, "ok\n")
        assert _get(f"{base}/readyz") == (200, "ok\n")
        assert _get(f"{base}/nope")[0] == 404

        deadline, consumed = time.time() + scaled(180), None
        while time.time() < deadline:  # Prometheus scrapes every second
            consumed = _query(prom_port, "stream_meta_records_consumed_total")
            if consumed == events:
                break
            time.sleep(0.5)
        assert consumed == events
        assert _query(prom_port, 'up{job="stream-meta"}') == 1
        assert _query(prom_port, "stream_meta_predictions_produced_total") == events - bad
        assert _query(prom_port, "sum(stream_meta_dead_letters_total)") == bad
        assert _query(prom_port, "sum(stream_meta_rejections_total)") == bad
        assert _query(prom_port, "stream_meta_end_to_end_latency_seconds_count") == events
        assert _query(prom_port, "stream_meta_ready") == 1
        assert _query(prom_port, "stream_meta_broker_up") == 1
        assert _query(prom_port, "stream_meta_assigned_partitions") == 3
        assert _query(prom_port, "stream_meta_model_version") == 1
        assert _query(prom_port, "stream_meta_tasks") == 30
        # lag is refreshed every second once positions exist, scraped every second
        deadline, lag = time.time() + scaled(60), None
        while lag is None and time.time() < deadline:
            lag = _query(prom_port, "sum(stream_meta_consumer_lag_records)")
            time.sleep(0.3)
        assert lag == 0
        labelled = _query(prom_port, 'stream_meta_events_total{kind="labelled"}')
        queries = _query(prom_port, 'stream_meta_events_total{kind="query"}')
        assert labelled is not None and queries is not None
        assert labelled + queries == events - bad
        assert _query(prom_port, "stream_meta_prequential_loss_count") == labelled
    finally:
        code, _ = serve.stop()
        prom.terminate()
        prom.wait(timeout=scaled(60))
    assert code == 0, serve.stderr()
