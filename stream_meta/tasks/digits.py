"""Few-shot digit classification from scikit-learn's bundled 8x8 digits (1797 images, 10 classes).

A task picks ``n_way`` distinct digit classes in a random order (label ``i`` is the ``i``-th
chosen class, so labels are permuted per task) and one *transform* applied to every image of the
task: a rotation, a sub-pixel shift (both by bilinear resampling), a contrast/brightness affine on
the intensities (then clipped to ``[0, 1]``) and additive Gaussian pixel noise drawn per image.
Pixels are scaled to ``[0, 1]``; ``x_dim = 64``.

Meta-train and meta-test are disjoint in both images and transforms:

* images: a fixed, seeded (``seed``), stratified 70/30 split of the 1797 images; the ``"train"``
  family only ever shows train images, the ``"test"`` family only test images;
* transforms: every transform parameter comes from disjoint ranges per split (see
  ``TRANSFORM_RANGES``). With ``m = |value - centre|``:

  ============  ======  ==================  =====================  =====
  parameter     centre  train ``m``         test ``m``             sign
  ============  ======  ==================  =====================  =====
  rotation_deg  0       ``[0, 15]``         ``(15, 25]``           +/-
  shift_row     0       ``[0, 0.3]`` px     ``(0.3, 0.6]`` px      +/-
  shift_col     0       ``[0, 0.3]`` px     ``(0.3, 0.6]`` px      +/-
  contrast      1       ``[0, 0.2]``        ``(0.2, 0.35]``        +/-
  brightness    0       ``[0, 0.1]``        ``(0.1, 0.2]``         +/-
  noise_std     0       ``[0, 0.05]``       ``(0.05, 0.10]``       +
  ============  ======  ==================  =====================  =====

A task's parameter row is ``[class_0, ..., class_{n_way-1}, rotation_deg, shift_row, shift_col,
contrast, brightness, noise_std]`` (the class ids stored as floats).

>>> import numpy as np
>>> family = DigitsFamily("train", n_way=5, seed=0)
>>> rng = np.random.default_rng(0)
>>> params = family.sample_params(2, rng)  # [B, 5 + 6]
>>> x, y = family.sample(params, 3, rng, per_class=True)  # 3-shot, 5-way
>>> x.shape, x.dtype.name, y.shape, y.dtype.name
((2, 15, 64), 'float32', (2, 15), 'int64')
>>> np.bincount(y[0]).tolist()
[3, 3, 3, 3, 3]
>>> nearest_centroid_accuracy(x, y, x, y) > 0.5
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

from stream_meta.tasks.base import FloatArray, Kind, TaskFamily

__all__ = ["TRANSFORM_RANGES", "DigitsFamily", "TransformRange", "nearest_centroid_accuracy"]

Split = Literal["train", "test"]

N_DIGIT_CLASSES = 10
IMAGE_SIDE = 8
TRAIN_FRACTION = 0.7
_MATMUL_MIN_IMAGES = 8  # images per task from which dense resampling matrices pay off
_DEDUPE_MIN_TASKS = 256  # tasks per call from which repeated geometries are resampled once


@dataclass(frozen=True, slots=True)
class TransformRange:
    """Values ``centre +/- m`` (``+ m`` only when not ``signed``) with ``m`` in ``[low, high]``.

    ``low`` is exclusive when ``low > 0``, so that ranges of the two splits never touch. Bounds
    are compared in value space (``centre + low`` etc. as floats), so membership is exact.
    """

    centre: float
    low: float
    high: float
    signed: bool = True

    def contains(self, values: NDArray[np.floating]) -> NDArray[np.bool_]:
        """Elementwise membership of ``values`` in this range."""
        v = np.asarray(values, dtype=np.float64)
        c, lo, hi = self.centre, self.low, self.high
        upper = (v <= c + hi) & ((v > c + lo) if lo > 0 else (v >= c + lo))
        if not self.signed:
            return upper
        lower = (v >= c - hi) & ((v < c - lo) if lo > 0 else (v <= c - lo))
        return upper | lower

    def sample(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``n`` values, uniform over the range."""
        m = self.low + (self.high - self.low) * rng.random(n)
        positive = rng.random(n) < 0.5 if self.signed else np.ones(n, dtype=bool)
        return self._clip(np.where(positive, self.centre + m, self.centre - m), positive)

    def perturb(self, values: FloatArray, spread: float, rng: np.random.Generator) -> FloatArray:
        """Gaussian steps of ``spread`` times the width of ``m``'s range, kept in the range."""
        step = spread * (self.high - self.low) * rng.standard_normal(values.shape)
        c = self.centre
        if self.low == 0 and self.signed:  # one interval around the centre
            return np.clip(values + step, c - self.high, c + self.high)
        positive = values >= c if self.signed else np.ones(values.shape, dtype=bool)
        m = np.abs(values - c) + step
        return self._clip(np.where(positive, c + m, c - m), positive)

    def _clip(self, v: FloatArray, positive: NDArray[np.bool_]) -> FloatArray:
        """Clip ``v`` into the positive or the negative side of the range, in value space."""
        c, lo, hi = self.centre, self.low, self.high
        pos = np.clip(v, np.nextafter(c + lo, np.inf) if lo > 0 else c + lo, c + hi)
        neg = np.clip(v, c - hi, np.nextafter(c - lo, -np.inf) if lo > 0 else c - lo)
        return np.where(positive, pos, neg)


