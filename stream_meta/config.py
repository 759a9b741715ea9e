"""The one settings tree of stream-meta, and how it is loaded.

:class:`Settings` is frozen and typed; every section forbids unknown keys, so a typo in a
config file or an environment variable is an error rather than a silently ignored setting.

Values come from four layers, later ones winning, merged key by key::

    defaults < TOML file < environment (STREAM_META_<SECTION>__<FIELD>) < overrides

The library never reads ``os.environ``: :func:`load_settings` only sees the ``env`` mapping it is
given (the CLI passes ``os.environ``), and constructing :class:`Settings` directly uses its
arguments and the defaults only.

>>> settings = load_settings(
...     env={"STREAM_META_ENGINE__SUPPORT_SIZE": "32", "HOME": "/root"},
...     overrides={"engine": {"k_neighbours": 0}},
... )
>>> settings.engine.support_size, settings.engine.k_neighbours, settings.index.kind
(32, 0, 'flat')

Every default of a setting that a library component takes is that component's own: the
sections take it from the library's dataclass (``EngineConfig.support_size``) or keyword
argument (``TaskIndex(nlist=...)``), never from a copy, and map onto them by field name
(:meth:`EngineSettings.config`, :meth:`DriftSettings.config`, :meth:`MetaUpdateSettings.configs`).
What a section adds is the application's: its constraints and descriptions (they validate what
a file or the environment says), and the few fields no library component has (commented where
they are declared).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import ipaddress
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

# the components whose defaults the sections take (this loads torch and FAISS: the CLI has
# loaded torch before it reads settings anyway)
from stream_meta.continual.update_job import UpdateConfig
from stream_meta.continual.updater import MetaUpdateConfig
from stream_meta.decider import DecisionConfig
from stream_meta.drift.monitor import DriftConfig
from stream_meta.drift.watch import DriftWatch
from stream_meta.engine import EngineConfig
from stream_meta.index import TaskIndex
from stream_meta.meta_training import TrainConfig, meta_train
from stream_meta.tasks.stream import TaskStream

__all__ = [
    "AdminSettings",
    "ConfigError",
    "DecisionSettings",
    "EngineSettings",
    "IndexSettings",
    "KafkaSettings",
    "MetricsSettings",
    "ModelSettings",
    "ModelsSettings",
    "Settings",
    "StreamSettings",
    "TrainSettings",
    "load_settings",
    "settings_summary",
]

ENV_PREFIX = "STREAM_META_"
ENV_NESTED_DELIMITER = "__"

_SECTION_CONFIG = ConfigDict(
    frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True
)


class ConfigError(Exception):
    """The configuration could not be loaded: its message lists every problem, one a line."""


def _default(owner: Callable[..., Any], name: str) -> Any:
    """The default of keyword argument ``name`` of ``owner`` (a class: of its constructor).

    >>> _default(TaskIndex, "nprobe")
    16
    """
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{owner.__qualname__}() has no default for {name}")
    return default


def _shared(library: type[Any], section: BaseModel) -> dict[str, Any]:
    """The values of ``section``'s fields that dataclass ``library`` has too (by name)."""
    names = {field.name for field in dataclasses.fields(library)}
    return {name: value for name, value in section if name in names}


class ModelSettings(BaseModel):
    """Which meta-model to serve."""

    model_config = _SECTION_CONFIG

    family: Literal["sinusoid", "digits"] = Field(
        default="sinusoid", description="Task family the model was meta-trained on."
    )
    checkpoint: Path | None = Field(
        default=None,
        description="Checkpoint file to load; None means the shipped default for the family.",
    )
    device: str = Field(
        default="cpu", min_length=1, description="Torch device, e.g. 'cpu' or 'cuda:0'."
    )


