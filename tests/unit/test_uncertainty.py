"""Predictive uncertainty: the head posterior's variance against a direct Bayesian linear
regression, the weight-row packing, the calibration and its fit, the scores, and what the
engine, a checkpoint and the shipped model make of them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stream_meta.evaluation.fewshot import uncertainty_report
from stream_meta.model import no_neighbours
from stream_meta.model_checkpoint import load_checkpoint, save_checkpoint
from stream_meta.tasks import SinusoidFamily
from stream_meta.uncertainty import (
    Z90,
    Calibration,
    central_coverage,
    expected_calibration_error,
    fit_variance_calibration,
    mixture_moments,
    regression_calibration_error,
    t_interval_factor,
)
from tests.conftest import sinusoid_events


def _support(b: int = 3, n: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(b, n, 1, generator=g) * 10 - 5
    ys = torch.sin(xs[..., 0]) * 2
    smask = torch.ones(b, n)
    smask[0, 3:] = 0.0  # a shorter, padded support set
    return xs, ys, smask


def _rows(model, xs, ys, smask) -> torch.Tensor:
    z = model.embed(xs, ys, smask)
    return model.adapt(z, *no_neighbours(len(xs), z.shape[1]), xs, ys, smask, posterior=True)


def test_std_is_the_bayesian_linear_regressions_when_calibration_is_the_identity(
    make_model,
) -> None:
    model = make_model(seed=1)
    with torch.no_grad():
        model.log_noise.fill_(-0.7)
        model.scaling.set(y_scale=3.0, y_shift=[0.5])
    xs, ys, smask = _support()
    xq = torch.linspace(-5, 5, 7).reshape(1, 7, 1).expand(3, 7, 1).contiguous()
    with torch.no_grad():
        rows = _rows(model, xs, ys, smask)
        mean, std = model.predict_with_std(xq, rows)
        z = model.embed(xs, ys, smask)
        generated = model.hyper(z, *no_neighbours(3, z.shape[1]), smask.sum(-1))
        lam0 = model.prior_precision().double().numpy()
        beta = float(torch.exp(-2 * model.log_noise))
    assert std is not None
    for i in range(3):
        # the posterior of a Bayesian linear regression on the body's features, in numpy
        phi = model.target.features(model.scaling.inputs(xs[i : i + 1]), generated[i : i + 1])
        phi = phi[0].double().numpy()[smask[i].bool().numpy()]
        phiq = model.target.features(model.scaling.inputs(xq[i : i + 1]), generated[i : i + 1])
        phiq = phiq[0].double().numpy()
        cov = np.linalg.inv(beta * phi.T @ phi + lam0)
        var = np.einsum("qf,fg,qg->q", phiq, cov, phiq) + 1.0 / beta
        np.testing.assert_allclose(std[i].numpy(), 3.0 * np.sqrt(var), rtol=2e-3)
    # the mean is the one the plain adaptation serves
    plain = model.adapt(z, *no_neighbours(3, z.shape[1]), xs, ys, smask)
    np.testing.assert_allclose(mean.numpy(), model.predict(xq, plain).detach().numpy(), atol=1e-5)


def test_rows_carry_the_posterior_factor_when_the_model_is_a_regressor(make_model) -> None:
    reg = make_model()
    f = reg.target.n_features
    assert reg.posterior_width == f * f + 1
    xs, ys, smask = _support()
    with torch.no_grad():
        rows = _rows(reg, xs, ys, smask)
    assert rows.shape == (3, reg.target.n_params + f * f + 1)
    chol = rows[:, reg.target.n_params : -1].reshape(3, f, f)
    assert torch.equal(chol, torch.tril(chol)) and bool((chol.diagonal(dim1=1, dim2=2) > 0).all())
    # it factors the posterior precision beta Phi^T Phi + Lambda0
    with torch.no_grad():
        z = reg.embed(xs, ys, smask)
        generated = reg.hyper(z, *no_neighbours(3, z.shape[1]), smask.sum(-1))
        phi = reg.target.features(xs, generated) * smask.unsqueeze(-1)
        beta = torch.exp(-2 * reg.log_noise)
        gram = beta * phi.transpose(1, 2) @ phi + reg.prior_precision()
    torch.testing.assert_close(chol @ chol.transpose(1, 2), gram, rtol=1e-4, atol=1e-4)
    assert torch.equal(rows[:, -1], torch.ones(3))  # the identity calibration: task scale 1
    clf = make_model(x_dim=2, kind="classification", n_classes=3)
    assert clf.posterior_width == 0
    x2, y2 = torch.randn(2, 4, 2), torch.randint(0, 3, (2, 4))
    with torch.no_grad():
        out, std = clf.predict_with_std(x2, _rows(clf, x2, y2, torch.ones(2, 4)))
    assert out.shape == (2, 4, 3) and std is None


def test_coverage_and_calibration_error_when_cases_are_made_by_hand() -> None:
    z = np.array([0.0, 1.0, -1.6, 1.7, -5.0, math.nan])
    assert central_coverage(z, 0.9) == pytest.approx(3 / 5)
    assert central_coverage(np.array([]), 0.9) is None
    # all residuals 0: every central interval holds all of them, |1 - p| on average
    assert regression_calibration_error(np.zeros(4)) == pytest.approx(0.5)
    # exact normal quantiles at every decile: the empirical coverage is the nominal one
    z = np.random.default_rng(0).standard_normal(200_000)
    assert regression_calibration_error(z) < 0.005
    assert central_coverage(z, 0.9) == pytest.approx(0.9, abs=0.005)
    # too narrow by half: the 90% interval is a normal's 59%
    assert central_coverage(2 * z, 0.9) == pytest.approx(0.59, abs=0.01)
    # ECE: 15 bins; here two, each off by 0.1
    conf = np.array([0.95, 0.95, 0.95, 0.95, 0.5, 0.5])
    hit = np.array([1, 1, 1, 1, 1, 0])
    assert expected_calibration_error(conf, hit) == pytest.approx((4 * 0.05 + 2 * 0.0) / 6)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0
    assert expected_calibration_error(np.array([]), np.array([])) is None


def test_mixture_variance_adds_the_spread_of_the_means_when_experts_disagree() -> None:
    means = torch.tensor([[1.0, 3.0, 5.0]])
    var = torch.tensor([[0.5, 0.5, 2.0]])
    w = torch.tensor([[2.0, 1.0, 1.0]])  # unnormalised weights
    m, v = mixture_moments(means, var, w)
    p = np.array([0.5, 0.25, 0.25])
    mu = float(p @ means[0].numpy())
    expect = float(p @ (var[0].numpy() + (means[0].numpy() - mu) ** 2))
    assert m.item() == pytest.approx(mu) and v.item() == pytest.approx(expect)


def test_task_scale_is_one_when_uncalibrated_and_tracks_the_misfit_when_fitted() -> None:
    cal = Calibration()
    misfit, shots = torch.tensor([0.0, 3.0, 50.0]), torch.tensor([0.0, 3.0, 5.0])
    assert torch.equal(cal.task_scale(misfit, shots), torch.ones(3))
    cal.set(1.0, 1.0, 100.0)
    scale = cal.task_scale(misfit, shots)
    tails = t_interval_factor(shots).float()
    assert scale[0] == pytest.approx(1.0)  # no example: the prior's scale
    assert scale[1] == pytest.approx(float(tails[1]), rel=1e-5)  # as expected: scale 1
    assert scale[2] > 5 * float(tails[2])  # 10x the expected misfit: a wilder task
    with pytest.raises(ValueError):
        cal.set(0.0, 1.0)


def test_t_interval_factor_matches_students_t_when_dof_vary() -> None:
    from scipy.stats import t

    dof = torch.tensor([1.0, 2.0, 7.0, 32.0, 33.0, 200.0])
    want = (t.ppf(0.95, dof.numpy()) / Z90) ** 2
    np.testing.assert_allclose(t_interval_factor(dof).numpy(), want, rtol=1e-3)


def test_fit_recovers_the_scales_when_errors_follow_the_model() -> None:
    rng = np.random.default_rng(1)
    m = 40_000
    shots = rng.integers(1, 20, m).astype(np.float64)
    epi = rng.uniform(0.0, 1.0, m) / shots
    # tasks wilder or tamer than the prior, and a misfit that shows it (chi-squared x scale)
    task = rng.choice([0.3, 1.0, 3.0], m)
    misfit = task * rng.chisquare(shots)
    a, c, k = 2.0, 0.5, 5.0
    tails = t_interval_factor(torch.from_numpy(shots)).numpy()
    var = (1 + k * misfit) / (1 + k * shots) * tails * (a * epi + c * 0.1)
    err = rng.normal(0.0, np.sqrt(var)) ** 2
    fa, fc, fk = fit_variance_calibration(epi, 0.1, err, misfit, shots)
    assert fa == pytest.approx(a, rel=0.15) and fc == pytest.approx(c, rel=0.15)
    assert fk > 1.0
    # without the misfit the scale rate stays 0
    assert fit_variance_calibration(epi, 0.1, err)[2] == 0.0


def test_checkpoint_without_calibration_loads_as_the_exact_predictive(tmp_path, make_model) -> None:
    model = make_model()
    model.calibration.set(0.1, 0.2, 3.0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, family="sinusoid")
    assert load_checkpoint(path)[0].calibration.to_dict() == pytest.approx(
        {"var_scale": 0.1, "noise_scale": 0.2, "scale_rate": 3.0}
    )
    # a checkpoint from before calibration existed: no calibration.* tensor
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("calibration.")}
    save_file(tensors, str(path), metadata=meta)
    old, _ = load_checkpoint(path)
    assert old.calibration.to_dict() == {"var_scale": 1.0, "noise_scale": 1.0, "scale_rate": 0.0}


def test_engine_serves_the_same_std_from_the_cache_as_fresh(make_model, make_engine) -> None:
    model = make_model(seed=2)
    model.calibration.set(0.5, 0.3, 10.0)
    engine = make_engine(model)
    events = sinusoid_events(200, tasks=10)
    engine.process(events)
    queries = [{"event_id": f"q{i}", "task_id": "t3", "x": [0.25 * i]} for i in range(4)]
    first = engine.process(queries).predictions
    again = engine.process([{**q, "event_id": q["event_id"] + "b"} for q in queries]).predictions
    engine.clear_weights_cache()
    fresh = engine.process([{**q, "event_id": q["event_id"] + "c"} for q in queries]).predictions
    stds = [[p.std for p in ps] for ps in (first, again, fresh)]
    assert all(s is not None and s > 0 for s in stds[0])
    assert stds[0] == stds[1]
    np.testing.assert_allclose(stds[0], stds[2], rtol=1e-3)  # adapted in another group
    record = json.loads(first[0].to_json())
    assert record["std"] == pytest.approx(stds[0][0])
    reg = engine.metrics.registry
    labels = reg.get_sample_value("stream_meta_interval_labels_total")
    hits = reg.get_sample_value("stream_meta_interval_hits_total")
    assert labels == engine.stats.labelled and 0 <= hits <= labels


def test_classifier_predictions_carry_probabilities_and_no_std(make_model, make_engine) -> None:
    engine = make_engine(make_model(x_dim=2, kind="classification", n_classes=3))
    out = engine.process(
        [{"event_id": f"e{i}", "task_id": "a", "x": [0.1 * i, 1.0], "y": i % 3} for i in range(6)]
    )
    for p in out.predictions:
        assert p.std is None and p.probabilities is not None
        assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_held_out_coverage_of_the_90_interval_is_near_90_percent_with_the_shipped_model(
    shipped_sinusoid,
) -> None:
    model, _ = shipped_sinusoid
    report = uncertainty_report(
        model, SinusoidFamily(), shots=[1, 2, 5, 10, 20], tasks=100, queries=20, bank_tasks=200
    )
    assert 0.80 <= report["coverage_90"] <= 0.97, report
    assert report["calibration_error"] < 0.2
    for shots, r in report["shots"].items():
        assert 0.75 <= r["coverage_90"] <= 0.99, (shots, r)