TRANSFORM_NAMES = ("rotation_deg", "shift_row", "shift_col", "contrast", "brightness", "noise_std")

TRANSFORM_RANGES: dict[Split, dict[str, TransformRange]] = {
    "train": {
        "rotation_deg": TransformRange(0.0, 0.0, 15.0),
        "shift_row": TransformRange(0.0, 0.0, 0.3),
        "shift_col": TransformRange(0.0, 0.0, 0.3),
        "contrast": TransformRange(1.0, 0.0, 0.2),
        "brightness": TransformRange(0.0, 0.0, 0.1),
        "noise_std": TransformRange(0.0, 0.0, 0.05, signed=False),
    },
    "test": {
        "rotation_deg": TransformRange(0.0, 15.0, 25.0),
        "shift_row": TransformRange(0.0, 0.3, 0.6),
        "shift_col": TransformRange(0.0, 0.3, 0.6),
        "contrast": TransformRange(1.0, 0.2, 0.35),
        "brightness": TransformRange(0.0, 0.1, 0.2),
        "noise_std": TransformRange(0.0, 0.05, 0.10, signed=False),
    },
}


@functools.cache
def _dataset() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """All 1797 images ``[N, 64]`` in ``[0, 1]`` and their digits ``[N]`` (loaded once)."""
    from sklearn.datasets import load_digits  # lazy: keeps imports inert and fast

    data = load_digits()
    images = np.ascontiguousarray(data.images.reshape(-1, IMAGE_SIDE * IMAGE_SIDE) / 16.0)
    images = images.astype(np.float32)
    targets = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


@functools.cache
def _split_indices(split: Split, seed: int) -> NDArray[np.int64]:
    """Sorted dataset indices of ``split``: a stratified ``TRAIN_FRACTION`` split per ``seed``."""
    _, targets = _dataset()
    rng = np.random.default_rng(seed)
    chosen = []
    for digit in range(N_DIGIT_CLASSES):
        members = rng.permutation(np.flatnonzero(targets == digit))
        n_train = round(TRAIN_FRACTION * len(members))
        chosen.append(members[:n_train] if split == "train" else members[n_train:])
    out = np.sort(np.concatenate(chosen))
    out.setflags(write=False)
    return out


