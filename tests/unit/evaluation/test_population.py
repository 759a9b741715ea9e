"""Population baselines (pooled, per-task, mixed model) scored prequentially."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.linear_model import LogisticRegression

from stream_meta.evaluation.population import (
    TaskRidge,
    TrainingData,
    _em_step,
    _structure_mask,
    _Sums,
    _task_sums,
    baselines,
    loss,
    prequential,
)

BETA = np.array([1.0, 2.0, -1.0])  # intercept, two slopes
# a random intercept and two random slopes, correlated
G = np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.3]])
NOISE = 0.5


def population(rng, tasks, rows, *, cov=G, beta=BETA, noise=NOISE):
    """Rows of ``tasks`` tasks drawn from ``y = [1, x]'(beta + b_task) + e``: ``(x, y, task)``;
    features centred at 1 with spread 2 (so standardisation matters)."""
    d = len(beta) - 1
    b = rng.multivariate_normal(np.zeros(d + 1), cov, size=tasks)
    task = np.repeat(np.arange(tasks), rows)
    x = 1.0 + 2.0 * rng.normal(size=(tasks * rows, d))
    z = np.c_[np.ones(len(task)), x]
    y = z @ beta + np.einsum("ij,ij->i", z, b[task]) + math.sqrt(noise) * rng.normal(size=len(task))
    return x, y, task


def stream(rng, x, y, task):
    """The rows as events of new tasks, interleaved at random (each task's rows in order)."""
    return [(f"new-{task[i]}", x[i], y[i]) for i in rng.permutation(len(y))]


def mean_losses(models, events):
    return {k: float(np.mean(v)) for k, v in prequential(models, events).items()}


def fitted(data, name):
    return next(m for m in baselines(data) if m.name == name)


# -- regression ---------------------------------------------------------------------------------
def test_task_ridge_beats_pooled_and_per_task_baselines_on_a_random_slopes_population():
    rng = np.random.default_rng(0)
    data = TrainingData(*population(rng, 200, 10), "regression")
    models = baselines(data)
    assert [m.name for m in models] == [
        "pooled-mean",
        "pooled-linear",
        "task-mean",
        "task-last",
        "task-ridge",
    ]
    out = mean_losses(models, stream(rng, *population(rng, 100, 10)))
    for other in ("pooled-linear", "task-mean", "task-last", "pooled-mean"):
        assert out["task-ridge"] < 0.6 * out[other], out
    # the pooled fit is right on average, so it beats the task averages (x matters)
    assert out["pooled-linear"] < out["task-mean"] < out["task-last"]


def test_task_ridge_estimates_the_variance_components():
    rng = np.random.default_rng(1)
    ridge = TaskRidge(TrainingData(*population(rng, 200, 10), "regression"))
    assert ridge.model.converged
    assert ridge.model.structure in ("diagonal", "full")
    assert 0.8 < ridge.noise_variance / NOISE < 1.25
    ratio = np.diag(ridge.task_covariance) / np.diag(G)
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio
    np.testing.assert_allclose(ridge.fixed_effects, BETA, atol=0.25)
    # the correlation structure is found when G is full: BIC prefers it here
    full = TaskRidge(TrainingData(*population(rng, 400, 10), "regression"))
    assert full.model.structure == "full"
    assert 0.1 < full.task_covariance[0, 1] < 0.6


def test_em_finds_a_likelihood_at_least_the_truths():
    rng = np.random.default_rng(2)
    data = TrainingData(*population(rng, 150, 6), "regression")
    ridge = TaskRidge(data, structure="full")
    # the true parameters in the model's standardised coordinates
    to_user = ridge._to_user()  # [1 + d, 1 + d], invertible: every feature varies
    inv = np.linalg.inv(to_user)
    beta = inv @ (BETA - np.r_[ridge.y_mean, 0.0, 0.0])
    cov = inv @ G @ inv.T
    noise = NOISE / ridge.y_sd**2
    z = ridge._design(data.x)
    sums = _Sums(*_task_sums(z, (data.y - ridge.y_mean) / ridge.y_sd, data.task))
    *_, truth = _em_step(sums, beta, cov, noise, 1e-6, 1e-6, _structure_mask("full", 3))
    assert ridge.model.loglik >= truth
    # and that likelihood is the multivariate normal density of each task's labels
    y = (data.y - ridge.y_mean) / ridge.y_sd
    m = ridge.model
    direct = sum(
        multivariate_normal(
            z[data.task == t] @ m.beta,
            z[data.task == t] @ m.cov @ z[data.task == t].T + m.noise * np.eye(6),
        ).logpdf(y[data.task == t])
        for t in range(150)
    )
    assert m.loglik == pytest.approx(direct, rel=1e-9)


def test_task_ridge_updates_equal_the_closed_form_posterior():
    rng = np.random.default_rng(3)
    data = TrainingData(*population(rng, 200, 10), "regression")
    ridge = TaskRidge(data, structure="full")
    x, y, _ = population(rng, 1, 7)
    for i in range(7):
        ridge.learn("t", x[i], y[i])
    # Bayesian linear regression: posterior mean (S / s2 + G^-1)^-1 Z'r / s2, standardised units
    m = ridge.model
    z = ridge._design(x)
    r = (y - ridge.y_mean) / ridge.y_sd - z @ m.beta
    post = np.linalg.solve(z.T @ z / m.noise + np.linalg.inv(m.cov), z.T @ r / m.noise)
    x_new = np.array([0.5, -2.0])
    expected = ridge.y_mean + ridge.y_sd * float(ridge._design(x_new)[0] @ (m.beta + post))
    assert float(ridge.predict("t", x_new)) == pytest.approx(expected, rel=1e-9)
    # an unseen task gets the fixed part
    fixed = ridge.y_mean + ridge.y_sd * float(ridge._design(x_new)[0] @ m.beta)
    assert float(ridge.predict("other", x_new)) == pytest.approx(fixed, rel=1e-12)


def test_task_ridge_shrinks_to_the_pooled_fit_without_task_effects():
    rng = np.random.default_rng(4)
    zero = np.zeros((3, 3))
    data = TrainingData(*population(rng, 200, 10, cov=zero), "regression")
    models = baselines(data)
    ridge = models[-1]
    assert np.trace(ridge.task_covariance) < 0.05 * NOISE
    out = mean_losses(models, stream(rng, *population(rng, 100, 10, cov=zero)))
    assert out["task-ridge"] < 1.03 * out["pooled-linear"], out
    assert out["pooled-linear"] < 1.1 * NOISE


def test_losses_and_predictions_follow_the_units_of_y():
    rng = np.random.default_rng(5)
    x, y, task = population(rng, 100, 8)
    events = stream(rng, *population(rng, 30, 8))
    grams = baselines(TrainingData(x, y, task, "regression"))
    mg = baselines(TrainingData(x, 1000.0 * y, task, "regression"))
    before = prequential(grams, events)
    after = prequential(mg, [(t, xi, 1000.0 * yi) for t, xi, yi in events])
    for name, losses in before.items():
        np.testing.assert_allclose(after[name], 1e6 * np.asarray(losses), rtol=1e-6, err_msg=name)
    probe = np.array([0.3, 4.0])
    for a, b in zip(grams, mg, strict=True):
        for task_id in ("new-0", "never-seen"):
            assert float(b.predict(task_id, probe)) == pytest.approx(
                1000.0 * float(a.predict(task_id, probe)), rel=1e-6
            )


def test_unlabelled_events_are_predicted_not_learned():
    rng = np.random.default_rng(6)
    models = baselines(TrainingData(*population(rng, 50, 5), "regression"))
    out = prequential(models, [("a", [0.0, 0.0], 10.0), ("a", [0.0, 0.0], None)])
    last = out["task-last"]
    assert last[1] is None
    before = float(models[3].predict("a", [0.0, 0.0]))
    prequential(models, [("a", [1.0, 1.0], None)])
    assert float(models[3].predict("a", [0.0, 0.0])) == before == 10.0


@pytest.mark.parametrize(
    "case",
    ["single-row tasks", "one training row", "constant feature", "collinear", "d=1", "constant y"],
)
def test_degenerate_training_data_fits_and_predicts_finitely(case):
    rng = np.random.default_rng(7)
    x, y, task = population(rng, 30, 4)
    if case == "single-row tasks":
        task = np.arange(len(y))
    elif case == "one training row":
        x, y, task = x[:1], y[:1], task[:1]
    elif case == "constant feature":
        x = np.c_[x, np.full(len(y), 3.0)]
    elif case == "collinear":
        x = np.c_[x, x[:, 0] - 2 * x[:, 1]]
    elif case == "d=1":
        x = x[:, :1]
    elif case == "constant y":
        y = np.full(len(y), 7.0)
    d = x.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = baselines(TrainingData(x, y, task, "regression"))
        events = [("a", rng.normal(size=d) * 10, 1.0), ("a", np.ones(d), None)]
        events += [("a", rng.normal(size=d), float(v)) for v in rng.normal(size=3)]
        events += [("b", rng.normal(size=d), 2.0)]
        out = prequential(models, events)
    for name, losses in out.items():
        assert all(v is None or math.isfinite(v) for v in losses), (name, losses)
        assert losses[1] is None
    if case == "constant y":
        assert out["pooled-linear"][0] == out["pooled-mean"][0] == 36.0


def test_g_structures_with_more_free_entries_than_tasks_are_not_tried():
    rng = np.random.default_rng(12)
    d = 50
    cov = np.diag(np.r_[1.0, 0.5, np.zeros(d - 1)])
    x, y, task = population(rng, 40, 3, cov=cov, beta=rng.normal(size=d + 1))
    ridge = TaskRidge(TrainingData(x, y, task, "regression"))
    assert set(ridge.candidates) == {"intercept"}  # 51 variances > 40 tasks
    x, y, task = population(rng, 30, 3, cov=cov[:11, :11], beta=rng.normal(size=11))
    ridge = TaskRidge(TrainingData(x, y, task, "regression"))
    assert set(ridge.candidates) == {"intercept", "diagonal"}  # 11 variances, 66 entries
    p = ridge.predict("t", x[0])
    ridge.learn("t", x[0], y[0])
    assert math.isfinite(float(p)) and math.isfinite(float(ridge.predict("t", x[1])))


# -- classification -----------------------------------------------------------------------------
def classes_population(rng, tasks, rows, *, concentration, informative):
    """Class labels 0..2 with per-task rates ``Dirichlet(concentration)``, optionally shifted
    by a linear function of ``x [., 2]`` shared by all tasks: ``(x, y, task)``."""
    rates = rng.dirichlet(np.full(3, concentration), size=tasks)
    task = np.repeat(np.arange(tasks), rows)
    x = rng.normal(size=(len(task), 2))
    logits = np.log(rates[task])
    if informative:
        logits = 3.0 * x @ np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) < rng.random(len(task))[:, None]).sum(1)
    return x, y, task


