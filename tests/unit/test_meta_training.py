"""Episodic meta-training: it learns, and short runs work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_meta.meta_training import TrainConfig, meta_train
from stream_meta.model import no_neighbours
from stream_meta.tasks import SinusoidFamily


def _held_out_mse(model, shots: int = 5) -> float:
    fam = SinusoidFamily()
    rng = np.random.default_rng(4242)
    params = fam.sample_params(200, rng)
    xs, ys, xq, yq = (torch.from_numpy(a) for a in fam.sample_episode(params, shots, 30, rng))
    with torch.no_grad():
        mask = torch.ones(ys.shape)
        z = model.embed(xs, ys, mask)
        w = model.adapt(z, *no_neighbours(200, model.config.embed_dim), xs, ys, mask)
        return float(((model.predict(xq, w) - yq) ** 2).mean())


def test_meta_training_lowers_held_out_loss_when_run_briefly(make_model) -> None:
    model = make_model(seed=0, encoder_hidden=32, hyper_hidden=32, target_hidden=(16, 16))
    before = _held_out_mse(model)
    result = meta_train(
        model,
        SinusoidFamily(),
        TrainConfig(steps=150, batch_tasks=16, bank_tasks=64),
        progress=False,
    )
    after = _held_out_mse(model)
    assert result.steps == 150 and np.isfinite(result.final_loss)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_meta_training_completes_when_steps_are_few(make_model, steps: int) -> None:
    result = meta_train(
        make_model(),
        SinusoidFamily(),
        TrainConfig(steps=steps, batch_tasks=4, bank_tasks=16),
        progress=False,
    )
    assert result.steps == steps


def test_experimental_sibling_and_prior_terms_train_when_enabled(make_model) -> None:
    config = TrainConfig(steps=5, batch_tasks=8, bank_tasks=16, sibling_rate=0.5, prior_weight=0.25)
    result = meta_train(make_model(), SinusoidFamily(), config, progress=False)
    assert result.steps == 5 and np.isfinite(result.final_loss)