class EngineSettings(BaseModel):
    """The per-event loop: support sets, retrieval, batching and memory bounds.

    :class:`~stream_meta.engine.EngineConfig` (:meth:`config`), plus ``micro_batch`` and
    ``threads``: how the application drives the engine, not a setting of the engine itself.
    """

    model_config = _SECTION_CONFIG

    support_size: int = Field(
        default=EngineConfig.support_size,
        ge=1,
        le=4096,
        description="Support examples kept per task.",
    )
    support_policy: Literal["recent", "reservoir"] = Field(
        default=EngineConfig.support_policy,
        description="Which examples a full support set keeps: the most recent, or a reservoir "
        "sample of the whole history.",
    )
    k_neighbours: int = Field(
        default=EngineConfig.k_neighbours,
        ge=0,
        le=64,
        description="Similar tasks retrieved from the index per adaptation; 0 disables retrieval.",
    )
    max_live_tasks: int = Field(
        default=EngineConfig.max_live_tasks,
        ge=1,
        description="Tasks kept in memory; the least recent are evicted.",
    )
    task_ttl_s: float | None = Field(
        default=EngineConfig.task_ttl_s,
        gt=0,
        description="Evict a task idle for this many seconds; None keeps tasks until evicted "
        "by max_live_tasks.",
    )
    # the application's: the loops (run, replay, serve) cut the stream into batches this size
    micro_batch: int = Field(
        default=512, ge=1, le=65536, description="Events processed together in one step."
    )
    index_flush_every: int = Field(
        default=EngineConfig.index_flush_every,
        ge=1,
        description="Task-embedding updates buffered before the index is written.",
    )
    max_event_bytes: int = Field(
        default=EngineConfig.max_event_bytes,
        ge=64,
        description="Largest serialised event accepted, in bytes.",
    )
    weights_cache_size: int = Field(
        default=EngineConfig.weights_cache_size,
        ge=0,
        description="Rows of adapted per-task weights kept (FIFO reuse; a miss re-adapts); "
        "0 = as many as fit in 256 MiB, at most max_live_tasks.",
    )
    dedupe_window: int = Field(
        default=EngineConfig.dedupe_window,
        ge=0,
        description="Ids of learned events remembered so a redelivered event is never learned "
        "twice (about 120 bytes each); 0 turns de-duplication off.",
    )
    seed: int = Field(default=EngineConfig.seed, description="Seed of the engine's random choices.")
    retrieval: bool = Field(
        default=EngineConfig.retrieval,
        description="Retrieval by evidence: a task with few examples borrows from the banked "
        "tasks that explain its examples best (weighted by their marginal likelihood, beside "
        "the model's own prior); false serves every task from the hypernetwork alone.",
    )
    retrieval_bank_size: int = Field(
        default=EngineConfig.retrieval_bank_size,
        ge=1,
        le=4096,
        description="Experienced tasks kept as retrieval candidates (similar tasks are merged "
        "into one entry; the least used entry is retired when the bank is full).",
    )
    retrieval_min_examples: int = Field(
        default=EngineConfig.retrieval_min_examples,
        ge=1,
        description="Examples a task needs before it enters the retrieval bank.",
    )
    retrieval_max_shots: int = Field(
        default=EngineConfig.retrieval_max_shots,
        ge=0,
        description="Tasks with 1 to this many examples are served with retrieval; 0 disables it.",
    )
    retrieval_candidates: int = Field(
        default=EngineConfig.retrieval_candidates,
        ge=1,
        le=64,
        description="Most probable bank entries whose examples are borrowed per task.",
    )
    expert_share_rate: float = Field(
        default=EngineConfig.expert_share_rate,
        gt=0,
        le=1,
        description="With experts: weight of one labelled event in each expert's population "
        "share (the routing prior of a task with no example).",
    )
    expert_share_floor: float = Field(
        default=EngineConfig.expert_share_floor,
        gt=0,
        le=1,
        description="With experts: an expert's routing prior is at least this / experts.",
    )
    expert_evidence_decay: float = Field(
        default=EngineConfig.expert_evidence_decay,
        gt=0,
        le=1,
        description="With experts: a task's evidence for each expert is multiplied by this "
        "before each new example joins it (1: exact Bayesian model averaging; less weighs "
        "recent predictions more).",
    )
    expert_prune_nats: float = Field(
        default=EngineConfig.expert_prune_nats,
        gt=0,
        description="With experts: an expert this many nats of log evidence behind a task's "
        "best is neither adapted nor evaluated for it (its weight would be below e^-this); "
        "inf never skips one.",
    )
    # the application's: the entry point sets the process's torch threads
    threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Intra-op threads for torch and FAISS in the engine (0 = one per core).",
    )

    def config(self) -> EngineConfig:
        """The :class:`~stream_meta.engine.EngineConfig` these settings give."""
        return EngineConfig(**_shared(EngineConfig, self))


class IndexSettings(BaseModel):
    """The FAISS task index: keyword arguments of :class:`~stream_meta.index.TaskIndex`."""

    model_config = _SECTION_CONFIG

    kind: Literal["flat", "ivf"] = Field(
        default=_default(TaskIndex, "kind"),
        description="Exact search ('flat') or inverted lists ('ivf').",
    )
    nlist: int = Field(
        default=_default(TaskIndex, "nlist"),
        ge=1,
        description="IVF only: number of inverted lists.",
    )
    nprobe: int = Field(
        default=_default(TaskIndex, "nprobe"),
        ge=1,
        description="IVF only: lists visited per search.",
    )
    train_size: int = Field(
        default=_default(TaskIndex, "train_size"),
        ge=1,
        description="IVF only: embeddings collected before training.",
    )


