"""Task schemas: declared in TOML, inferred from a log, refused with one clear message."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from stream_meta.schema import SchemaError, TaskSchema, family_schema, load_schema
from stream_meta.tasklog import infer_schema
from stream_meta.tasks import DigitsFamily, SinusoidFamily

REAL = Path(__file__).resolve().parents[1] / "data" / "real"


def write_log(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def events(n_tasks: int = 3, per_task: int = 4, x_dim: int = 2, label=lambda i: 0.5 * i):
    return [
        {"event_id": f"e{t}-{i}", "task_id": f"t{t}", "x": [float(i)] * x_dim, "y": label(i)}
        for t in range(n_tasks)
        for i in range(per_task)
    ]


def test_declared_schemas_of_the_shipped_real_sets_load() -> None:
    radon = load_schema(REAL / "radon.toml")
    assert radon.x_dim == 2 and radon.target == "regression"
    assert radon.feature_names == ["floor", "log_uranium"]
    contraception = load_schema(REAL / "contraception.toml")
    assert contraception.n_classes == 2 and contraception.classes == ["N", "Y"]
    assert load_schema(REAL / "wages.toml").time_ordered


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[other]\nx = 1\n", r"no \[schema\] table"),
        ("[schema]\nx_dim = 0\n", "x_dim"),
        ('[schema]\nx_dim = 2\ntarget = "classification"\n', "needs 2.."),
        ('[schema]\nx_dim = 1\nclasses = ["a", "b"]\n', "only for target"),
        ("[schema]\nx_dim = 1\ncolour = 3\n", "colour"),
        ("[schema\nx_dim = 1\n", "not valid TOML"),
    ],
)
def test_bad_schema_files_are_refused_with_a_clear_message(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(SchemaError, match=message):
        load_schema(path)


def test_a_schema_round_trips_through_its_toml(tmp_path: Path) -> None:
    s = TaskSchema(x_dim=2, feature_names=["a", "b"], target="classification", classes=["n", "y"])
    (tmp_path / "s.toml").write_text(s.to_toml())
    assert load_schema(tmp_path / "s.toml") == s


def test_the_built_in_families_are_schemas() -> None:
    assert family_schema(SinusoidFamily()) == TaskSchema(x_dim=1)
    family = DigitsFamily(split="test")
    digits = family_schema(family)
    assert digits.target == "classification" and digits.n_classes == family.n_classes


def test_inference_reads_dimension_kind_and_counts(tmp_path: Path) -> None:
    schema, summary = infer_schema(write_log(tmp_path / "log.jsonl", events()))
    assert schema == TaskSchema(x_dim=2, target="regression")
    assert (summary.events, summary.tasks, summary.labelled) == (12, 3, 12)
    assert summary.examples_per_task["median"] == 4
    assert summary.label["max"] == 1.5


def test_integer_labels_0_to_c_are_classes_and_gzip_is_read(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for e in events(label=lambda i: i % 3):
            fh.write(json.dumps(e) + "\n")
    schema, _ = infer_schema(path)
    assert schema.target == "classification" and schema.n_classes == 3


def test_inference_of_the_real_sets_agrees_with_their_declarations() -> None:
    for name in ("radon", "contraception", "spruce"):
        inferred, summary = infer_schema(REAL / f"{name}.jsonl.gz")
        declared = load_schema(REAL / f"{name}.toml")
        assert (inferred.x_dim, inferred.target, inferred.n_classes) == (
            declared.x_dim,
            declared.target,
            declared.n_classes,
        )
        assert inferred.time_ordered == declared.time_ordered
        assert summary.tasks >= 15


def test_mixed_dimensions_are_refused_naming_the_first_odd_event(tmp_path: Path) -> None:
    evs = events()
    evs[5]["x"] = [1.0, 2.0, 3.0]
    expected = r"mixed dimensions.*3 values in 1 events \(first: event 6\)"
    with pytest.raises(SchemaError, match=expected):
        infer_schema(write_log(tmp_path / "log.jsonl", evs))


def test_non_numeric_features_are_refused(tmp_path: Path) -> None:
    evs = events()
    evs[2]["x"] = [1.0, "red"]
    with pytest.raises(SchemaError, match="event 3: feature 1 of x is str 'red'"):
        infer_schema(write_log(tmp_path / "log.jsonl", evs))


def test_a_log_with_one_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="holds one task"):
        infer_schema(write_log(tmp_path / "log.jsonl", events(n_tasks=1)))


def test_a_log_without_labels_is_refused(tmp_path: Path) -> None:
    evs = [{k: v for k, v in e.items() if k != "y"} for e in events()]
    with pytest.raises(SchemaError, match="no labelled event"):
        infer_schema(write_log(tmp_path / "log.jsonl", evs))
