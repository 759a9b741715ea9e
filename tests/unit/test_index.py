"""Tests for stream_meta.index: TaskIndex against brute-force numpy ground truth."""

from __future__ import annotations

import zipfile
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream_meta.index import IndexLoadError, TaskIndex, task_key, task_keys

D_DIM = 16
ATOL = 1e-5


# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """On a busy small machine every OpenMP region waits for a time slice (ms a call);
    one thread keeps this file fast and k-means deterministic. Restored afterwards."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def random_vectors(rng: np.random.Generator, n: int, d: int = D_DIM) -> np.ndarray:
    return rng.standard_normal((n, d)).astype(np.float32)


def exact_knn(
    model: dict[str, np.ndarray], xq: np.ndarray, k: int, exclude: list[str | None] | None = None
) -> list[list[tuple[float, int]]]:
    """Ground truth per query: [(similarity, key)] best first, excluded task removed."""
    ids = list(model)
    keys = task_keys(ids)
    sims = normalise(xq) @ normalise(np.stack([model[t] for t in ids])).T if ids else None
    out = []
    for i in range(len(xq)):
        row = [] if sims is None else list(zip(sims[i].tolist(), keys.tolist(), strict=True))
        if exclude is not None and exclude[i] is not None:
            row = [(s, key) for s, key in row if key != task_key(exclude[i])]
        out.append(sorted(row, key=lambda p: -p[0])[:k])
    return out


def assert_valid_knn(
    D: np.ndarray,
    I: np.ndarray,
    model: dict[str, np.ndarray],
    xq: np.ndarray,
    k: int,
    exclude: list[str | None] | None = None,
) -> None:
    """Tie-tolerant check: the similarity values equal the exact top-k values, and every
    returned key is a distinct, non-excluded task whose true similarity is the one reported.
    (Among tied tasks any choice is accepted.)"""
    assert D.shape == I.shape == (len(xq), k)
    assert D.dtype == np.float32 and I.dtype == np.int64
    ref = exact_knn(model, xq, k, exclude)
    key_to_id = {task_key(t): t for t in model}
    qn = normalise(xq)
    for i, ref_row in enumerate(ref):
        n_valid = len(ref_row)
        np.testing.assert_allclose(D[i, :n_valid], [s for s, _ in ref_row], atol=ATOL)
        assert np.all(I[i, n_valid:] == -1) and np.all(np.isneginf(D[i, n_valid:]))
        returned = I[i, :n_valid].tolist()
        assert len(set(returned)) == n_valid
        for key, sim in zip(returned, D[i, :n_valid].tolist(), strict=True):
            assert key in key_to_id
            assert exclude is None or exclude[i] is None or key != task_key(exclude[i])
            true_sim = float(qn[i] @ normalise(model[key_to_id[key]][None])[0])
            assert true_sim == pytest.approx(sim, abs=ATOL)


def recall_at_k(I: np.ndarray, ref: list[list[tuple[float, int]]]) -> float:
    hits = [len(set(I[i].tolist()) & {key for _, key in row}) for i, row in enumerate(ref)]
    return sum(hits) / sum(len(row) for row in ref)


def make_index(kind: str, d: int = D_DIM) -> TaskIndex:
    if kind == "ivf":
        # trains in-test at 39 * 8 = 312 tasks; nprobe = nlist makes the search exhaustive
        return TaskIndex(d, kind="ivf", nlist=8, nprobe=8, train_size=10_000, seed=0)
    return TaskIndex(d)


def random_ops(
    index: TaskIndex, rng: np.random.Generator, n_ops: int, pool: int
) -> dict[str, np.ndarray]:
    """Apply random upserts (with overwrites and in-batch duplicates) and removes to
    ``index``; return the dict model of what it should hold."""
    model: dict[str, np.ndarray] = {}
    for _ in range(n_ops):
        if rng.random() < 0.75 or not model:
            ids = [f"task-{j}" for j in rng.integers(0, pool, size=int(rng.integers(1, 64)))]
            xb = random_vectors(rng, len(ids))
            index.upsert(ids, xb)
            model.update(zip(ids, xb, strict=True))  # last duplicate wins, as in the index
        else:
            ids = [f"task-{j}" for j in rng.integers(0, pool, size=int(rng.integers(1, 32)))]
            expected = len(set(ids) & set(model))
            assert index.remove(ids) == expected
            for t in ids:
                model.pop(t, None)
    return model