def _bilinear_taps(
    rotation_deg: FloatArray, shift_row: FloatArray, shift_col: FloatArray
) -> tuple[NDArray[np.intp], NDArray[np.float32]]:
    """Per-task bilinear resampling taps of a rotation about the centre, then a shift.

    Output pixel ``o`` of task ``b`` is ``sum_k w[b, o, k] * image[src[b, o, k]]`` and reads the
    input at ``R(theta) (o - centre - shift) + centre``; pixels outside the image count as 0
    (``scipy.ndimage.affine_transform(..., order=1, mode="grid-constant")``).

    Returns:
        ``src [B, 64 * 4]`` flat input-pixel indices and ``w [B, 64, 4]`` weights.
    """
    side = IMAGE_SIDE
    centre = np.float32((side - 1) / 2.0)
    rows, cols = np.divmod(np.arange(side * side, dtype=np.float32), np.float32(side))
    theta = np.deg2rad(np.asarray(rotation_deg, dtype=np.float32))[:, None]
    cos, sin = np.cos(theta), np.sin(theta)
    dr = rows - centre - np.asarray(shift_row, dtype=np.float32)[:, None]  # [B, 64]
    dc = cols - centre - np.asarray(shift_col, dtype=np.float32)[:, None]
    src_r = cos * dr - sin * dc + centre
    src_c = sin * dr + cos * dc + centre
    r0, c0 = np.floor(src_r), np.floor(src_c)
    fr, fc = src_r - r0, src_c - c0
    # separable weights, zero for taps outside the image
    wr0 = np.where((r0 >= 0) & (r0 < side), 1 - fr, 0)
    wr1 = np.where((r0 >= -1) & (r0 < side - 1), fr, 0)
    wc0 = np.where((c0 >= 0) & (c0 < side), 1 - fc, 0)
    wc1 = np.where((c0 >= -1) & (c0 < side - 1), fc, 0)
    ir0 = np.clip(r0, 0, side - 1).astype(np.intp) * side
    ir1 = np.clip(r0 + 1, 0, side - 1).astype(np.intp) * side
    ic0 = np.clip(c0, 0, side - 1).astype(np.intp)
    ic1 = np.clip(c0 + 1, 0, side - 1).astype(np.intp)
    b = src_r.shape[0]
    w = np.empty((b, side * side, 4), dtype=np.float32)
    src = np.empty((b, side * side, 4), dtype=np.intp)
    for k, (wr, wc, ir, ic) in enumerate(
        ((wr0, wc0, ir0, ic0), (wr0, wc1, ir0, ic1), (wr1, wc0, ir1, ic0), (wr1, wc1, ir1, ic1))
    ):
        np.multiply(wr, wc, out=w[..., k])
        np.add(ir, ic, out=src[..., k])
    return src.reshape(b, 4 * side * side), w


def _warp_matrices(src: NDArray[np.intp], w: NDArray[np.float32]) -> NDArray[np.float32]:
    """Dense resampling matrices ``[B, 64 out, 64 in]`` from the taps of ``_bilinear_taps``."""
    b, pixels = w.shape[0], IMAGE_SIDE * IMAGE_SIDE
    out_pixel = np.repeat(np.arange(pixels), 4)
    flat = (np.arange(b)[:, None] * pixels + out_pixel) * pixels + src  # [B, 64 * 4]
    dense = np.bincount(flat.ravel(), weights=w.ravel(), minlength=b * pixels * pixels)
    return dense.astype(np.float32).reshape(b, pixels, pixels)


