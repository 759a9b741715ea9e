"""deploy/ and services/: the compose stack, the Prometheus rules and their unit tests, the
Grafana dashboard, the Kubernetes manifests and the Dockerfile agree with each other and with the
service (its settings and the metrics it exports). No Docker engine or cluster is needed.

Tests that run ``promtool`` are skipped when it is not on PATH, unless the environment variable
``TEST_REQUIRE_PROMETHEUS`` is set (to anything): then a missing promtool fails them. The
kustomize build (``kubectl kustomize``, no cluster involved) is skipped without kubectl.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from stream_meta.config import ConfigError, load_settings
from stream_meta.metrics import DecisionMetrics, EngineMetrics, ServiceMetrics, TrainerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts.test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stream-meta.json"
K8S = DEPLOY / "k8s"
LAUNCHER = ROOT / "services" / "adapter" / "run.sh"
TRAINER_LAUNCHER = ROOT / "services" / "trainer" / "run.sh"

#: the scrape job the alert rules select on (compose job name; Service name on Kubernetes)
ADAPTER_JOB = "stream-meta-adapter"
TRAINER_JOB = "stream-meta-trainer"
METRICS_PORT = 9108
STATE_DIR = "/var/lib/stream-meta"
ENV_PREFIX = "STREAM_META_"

#: the signals deploy/README.md promises an alert for
REQUIRED_ALERTS = {
    "StreamMetaAdapterDown",
    "StreamMetaBrokerUnreachable",
    "StreamMetaConsumerLagGrowing",
    "StreamMetaNoPredictions",
    "StreamMetaDeadLetterRatioHigh",
    "StreamMetaEndToEndLatencyHigh",
    "StreamMetaCommitsFailing",
    "StreamMetaCheckpointStale",
    "StreamMetaDriftAlarmStorm",
    "StreamMetaMetaUpdateFailed",
}
SEVERITIES = {"critical", "warning", "info"}
K8S_KINDS = (
    "ConfigMap",
    "Deployment",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "PrometheusRule",
    "Service",
    "Service",
    "ServiceMonitor",
    "StatefulSet",
)
#: the Kubernetes workload of each process, and the command its container runs
WORKLOADS = {"adapter": ("StatefulSet", "serve"), "trainer": ("Deployment", "trainer")}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_TOKEN = re.compile(r"\bstream_meta_[a-z0-9_]+")


# -- helpers ---------------------------------------------------------------------------------
@cache
def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


def _service(name: str) -> dict[str, Any]:
    return _compose()["services"][name]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write compose environments as mappings"
    return {str(k): str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _volume_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(type, source, target)`` of each of the service's volumes, short or long syntax."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            yield volume["type"], volume.get("source", ""), volume["target"]
            continue
        source, target = volume.split(":")[:2]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        yield kind, source, target


def _adapters() -> dict[str, dict[str, Any]]:
    """The compose services that run ``stream-meta serve`` (the adapter replicas), by name."""
    return {
        name: service
        for name, service in _compose()["services"].items()
        if service.get("command") == ["serve"]
    }


def _host_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """``(host, container)`` of each published port (short syntax ``HOST:CONTAINER``)."""
    pairs = []
    for spec in service.get("ports", []):
        host, _, container = str(spec).rpartition(":")
        assert host, f"{spec}: publish ports as HOST:CONTAINER"
        pairs.append((int(host), int(container)))
    return pairs


def _mount_target(service: dict[str, Any], source: str) -> str:
    targets = [t for _, s, t in _volume_mounts(service) if s == source]
    assert targets, f"{source} is not mounted"
    return targets[0]


@cache
def _k8s_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """``(file name, document)`` for every document of every manifest in deploy/k8s."""
    return tuple(
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    )


def _k8s(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _k8s_documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _workload(component: str) -> dict[str, Any]:
    """The StatefulSet (adapter) or Deployment (trainer) of ``component``."""
    workload = _k8s(WORKLOADS[component][0])
    assert workload["metadata"]["labels"]["app.kubernetes.io/component"] == component
    return workload


def _pod(component: str) -> dict[str, Any]:
    return _workload(component)["spec"]["template"]["spec"]


def _container(component: str) -> dict[str, Any]:
    containers = _pod(component)["containers"]
    assert len(containers) == 1
    return containers[0]


def _k8s_service(component: str) -> dict[str, Any]:
    found = [
        doc
        for _, doc in _k8s_documents()
        if doc["kind"] == "Service"
        and doc["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one Service of the {component}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (``matchLabels`` and ``matchExpressions``) selects
    an object with ``labels``. A bare mapping is a Service's selector (equality only)."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _configmap_toml() -> tuple[str, str]:
    """``(key, text)`` of the TOML file in the ConfigMap."""
    data = _k8s("ConfigMap")["data"]
    tomls = [(key, text) for key, text in data.items() if key.endswith(".toml")]
    assert len(tomls) == 1, "the ConfigMap should carry one TOML settings file"
    return tomls[0]


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as ``(INSTRUCTION, arguments)``, one list per stage
    (continuation lines joined, comments dropped); anything before the first FROM is stage 0."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def _alert_rules(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL string of the dashboard: panel targets, annotations, template variables."""
    queries: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    queries.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def _as_promql(query: str) -> str:
    """A dashboard query as Prometheus would receive it: Grafana's variables replaced, and
    ``label_values(SELECTOR, label)`` (a Grafana variable query) reduced to its selector."""
    query = re.sub(r"^label_values\((.+),\s*\w+\)$", r"\1", query.strip())
    query = query.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", query)