def test_task_frequency_beats_pooled_when_task_rates_differ():
    rng = np.random.default_rng(8)
    x, y, task = classes_population(rng, 200, 20, concentration=0.5, informative=False)
    models = baselines(TrainingData(x, y, task, "classification", 3))
    assert [m.name for m in models] == ["pooled-frequency", "pooled-logistic", "task-frequency"]
    # the prior strength is the Dirichlet's total concentration, 1.5
    assert 0.75 < models[2].strength < 3.0
    out = mean_losses(
        models, stream(rng, *classes_population(rng, 100, 20, concentration=0.5, informative=False))
    )
    assert out["task-frequency"] < 0.8 * out["pooled-frequency"], out


def test_pooled_logistic_beats_pooled_frequency_when_x_is_informative():
    rng = np.random.default_rng(9)
    data = TrainingData(
        *classes_population(rng, 100, 10, concentration=1.0, informative=True), "classification"
    )
    models = baselines(data)
    out = mean_losses(
        models, stream(rng, *classes_population(rng, 50, 10, concentration=1.0, informative=True))
    )
    assert out["pooled-logistic"] < 0.7 * out["pooled-frequency"], out
    p = models[1].predict("t", [0.2, -0.1])
    assert p.shape == (3,) and p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_pooled_logistic_is_sklearns_on_standardised_x(n_classes):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(200, 2)) * [1.0, 1000.0] + [0.0, 5000.0]  # scales far apart
    y = (x[:, 0] + (x[:, 1] - 5000.0) / 1000.0 + rng.normal(size=200) > 0).astype(int)
    if n_classes == 3:
        y[x[:, 0] > 1.0] = 2
    model = fitted(TrainingData(x, y, np.arange(200) % 10, "classification"), "pooled-logistic")
    xs = (x - x.mean(0)) / x.std(0)
    expected = LogisticRegression(max_iter=1000).fit(xs, y).predict_proba(xs[:5])
    got = np.stack([model.predict("t", row) for row in x[:5]])
    np.testing.assert_allclose(got, expected, rtol=1e-9)