class MetricsSettings(BaseModel):
    """The Prometheus scrape endpoint: ``/metrics``, ``/healthz``, ``/readyz``, read-only
    (control routes are on the admin port, ``[admin]``)."""

    model_config = _SECTION_CONFIG

    host: str = Field(default="127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(
        default=9108, ge=0, le=65535, description="Port to listen on; 0 turns the endpoint off."
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


class AdminSettings(BaseModel):
    """The admin port: control routes (``POST /meta-update``, ``GET /meta-updates``) of
    ``run``, ``serve`` and ``trainer``, apart from the read-only scrape port (``[metrics]``).

    Bound to loopback by default. With a token (``token_file``, or ``token`` from
    ``STREAM_META_ADMIN__TOKEN``) every request needs ``Authorization: Bearer <token>``;
    without one only loopback may be bound: another ``host`` without a token is refused.
    """

    model_config = _SECTION_CONFIG

    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address to listen on (loopback; another needs a token).",
    )
    port: int = Field(
        default=9109, ge=0, le=65535, description="Port to listen on; 0 turns the endpoint off."
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding the bearer token (read at start, whitespace stripped; a "
        "missing or empty file stops the process), e.g. a mounted Kubernetes Secret.",
    )
    token: SecretStr | None = Field(
        default=None,
        description="The bearer token itself: a secret (never logged or printed); set it "
        "through STREAM_META_ADMIN__TOKEN. token_file is preferred.",
    )

    @model_validator(mode="after")
    def _beyond_loopback_needs_a_token(self) -> Self:
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("admin.token is empty (unset it, or set a token)")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set admin.token or admin.token_file, not both")
        if self.port and not is_loopback(self.host) and not self.has_token:
            raise ValueError(
                f"admin.host {self.host} is beyond loopback: the admin port needs a token "
                "there (admin.token_file or STREAM_META_ADMIN__TOKEN), or bind 127.0.0.1"
            )
        return self

    @property
    def has_token(self) -> bool:
        return self.token is not None or self.token_file is not None

    def read_token(self) -> str | None:
        """The token (``token``, or ``token_file``'s stripped content), None without one;
        ``ValueError`` naming the file when it is missing, unreadable or empty."""
        if self.token is not None:
            return self.token.get_secret_value().strip()
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise ValueError(f"cannot read admin.token_file {self.token_file}: {why}") from None
        if not token:
            raise ValueError(f"admin.token_file {self.token_file} is empty")
        return token


class KafkaSettings(BaseModel):
    """The Kafka-fed service (``stream-meta serve``, ``produce``, ``tail``)."""

    model_config = _SECTION_CONFIG

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", min_length=1, description="Comma-separated host:port list."
    )
    group_id: str = Field(default="stream-meta", min_length=1, description="Consumer group.")
    topic_prefix: str = Field(
        default="stream-meta",
        min_length=1,
        description="Topics are <prefix>.events, <prefix>.predictions, <prefix>.dead-letter.",
    )
    session_timeout_ms: int = Field(
        default=10_000, ge=1000, description="Consumer-group session timeout."
    )
    heartbeat_interval_ms: int = Field(default=3000, ge=100, description="Group heartbeat.")
    max_poll_interval_ms: int = Field(
        default=300_000, ge=1000, description="Longest allowed gap between two polls."
    )
    poll_timeout_ms: int = Field(default=200, ge=1, description="How long one poll waits.")
    fetch_max_wait_ms: int = Field(
        default=20,
        ge=0,
        description="Longest time the broker may hold a fetch waiting for data. Kept short: "
        "a broker that does not answer a waiting fetch as soon as data arrives (Tansu) would "
        "otherwise add up to this much to every event's latency at low rates.",
    )
    request_timeout_ms: int = Field(
        default=30_000, ge=1000, description="Client request timeout (produce, commit, admin)."
    )
    reconnect_backoff_ms: int = Field(
        default=100, ge=1, description="First wait before reconnecting to a broker."
    )
    reconnect_backoff_max_ms: int = Field(
        default=5000, ge=1, description="Longest wait between reconnection attempts."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How every client talks to the brokers."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism (SASL_* protocols only)."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        default=None,
        description="SASL password: a secret (never logged or printed); set it through "
        "STREAM_META_KAFKA__SASL_PASSWORD, e.g. from a Kubernetes Secret.",
    )
    ssl_cafile: Path | None = Field(default=None, description="CA bundle (SSL, SASL_SSL).")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mTLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (mTLS).")
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of the private key: a secret, like sasl_password."
    )

    @model_validator(mode="after")
    def _security_is_complete(self) -> Self:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                "sasl_username and sasl_password"
            )
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password):
            raise ValueError(
                f"SASL settings given but security_protocol is {self.security_protocol} "
                "(use SASL_PLAINTEXT or SASL_SSL)"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        return self

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments every kafka-python client (consumer, producer, admin) takes:
        brokers, timeouts, reconnection and security. Secrets are revealed only here."""
        out: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "request_timeout_ms": self.request_timeout_ms,
            "reconnect_backoff_ms": self.reconnect_backoff_ms,
            "reconnect_backoff_max_ms": self.reconnect_backoff_max_ms,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.sasl_username
            out["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        if self.ssl_password is not None:
            out["ssl_password"] = self.ssl_password.get_secret_value()
        return out


class ServiceSettings(BaseModel):
    """State, delivery and lifecycle of ``stream-meta serve``."""

    model_config = _SECTION_CONFIG

    state_dir: Path | None = Field(
        default=None,
        description="Directory for state checkpoints (task support sets, index, de-duplication "
        "window, offsets). Unset: no state survives a restart and offsets are committed after "
        "every batch.",
    )
    checkpoint_every_s: float = Field(
        default=5.0, gt=0, description="Seconds between state checkpoints (and offset commits)."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="State checkpoints kept on disk.")
    startup_timeout_s: float = Field(
        default=60.0, gt=0, description="Give up with an error when Kafka stays unreachable."
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM, how long to keep retrying undelivered outputs before exiting.",
    )
    stall_timeout_s: float = Field(
        default=120.0, gt=0, description="/healthz fails when the loop has not turned this long."
    )
    create_topics: bool = Field(
        default=True, description="Create the service's topics at start-up if they are missing."
    )
    partitions: int = Field(default=6, ge=1, description="Partitions of created topics.")
    replication_factor: int = Field(
        default=1, ge=1, description="Replication factor of created topics."
    )
    state_changelog: bool = Field(
        default=True,
        description="Write every task's support set to <prefix>.task-state (compacted, "
        "co-partitioned with the events topic) after each batch, and load a partition's "
        "tasks from it when the partition is assigned: a replica that takes over a partition "
        "(or restarts) serves its tasks with every example they had learned.",
    )
    follow_models: bool = Field(
        default=True,
        description="Read <prefix>.models and serve every newer model version published there "
        "(stream-meta publish-model, or a trainer), once its signature (see [models]), sha256 "
        "and checkpoint check out.",
    )
    share_embeddings: bool = Field(
        default=True,
        description="Publish this replica's task embeddings to <prefix>.task-embeddings (a "
        "compacted topic) and index every other replica's, so neighbours are found across "
        "partitions. Off: each replica retrieves among its own tasks only.",
    )


class ModelsSettings(BaseModel):
    """Signed model versions on ``<prefix>.models`` (:mod:`stream_meta.kafka.model_signing`):
    the publisher's private key, the keys replicas trust, and the explicit development mode."""

    model_config = _SECTION_CONFIG

    signing_key_file: Path | None = Field(
        default=None,
        description="The publisher's Ed25519 private key (PEM, PKCS#8; stream-meta keygen) "
        "with which publish-model and the trainer sign each model version. Unset: they refuse "
        "to publish unless accept_unsigned is on.",
    )
    signing_key_password: SecretStr | None = Field(
        default=None, description="The passphrase of signing_key_file, if it is encrypted."
    )
    trusted_keys: list[Path] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM files) whose signatures a replica (and the "
        "trainer) accepts; several at once for key rotation (a list in TOML, comma-separated "
        "in the environment or --set).",
    )
    trusted_keys_dir: Path | None = Field(
        default=None,
        description="A directory whose *.pem files are trusted public keys too (a mounted "
        "Secret or ConfigMap).",
    )
    accept_unsigned: bool = Field(
        default=False,
        description="Development only: accept unsigned model versions (and publish unsigned "
        "without a signing key), with a WARNING at start and per version. Badly signed "
        "versions are refused regardless.",
    )

    @model_validator(mode="before")
    @classmethod
    def _split_trusted_keys(cls, data: Any) -> Any:
        """``trusted_keys`` given as one string (environment, ``--set``): comma-separated."""
        if isinstance(data, dict) and isinstance(data.get("trusted_keys"), str):
            paths = [p.strip() for p in data["trusted_keys"].split(",") if p.strip()]
            data = {**data, "trusted_keys": paths}
        return data