@cache
def exported_metric_names() -> frozenset[str]:
    """Every series name the service exports (engine and service metrics), as queried:
    histograms as ``_bucket`` / ``_sum`` / ``_count``, counters with ``_total``."""
    registry = CollectorRegistry()
    EngineMetrics(registry)
    ServiceMetrics(registry)
    DecisionMetrics(registry)
    TrainerMetrics(registry)
    names: set[str] = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return frozenset(names)


def unknown_metric_names(exprs: Iterable[str], exported: Iterable[str]) -> set[str]:
    """The ``stream_meta_*`` series names queried by ``exprs`` that are not in ``exported``.

    A histogram is queried through its ``_bucket`` / ``_sum`` / ``_count`` series: those
    names are accepted when the histogram itself is exported (given either as the series or
    as the family name); a suffix on any other metric is not."""
    known = set(exported)
    unknown = set()
    for token in {t for expr in exprs for t in METRIC_TOKEN.findall(expr)}:
        if token in known:
            continue
        stem = next((token.removesuffix(s) for s in HISTOGRAM_SUFFIXES if token.endswith(s)), None)
        if stem is not None and all(stem + s in known for s in HISTOGRAM_SUFFIXES):
            continue
        unknown.add(token)
    return unknown


def promtool_path() -> str:
    """promtool's path; skips the calling test when it is missing, or fails it when
    TEST_REQUIRE_PROMETHEUS is set. (Called from the test body, not a fixture, so that a
    missing promtool is a test failure rather than an error.)"""
    path = shutil.which("promtool")
    if path is None:
        if "TEST_REQUIRE_PROMETHEUS" in os.environ:
            pytest.fail("promtool is not on PATH and TEST_REQUIRE_PROMETHEUS is set")
        pytest.skip(
            "promtool is not on PATH (Debian: apt-get install prometheus); "
            "set TEST_REQUIRE_PROMETHEUS to make this a failure"
        )
    return path


def _run(*cmd: str | Path) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{output}"
    return output


# -- compose ---------------------------------------------------------------------------------
def test_compose_defines_the_stack_when_parsed() -> None:
    services = _compose()["services"]
    assert {"kafka", "kafka-init", "trainer", "producer", "prometheus", "grafana"} <= set(services)
    assert len(_adapters()) >= 2, "the stack runs several adapter replicas"
    for name in ("kafka", "trainer", "prometheus", "grafana", *_adapters()):
        assert "profiles" not in services[name], f"{name} must start without a profile"


def test_kafka_runs_kraft_without_zookeeper_when_composed() -> None:
    kafka = _service("kafka")
    env = _environment(kafka)
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    for key in (
        "KAFKA_NODE_ID",
        "KAFKA_CONTROLLER_QUORUM_VOTERS",
        "KAFKA_CONTROLLER_LISTENER_NAMES",
        "CLUSTER_ID",
    ):
        assert env.get(key), f"KRaft needs {key}"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert not [k for k in env if "ZOOKEEPER" in k]
    for name, service in _compose()["services"].items():
        assert "zookeeper" not in name and "zookeeper" not in str(service.get("image", ""))
    assert kafka["healthcheck"]["test"]