# ---------------------------------------------------------------------- search vs ground truth


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_search_matches_brute_force_when_random_upserts_and_removes(kind: str) -> None:
    rng = np.random.default_rng(1)
    index = make_index(kind)
    model = random_ops(index, rng, n_ops=60, pool=800)
    assert len(index) == len(model)
    if kind == "ivf":
        assert not index.exact  # the sequence crossed the training threshold
    stored = list(model)[:20]
    xq = np.concatenate([index.reconstruct(stored), random_vectors(rng, 20)])
    exclude: list[str | None] = [*stored, *([None] * 20)]
    D, I = index.search(xq, 10, exclude=exclude)
    assert_valid_knn(D, I, model, xq, 10, exclude)
    expected = normalise(np.stack([model[t] for t in stored]))
    np.testing.assert_allclose(index.reconstruct(stored), expected, atol=ATOL)


def test_ivf_recall_at_10_is_high_when_trained_with_moderate_nprobe() -> None:
    rng = np.random.default_rng(2)
    index = TaskIndex(D_DIM, kind="ivf", nlist=16, nprobe=10, train_size=500, seed=0)
    model = random_ops(index, rng, n_ops=80, pool=3000)
    index.upsert(list(model), np.stack(list(model.values())))  # overwrite all after training
    assert not index.exact and len(index) > index.train_threshold
    xq = random_vectors(rng, 100)
    _, I = index.search(xq, 10)
    assert recall_at_k(I, exact_knn(model, xq, 10)) >= 0.9


def test_ivf_serves_exactly_then_migrates_when_threshold_reached() -> None:
    rng = np.random.default_rng(3)
    index = TaskIndex(D_DIM, kind="ivf", nlist=4, nprobe=4, train_size=50, seed=0)
    assert index.train_threshold == 50
    ids = [f"t{i}" for i in range(60)]
    xb = random_vectors(rng, 60)
    index.upsert(ids[:49], xb[:49])
    assert index.exact
    index.upsert(ids[49:], xb[49:])
    assert not index.exact and len(index) == 60
    np.testing.assert_allclose(index.reconstruct(ids), normalise(xb), atol=ATOL)
    D, I = index.search(xb[:5], 3, exclude=ids[:5])
    assert_valid_knn(D, I, dict(zip(ids, xb, strict=True)), xb[:5], 3, ids[:5])


# ---------------------------------------------------------------------- upsert / remove


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_overwrite_is_visible_to_search_when_task_already_stored(kind: str) -> None:
    rng = np.random.default_rng(4)
    index = make_index(kind)
    ids = [f"t{i}" for i in range(400)]
    index.upsert(ids, random_vectors(rng, 400))
    assert index.exact == (kind == "flat")
    target = random_vectors(rng, 1)
    index.upsert(["t123"], target)
    assert len(index) == 400
    D, I = index.search(target, 1)
    assert index.task_id_of(I[0]) == ["t123"]
    assert D[0, 0] == pytest.approx(1.0, abs=ATOL)
    np.testing.assert_allclose(index.reconstruct(["t123"]), normalise(target), atol=ATOL)


def test_last_vector_wins_when_id_repeats_in_one_batch() -> None:
    rng = np.random.default_rng(5)
    index = TaskIndex(D_DIM)
    xb = random_vectors(rng, 3)
    index.upsert(["a", "b", "a"], xb)
    assert len(index) == 2
    np.testing.assert_allclose(index.reconstruct(["a", "b"]), normalise(xb[[2, 1]]), atol=ATOL)