class TrainerSettings(BaseModel):
    """The trainer service (``stream-meta trainer``): central meta-updates for all replicas."""

    model_config = _SECTION_CONFIG

    sample: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="Share of the task ids whose events the trainer learns (whole tasks, by a "
        "hash of the id), so it keeps up with many replicas.",
    )
    batch: int = Field(default=512, ge=1, description="Events polled per trainer batch.")
    seed: int = Field(default=0, description="Seed of the draw for events without a key.")


class LabelSettings(BaseModel):
    """Label requests (``run --label-requests``, ``serve``'s ``<prefix>.label-requests``): ask
    for the labels of the unlabelled events worth most, within budgets
    (:mod:`stream_meta.labels`)."""

    model_config = _SECTION_CONFIG

    enabled: bool = Field(
        default=False,
        description="Emit label requests (`serve`: on <prefix>.label-requests; `run`: on with "
        "--label-requests FILE).",
    )
    policy: Literal["uncertainty", "random", "first-k"] = Field(
        default="uncertainty",
        description="uncertainty: the events whose label lowers the task's expected loss most "
        "(the epistemic variance removed, or the entropy for a classifier); random: a share "
        "drawn by event id; first-k: each task's first `first_k` unlabelled events.",
    )
    fraction: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Total budget: at any time at most this share of the unlabelled events "
        "seen so far is requested.",
    )
    rate_per_s: float | None = Field(
        default=None, gt=0, description="Requests per second, overall (unset: no limit)."
    )
    task_rate_per_s: float | None = Field(
        default=None, gt=0, description="Requests per second for one task (unset: no limit)."
    )
    burst: float = Field(
        default=10.0,
        ge=1,
        description="Requests that may go out at once: the unspent share kept (in requests) "
        "and the depth of the rate buckets.",
    )
    first_k: int = Field(default=10, ge=1, description="first-k: requests per task.")
    window: int = Field(
        default=2000,
        ge=1,
        description="uncertainty: the recent unlabelled events whose worth sets the threshold.",
    )
    dedupe_window: int = Field(
        default=200_000,
        ge=0,
        description="Requested event ids remembered, so one event is requested once (0: none).",
    )
    seed: int = Field(default=0, description="Seed of the random policy's draw.")

    def policy_config(self, max_tasks: int) -> Any:
        """The :class:`~stream_meta.labels.LabelPolicy` these settings describe."""
        from stream_meta.labels import LabelPolicy

        return LabelPolicy(
            policy=self.policy,
            fraction=self.fraction,
            rate_per_s=self.rate_per_s,
            task_rate_per_s=self.task_rate_per_s,
            burst=self.burst,
            first_k=self.first_k,
            window=self.window,
            dedupe_window=self.dedupe_window,
            max_tasks=max_tasks,
            seed=self.seed,
        )


