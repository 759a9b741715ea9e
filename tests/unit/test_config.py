"""Settings: layer precedence (defaults < TOML < env < overrides), readable errors, and defaults
that are the library's own (each mapped section against the dataclasses it fills)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from stream_meta.config import (
    ConfigError,
    DecisionSettings,
    DriftSettings,
    EngineSettings,
    IndexSettings,
    MetaUpdateSettings,
    Settings,
    StreamSettings,
    TrainSettings,
    load_settings,
    settings_summary,
)
from stream_meta.continual.update_job import UpdateConfig
from stream_meta.continual.updater import MetaUpdateConfig
from stream_meta.decider import DecisionConfig
from stream_meta.drift.monitor import DriftConfig
from stream_meta.drift.watch import DriftWatch
from stream_meta.engine import EngineConfig
from stream_meta.index import TaskIndex
from stream_meta.meta_training import TrainConfig, meta_train
from stream_meta.tasks.stream import TaskStream

WriteToml = Callable[..., Path]


@pytest.fixture
def write_toml(tmp_path: Path) -> WriteToml:
    """Factory: write TOML text to a fresh config file and return its path."""

    def write(text: str, name: str = "config.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_defaults_are_valid_when_nothing_is_given() -> None:
    settings = load_settings()

    assert settings == Settings()
    assert settings.model.family == "sinusoid"
    assert settings.model.checkpoint is None
    assert settings.engine.support_size == 64
    assert settings.engine.task_ttl_s is None
    assert settings.index.kind == "flat"
    assert settings.metrics.port == 9108
    assert settings.stream.labelled_fraction == pytest.approx(0.7)
    assert settings.train.max_shots == 20


def test_file_values_are_applied_when_toml_is_given(write_toml: WriteToml) -> None:
    path = write_toml(
        """
        [model]
        family = "digits"
        checkpoint = "runs/digits.safetensors"

        [engine]
        support_size = 16
        task_ttl_s = 3600

        [index]
        kind = "ivf"
        """
    )

    settings = load_settings(path)

    assert settings.model.family == "digits"
    assert settings.model.checkpoint == Path("runs/digits.safetensors")
    assert settings.engine.support_size == 16
    assert settings.engine.task_ttl_s == pytest.approx(3600.0)
    assert settings.engine.k_neighbours == 8  # untouched fields keep their defaults
    assert settings.index.kind == "ivf"


def test_env_beats_file_when_both_set_a_field(write_toml: WriteToml) -> None:
    path = write_toml("[engine]\nsupport_size = 16\nk_neighbours = 4\n")
    env = {"STREAM_META_ENGINE__SUPPORT_SIZE": "32", "PATH": "/usr/bin"}

    settings = load_settings(path, env=env)

    assert settings.engine.support_size == 32
    assert settings.engine.k_neighbours == 4


def test_overrides_beat_env_when_both_set_a_field() -> None:
    env = {"STREAM_META_ENGINE__K_NEIGHBOURS": "16", "STREAM_META_ENGINE__SEED": "7"}

    settings = load_settings(env=env, overrides={"engine": {"k_neighbours": 0}})

    assert settings.engine.k_neighbours == 0
    assert settings.engine.seed == 7


@pytest.mark.parametrize(
    ("value", "expected"),
    [("none", None), ("", None), ("12.5", 12.5)],
    ids=["none-word", "empty", "number"],
)
def test_env_sets_optional_field_when_value_is_given(value: str, expected: float | None) -> None:
    settings = load_settings(env={"stream_meta_engine__task_ttl_s": value})

    assert settings.engine.task_ttl_s == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("toml", "engine.suport_size: unknown setting (did you mean 'support_size'?) [from "),
        (
            "env",
            "engine.suport_size: unknown setting (did you mean 'support_size'?) [from "
            "STREAM_META_ENGINE__SUPORT_SIZE]",
        ),
        (
            "overrides",
            "engine.suport_size: unknown setting (did you mean 'support_size'?) [from overrides]",
        ),
        ("section", "enigne: unknown setting (did you mean 'engine'?) [from "),
    ],
    ids=["toml", "env", "overrides", "unknown-section"],
)
def test_error_names_unknown_key_when_it_is_misspelt(
    source: str, expected: str, write_toml: WriteToml
) -> None:
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "toml": lambda: {"config_file": write_toml("[engine]\nsuport_size = 3\n")},
        "env": lambda: {"env": {"STREAM_META_ENGINE__SUPORT_SIZE": "3"}},
        "overrides": lambda: {"overrides": {"engine": {"suport_size": 3}}},
        "section": lambda: {"config_file": write_toml("[enigne]\nsupport_size = 3\n")},
    }
    kwargs = builders[source]()

    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)

    assert expected in str(caught.value)


def test_error_names_field_value_and_variable_when_env_value_is_invalid() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"STREAM_META_ENGINE__SUPPORT_SIZE": "-3"})

    assert (
        "engine.support_size: Input should be greater than or equal to 1 (got -3) "
        "[from STREAM_META_ENGINE__SUPPORT_SIZE]"
    ) in str(caught.value)


def test_error_lists_every_problem_with_its_source_when_several_layers_are_invalid(
    write_toml: WriteToml,
) -> None:
    path = write_toml("[metrics]\nport = 70000\n\n[train]\nmin_shots = 30\n")
    env = {"STREAM_META_INDEX__KIND": "hnsw"}

    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=env, overrides={"stream": {"labelled_fraction": 1.5}})

    message = str(caught.value)
    assert message.startswith("invalid configuration (4 problems):")
    assert (
        f"metrics.port: Input should be less than or equal to 65535 (got 70000) [from {path}]"
        in (message)
    )
    assert f"train: min_shots (30) must not exceed max_shots (20) [from {path}]" in message
    assert (
        "index.kind: Input should be 'flat' or 'ivf' (got hnsw) [from STREAM_META_INDEX__KIND]"
        in (message)
    )
    assert "stream.labelled_fraction:" in message and "(got 1.5) [from overrides]" in message


def test_error_when_config_file_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_settings(missing)


def test_error_when_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path)


def test_error_gives_line_when_toml_is_invalid(write_toml: WriteToml) -> None:
    path = write_toml("[engine]\nsupport_size = \n")

    with pytest.raises(ConfigError, match=r"invalid TOML in .*config.toml: .*line 2"):
        load_settings(path)


def test_os_environ_is_ignored_when_env_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_META_ENGINE__SUPPORT_SIZE", "3")
    monkeypatch.setenv("STREAM_META_ENGINE__BOGUS", "1")

    assert load_settings().engine.support_size == 64
    assert Settings().engine.support_size == 64


def test_settings_refuse_assignment_when_frozen() -> None:
    settings = load_settings()

    with pytest.raises(ValidationError):
        settings.engine.support_size = 3
    with pytest.raises(ValidationError):
        settings.engine = settings.engine


def test_summary_is_json_and_round_trips_when_dumped(write_toml: WriteToml) -> None:
    settings = load_settings(write_toml('[model]\ncheckpoint = "a/b.safetensors"\n'))

    summary = settings_summary(settings)

    assert json.loads(json.dumps(summary)) == summary
    assert summary["model"]["checkpoint"] == "a/b.safetensors"
    assert Settings.model_validate(summary) == settings


# -- Kafka security ------------------------------------------------------------------------------
SASL_ENV = {
    "STREAM_META_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "STREAM_META_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "STREAM_META_KAFKA__SASL_USERNAME": "svc",
    "STREAM_META_KAFKA__SASL_PASSWORD": "hunter2-secret",
}


def test_sasl_secrets_reach_the_clients_and_nothing_else() -> None:
    settings = load_settings(None, env=SASL_ENV)
    config = settings.kafka.client_config()
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "svc"
    assert config["sasl_plain_password"] == "hunter2-secret"
    for shown in (repr(settings), str(settings), json.dumps(settings_summary(settings))):
        assert "hunter2-secret" not in shown


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAM_META_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "needs sasl_mechanism"),
        ({"STREAM_META_KAFKA__SASL_USERNAME": "svc"}, "SASL settings given"),
        ({"STREAM_META_KAFKA__SSL_CERTFILE": "/c.pem"}, "go together"),
        ({"STREAM_META_KAFKA__SECURITY_PROTOCOL": "TLS"}, "security_protocol"),
    ],
)
def test_incomplete_security_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env=env)


# -- configuration fuzzing -------------------------------------------------------------------------
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _fields() -> list[tuple[str, str]]:
    return [
        (section, name)
        for section, model in Settings.model_fields.items()
        for name in (getattr(model.annotation, "model_fields", None) or {})
    ]


@given(
    st.lists(st.tuples(st.sampled_from(_fields()), _VALUES), max_size=6),
    st.dictionaries(st.text(max_size=8), _VALUES, max_size=2),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_configuration_loads_or_is_refused_with_a_config_error(
    changes: list[tuple[tuple[str, str], Any]], stray: dict[str, Any]
) -> None:
    overrides: dict[str, Any] = {}
    for (section, name), value in changes:
        overrides.setdefault(section, {})[name] = value
    overrides.update(stray)
    env = {f"STREAM_META_{s.upper()}__{n.upper()}": str(v) for (s, n), v in changes[:2]}
    try:
        loaded = load_settings(None, env=env, overrides=overrides)
    except ConfigError as exc:
        assert str(exc).strip()  # one readable message, never another exception
    else:
        assert isinstance(loaded, Settings)


# -- one source of defaults: the library's ---------------------------------------------------------
#: each settings section with a library counterpart, and the library objects its fields fill: the
#: fields of a dataclass, or the keyword arguments of a class or function, by field name
LIBRARY: dict[type[BaseModel], tuple[Callable[..., Any], ...]] = {
    EngineSettings: (EngineConfig,),
    IndexSettings: (TaskIndex,),
    StreamSettings: (TaskStream,),
    DriftSettings: (DriftConfig, DriftWatch),
    MetaUpdateSettings: (MetaUpdateConfig, UpdateConfig),
    TrainSettings: (TrainConfig, meta_train),
    DecisionSettings: (DecisionConfig,),
}
#: fields whose library parameter has another name
RENAMED = {(DriftSettings, "loss_window"): "window"}
#: the application's fields: no library parameter takes them, or (worker) takes another default
APP_ONLY = {
    (EngineSettings, "micro_batch"),
    (EngineSettings, "threads"),
    (DriftSettings, "enabled"),
    (DecisionSettings, "enabled"),
    (MetaUpdateSettings, "worker"),
}


def _library_parameters(section: type[BaseModel], name: str) -> list[tuple[str, Any]]:
    """``(owner.parameter, default)`` of every library parameter that settings field fills."""
    wanted = RENAMED.get((section, name), name)
    found = []
    for owner in LIBRARY[section]:
        parameter = inspect.signature(owner).parameters.get(wanted)
        if parameter is not None:
            found.append((f"{owner.__name__}.{wanted}", parameter.default))
    return found


_SHARED = [
    pytest.param(section, name, where, default, id=f"{section.__name__}.{name}={where}")
    for section in LIBRARY
    for name in section.model_fields
    if (section, name) not in APP_ONLY
    for where, default in _library_parameters(section, name)
]


@pytest.mark.parametrize(("section", "name", "where", "default"), _SHARED)
def test_setting_defaults_to_the_library_default_when_a_library_parameter_takes_it(
    section: type[BaseModel], name: str, where: str, default: Any
) -> None:
    setting = section.model_fields[name].default

    assert (type(setting), setting) == (type(default), default), f"{where} defaults to {default!r}"


def test_every_setting_of_a_mapped_section_has_a_library_parameter_unless_it_is_the_apps() -> None:
    orphans = [
        f"{section.__name__}.{name}"
        for section in LIBRARY
        for name in section.model_fields
        if (section, name) not in APP_ONLY and not _library_parameters(section, name)
    ]

    assert not orphans, f"give these a library parameter (or list them in APP_ONLY): {orphans}"
    assert all(name in section.model_fields for section, name in APP_ONLY | RENAMED.keys())
    assert len(_SHARED) >= 60  # the parametrization above is not silently empty


def test_default_settings_give_the_library_defaults_when_mapped() -> None:
    assert EngineSettings().config() == EngineConfig()
    assert DriftSettings().config() == DriftConfig()
    assert DecisionSettings().config() == DecisionConfig()
    assert MetaUpdateSettings().configs("inline") == MetaUpdateConfig()


def _another_valid_value(section: type[BaseModel], name: str) -> Any:
    """A value of the field other than its default that the section accepts."""
    default = section.model_fields[name].default
    if isinstance(default, bool):
        candidates: list[Any] = [not default]
    elif isinstance(default, int):
        candidates = [default + 1, default - 1]
    elif isinstance(default, float):
        candidates = [default * 1.5, default / 2, default + 0.5]
    elif default is None:
        candidates = [60.0]
    else:  # a Literal's other choices
        candidates = list(typing.get_args(section.model_fields[name].annotation))
    for value in candidates:
        if value == default:
            continue
        try:
            section(**{name: value})
        except ValidationError:
            continue
        return value
    raise AssertionError(f"no other valid value for {section.__name__}.{name}")


def _mapped_value(section: type[BaseModel], name: str, value: Any) -> tuple[Any, Any]:
    """The library config's value of field ``name`` when only that setting is ``value``, and
    the value it should have (that value: the settings and the dataclass share the name)."""
    settings: Any = section(**{name: value})
    if section is EngineSettings:
        return getattr(settings.config(), name), value
    if section in (DriftSettings, DecisionSettings):
        return getattr(settings.config(), name), value
    configs = settings.configs("inline")
    return getattr(configs.update if hasattr(configs.update, name) else configs, name), value


_MAPPED = [
    pytest.param(section, name, id=f"{section.__name__}.{name}")
    for section, library in (
        (EngineSettings, (EngineConfig,)),
        (DriftSettings, (DriftConfig,)),
        (MetaUpdateSettings, (MetaUpdateConfig, UpdateConfig)),
        (DecisionSettings, (DecisionConfig,)),
    )
    for name in section.model_fields
    if (section, name) not in APP_ONLY
    and any(name in {f.name for f in dataclasses.fields(lib)} for lib in library)
]


@pytest.mark.parametrize(("section", "name"), _MAPPED)
def test_every_setting_reaches_the_library_config_when_mapped(
    section: type[BaseModel], name: str
) -> None:
    value = _another_valid_value(section, name)

    got, expected = _mapped_value(section, name, value)

    assert got == expected


def test_meta_update_configs_take_the_commands_worker_and_the_engines_seed_when_given() -> None:
    auto = MetaUpdateSettings().configs("process", seed=7, k_neighbours=3)
    chosen = MetaUpdateSettings(worker="thread").configs("process")

    assert auto.worker == "process" and chosen.worker == "thread"
    assert (auto.update.seed, auto.update.k_neighbours) == (7, 3)


def test_drift_config_has_cluster_detectors_only_when_clusters_are_set() -> None:
    assert DriftSettings(clusters=0).config().per_cluster is False
    assert DriftSettings(clusters=4).config().per_cluster is True


@pytest.mark.parametrize(
    ("field", "value"),
    [("policy", "greedy"), ("draws", 0), ("ucb_c", -1.0), ("reward_ttl_s", 0), ("max_pending", 0)],
)
def test_decision_settings_are_refused_with_their_name_when_out_of_range(
    field: str, value: Any
) -> None:
    with pytest.raises(ConfigError, match=f"decisions.{field}"):
        load_settings(None, env={}, overrides={"decisions": {field: value}})