class DigitsFamily(TaskFamily):
    """``n_way``-way classification of transformed 8x8 digits; see the module docstring.

    Args:
        split: ``"train"`` or ``"test"``: which images and which transform ranges.
        n_way: classes per task (2 to 10).
        seed: seed of the image split (the same for both splits of one experiment).
    """

    name: ClassVar[str] = "digits"
    x_dim = IMAGE_SIDE * IMAGE_SIDE
    kind: Kind = "classification"

    def __init__(self, split: Split = "train", n_way: int = 5, seed: int = 0) -> None:
        if split not in TRANSFORM_RANGES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 2 <= n_way <= N_DIGIT_CLASSES:
            raise ValueError(f"n_way must be in [2, {N_DIGIT_CLASSES}], got {n_way}")
        self.split: Split = split
        self.n_way = int(n_way)
        self.n_classes: int | None = self.n_way
        self.seed = int(seed)
        self.ranges = TRANSFORM_RANGES[split]
        self.param_names = (*(f"class_{i}" for i in range(self.n_way)), *TRANSFORM_NAMES)

    def _describe(self) -> str:
        return f"split={self.split!r}, n_way={self.n_way}, seed={self.seed}"

    @property
    def image_indices(self) -> NDArray[np.int64]:
        """Indices into ``load_digits()`` of the images this split draws from (sorted)."""
        return _split_indices(self.split, self.seed)

    @functools.cached_property
    def _class_slots(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``slots [10, M]`` (dataset indices of each digit, padded) and ``counts [10]``."""
        _, targets = _dataset()
        idx = self.image_indices
        per_digit = [idx[targets[idx] == d] for d in range(N_DIGIT_CLASSES)]
        counts = np.array([len(p) for p in per_digit], dtype=np.int64)
        slots = np.zeros((N_DIGIT_CLASSES, counts.max()), dtype=np.int64)
        for d, members in enumerate(per_digit):
            slots[d, : len(members)] = members
        return slots, counts

    def sample_params(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``[n, n_way + 6]``: distinct classes in random order, then the transform."""
        classes = np.argsort(rng.random((n, N_DIGIT_CLASSES)), axis=1)[:, : self.n_way]
        transforms = [self.ranges[t].sample(n, rng) for t in TRANSFORM_NAMES]
        return np.column_stack([classes.astype(np.float64), *transforms])

    def perturb(self, params: FloatArray, spread: float, rng: np.random.Generator) -> FloatArray:
        """Same classes; each transform parameter takes a Gaussian step of ``spread`` times its
        range's width and is clipped back into the split's range (keeping its side of the centre
        where the range has two parts, as in the test split)."""
        params = self.check_params(params)
        if spread < 0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        out = params.copy()
        if spread == 0:
            return out
        for j, t in enumerate(TRANSFORM_NAMES, start=self.n_way):
            out[:, j] = self.ranges[t].perturb(params[:, j], spread, rng)
        return out

    def classes_of(self, params: FloatArray) -> NDArray[np.int64]:
        """The digit behind each label: ``[B, n_way]`` int64."""
        classes = np.rint(params[:, : self.n_way]).astype(np.int64)
        if classes.size and (classes.min() < 0 or classes.max() >= N_DIGIT_CLASSES):
            raise ValueError("class ids in params must lie in [0, 10)")
        return classes

    def sample(
        self,
        params: FloatArray,
        n: int,
        rng: np.random.Generator,
        *,
        per_class: bool = False,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """``x [B, n_total, 64]`` transformed images and ``y [B, n_total]`` labels.

        Within one call the images of a task are distinct (drawn without replacement per class)
        as long as the split holds enough images of that digit; beyond that they repeat.
        """
        params = self.check_params(params)
        classes = self.classes_of(params)
        b, c = classes.shape
        if per_class:
            y = rng.permuted(np.broadcast_to(np.tile(np.arange(c), n), (b, n * c)), axis=1)
        else:
            y = rng.integers(0, c, size=(b, n))
        y = y.astype(np.int64, copy=False)
        image_idx = self._draw_images(classes, y, rng)  # [B, N]
        x = self._render(params, image_idx, rng)
        return x, y

    def _draw_images(
        self, classes: NDArray[np.int64], y: NDArray[np.int64], rng: np.random.Generator
    ) -> NDArray[np.int64]:
        """Dataset indices ``[B, N]``, distinct per (task, label) up to the digit's count."""
        slots, counts = self._class_slots
        b, n = y.shape
        digit = np.take_along_axis(classes, y, axis=1)  # [B, N]
        count = counts[digit]
        if y.size == 0:
            return np.zeros((b, n), dtype=np.int64)
        # rank of each example among the earlier examples with its label, in its task
        onehot = y[..., None] == np.arange(classes.shape[1])
        rank = np.take_along_axis(np.cumsum(onehot, axis=1), y[..., None], axis=2)[..., 0] - 1
        if rank.max() == 0:  # one example per label: a plain uniform draw
            slot = (rng.random((b, n)) * count).astype(np.int64)
        else:  # a random order of the digit's slots per (task, label), read at ``rank``
            keys = rng.random((b, classes.shape[1], slots.shape[1]))
            keys[np.arange(slots.shape[1]) >= counts[classes][..., None]] = np.inf
            order = np.argsort(keys, axis=2)
            slot = order[np.arange(b)[:, None], y, rank % count]
        return slots[digit, np.minimum(slot, count - 1)]

    def _render(
        self, params: FloatArray, image_idx: NDArray[np.int64], rng: np.random.Generator
    ) -> NDArray[np.float32]:
        """Apply each task's transform to its images: ``[B, N]`` indices -> ``[B, N, 64]``."""
        images, _ = _dataset()
        b, n = image_idx.shape
        t = {name: params[:, self.n_way + j] for j, name in enumerate(TRANSFORM_NAMES)}
        geometry = np.column_stack([t["rotation_deg"], t["shift_row"], t["shift_col"]])
        if n >= _MATMUL_MIN_IMAGES:  # one [64, 64] resampling matrix per task, then a matmul
            src, w = _bilinear_taps(*geometry.T)
            x = np.matmul(images[image_idx], _warp_matrices(src, w).transpose(0, 2, 1))
        else:  # few images per task (e.g. a stream chunk): gather the taps of each pixel
            inverse = None
            if b > _DEDUPE_MIN_TASKS:  # repeated tasks: resample each geometry once
                geometry, inverse = np.unique(geometry, axis=0, return_inverse=True)
            src, w = _bilinear_taps(*geometry.T)
            if inverse is not None:
                src, w = src[inverse.reshape(-1)], w[inverse.reshape(-1)]
            taps = images[image_idx[:, :, None], src[:, None, :]]  # [B, N, 64 * 4]
            x = np.einsum("bnok,bok->bno", taps.reshape(b, n, self.x_dim, 4), w)
        contrast = t["contrast"].astype(np.float32)[:, None, None]
        brightness = t["brightness"].astype(np.float32)[:, None, None]
        x *= contrast
        x += brightness
        np.clip(x, 0.0, 1.0, out=x)
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        noise *= t["noise_std"].astype(np.float32)[:, None, None]
        x += noise
        return x


def nearest_centroid_accuracy(
    x_support: NDArray[np.floating],
    y_support: NDArray[np.integer],
    x_query: NDArray[np.floating],
    y_query: NDArray[np.integer],
) -> float:
    """Accuracy of the nearest class centroid (Euclidean, raw input space), over all queries.

    Args:
        x_support: ``[B, S, D]`` (or ``[S, D]`` for one task).
        y_support: ``[B, S]`` int labels.
        x_query: ``[B, Q, D]``.
        y_query: ``[B, Q]`` int labels.

    Classes without a support example are never predicted.
    """
    xs, xq = np.asarray(x_support, np.float64), np.asarray(x_query, np.float64)
    ys, yq = np.asarray(y_support, np.int64), np.asarray(y_query, np.int64)
    if xs.ndim == 2:
        xs, ys, xq, yq = xs[None], ys[None], xq[None], yq[None]
    if xs.ndim != 3 or ys.shape != xs.shape[:2] or yq.shape != xq.shape[:2]:
        raise ValueError("expected x [B, S, D], y [B, S] for support and query")
    if yq.size == 0:
        raise ValueError("no query examples")
    n_classes = int(max(ys.max(initial=0), yq.max())) + 1
    onehot = (ys[..., None] == np.arange(n_classes)).astype(np.float64)  # [B, S, C]
    counts = onehot.sum(axis=1)  # [B, C]
    centroids = np.einsum("bsc,bsd->bcd", onehot, xs) / np.maximum(counts, 1)[..., None]
    dist = ((xq[:, :, None, :] - centroids[:, None, :, :]) ** 2).sum(axis=-1)  # [B, Q, C]
    dist[np.broadcast_to((counts == 0)[:, None, :], dist.shape)] = np.inf
    return float((dist.argmin(axis=-1) == yq).mean())