class DriftSettings(BaseModel):
    """The drift monitor (``stream_meta.drift``): what it watches and how it alarms.

    Part of :class:`~stream_meta.drift.monitor.DriftConfig` (:meth:`config`; the detectors' finer
    knobs keep the library's defaults) and the keyword arguments of
    :class:`~stream_meta.drift.watch.DriftWatch` (``clusters``, ``warmup_events``, ``window``:
    ``loss_window`` here).
    """

    model_config = _SECTION_CONFIG

    # the application's: whether to build a monitor at all
    enabled: bool = Field(default=True, description="Watch losses and task embeddings for drift.")
    warmup_events: int = Field(
        default=DriftConfig.warmup_events,
        ge=0,
        description="Events observed before any alarm (calibration).",
    )
    cooldown_events: int = Field(
        default=DriftConfig.cooldown_events,
        ge=0,
        description="Events a detector stays silent after it alarmed.",
    )
    min_shots: int = Field(
        default=DriftConfig.min_shots,
        ge=0,
        description="Loss detectors ignore events whose task had fewer support examples (a "
        "task's first predictions are guesses whatever the world does).",
    )
    clusters: int = Field(
        default=_default(DriftWatch, "clusters"),
        ge=0,
        description="Task clusters (k-means on task embeddings after warm-up) with a loss "
        "detector each; 0: global detectors only.",
    )
    novelty_quantile: float = Field(
        default=DriftConfig.novelty_quantile,
        gt=0,
        lt=1,
        description="Reference quantile of nearest-neighbour distances that marks a novel task.",
    )
    loss_window: int = Field(
        default=_default(DriftWatch, "window"),
        ge=1,
        description="Events per window of the run summary's loss_windows.",
    )

    def config(self) -> DriftConfig:
        """The :class:`~stream_meta.drift.monitor.DriftConfig` these settings give."""
        return DriftConfig(**_shared(DriftConfig, self), per_cluster=self.clusters > 0)


class DecisionSettings(BaseModel):
    """Decisions with reward-only feedback (:mod:`stream_meta.decider`): how an action is
    chosen for a decision event, and how long its reward is awaited.

    :class:`~stream_meta.decider.DecisionConfig` (:meth:`config`), plus ``enabled``. Decision
    and reward events are recognised by their shape, so plain streams never meet them; with
    ``enabled`` off they are dead-lettered as plain events without ``x``.
    """

    model_config = _SECTION_CONFIG

    # the application's: whether to build a decider at all
    enabled: bool = Field(
        default=True, description="Answer decision events and learn their rewards."
    )
    policy: Literal["thompson", "ucb"] = Field(
        default=DecisionConfig.policy,
        description="Thompson sampling (one posterior draw; propensities for off-policy "
        "evaluation) or UCB (mean + ucb_c epistemic std; propensity 1).",
    )
    ucb_c: float = Field(
        default=DecisionConfig.ucb_c,
        ge=0,
        le=100,
        description="UCB's width, in epistemic standard deviations.",
    )
    draws: int = Field(
        default=DecisionConfig.draws,
        ge=1,
        le=4096,
        description="Posterior draws per Thompson decision; the played action's propensity is "
        "the share of draws in which it is best.",
    )
    max_actions: int = Field(
        default=DecisionConfig.max_actions,
        ge=1,
        le=4096,
        description="Most candidate actions a decision may offer (more: dead-lettered).",
    )
    max_pending: int = Field(
        default=DecisionConfig.max_pending,
        ge=1,
        description="Decisions held for their reward (least recent evicted; about 1 KiB each).",
    )
    reward_ttl_s: float = Field(
        default=DecisionConfig.reward_ttl_s,
        gt=0,
        description="A reward this long after its decision (event time, else receipt time) "
        "is late: dead-lettered, not learned.",
    )

    def config(self) -> DecisionConfig:
        """The :class:`~stream_meta.decider.DecisionConfig` these settings give."""
        return DecisionConfig(**_shared(DecisionConfig, self))