@pytest.mark.parametrize("seen", [(0, 1), (1,)])
def test_a_class_never_seen_in_training_has_a_finite_loss(seen):
    rng = np.random.default_rng(10)
    task = np.repeat(np.arange(20), 5)
    y = rng.choice(seen, size=100)
    x = np.c_[rng.normal(size=100), np.ones(100)]  # and a constant feature
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = baselines(TrainingData(x, y, task, "classification", 3))
        out = prequential(models, [("a", x[0], 2), ("a", x[1], 2), ("a", x[2], None)])
    for name, losses in out.items():
        assert math.isfinite(losses[0]) and math.isfinite(losses[1]), name
        assert losses[0] <= -math.log(1e-6) + 1e-9
    # the frequencies keep some mass on the unseen class, and the task learns it
    assert models[0].predict("a", x[0])[2] > 0
    assert out["task-frequency"][1] < out["task-frequency"][0]


# -- loss and data checks -----------------------------------------------------------------------
def test_loss():
    assert loss("regression", np.asarray(2.5), 1.0) == 2.25
    p = np.array([0.2, 0.8, 0.0])
    assert loss("classification", p, 1) == pytest.approx(-math.log(0.8))
    assert loss("classification", p, 2) == pytest.approx(-math.log(1e-6))
    with pytest.raises(ValueError, match="class index"):
        loss("classification", p, 3)


def test_training_data_is_checked():
    x, task = np.zeros((3, 2)), np.array([0, 0, 1])
    with pytest.raises(ValueError, match="class indices"):
        TrainingData(x, np.array([0.5, 1.0, 0.0]), task, "classification")
    with pytest.raises(ValueError, match="n_classes"):
        TrainingData(x, np.array([0, 1, 2]), task, "classification", 2)
    with pytest.raises(ValueError, match="kind"):
        TrainingData(x, np.zeros(3), task, "ranking")
    with pytest.raises(ValueError, match=r"\[N\]"):
        TrainingData(x, np.zeros(4), task, "regression")
    assert TrainingData(x, np.array([0, 2, 1]), task, "classification").n_classes == 3