def test_rows_stay_consistent_when_removing_from_middle_and_tail() -> None:
    rng = np.random.default_rng(6)
    index = TaskIndex(D_DIM)
    ids = [f"t{i}" for i in range(10)]
    xb = random_vectors(rng, 10)
    index.upsert(ids, xb)
    assert index.remove(["t1", "t9", "t4", "t8", "nope", "t1"]) == 4
    kept = [t for t in ids if t not in {"t1", "t4", "t8", "t9"}]
    assert len(index) == 6 and "t1" not in index and "t0" in index
    np.testing.assert_allclose(
        index.reconstruct(kept), normalise(xb[[int(t[1:]) for t in kept]]), atol=ATOL
    )
    index.upsert(["t0", "t2"], xb[[8, 9]])  # in-place overwrites land on the right rows
    _, I = index.search(xb[[8, 9]], 1)
    assert index.task_id_of(I) == ["t0", "t2"]


def test_remove_returns_zero_when_ids_unknown_or_empty() -> None:
    index = TaskIndex(D_DIM)
    index.upsert(["a"], np.ones((1, D_DIM), np.float32))
    assert index.remove([]) == 0
    assert index.remove(["b"]) == 0
    assert len(index) == 1


def test_upsert_accepts_float64_and_non_contiguous_when_values_are_finite() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((D_DIM, 4))  # float64, and x.T is not C-contiguous
    index = TaskIndex(D_DIM)
    index.upsert(["a", "b", "c", "d"], x.T)
    np.testing.assert_allclose(index.reconstruct(["c"]), normalise(x.T[[2]]), atol=ATOL)


# ---------------------------------------------------------------------- search details


def test_exclude_never_returns_excluded_id_when_it_is_the_nearest() -> None:
    rng = np.random.default_rng(8)
    index = TaskIndex(D_DIM)
    ids = [f"t{i}" for i in range(50)]
    xb = random_vectors(rng, 50)
    index.upsert(ids, xb)
    D, I = index.search(xb, 50, exclude=ids)
    for i, t in enumerate(ids):
        assert task_key(t) not in I[i, :49].tolist()
        assert I[i, 49] == -1 and np.isneginf(D[i, 49])
    _, I_full = index.search(xb, 3)
    assert I_full[:, 0].tolist() == task_keys(ids).tolist()  # each is its own nearest
    np.testing.assert_array_equal(I_full[:, 1:3], I[:, :2])  # order kept after dropping


def test_search_pads_with_minus_inf_and_minus_one_when_fewer_than_k_tasks() -> None:
    index = TaskIndex(D_DIM)
    xq = np.ones((2, D_DIM), np.float32)
    D, I = index.search(xq, 3)
    assert np.all(I == -1) and np.all(np.isneginf(D))
    index.upsert(["a", "b"], np.eye(2, D_DIM, dtype=np.float32))
    D, I = index.search(xq, 3, exclude=["a", None])
    assert I[0].tolist() == [task_key("b"), -1, -1]
    assert sorted(I[1, :2].tolist()) == sorted(task_keys(["a", "b"]).tolist())
    assert I[1, 2] == -1 and np.isneginf(D[:, 2]).all()


def test_search_returns_empty_arrays_when_no_queries() -> None:
    D, I = TaskIndex(D_DIM).search(np.empty((0, D_DIM), np.float32), 4)
    assert D.shape == I.shape == (0, 4)


def test_task_id_of_names_neighbours_when_keys_include_padding() -> None:
    index = TaskIndex(D_DIM)
    index.upsert(["x"], np.ones((1, D_DIM), np.float32))
    assert index.task_id_of(np.array([task_key("x"), -1, 12345])) == ["x", None, None]


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "xb",
    [
        pytest.param(np.full((1, D_DIM), np.nan, np.float32), id="nan"),
        pytest.param(np.full((1, D_DIM), np.inf, np.float32), id="inf"),
        pytest.param(np.ones((1, D_DIM + 1), np.float32), id="wrong-dim"),
        pytest.param(np.ones(D_DIM, np.float32), id="1-d"),
        pytest.param(np.ones((2, D_DIM), np.float32), id="rows-vs-ids"),
        pytest.param(np.array([["a"] * D_DIM]), id="strings"),
    ],
)
def test_upsert_raises_value_error_when_input_invalid(xb: np.ndarray) -> None:
    index = TaskIndex(D_DIM)
    with pytest.raises(ValueError):
        index.upsert(["a"], xb)
    assert len(index) == 0