class MetaUpdateSettings(BaseModel):
    """Meta-updates (``stream_meta.continual``): triggers, replay, training and the gate.

    :class:`~stream_meta.continual.updater.MetaUpdateConfig` and part of its
    :class:`~stream_meta.continual.update_job.UpdateConfig` (:meth:`configs`).
    """

    model_config = _SECTION_CONFIG

    enabled: bool = Field(
        default=MetaUpdateConfig.enabled,
        description="Run meta-updates (needs [drift] for on_drift).",
    )
    on_drift: bool = Field(
        default=MetaUpdateConfig.on_drift, description="A drift alarm requests an update."
    )
    every_events: int = Field(
        default=MetaUpdateConfig.every_events,
        ge=0,
        description="Also request an update every N events (0: no schedule).",
    )
    collect_events: int = Field(
        default=MetaUpdateConfig.collect_events,
        ge=0,
        description="Events to gather after a drift alarm before training starts (the replay "
        "buffer needs tasks of the new regime).",
    )
    follow_up_events: int = Field(
        default=MetaUpdateConfig.follow_up_events,
        ge=0,
        description="After a promoted drift update, another on the same drift this many events "
        "later, until one is not promoted (0: one update per drift).",
    )
    new_lookback_events: int = Field(
        default=MetaUpdateConfig.new_lookback_events,
        ge=0,
        description="Tasks that arrived up to this many events before a drift alarm count as "
        "new (the alarm comes after the change).",
    )
    cooldown_events: int = Field(
        default=MetaUpdateConfig.cooldown_events,
        ge=0,
        description="Events after an update ends before the next starts.",
    )
    budget: int = Field(
        default=MetaUpdateConfig.budget, ge=1, description="At most this many updates ..."
    )
    budget_window_events: int = Field(
        default=MetaUpdateConfig.budget_window_events,
        ge=1,
        description="... per this many events (more are skipped).",
    )
    # not MetaUpdateConfig's default ("inline"): "auto" lets each command choose (configs())
    worker: Literal["auto", "inline", "thread", "process"] = Field(
        default="auto",
        description="Where a job trains: inline (the stream waits; reproducible), a thread, or "
        "a worker process (serving never waits). auto: inline for `run`, process for `serve`.",
    )
    promote: Literal["gate", "always"] = Field(
        default=MetaUpdateConfig.promote,
        description="gate: promote only what validation approves; always: every trained "
        "candidate (a baseline for comparisons, not for production).",
    )
    probation_events: int = Field(
        default=MetaUpdateConfig.probation_events,
        ge=0,
        description="Scored events after a swap compared with as many before it (0: none).",
    )
    rollback_factor: float = Field(
        default=MetaUpdateConfig.rollback_factor,
        gt=1,
        description="Roll back when the probation loss exceeds this x before (a guard against "
        "gross failures: the stream itself changes between the two windows).",
    )
    min_shots: int = Field(
        default=MetaUpdateConfig.min_shots,
        ge=0,
        description="Probation scores events whose task had this many examples (1: what the "
        "validation gate judges, support sizes from 1 up).",
    )
    reservoir_tasks: int = Field(
        default=MetaUpdateConfig.reservoir_tasks, ge=0, description="Replay reservoir (tasks)."
    )
    recent_tasks: int = Field(
        default=MetaUpdateConfig.recent_tasks, ge=1, description="Replay window of recent tasks."
    )
    max_examples: int = Field(
        default=MetaUpdateConfig.max_examples,
        ge=2,
        le=4096,
        description="Replay examples per task.",
    )
    steps: int = Field(
        default=UpdateConfig.steps, ge=1, description="Training steps of a candidate."
    )
    batch_tasks: int = Field(
        default=UpdateConfig.batch_tasks, ge=2, description="Episode tasks per step."
    )
    bank_tasks: int = Field(
        default=UpdateConfig.bank_tasks, ge=0, description="Neighbour bank tasks per step."
    )
    lr: float = Field(default=UpdateConfig.lr, gt=0, description="Adam learning rate.")
    new_fraction: float = Field(
        default=UpdateConfig.new_fraction,
        gt=0,
        le=1,
        description="Fraction of each batch drawn from new tasks.",
    )
    distill_weight: float = Field(
        default=UpdateConfig.distill_weight,
        ge=0,
        description="Weight of the anti-forgetting term on old tasks.",
    )
    distill_floor: float = Field(
        default=UpdateConfig.distill_floor,
        gt=0,
        description="The anti-forgetting term is relative to the served model's own loss on "
        "each old episode plus this floor (so precise old tasks stay precise).",
    )
    min_task_examples: int = Field(
        default=UpdateConfig.min_task_examples,
        ge=2,
        description="Replay tasks need this many examples to be used.",
    )
    holdout_fraction: float = Field(
        default=UpdateConfig.holdout_fraction,
        gt=0,
        lt=1,
        description="Replay tasks held out for validation.",
    )
    min_val_tasks: int = Field(
        default=UpdateConfig.min_val_tasks,
        ge=1,
        description="Held-out new tasks needed to judge a candidate.",
    )
    min_improvement: float = Field(
        default=UpdateConfig.min_improvement,
        ge=0,
        lt=1,
        description="Required relative drop of the new-task loss.",
    )
    old_margin: float = Field(
        default=UpdateConfig.old_margin,
        ge=0,
        description="Allowed relative rise of the old-task loss.",
    )
    max_experts: int = Field(
        default=MetaUpdateConfig.max_experts,
        ge=1,
        le=16,
        description="Experts served side by side: a candidate that helps the new tasks but "
        "not the old ones is added beside the served model, each task routed by its own "
        "evidence (the least used one retired at capacity); 1 keeps a single model, replaced "
        "by a candidate that passes the gate.",
    )
    expert_min_improvement: float = Field(
        default=UpdateConfig.expert_min_improvement,
        ge=0,
        lt=1,
        description="With experts: required relative drop of the new-task loss under routing.",
    )
    expert_old_margin: float = Field(
        default=UpdateConfig.expert_old_margin,
        ge=0,
        description="With experts: allowed relative rise of the old-task loss under routing.",
    )
    expert_new_fraction: float = Field(
        default=UpdateConfig.expert_new_fraction,
        gt=0,
        le=1,
        description="With experts: fraction of each training batch drawn from new tasks.",
    )
    expert_distill_weight: float = Field(
        default=UpdateConfig.expert_distill_weight,
        ge=0,
        description="With experts: weight of the anti-forgetting term (0: a specialist; "
        "routing keeps old tasks with their experts).",
    )
    expert_lr: float = Field(
        default=UpdateConfig.expert_lr, gt=0, description="With experts: Adam learning rate."
    )
    threads: int = Field(
        default=UpdateConfig.threads, ge=0, description="Torch threads of a job (0: default)."
    )

    def configs(
        self,
        worker: str,
        *,
        seed: int = UpdateConfig.seed,
        k_neighbours: int = UpdateConfig.k_neighbours,
    ) -> MetaUpdateConfig:
        """The :class:`~stream_meta.continual.updater.MetaUpdateConfig` these settings give;
        ``worker`` is the command's choice for ``worker = "auto"``, ``seed`` and
        ``k_neighbours`` are the engine's."""
        update = UpdateConfig(**_shared(UpdateConfig, self), seed=seed, k_neighbours=k_neighbours)
        values = _shared(MetaUpdateConfig, self)
        values["worker"] = worker if self.worker == "auto" else self.worker
        return MetaUpdateConfig(**values, update=update)


