"""Task families: the shared contract, sinusoid, digits and the family registry."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from stream_meta.tasks import (
    FAMILIES,
    BanditFamily,
    DigitsFamily,
    SinusoidFamily,
    TaskFamily,
    get_family,
)
from stream_meta.tasks.digits import (
    TRANSFORM_NAMES,
    TRANSFORM_RANGES,
    _bilinear_taps,
    _dataset,
    nearest_centroid_accuracy,
)

FAMILY_FACTORIES = {
    "sinusoid": lambda: SinusoidFamily(),
    "sinusoid-noisy": lambda: SinusoidFamily(noise_std=0.1),
    "digits-train": lambda: DigitsFamily("train"),
    "digits-test-3way": lambda: DigitsFamily("test", n_way=3),
    "bandit": lambda: BanditFamily(),
}


@pytest.fixture(params=sorted(FAMILY_FACTORIES), ids=str)
def family(request: pytest.FixtureRequest) -> TaskFamily:
    return FAMILY_FACTORIES[request.param]()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def identity_transform(family: DigitsFamily, classes: list[list[int]]) -> np.ndarray:
    """Params of tasks with the given classes and no rotation, shift, contrast change or noise."""
    cls = np.asarray(classes, dtype=np.float64)
    neutral = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    return np.column_stack([cls, np.broadcast_to(neutral, (len(cls), 6))])


def digit_of_images(x: np.ndarray) -> np.ndarray:
    """The dataset index of each untransformed image in ``x [..., 64]`` (exact match)."""
    images, _ = _dataset()
    flat = x.reshape(-1, 64)
    d = ((flat[:, None, :] - images[None, :, :]) ** 2).sum(-1)
    assert np.allclose(d.min(axis=1), 0.0, atol=1e-10)
    return d.argmin(axis=1).reshape(x.shape[:-1])


# -- the contract, for every family ----------------------------------------------------------


def test_sample_has_contract_shapes_and_dtypes_when_any_family(family: TaskFamily) -> None:
    params = family.sample_params(7, rng())
    assert params.shape == (7, family.param_dim) and params.dtype == np.float64
    x, y = family.sample(params, 4, rng(1))
    assert x.shape == (7, 4, family.x_dim) and x.dtype == np.float32
    assert y.shape == (7, 4)
    if family.kind == "regression":
        assert y.dtype == np.float32 and family.y_dim == 1 and family.loss_name == "mse"
    else:
        assert y.dtype == np.int64 and family.y_dim == family.n_classes
        assert family.loss_name == "cross_entropy" and family.metric_name == "accuracy"
        assert y.min() >= 0 and y.max() < family.n_classes


def test_draws_are_identical_when_seeds_are_equal(family: TaskFamily) -> None:
    def draw(seed: int) -> tuple[np.ndarray, ...]:
        r = rng(seed)
        params = family.sample_params(5, r)
        near = family.perturb(params, 0.1, r)
        x, y = family.sample(near, 6, r)
        return params, near, x, y

    for a, b in zip(draw(3), draw(3), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(draw(3)[2], draw(4)[2])


def test_perturb_returns_the_same_task_when_spread_is_zero(family: TaskFamily) -> None:
    params = family.sample_params(6, rng())
    np.testing.assert_array_equal(family.perturb(params, 0.0, rng(1)), params)


def test_perturb_moves_tasks_a_little_when_spread_is_small(family: TaskFamily) -> None:
    params = family.sample_params(200, rng())
    small = np.abs(family.perturb(params, 0.01, rng(1)) - params).mean()
    large = np.abs(family.perturb(params, 0.3, rng(1)) - params).mean()
    assert 0 < small < large


def test_sample_episode_splits_support_and_query_when_called(family: TaskFamily) -> None:
    params = family.sample_params(3, rng())
    xs, ys, xq, yq = family.sample_episode(params, 2, 5, rng(1))
    per = family.n_classes or 1
    assert xs.shape == (3, 2 * per, family.x_dim) and ys.shape == (3, 2 * per)
    assert xq.shape == (3, 5 * per, family.x_dim) and yq.shape == (3, 5 * per)
    if family.n_classes is not None:
        for labels, k in ((ys, 2), (yq, 5)):
            assert all((np.bincount(row, minlength=per) == k).all() for row in labels)


def test_sample_returns_empty_arrays_when_batch_or_count_is_zero(family: TaskFamily) -> None:
    x, y = family.sample(family.sample_params(0, rng()), 4, rng())
    assert x.shape == (0, 4, family.x_dim) and y.shape == (0, 4)
    x, y = family.sample(family.sample_params(3, rng()), 0, rng())
    assert x.shape == (3, 0, family.x_dim) and y.shape == (3, 0)


def test_check_params_raises_when_shape_is_wrong(family: TaskFamily) -> None:
    with pytest.raises(ValueError, match="params must have shape"):
        family.sample(np.zeros((2, family.param_dim + 1)), 3, rng())


# -- sinusoid --------------------------------------------------------------------------------


def test_sinusoid_params_and_inputs_lie_in_their_ranges_when_defaults() -> None:
    fam = SinusoidFamily()
    params = fam.sample_params(5000, rng())
    assert params[:, 0].min() >= 0.1 and params[:, 0].max() <= 5.0
    assert params[:, 1].min() >= 0.0 and params[:, 1].max() <= math.pi
    x, _ = fam.sample(params[:50], 100, rng(1))
    assert x.min() >= -5.0 and x.max() <= 5.0
    assert x.min() < -4.9 and x.max() > 4.9


def test_sinusoid_y_equals_the_formula_when_noise_is_off() -> None:
    fam = SinusoidFamily()
    params = fam.sample_params(10, rng())
    x, y = fam.sample(params, 20, rng(1))
    want = params[:, :1] * np.sin(x[..., 0].astype(np.float64) - params[:, 1:])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fam.evaluate(params, x), want, rtol=1e-5, atol=1e-5)


def test_sinusoid_y_has_the_noise_std_when_noise_is_on() -> None:
    fam = SinusoidFamily(noise_std=0.5)
    params = fam.sample_params(50, rng())
    x, y = fam.sample(params, 200, rng(1))
    assert abs((y - fam.evaluate(params, x)).std() - 0.5) < 0.02


def test_sinusoid_respects_custom_ranges_when_given() -> None:
    fam = get_family("sinusoid", amplitude=(2.0, 3.0), phase=(1.0, 1.5), x_range=(0.0, 1.0))
    params = fam.sample_params(1000, rng())
    assert params[:, 0].min() >= 2.0 and params[:, 0].max() <= 3.0
    assert params[:, 1].min() >= 1.0 and params[:, 1].max() <= 1.5
    moved = fam.perturb(params, 5.0, rng(1))
    assert moved[:, 0].min() >= 2.0 and moved[:, 0].max() <= 3.0
    assert moved[:, 1].min() >= 1.0 and moved[:, 1].max() <= 1.5
    x, _ = fam.sample(params[:10], 50, rng(2))
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_sinusoid_phase_wraps_when_range_is_a_full_period() -> None:
    fam = SinusoidFamily(phase=(0.0, 2 * math.pi))
    params = np.array([[1.0, 2 * math.pi - 1e-3]] * 500)
    moved = fam.perturb(params, 0.05, rng())
    assert moved[:, 1].min() >= 0.0 and moved[:, 1].max() < 2 * math.pi
    assert (moved[:, 1] < 1.0).any()  # some crossed the period boundary and wrapped


def test_sinusoid_sample_raises_when_per_class_is_requested() -> None:
    fam = SinusoidFamily()
    with pytest.raises(ValueError, match="classification"):
        fam.sample(fam.sample_params(2, rng()), 3, rng(), per_class=True)


def test_sinusoid_raises_when_a_range_is_inverted() -> None:
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidFamily(amplitude=(5.0, 0.1))


# -- digits ----------------------------------------------------------------------------------


def test_digits_image_splits_are_disjoint_and_stratified_when_seeded() -> None:
    train, test = DigitsFamily("train").image_indices, DigitsFamily("test").image_indices
    _, targets = _dataset()
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).size == len(targets) == 1797
    frac = np.bincount(targets[train], minlength=10) / np.bincount(targets, minlength=10)
    assert np.abs(frac - 0.7).max() < 0.01
    other = DigitsFamily("train", seed=1).image_indices
    assert not np.array_equal(train, other)


def test_digits_transform_params_lie_in_disjoint_ranges_when_split_differs() -> None:
    train, test = DigitsFamily("train"), DigitsFamily("test")
    p_train, p_test = train.sample_params(3000, rng()), test.sample_params(3000, rng(1))
    p_train = np.vstack([p_train, train.perturb(p_train, 0.5, rng(2))])
    p_test = np.vstack([p_test, test.perturb(p_test, 0.5, rng(3))])
    for j, name in enumerate(TRANSFORM_NAMES, start=5):
        r_train, r_test = TRANSFORM_RANGES["train"][name], TRANSFORM_RANGES["test"][name]
        assert r_train.contains(p_train[:, j]).all(), name
        assert r_test.contains(p_test[:, j]).all(), name
        assert not r_test.contains(p_train[:, j]).any(), name
        assert not r_train.contains(p_test[:, j]).any(), name
    rot_train, rot_test = np.abs(p_train[:, 5]), np.abs(p_test[:, 5])
    assert rot_train.max() <= 15.0 and rot_test.min() > 15.0 and rot_test.max() <= 25.0
    noise_train, noise_test = p_train[:, -1], p_test[:, -1]
    assert noise_train.min() >= 0.0 and noise_train.max() <= 0.05
    assert noise_test.min() > 0.05 and noise_test.max() <= 0.10


@settings(max_examples=40, deadline=None)
@given(
    split=st.sampled_from(["train", "test"]),
    spread=st.floats(0.0, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_digits_perturb_stays_in_the_split_when_spread_is_any(
    split: str, spread: float, seed: int
) -> None:
    fam = DigitsFamily(split)  # type: ignore[arg-type]
    params = fam.sample_params(20, rng(seed))
    moved = fam.perturb(params, spread, rng(seed + 1))
    np.testing.assert_array_equal(moved[:, :5], params[:, :5])
    for j, name in enumerate(TRANSFORM_NAMES, start=5):
        assert TRANSFORM_RANGES[split][name].contains(moved[:, j]).all()  # type: ignore[index]


def test_digits_classes_are_distinct_and_permuted_when_sampling_tasks() -> None:
    params = DigitsFamily("train").sample_params(500, rng())
    classes = params[:, :5].astype(int)
    assert all(len(set(row)) == 5 for row in classes.tolist())
    assert classes.min() == 0 and classes.max() == 9
    assert len({tuple(row) for row in classes.tolist()}) > 400  # order differs per task
    # every digit takes every label position in some task
    for label in range(5):
        assert set(classes[:, label].tolist()) == set(range(10))


def test_digits_label_i_shows_the_ith_class_when_transform_is_neutral() -> None:
    fam = DigitsFamily("train")
    classes = [[3, 1, 4, 0, 9], [9, 0, 4, 1, 3]]
    x, y = fam.sample(identity_transform(fam, classes), 4, rng(), per_class=True)
    _, targets = _dataset()
    image_idx = digit_of_images(x)
    np.testing.assert_array_equal(targets[image_idx], np.asarray(classes)[np.arange(2)[:, None], y])
    assert np.isin(image_idx, fam.image_indices).all()


def test_digits_per_class_draws_are_balanced_and_distinct_when_per_class() -> None:
    fam = DigitsFamily("test")
    params = identity_transform(fam, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    x, y = fam.sample(params, 20, rng(), per_class=True)
    assert x.shape == (2, 100, 64)
    for row in y:
        np.testing.assert_array_equal(np.bincount(row, minlength=5), [20] * 5)
        assert (np.diff(row) != 0).any()  # shuffled, not grouped
    image_idx = digit_of_images(x)
    assert all(len(set(row)) == 100 for row in image_idx.tolist())
    assert np.isin(image_idx, fam.image_indices).all()


def test_digits_images_stay_in_the_split_when_labels_are_random() -> None:
    fam = DigitsFamily("test")
    params = identity_transform(fam, [[0, 1, 2, 3, 4]] * 8)
    x, y = fam.sample(params, 30, rng())
    assert y.shape == (8, 30) and set(np.unique(y).tolist()) == set(range(5))
    assert np.isin(digit_of_images(x), fam.image_indices).all()


@pytest.mark.parametrize(
    ("rotation", "shift_row", "shift_col"),
    [(0.0, 0.0, 0.0), (12.0, 0.2, -0.25), (-22.0, -0.5, 0.45)],
    ids=["identity", "train-like", "test-like"],
)
def test_bilinear_taps_match_scipy_when_rotating_and_shifting(
    rotation: float, shift_row: float, shift_col: float
) -> None:
    images, _ = _dataset()
    img = images[17].astype(np.float64)
    src, w = _bilinear_taps(np.array([rotation]), np.array([shift_row]), np.array([shift_col]))
    mine = (img[src[0]].reshape(64, 4) * w[0]).sum(-1)
    t = math.radians(rotation)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    centre, shift = np.array([3.5, 3.5]), np.array([shift_row, shift_col])
    want = ndimage.affine_transform(
        img.reshape(8, 8),
        rot,
        offset=centre - rot @ (centre + shift),
        order=1,
        mode="grid-constant",
    )
    np.testing.assert_allclose(mine, want.ravel(), atol=1e-5)


def test_digits_pixels_follow_contrast_brightness_and_noise_when_set() -> None:
    fam = DigitsFamily("train")
    plain = identity_transform(fam, [[0, 1, 2, 3, 4]])
    changed = plain.copy()
    changed[0, -3:] = [1.2, 0.05, 0.0]  # contrast, brightness, noise_std
    x0, _ = fam.sample(plain, 10, rng(), per_class=True)
    x1, _ = fam.sample(changed, 10, rng(), per_class=True)
    np.testing.assert_allclose(x1, np.clip(1.2 * x0 + 0.05, 0, 1), atol=1e-6)
    noisy = plain.copy()
    noisy[0, -1] = 0.05
    x2, _ = fam.sample(noisy, 10, rng(), per_class=True)
    assert abs((x2 - x0).std() - 0.05) < 0.005


def test_nearest_centroid_is_well_above_chance_when_5way_5shot_on_test_split() -> None:
    fam = DigitsFamily("test")
    xs, ys, xq, yq = fam.sample_episode(fam.sample_params(64, rng()), 5, 15, rng(1))
    assert nearest_centroid_accuracy(xs, ys, xq, yq) > 0.6


def test_nearest_centroid_is_perfect_when_support_equals_query() -> None:
    fam = DigitsFamily("test")
    x, y = fam.sample(fam.sample_params(16, rng()), 1, rng(1), per_class=True)
    assert nearest_centroid_accuracy(x, y, x, y) == 1.0
    assert nearest_centroid_accuracy(x[0], y[0], x[0], y[0]) == 1.0  # one task, [S, D]


def test_nearest_centroid_never_predicts_a_class_when_it_has_no_support() -> None:
    xs = np.array([[[0.0], [1.0]]])
    ys = np.array([[0, 1]])
    xq = np.array([[[5.0], [0.1]]])
    yq = np.array([[2, 0]])  # class 2 has no support: the best it can score is 1/2
    assert nearest_centroid_accuracy(xs, ys, xq, yq) == 0.5


@pytest.mark.parametrize(
    "kwargs", [{"split": "val"}, {"n_way": 1}, {"n_way": 11}], ids=["split", "n_way=1", "n_way=11"]
)
def test_digits_raises_when_arguments_are_invalid(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DigitsFamily(**kwargs)  # type: ignore[arg-type]


# -- registry and imports --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sinusoid", SinusoidFamily), ("digits", DigitsFamily), ("bandit", BanditFamily)],
    ids=FAMILIES,
)
def test_get_family_builds_the_family_when_name_is_known(name: str, cls: type) -> None:
    assert name in FAMILIES
    fam = get_family(name)
    assert isinstance(fam, cls) and isinstance(fam, TaskFamily) and fam.name == name


def test_get_family_lists_known_names_when_name_is_unknown() -> None:
    with pytest.raises(ValueError, match="sinusoid, digits"):
        get_family("omniglot")


def test_import_is_inert_when_package_is_imported() -> None:
    code = (
        "import sys, stream_meta.tasks as t; "
        "assert not any(m.startswith(('sklearn', 'scipy')) for m in sys.modules); "
        "assert t.digits._dataset.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