def test_search_raises_value_error_when_query_invalid() -> None:
    index = TaskIndex(D_DIM)
    with pytest.raises(ValueError, match="shape"):
        index.search(np.ones((1, D_DIM - 1), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, D_DIM), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="k must"):
        index.search(np.ones((1, D_DIM), np.float32), 0)
    with pytest.raises(ValueError, match="exclude"):
        index.search(np.ones((1, D_DIM), np.float32), 1, exclude=["a", "b"])


def test_upsert_raises_type_error_when_task_ids_is_a_string() -> None:
    with pytest.raises(TypeError):
        TaskIndex(D_DIM).upsert("a", np.ones((1, D_DIM), np.float32))


def test_reconstruct_raises_key_error_when_task_unknown() -> None:
    with pytest.raises(KeyError):
        TaskIndex(D_DIM).reconstruct(["missing"])
    with pytest.raises(KeyError):
        TaskIndex(D_DIM).reconstruct_keys(np.array([-1]))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_reconstruct_keys_returns_neighbour_vectors_when_given_search_result(kind: str) -> None:
    rng = np.random.default_rng(12)
    index = make_index(kind)
    ids = [f"t{i}" for i in range(400)]
    xb = random_vectors(rng, 400)
    index.upsert(ids, xb)
    _, I = index.search(xb[:3], 4, exclude=ids[:3])
    zn = index.reconstruct_keys(I)
    assert zn.shape == (3, 4, D_DIM) and zn.dtype == np.float32
    expected = normalise(xb[[int(t[1:]) for t in index.task_id_of(I)]]).reshape(3, 4, D_DIM)
    np.testing.assert_allclose(zn, expected, atol=ATOL)
    assert index.reconstruct_keys(np.empty(0, np.int64)).shape == (0, D_DIM)


# ---------------------------------------------------------------------- keys


def test_task_key_is_stable_when_computed_again() -> None:
    # pinned once from this function (and cross-checked with `printf task-0 | b2sum -l 64`)
    assert task_key("task-0") == 6592250732523420890
    assert task_key("task-1") == 7820961590264054659
    assert task_key("") == 7252660547403494068
    assert task_keys(["task-0", "task-1"]).tolist() == [6592250732523420890, 7820961590264054659]


def test_task_key_is_distinct_and_non_negative_when_1e5_random_ids() -> None:
    rng = np.random.default_rng(9)
    ids = {f"{a:x}-{b:x}" for a, b in rng.integers(0, 2**62, size=(100_000, 2))}
    keys = task_keys(sorted(ids))
    assert keys.dtype == np.int64 and keys.min() >= 0
    assert len(np.unique(keys)) == len(ids)


# ---------------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    "kind,n", [("flat", 300), ("ivf", 100), ("ivf", 400)], ids=["flat", "ivf-untrained", "ivf"]
)
def test_save_load_round_trip_gives_identical_search_when_saved(
    tmp_path: Path, kind: str, n: int
) -> None:
    rng = np.random.default_rng(10)
    index = make_index(kind)
    ids = [f"t{i}" for i in range(n)]
    index.upsert(ids, random_vectors(rng, n))
    index.remove(ids[:7])
    path = tmp_path / "tasks.npz"
    index.save(path)
    loaded = TaskIndex.load(path)
    assert (loaded.d, loaded.kind, loaded.exact, len(loaded)) == (
        index.d,
        index.kind,
        index.exact,
        len(index),
    )
    xq = random_vectors(rng, 16)
    D0, I0 = index.search(xq, 5)
    D1, I1 = loaded.search(xq, 5)
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    assert loaded.task_id_of(I1[:, 0]) == index.task_id_of(I0[:, 0])
    assert "t3" not in loaded and "t8" in loaded
    loaded.upsert(["t8", "new"], random_vectors(rng, 2))  # still writable after loading
    assert len(loaded) == len(index) + 1
    assert [p.name for p in tmp_path.iterdir()] == ["tasks.npz"]  # no temp file left