class StreamSettings(BaseModel):
    """The built-in synthetic event stream: keyword arguments of
    :class:`~stream_meta.tasks.stream.TaskStream` (and of a scenario's stream)."""

    model_config = _SECTION_CONFIG

    tasks: int = Field(
        default=_default(TaskStream, "tasks"),
        ge=1,
        description="Distinct tasks over the whole stream.",
    )
    clusters: int = Field(
        default=_default(TaskStream, "clusters"),
        ge=0,
        description="Clusters the tasks are drawn around; 0 means no clusters.",
    )
    cluster_spread: float = Field(
        default=_default(TaskStream, "cluster_spread"),
        ge=0,
        description="Spread of task parameters around their cluster centre.",
    )
    labelled_fraction: float = Field(
        default=_default(TaskStream, "labelled_fraction"),
        ge=0,
        le=1,
        description="Probability that an event carries its label.",
    )
    zipf_s: float = Field(
        default=_default(TaskStream, "zipf_s"),
        gt=0,
        description="Zipf exponent of task popularity (larger: more skewed).",
    )
    new_task_rate: float = Field(
        default=_default(TaskStream, "new_task_rate"),
        ge=0,
        le=1,
        description="Probability that an event starts a new task.",
    )
    seed: int = Field(default=_default(TaskStream, "seed"), description="Seed of the stream.")


class TrainSettings(BaseModel):
    """Episodic meta-training: :class:`~stream_meta.meta_training.TrainConfig` (by field name)
    and ``device``, :func:`~stream_meta.meta_training.meta_train`'s keyword argument."""

    model_config = _SECTION_CONFIG

    steps: int = Field(default=TrainConfig.steps, ge=1, description="Optimiser steps.")
    batch_tasks: int = Field(
        default=TrainConfig.batch_tasks, ge=1, description="Tasks per meta-batch."
    )
    lr: float = Field(default=TrainConfig.lr, gt=0, description="Learning rate.")
    min_shots: int = Field(
        default=TrainConfig.min_shots, ge=0, description="Fewest support examples in an episode."
    )
    max_shots: int = Field(
        default=TrainConfig.max_shots, ge=1, description="Most support examples in an episode."
    )
    query_points: int = Field(
        default=TrainConfig.query_points, ge=1, description="Query examples per episode."
    )
    bank_tasks: int = Field(
        default=TrainConfig.bank_tasks,
        ge=1,
        description="Tasks in the bank that retrieval is trained against.",
    )
    sibling_rate: float = Field(
        default=TrainConfig.sibling_rate,
        ge=0,
        le=1,
        description="Experimental: share of near episodes whose sibling task is injected as a "
        "retrieved neighbour.",
    )
    prior_weight: float = Field(
        default=TrainConfig.prior_weight,
        ge=0,
        description="Experimental: weight of the prior-only (no example) prediction loss.",
    )
    seed: int = Field(default=TrainConfig.seed, description="Seed of training.")
    device: str = Field(
        default=_default(meta_train, "device"),
        min_length=1,
        description="Torch device to train on.",
    )

    @model_validator(mode="after")
    def _shots_in_order(self) -> Self:
        if self.min_shots > self.max_shots:
            raise ValueError(
                f"min_shots ({self.min_shots}) must not exceed max_shots ({self.max_shots})"
            )
        return self