def test_topic_init_creates_the_adapters_topics_when_composed() -> None:
    init = _service("kafka-init")
    env = _environment(init)
    topics = dict(spec.split(":") for spec in env["TOPICS"].split())
    assert topics.keys() >= {"events", "predictions", "dead-letter"}
    # every topic the service writes or reads exists before it starts
    from stream_meta.kafka.topics import Topics

    every = {t.split(".", 1)[1] for t in Topics.for_prefix(env["TOPIC_PREFIX"]).all()}
    compacted_names = {spec.split(":")[0] for spec in env["COMPACTED_TOPICS"].split()}
    assert every <= topics.keys() | compacted_names, every - topics.keys() - compacted_names
    assert topics["events"] == "6" and topics["models"] == "1"
    # one partition: its owner in the trainers' group is the one active trainer
    assert topics["trainer-lock"] == "1"
    compacted = dict(spec.split(":") for spec in env["COMPACTED_TOPICS"].split())
    # the changelog is co-partitioned with the events
    assert compacted == {"task-embeddings": "6", "task-state": topics["events"]}
    assert not topics.keys() & compacted.keys()
    for name, service in {**_adapters(), "trainer": _service("trainer")}.items():
        prefix = _environment(service)["STREAM_META_KAFKA__TOPIC_PREFIX"]
        assert env["TOPIC_PREFIX"] == prefix, name
    # the adapter replicas cannot all be busy beyond the partition count
    assert len(_adapters()) <= int(topics["events"])
    assert env["BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert _depends_on(init) == {"kafka": "service_healthy"}
    assert init.get("restart") == "no"


def test_adapters_wait_for_kafka_and_topics_and_are_healthchecked_when_composed() -> None:
    for name, adapter in _adapters().items():
        assert _depends_on(adapter) == {
            "kafka": "service_healthy",
            "kafka-init": "service_completed_successfully",
        }, name
        build = adapter["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        check = " ".join(adapter["healthcheck"]["test"])
        assert f"127.0.0.1:{METRICS_PORT}/healthz" in check, name
        assert [c for _, c in _host_ports(adapter)] == [METRICS_PORT], name
        kind, _, _ = next(m for m in _volume_mounts(adapter) if m[2] == STATE_DIR)
        assert kind == "volume", f"{name}: the adapter's state belongs in a named volume"
        assert adapter.get("read_only") is True and "/tmp" in adapter["tmpfs"], name
        assert "deploy" not in adapter, f"{name}: one container per state volume"


def test_adapter_replicas_share_a_group_with_a_state_volume_each_when_composed() -> None:
    adapters = _adapters()
    settings = {name: load_settings(None, env=_environment(s)) for name, s in adapters.items()}
    assert len({s.kafka.group_id for s in settings.values()}) == 1, "one consumer group"
    assert len({s.kafka.topic_prefix for s in settings.values()}) == 1
    volumes = [
        source
        for a in adapters.values()
        for _, source, target in _volume_mounts(a)
        if target == STATE_DIR
    ]
    assert len(volumes) == len(adapters) == len(set(volumes)), "one writer per state volume"
    host_ports = [host for a in adapters.values() for host, _ in _host_ports(a)]
    assert len(host_ports) == len(set(host_ports)), "each replica on a host port of its own"
    for name, s in settings.items():
        # the trainer runs the meta-updates; the replicas adopt what it publishes
        assert s.meta_update.enabled is False, name
        assert s.service.follow_models and s.service.state_changelog, name
        assert s.service.share_embeddings, name


def test_trainer_runs_stream_meta_trainer_with_a_standby_when_composed() -> None:
    trainer = _service("trainer")
    assert trainer["command"] == ["trainer"]
    assert trainer["image"] == next(iter(_adapters().values()))["image"]
    assert trainer["build"] == next(iter(_adapters().values()))["build"]
    assert _depends_on(trainer) == {
        "kafka": "service_healthy",
        "kafka-init": "service_completed_successfully",
    }
    assert trainer["deploy"]["replicas"] >= 2, "one active trainer and a standby"
    assert not trainer.get("ports"), "replicas cannot share a fixed host port"
    check = " ".join(trainer["healthcheck"]["test"])
    settings = load_settings(None, env=_environment(trainer))
    assert f"127.0.0.1:{settings.metrics.port}/healthz" in check
    assert settings.meta_update.enabled, "`stream-meta trainer` refuses to run without it"
    assert settings.metrics.host == "0.0.0.0"
    adapter = load_settings(None, env=_environment(next(iter(_adapters().values()))))
    assert settings.kafka.group_id == adapter.kafka.group_id, "<group>.trainer is derived"
    assert settings.kafka.bootstrap_servers == adapter.kafka.bootstrap_servers
    assert trainer.get("read_only") is True and "/tmp" in trainer["tmpfs"]


def test_producer_runs_only_in_the_demo_profile_when_composed() -> None:
    producer = _service("producer")
    assert producer["profiles"] == ["demo"]
    command = producer["command"]
    assert command[0] == "produce"
    assert command[command.index("--bootstrap-servers") + 1] == "kafka:9092"
    assert producer["image"] == next(iter(_adapters().values()))["image"]
    assert producer["healthcheck"] == {"disable": True}


def test_bind_mounts_exist_and_named_volumes_are_declared_when_composed() -> None:
    declared = set(_compose().get("volumes") or {})
    used = set()
    for name, service in _compose()["services"].items():
        for kind, source, _target in _volume_mounts(service):
            if kind == "bind":
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            elif kind == "volume":
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def _k8s_env(component: str) -> dict[str, str]:
    """The variables a Kubernetes container sets, ConfigMap references resolved."""
    configmap = _k8s("ConfigMap")["data"]
    env = {}
    for var in _container(component)["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            # credentials: optional, absent unless the cluster has the Secret (and its TOML
            # then selects a SASL protocol)
            secret = var["valueFrom"]["secretKeyRef"]
            assert secret["optional"] is True and secret["name"] == "stream-meta-kafka"
            assert var["name"].startswith("STREAM_META_KAFKA__SASL_")
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == _k8s("ConfigMap")["metadata"]["name"]
            env[var["name"]] = configmap[ref["key"]]
    return env


def _env_sources() -> dict[str, dict[str, str]]:
    """The STREAM_META_* variables of every place that configures the service."""
    image_env: dict[str, str] = {}
    for instruction, args in _dockerfile_stages()[-1]:
        if instruction == "ENV":
            image_env.update(re.findall(r"(\w+)=(\S+)", args))
    sources = {
        **{f"compose {name}": _environment(s) for name, s in _adapters().items()},
        "compose trainer": _environment(_service("trainer")),
        "compose producer": _environment(_service("producer")),
        "Dockerfile": image_env,
        **{f"k8s {component}": _k8s_env(component) for component in WORKLOADS},
    }
    return {
        name: {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        for name, env in sources.items()
    }


ENV_SOURCES = (
    "compose adapter-0",
    "compose adapter-1",
    "compose trainer",
    "compose producer",
    "Dockerfile",
    "k8s adapter",
    "k8s trainer",
)


def test_environment_sources_cover_every_configured_process_when_listed() -> None:
    assert set(_env_sources()) == set(ENV_SOURCES)


@pytest.mark.parametrize("source", ENV_SOURCES)
def test_service_accepts_the_environment_when_deployed(source: str) -> None:
    env = _env_sources()[source]
    try:
        settings = load_settings(None, env=env)
    except ConfigError as exc:
        pytest.fail(f"{source} sets variables the service rejects:\n{exc}")
    if env:  # every container must listen beyond loopback
        assert settings.metrics.host == "0.0.0.0"


def test_compose_adapter_environment_sets_the_deployed_values_when_loaded() -> None:
    for name in _adapters():
        settings = load_settings(None, env=_env_sources()[f"compose {name}"])
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        assert settings.metrics.port == METRICS_PORT
        assert str(settings.service.state_dir) == STATE_DIR


def test_environment_check_rejects_an_unknown_variable_when_misspelt() -> None:
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_settings(None, env={"STREAM_META_KAFKA__BOOTSTRAP_SERVER": "kafka:9092"})


def test_prometheus_scrapes_every_adapter_and_loads_the_rules_when_composed() -> None:
    config = _yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs[ADAPTER_JOB]["static_configs"] for t in sc["targets"]]
    expected = [
        f"{name}:{_environment(s)['STREAM_META_METRICS__PORT']}" for name, s in _adapters().items()
    ]
    assert sorted(targets) == sorted(expected)
    assert config["rule_files"] == ["alerts.yml"]
    prometheus = _service("prometheus")
    config_dir = Path(_mount_target(prometheus, "./prometheus/prometheus.yml")).parent
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file()
        assert _mount_target(prometheus, f"./prometheus/{rule_file}") == str(config_dir / rule_file)


def test_prometheus_scrapes_every_trainer_replica_when_composed() -> None:
    jobs = {job["job_name"]: job for job in _yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    job = jobs[TRAINER_JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # the service has replicas: its name resolves to each of them, and each is a target
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["trainer"] and sd["type"] == "A"
    port = int(_environment(_service("trainer"))["STREAM_META_METRICS__PORT"])
    assert sd["port"] == port
    assert "static_configs" not in job


def test_grafana_provisions_the_datasource_and_dashboard_when_composed() -> None:
    grafana = _service("grafana")
    assert _mount_target(grafana, "./grafana/provisioning") == "/etc/grafana/provisioning"
    dashboards_dir = _mount_target(grafana, "./grafana/dashboards")
    provider = _yaml(GRAFANA / "provisioning" / "dashboards" / "stream-meta.yml")["providers"][0]
    assert provider["options"]["path"] == dashboards_dir
    home = _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    datasource = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    variable = next(v for v in _dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == source["uid"]


# -- Prometheus ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", PROMETHEUS_CONFIG),
        ("check", "rules", ALERTS),
        ("test", "rules", ALERTS_TEST),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_the_prometheus_files_when_run(args: tuple[str, str, Path]) -> None:
    _run(promtool_path(), *args)


def test_dashboard_queries_parse_as_promql_when_checked(tmp_path: Path) -> None:
    promtool = promtool_path()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _as_promql(q)}
        for i, q in enumerate(_dashboard_queries(_dashboard()))
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run(promtool, "check", "rules", path)


def test_alert_rules_cover_every_signal_with_severity_and_annotations_when_loaded() -> None:
    rules = _alert_rules(_yaml(ALERTS)["groups"])
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert set(names) >= REQUIRED_ALERTS, f"missing: {REQUIRED_ALERTS - set(names)}"
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: for"
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert f'up{{job="{ADAPTER_JOB}"}}' in next(
        r["expr"] for r in rules if r["alert"] == "StreamMetaAdapterDown"
    )


def test_alert_unit_tests_fire_and_clear_every_alert_when_read() -> None:
    suite = _yaml(ALERTS_TEST)
    assert suite["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in suite["tests"]:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in _alert_rules(_yaml(ALERTS)["groups"])}
    assert fired == names, f"never fired by a test: {names - fired}"
    assert quiet == names, f"never shown quiet by a test: {names - quiet}"


def test_prometheusrule_has_the_groups_of_the_alert_rules_when_compared() -> None:
    rule = _k8s("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == _yaml(ALERTS)["groups"], (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/alerts.yml"
    )


# -- metric names ----------------------------------------------------------------------------
def _queries_of(source: str) -> list[str]:
    if source == "alerts.yml":
        return [rule["expr"] for rule in _alert_rules(_yaml(ALERTS)["groups"])]
    if source == "prometheusrule.yaml":
        return [rule["expr"] for rule in _alert_rules(_k8s("PrometheusRule")["spec"]["groups"])]
    return _dashboard_queries(_dashboard())


@pytest.mark.parametrize("source", ["alerts.yml", "prometheusrule.yaml", "dashboard"])
def test_queried_metrics_are_exported_by_the_service_when_compared(source: str) -> None:
    queries = _queries_of(source)
    assert any(METRIC_TOKEN.search(q) for q in queries), f"{source} queries no stream_meta metric"
    unknown = unknown_metric_names(queries, exported_metric_names())
    assert not unknown, f"{source} queries metrics the service does not export: {sorted(unknown)}"


def test_metric_check_reports_names_the_service_lacks_when_given_them() -> None:
    exported = exported_metric_names()
    assert unknown_metric_names(
        ["sum(rate(stream_meta_not_a_metric_total[5m])) > 0"], exported
    ) == {"stream_meta_not_a_metric_total"}
    # a histogram's series are known; a histogram suffix on a counter is not
    assert not unknown_metric_names(
        [
            "rate(stream_meta_end_to_end_latency_seconds_bucket[5m])",
            "stream_meta_prequential_loss_sum / stream_meta_prequential_loss_count",
        ],
        exported,
    )
    assert unknown_metric_names(
        ["rate(stream_meta_records_consumed_total_bucket[5m])"], exported
    ) == {"stream_meta_records_consumed_total_bucket"}
    # a family name is accepted as the stem of its histogram series
    assert not unknown_metric_names(["x_bucket{}"], {"x_bucket", "x_sum", "x_count"})


def test_dashboard_is_valid_with_unique_panel_ids_and_a_query_per_panel_when_loaded() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        exprs = [target.get("expr", "").strip() for target in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    titles = " ".join(panel["title"].lower() for panel in graphs)
    for topic in (
        "throughput",
        "end-to-end",
        "lag",
        "prequential",
        "model version",
        "index vectors",
        "rebalances",
        "checkpoint",
        "drift",
        "meta-updates",
    ):
        assert topic in titles, f"no panel about {topic}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables


# -- Kubernetes ------------------------------------------------------------------------------
def test_k8s_manifests_parse_as_named_resources_when_loaded() -> None:
    documents = _k8s_documents()
    assert documents
    for name, doc in documents:
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc["metadata"]["name"], name
    assert sorted(doc["kind"] for _, doc in documents) == sorted(K8S_KINDS)
    names = [(doc["kind"], doc["metadata"]["name"]) for _, doc in documents]
    assert len(names) == len(set(names)), "two resources of a kind share a name"


def test_kustomization_lists_every_manifest_when_read() -> None:
    kustomization = _yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    manifests = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")}
    assert sorted(kustomization["resources"]) == sorted(manifests - {"kustomization.yaml"})
    images = {entry["name"] for entry in kustomization.get("images", [])}
    for component in WORKLOADS:
        assert _container(component)["image"].split(":")[0] in images, component
    assert _container("adapter")["image"] == _container("trainer")["image"], "one image"


def test_kustomize_builds_the_manifests_with_the_image_set_when_run() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    built = list(yaml.safe_load_all(_run(kubectl, "kustomize", K8S)))
    tag = _yaml(K8S / "kustomization.yaml")["images"][0]["newTag"]
    workloads = [doc for doc in built if doc and doc["kind"] in ("StatefulSet", "Deployment")]
    assert len(workloads) == len(WORKLOADS)
    for doc in workloads:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"stream-meta:{tag}", doc["metadata"]["name"]


def test_selector_check_matches_labels_and_expressions_when_evaluated() -> None:
    pod = {"app": "x", "component": "adapter"}
    assert selects({"app": "x"}, pod)
    assert not selects({"app": "y"}, pod)
    expr = {"matchExpressions": [{"key": "component", "operator": "In", "values": ["adapter"]}]}
    assert selects(expr, pod)
    assert not selects(expr, {"app": "x"})
    assert not selects(expr, {"app": "x", "component": "trainer"})
    assert not selects({"matchLabels": {"app": "x"}, **expr}, {"component": "adapter"})


def test_adapter_statefulset_gives_each_replica_a_state_volume_when_read() -> None:
    statefulset = _workload("adapter")
    spec = statefulset["spec"]
    assert spec["replicas"] >= 2
    # replicas beyond the events topic's partitions would hold none (idle, not ready)
    init_topics = dict(t.split(":") for t in _environment(_service("kafka-init"))["TOPICS"].split())
    assert spec["replicas"] <= int(init_topics["events"])
    assert spec.get("podManagementPolicy") == "Parallel"
    assert spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    assert selects(spec["selector"], spec["template"]["metadata"]["labels"])
    # one claim per pod, mounted on the state directory; no shared claim
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["mountPath"]: m["name"] for m in _container("adapter")["volumeMounts"]}
    assert mounts[STATE_DIR] == claim["metadata"]["name"]
    pod_volumes = {v["name"]: v for v in _pod("adapter").get("volumes", [])}
    assert claim["metadata"]["name"] not in pod_volumes, "the template's claim, not a pod volume"
    assert not [v for v in pod_volumes.values() if "persistentVolumeClaim" in v]
    # the headless Service that governs the pods' names is the one Prometheus scrapes
    service = _k8s_service("adapter")
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"


def test_adapter_replicas_have_time_to_drain_and_a_disruption_budget_when_read() -> None:
    key, text = _configmap_toml()
    pod = _pod("adapter")
    settings = load_settings(None, env={}, overrides=tomllib.loads(text))
    # SIGTERM: retry undelivered outputs for shutdown_timeout_s, then commit and checkpoint
    assert pod["terminationGracePeriodSeconds"] > settings.service.shutdown_timeout_s, key
    budget = _k8s("PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]
    adapter_labels = _workload("adapter")["spec"]["template"]["metadata"]["labels"]
    trainer_labels = _workload("trainer")["spec"]["template"]["metadata"]["labels"]
    assert selects(budget["spec"]["selector"], adapter_labels)
    assert not selects(budget["spec"]["selector"], trainer_labels)


def test_trainer_deployment_runs_an_active_and_a_standby_trainer_when_read() -> None:
    deployment = _workload("trainer")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2, "one active trainer and a standby"
    # a rollout starts the new trainer before it stops an old one
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert selects(spec["selector"], spec["template"]["metadata"]["labels"])
    container = _container("trainer")
    # `stream-meta trainer` through the image's entrypoint, the same image as the adapters
    assert "command" not in container
    entrypoint = next(a for i, a in _dockerfile_stages()[-1] if i == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["stream-meta"]
    assert container["args"][0] == "trainer"
    assert container["image"] == _container("adapter")["image"]
    # no state: the trainer starts from the newest published model
    pod_volumes = {v["name"]: v for v in _pod("trainer")["volumes"]}
    assert not [v for v in pod_volumes.values() if "persistentVolumeClaim" in v]
    assert "volumeClaimTemplates" not in spec


@pytest.mark.parametrize("component", list(WORKLOADS))
def test_workload_probes_health_and_readiness_on_the_metrics_port_when_read(
    component: str,
) -> None:
    container = _container(component)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == METRICS_PORT

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("livenessProbe") == ("/healthz", METRICS_PORT)
    assert probe("readinessProbe") == ("/readyz", METRICS_PORT)
    # loading the model (and restoring state) must not be cut short by the liveness probe
    assert probe("startupProbe") == ("/healthz", METRICS_PORT)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


@pytest.mark.parametrize("component", list(WORKLOADS))
def test_workload_runs_non_root_read_only_with_writable_tmp_when_read(component: str) -> None:
    pod = _pod(component)
    container = _container(component)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    env = {var["name"]: var for var in container["env"]}
    assert env["STREAM_META_METRICS__HOST"]["value"] == "0.0.0.0"
    assert "configMapKeyRef" in env["STREAM_META_KAFKA__BOOTSTRAP_SERVERS"]["valueFrom"]
    for name in ("STREAM_META_KAFKA__SASL_USERNAME", "STREAM_META_KAFKA__SASL_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["optional"] is True, name
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == ({"/tmp", STATE_DIR} if component == "adapter" else {"/tmp"})


@pytest.mark.parametrize("component", list(WORKLOADS))
def test_configmap_toml_is_the_settings_file_the_workload_passes_when_loaded(
    component: str, tmp_path: Path
) -> None:
    key, text = _configmap_toml()
    path = tmp_path / key
    path.write_text(text)
    try:
        settings = load_settings(path, env=_k8s_env(component))
    except ConfigError as exc:
        pytest.fail(f"the ConfigMap's {key} is not a valid settings file:\n{exc}")
    assert settings.metrics.port == METRICS_PORT
    assert settings.metrics.host == "0.0.0.0"
    assert str(settings.service.state_dir) == STATE_DIR
    assert "bootstrap_servers" not in tomllib.loads(text)["kafka"], "set by the environment"
    container = _container(component)
    config_arg = container["args"][container["args"].index("--config") + 1]
    pod_volumes = {v["name"]: v for v in _pod(component)["volumes"]}
    mount = next(m for m in container["volumeMounts"] if config_arg.startswith(m["mountPath"]))
    assert pod_volumes[mount["name"]]["configMap"]["name"] == _k8s("ConfigMap")["metadata"]["name"]
    assert config_arg == f"{mount['mountPath']}/{key}"
    assert container["args"][0] == WORKLOADS[component][1]
    # the trainer runs the meta-updates (it refuses to start without them); the adapters
    # serve the versions it publishes
    if component == "trainer":
        assert settings.meta_update.enabled is True
    else:
        assert settings.meta_update.enabled is False
        assert settings.service.follow_models and settings.service.state_changelog
        assert settings.service.share_embeddings


@pytest.mark.parametrize("component", list(WORKLOADS))
def test_service_and_servicemonitor_agree_on_the_metrics_port_when_read(component: str) -> None:
    service, monitor = _k8s_service(component), _k8s("ServiceMonitor")
    job = {"adapter": ADAPTER_JOB, "trainer": TRAINER_JOB}[component]
    assert service["metadata"]["name"] == job, "the job label Prometheus Operator gives"
    assert service["spec"]["clusterIP"] == "None", "every pod is scraped, none balanced"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == METRICS_PORT
    assert port["targetPort"] in ("metrics", METRICS_PORT)
    # the Service selects this component's pods and no other's
    for other in WORKLOADS:
        labels = _workload(other)["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], labels) == (other == component), other
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert monitor["spec"]["endpoints"][0].get("path", "/metrics") == "/metrics"


def test_networkpolicy_lets_only_prometheus_reach_the_metrics_port_when_read() -> None:
    policy = _k8s("NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for component in WORKLOADS:  # it covers every workload's pods
        labels = _workload(component)["spec"]["template"]["metadata"]["labels"]
        assert selects(spec["podSelector"], labels), component
    (rule,) = spec["ingress"]  # one way in
    assert [(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]] == [("metrics", "TCP")]
    (source,) = rule["from"]
    assert set(source) == {"namespaceSelector", "podSelector"}, "pods, not IP blocks"
    assert source["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert not selects(source["podSelector"], {"app.kubernetes.io/name": "stream-meta"})


@pytest.mark.parametrize("component", list(WORKLOADS))
def test_workloads_expose_only_the_metrics_port_and_keep_admin_on_loopback_when_read(
    component: str,
) -> None:
    container = _container(component)
    assert [p["name"] for p in container["ports"]] == ["metrics"]
    settings = load_settings(None, env=_env_sources()[f"k8s {component}"])
    assert settings.admin.host == "127.0.0.1" and settings.admin.port != METRICS_PORT


def test_no_environment_binds_the_admin_port_beyond_loopback_when_loaded() -> None:
    for source, env in _env_sources().items():
        assert not any(k.upper().startswith("STREAM_META_ADMIN__HOST") for k in env), source
        assert load_settings(None, env=env).admin.host == "127.0.0.1", source


def test_trainer_reads_the_admin_token_from_the_secret_when_read() -> None:
    pod, container = _pod("trainer"), _container("trainer")
    env = {var["name"]: var for var in container["env"]}
    token_file = Path(env["STREAM_META_ADMIN__TOKEN_FILE"]["value"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(token_file.parent)]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == "stream-meta-admin"
    assert secret["items"] == [{"key": "token", "path": token_file.name}]
    # readable by the pod's user (through fsGroup), by nobody else
    assert secret["defaultMode"] & 0o007 == 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    settings = load_settings(None, env=_env_sources()["k8s trainer"])
    assert settings.admin.token_file == token_file and settings.meta_update.enabled


@pytest.mark.parametrize("component", ["adapter", "trainer"])
def test_model_versions_are_verified_and_signed_with_keys_from_secrets_when_read(
    component: str,
) -> None:
    """Every pod trusts the public keys of stream-meta-model-keys; the trainer signs with the
    private key of stream-meta-model-signing (SECURITY.md); no pod accepts unsigned versions."""
    pod, container = _pod(component), _container(component)
    env = {var["name"]: var.get("value") for var in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def secret_at(path: str) -> dict[str, Any]:
        mount = mounts[path]
        assert mount["readOnly"] is True
        return volumes[mount["name"]]["secret"]

    keys_dir = env["STREAM_META_MODELS__TRUSTED_KEYS_DIR"]
    assert secret_at(keys_dir)["secretName"] == "stream-meta-model-keys"
    assert "STREAM_META_MODELS__ACCEPT_UNSIGNED" not in env
    if component == "trainer":
        key_file = Path(env["STREAM_META_MODELS__SIGNING_KEY_FILE"])
        secret = secret_at(str(key_file.parent))
        assert secret["secretName"] == "stream-meta-model-signing"
        assert secret["defaultMode"] & 0o007 == 0  # not world-readable
    else:
        assert "STREAM_META_MODELS__SIGNING_KEY_FILE" not in env  # replicas never sign


# -- Dockerfile ------------------------------------------------------------------------------
def test_dockerfile_installs_cpu_torch_before_the_project_when_read() -> None:
    runs = [
        (s, args)
        for s, stage in enumerate(_dockerfile_stages())
        for instruction, args in stage
        if instruction == "RUN"
    ]
    torch = [
        i
        for i, (_, args) in enumerate(runs)
        if "torch==2.13.0" in args and "--index-url https://download.pytorch.org/whl/cpu" in args
    ]
    project = [
        i
        for i, (_, args) in enumerate(runs)
        if re.search(r"pip install (?:-\S+ )*\.(?:\s|$|\[)", args)
    ]
    assert torch, "no RUN installs torch==2.13.0 from the CPU index"
    assert project, "no RUN installs the project (pip install .)"
    assert torch[0] < project[0], "torch must be installed before the project"
    assert runs[torch[0]][0] == runs[project[0]][0], "torch and the project in one stage"


def test_dockerfile_runs_serve_as_a_non_root_user_when_read() -> None:
    final = _dockerfile_stages()[-1]
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, "the final stage must set a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last = {instruction: args for instruction, args in final}
    assert json.loads(last["ENTRYPOINT"]) == ["stream-meta"]
    assert json.loads(last["CMD"]) == ["serve"]
    assert str(METRICS_PORT) in last["EXPOSE"].split()
    assert STATE_DIR in last["VOLUME"]
    assert "/healthz" in last["HEALTHCHECK"] and "python" in last["HEALTHCHECK"]


def test_dockerignore_excludes_environments_and_caches_but_not_the_sources_when_read() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache"} <= patterns
    copied = [
        args.split()[:-1]
        for stage in _dockerfile_stages()
        for ins, args in stage
        if ins == "COPY" and not args.startswith("--from")
    ]
    for source in (s for sources in copied for s in sources):
        assert source not in patterns, f".dockerignore excludes {source}, which the image copies"
        assert (ROOT / source).exists(), source


# -- services/adapter ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("launcher", "command", "option"),
    [(LAUNCHER, "serve", "--state-dir"), (TRAINER_LAUNCHER, "trainer", "--metrics-port")],
    ids=["adapter", "trainer"],
)
def test_service_launcher_execs_its_stream_meta_command_when_run(
    launcher: Path, command: str, option: str
) -> None:
    assert os.access(launcher, os.X_OK), f"{launcher} must be executable"
    _run("sh", "-n", launcher)
    help_text = _run(launcher, "--help")
    assert f"usage: stream-meta {command}" in help_text
    assert option in help_text