def _corrupt_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"not an index at all")


def _corrupt_foreign_npz(path: Path) -> None:
    with path.open("wb") as f:
        np.savez(f, meta=np.zeros(3, np.uint8))


def _corrupt_missing(path: Path) -> None:
    path.unlink()


def _corrupt_swapped_member(path: Path) -> None:
    """Valid zip, valid arrays, but the keys no longer match the task ids."""
    with np.load(path) as z:
        parts = {name: z[name] for name in z.files}
    parts["keys"] = parts["keys"][::-1].copy()
    with path.open("wb") as f:
        np.savez(f, **parts)


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_flip,
        _corrupt_truncate,
        _corrupt_garbage,
        _corrupt_foreign_npz,
        _corrupt_missing,
        _corrupt_swapped_member,
    ],
    ids=lambda f: f.__name__.removeprefix("_corrupt_"),
)
def test_load_raises_index_load_error_when_file_corrupt_or_missing(tmp_path: Path, corrupt) -> None:
    index = TaskIndex(D_DIM)
    index.upsert([f"t{i}" for i in range(50)], random_vectors(np.random.default_rng(11), 50))
    path = tmp_path / "tasks.npz"
    index.save(path)
    assert zipfile.is_zipfile(path)
    corrupt(path)
    with pytest.raises(IndexLoadError):
        TaskIndex.load(path)


def test_memory_bytes_grows_with_tasks_when_upserting() -> None:
    index = TaskIndex(64)
    empty = index.memory_bytes()
    index.upsert([f"t{i}" for i in range(1000)], np.ones((1000, 64), np.float32))
    per_task = (index.memory_bytes() - empty) / 1000
    assert 64 * 4 < per_task < 2000


# ---------------------------------------------------------------------- property test

_op = st.one_of(
    st.tuples(
        st.just("upsert"),
        st.lists(st.integers(0, 14), min_size=1, max_size=6),
        st.integers(0, 2**32 - 1),
    ),
    st.tuples(st.just("remove"), st.lists(st.integers(0, 14), max_size=6), st.just(0)),
)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_op, min_size=1, max_size=12))
def test_index_behaves_like_dict_model_when_random_op_sequence(
    kind: str, ops: list[tuple[str, list[int], int]]
) -> None:
    # ivf: trains at 4 tasks; nprobe = nlist keeps it exact, so the model check is exact
    index = (
        TaskIndex(4, kind="ivf", nlist=2, nprobe=2, train_size=4, seed=0)
        if kind == "ivf"
        else TaskIndex(4)
    )
    model: dict[str, np.ndarray] = {}
    for op, nums, seed in ops:
        ids = [f"id{j}" for j in nums]
        if op == "upsert":
            # a few distinct values, so overwrites often create exact ties
            xb = np.random.default_rng(seed).integers(-2, 3, size=(len(ids), 4)).astype(np.float32)
            index.upsert(ids, xb)
            model.update(zip(ids, xb, strict=True))
        else:
            assert index.remove(ids) == len(set(ids) & set(model))
            for t in ids:
                model.pop(t, None)
        assert len(index) == len(model)
        assert all((f"id{j}" in index) == (f"id{j}" in model) for j in range(15))
    event("exact" if index.exact else "trained ivf")
    if model:
        stored = list(model)
        np.testing.assert_allclose(
            index.reconstruct(stored), normalise(np.stack(list(model.values()))), atol=ATOL
        )
        xq = np.concatenate([index.reconstruct(stored[:3]), np.ones((1, 4), np.float32)])
        exclude: list[str | None] = [*stored[:3], None]
        D, I = index.search(xq, 5, exclude=exclude)
        assert_valid_knn(D, I, model, xq, 5, exclude)