class Settings(BaseSettings):
    """Every setting of stream-meta, one frozen section per concern.

    Build it with :func:`load_settings`. ``Settings(...)`` itself takes its arguments and the
    defaults only: it reads no environment variable and no file.
    """

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
    )

    model: ModelSettings = Field(default_factory=ModelSettings, description="The meta-model.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="The event loop.")
    index: IndexSettings = Field(default_factory=IndexSettings, description="The task index.")
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings, description="The Prometheus endpoint."
    )
    admin: AdminSettings = Field(
        default_factory=AdminSettings, description="The admin port (control routes)."
    )
    stream: StreamSettings = Field(
        default_factory=StreamSettings, description="The synthetic stream."
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="The Kafka service.")
    drift: DriftSettings = Field(default_factory=DriftSettings, description="The drift monitor.")
    labels: LabelSettings = Field(default_factory=LabelSettings, description="Label requests.")
    meta_update: MetaUpdateSettings = Field(
        default_factory=MetaUpdateSettings, description="Meta-updates."
    )
    service: ServiceSettings = Field(
        default_factory=ServiceSettings, description="State and lifecycle of `serve`."
    )
    decisions: DecisionSettings = Field(
        default_factory=DecisionSettings, description="Decisions and their rewards."
    )
    train: TrainSettings = Field(default_factory=TrainSettings, description="Meta-training.")
    trainer: TrainerSettings = Field(
        default_factory=TrainerSettings, description="The trainer service (`trainer`)."
    )
    models: ModelsSettings = Field(
        default_factory=ModelsSettings, description="Signed model versions."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments only: the environment and files enter through :func:`load_settings`."""
        return (init_settings,)


def settings_summary(settings: Settings) -> dict[str, Any]:
    """The settings as a JSON-serialisable dict (for logs, reports and checkpoints)."""
    return settings.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# loading

_Key = tuple[str, ...]
_OVERRIDES = "overrides"


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load and validate the settings; raise :class:`ConfigError` on any problem.

    ``config_file`` is a TOML file with one table per section (``[engine]``...). ``env`` is a
    mapping of environment variables; only ``STREAM_META_<SECTION>__<FIELD>`` ones are read (the
    name is case-insensitive), and ``none``, ``null`` or an empty value set an optional field
    to None. ``env=None`` means no environment at all. ``overrides`` is a nested mapping such as
    ``{"engine": {"k_neighbours": 0}}``. Precedence: overrides > env > file > defaults.
    """
    merged: dict[str, Any] = {}
    sources: dict[_Key, str] = {}
    if config_file is not None:
        _merge(merged, sources, _read_toml(Path(config_file)), str(config_file), ())
    if env is not None:
        for name, path, value in _env_entries(env):
            _merge(merged, sources, _nest(path, value), name, ())
    if overrides is not None:
        _merge(merged, sources, _plain(overrides), _OVERRIDES, ())
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc.errors(), sources)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from None


def _env_entries(env: Mapping[str, str]) -> list[tuple[str, _Key, Any]]:
    """``(variable name, key path, value)`` for each STREAM_META_ variable, sorted by name."""
    entries = []
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER))
        value: Any = env[name]
        if value.strip().lower() in ("", "none", "null") and _allows_none(path):
            value = None
        entries.append((name, path, value))
    return entries


def _allows_none(path: _Key) -> bool:
    """Whether the field at ``path`` (section, field) accepts None."""
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i == len(path) - 1:
            return type(None) in typing.get_args(annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return False


def _nest(path: _Key, value: Any) -> Any:
    for part in reversed(path):
        value = {part: value}
    return value


def _plain(value: Any) -> Any:
    """Mappings (at any depth) as plain dicts."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _merge(
    target: dict[str, Any], sources: dict[_Key, str], layer: Any, source: str, prefix: _Key
) -> None:
    """Merge ``layer`` into ``target`` key by key, recording where each leaf came from."""
    for key, value in layer.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], sources, value, source, path)
            continue
        for known in [known for known in sources if known[: len(path)] == path]:
            del sources[known]
        target[key] = value
        if isinstance(value, dict):
            _merge_sources(sources, value, source, path)
        else:
            sources[path] = source


def _merge_sources(
    sources: dict[_Key, str], layer: dict[str, Any], source: str, prefix: _Key
) -> None:
    sources[prefix] = source
    for key, value in layer.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            _merge_sources(sources, value, source, path)
        else:
            sources[path] = source


def _format_errors(errors: list[ErrorDetails], sources: dict[_Key, str]) -> str:
    lines = [_format_error(error, sources) for error in errors]
    count = f"{len(lines)} problem{'s' if len(lines) > 1 else ''}"
    return f"invalid configuration ({count}):\n" + "\n".join(f"  - {line}" for line in lines)


def _format_error(error: ErrorDetails, sources: dict[_Key, str]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    where = ".".join(loc) or "settings"
    found = _sources_for(loc, sources)
    if error["type"] == "extra_forbidden":
        message = "unknown setting" + _did_you_mean(loc)
    else:
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if error["type"] != "missing" and not isinstance(value, dict):
            from_env = len(found) == 1 and found[0].upper().startswith(ENV_PREFIX)
            shown = value if from_env and isinstance(value, str) else repr(value)
            message += f" (got {_shorten(shown)})"
    if found:
        message += f" [from {', '.join(found)}]"
    return f"{where}: {message}"


def _sources_for(loc: _Key, sources: dict[_Key, str]) -> list[str]:
    """Where the value at ``loc`` came from: its own source or an ancestor's, else those of
    the keys below it (for an error about a whole section)."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in sources:
            return [sources[loc[:end]]]
    below = [source for key, source in sources.items() if key[: len(loc)] == loc]
    return list(dict.fromkeys(below))


def _did_you_mean(loc: _Key) -> str:
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = None if field is None else field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    known = ", ".join(model.model_fields)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
