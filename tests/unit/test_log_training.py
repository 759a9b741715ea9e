"""Meta-training on recorded tasks: the mixed-model start, validation at step 0 and the
significance a check needs to replace the start."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_meta.evaluation import population
from stream_meta.log_training import (
    LogTrainConfig,
    _mixed_model,
    _start_from_population,
    model_size,
    train_on_log,
)
from stream_meta.meta_training import EarlyStopping, TrainConfig, meta_train
from stream_meta.model import MetaModel, ModelConfig, no_neighbours
from stream_meta.scaling import fit_scaling
from stream_meta.schema import TaskSchema
from stream_meta.tasklog import read_tasks
from stream_meta.tasks import SinusoidFamily


def _write_log(path: Path, task_ids: list[str], rows: int = 12, seed: int = 0) -> None:
    """A multilevel log: ``y = 2 + 1.5 x + b0 + b1 x + noise`` per task."""
    rng = np.random.default_rng(seed)
    with gzip.open(path, "wt") as f:
        for t in task_ids:
            b0, b1 = rng.normal(0.0, 1.0), rng.normal(0.0, 0.5)
            for i in range(rows):
                x = float(rng.normal(3.0, 2.0))
                y = 2.0 + 1.5 * x + b0 + b1 * x + float(rng.normal(0.0, 0.5))
                f.write(json.dumps({"event_id": f"{t}-{i}", "task_id": t, "x": [x], "y": y}))
                f.write("\n")


def test_the_mixed_model_start_is_the_mixed_models_blup(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl.gz"
    _write_log(path, [f"t{i}" for i in range(60)])
    with read_tasks(path, TaskSchema(x_dim=1), seed=0) as table:
        train = table.tasks_in("train")
        rows = np.concatenate([np.arange(table.offsets[t], table.offsets[t + 1]) for t in train])
        _, size = model_size(len(train), len(rows))
        model = MetaModel(ModelConfig(x_dim=1, **size)).eval()
        model.scaling.set(**fit_scaling(table.x[rows], table.y[rows], kind="regression"))
        mixed = _mixed_model(model, table, train, seed=0)
        # the body's features (almost) off: the head is the mixed model's [x, 1] block
        _start_from_population(model, 1e-6, mixed=mixed, mixed_mean=True)
        tasks = np.searchsorted(table.offsets, rows, side="right") - 1
        data = population.TrainingData(table.x[rows], table.y[rows], tasks, "regression")
        ridge = population.TaskRidge(data)
        new = table.tasks_in("test")[0]
        r = np.arange(table.offsets[new], table.offsets[new + 1])
        xs, ys, xq = np.array(table.x[r[:3]]), np.array(table.y[r[:3]]), np.array(table.x[r[3:]])
        for x, y in zip(xs, ys, strict=True):
            ridge.learn("new", x, float(y))
        expected = [float(ridge.predict("new", x)) for x in xq]
        spread = float(np.std(table.y[rows]))
    xs_t = torch.tensor(xs, dtype=torch.float32)[None]
    ys_t = torch.tensor(ys, dtype=torch.float32)[None]
    mask = torch.ones(1, 3)
    with torch.no_grad():
        z = model.embed(xs_t, ys_t, mask)
        w = model.adapt(z, *no_neighbours(1, model.config.embed_dim), xs_t, ys_t, mask)
        got = model.predict(torch.tensor(xq, dtype=torch.float32)[None], w)[0]
    np.testing.assert_allclose(got.numpy(), expected, atol=0.005 * spread)


def test_validation_at_start_keeps_the_starting_weights_when_training_never_beats_them(
    make_model,
) -> None:
    model = make_model(seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses = iter([1.0, 2.0, 3.0, 4.0])
    result = meta_train(
        model,
        SinusoidFamily(),
        TrainConfig(steps=6, batch_tasks=4, bank_tasks=16),
        progress=False,
        early_stopping=EarlyStopping(lambda m: next(losses), every=2, at_start=True),
    )
    assert result.best_step == 0 and [s for s, _ in result.validation] == [0, 2, 4, 6]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, start[k])


@pytest.mark.parametrize("head_prior", ["isotropic", "mixed"])
def test_train_on_log_runs_with_either_head_prior(tmp_path: Path, head_prior: str) -> None:
    path = tmp_path / "log.jsonl.gz"
    _write_log(path, [f"t{i}" for i in range(30)], rows=8)
    with read_tasks(path, TaskSchema(x_dim=1), seed=0) as table:
        _, report = train_on_log(
            table,
            LogTrainConfig(max_steps=4, validate_every=2, batch_tasks=4, head_prior=head_prior),
            progress=False,
        )
    assert np.isfinite(report["train"]["best_validation_loss"])
    assert report["validation_pooled_loss"] > 0
    checks = report["validation_checks"]
    assert checks[0][0] == 0  # the starting weights were checked too
    assert report["train"]["best_validation_loss"] <= checks[0][1] + 1e-6
    assert (report["head_prior"] is None) == (head_prior == "isotropic")


@pytest.mark.parametrize(
    ("later", "kept"),
    [
        ([0.9, 1.2, 0.7, 1.05], 0),  # lower in sum, but not across the tasks: luck
        ([0.9, 0.92, 0.88, 0.9], 2),  # lower on every task
    ],
)
def test_a_check_replaces_the_start_only_if_it_beats_it_across_validation_tasks(
    make_model, later: list[float], kept: int
) -> None:
    shares = iter([np.ones(4), np.array(later), np.full(4, 5.0)])
    result = meta_train(
        make_model(seed=0),
        SinusoidFamily(),
        TrainConfig(steps=4, batch_tasks=4, bank_tasks=16),
        progress=False,
        early_stopping=EarlyStopping(
            lambda m: next(shares), every=2, at_start=True, significance=1.0
        ),
    )
    assert result.best_step == kept
    assert result.validation[1] == (2, pytest.approx(sum(later)))


def test_train_on_log_calibrates_the_variance_on_the_validation_tasks(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl.gz"
    _write_log(path, [f"t{i}" for i in range(60)], rows=12)
    with read_tasks(path, TaskSchema(x_dim=1), seed=0) as table:
        model, report = train_on_log(
            table, LogTrainConfig(max_steps=4, validate_every=2, batch_tasks=4), progress=False
        )
    cal = report["calibration"]
    assert cal["points"] > 100
    assert model.calibration.to_dict() == {
        k: cal[k] for k in ("var_scale", "noise_scale", "scale_rate")
    }
    # the validation points' 90% intervals cover about 90% of them once calibrated
    assert 0.8 <= cal["coverage_90"] <= 0.97
