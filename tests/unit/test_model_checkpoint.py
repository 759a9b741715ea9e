"""Checkpoints: safe format, atomic writes, identical predictions after a reload."""

from __future__ import annotations

import json

import pytest
import torch

from stream_meta.model_checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    shipped_checkpoint,
)
from tests.conftest import sinusoid_events


def test_reloaded_checkpoint_gives_identical_predictions_when_run_on_the_same_events(
    tmp_path, make_model, make_engine
) -> None:
    model = make_model(seed=3)
    path = tmp_path / "m.safetensors"
    manifest = save_checkpoint(path, model, family="sinusoid", metrics={"x": 1.0})
    loaded, manifest2 = load_checkpoint(path)
    assert manifest2["family"] == "sinusoid" and manifest2["metrics"] == {"x": 1.0}
    assert manifest2 == manifest
    events = sinusoid_events(300, tasks=15)
    a = [p.prediction for p in make_engine(model).process(events).predictions]
    b = [p.prediction for p in make_engine(loaded).process(events).predictions]
    assert a == b
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == manifest


def test_corrupt_checkpoint_is_refused_when_bytes_are_damaged(tmp_path, make_model) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, make_model(), family="sinusoid")
    data = bytearray(path.read_bytes())
    data[10:40] = b"\x00" * 30
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_checkpoint_with_nan_weights_is_refused_when_loaded(tmp_path, make_model) -> None:
    model = make_model()
    with torch.no_grad():
        model.log_noise.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, model, family="sinusoid")
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path_when_loaded(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_manifest(tmp_path / "nope.safetensors")


def test_failed_save_leaves_the_previous_checkpoint_intact_when_interrupted(
    tmp_path, make_model, monkeypatch
) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, make_model(seed=1), family="sinusoid")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("stream_meta.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_model(seed=2), family="sinusoid")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shipped_sinusoid_checkpoint_loads_with_its_manifest_when_installed() -> None:
    manifest = read_manifest(shipped_checkpoint("sinusoid"))
    assert manifest["family"] == "sinusoid"
    assert manifest["model"]["x_dim"] == 1
    assert manifest["metrics"]["train"]["steps"] >= 1000
