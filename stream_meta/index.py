"""FAISS task index: one embedding per task, upserted as examples arrive, k-NN over tasks.

Every task in the stream keeps one embedding of dimension ``d``. The index stores it under
a stable 63-bit key (:func:`task_key`) and answers "which tasks are nearest to this one?"
with cosine similarity: vectors are L2-normalised on entry and searched by inner product,
so ``D`` holds similarities in ``[-1, 1]`` (best first) and ``I`` holds task keys.

Why upserts do not go through ``remove_ids``
--------------------------------------------
Measured with faiss-cpu 1.15.1, d=64, on a 2-core machine: one ``remove_ids`` call on
``IndexIDMap2(IndexFlatIP)`` scans the whole index whatever the number of ids removed,
compacts the storage and rebuilds its reverse map: about 0.25 ms at 1e4 vectors, 2.8 ms
at 1e5 and 31 ms at 1e6 with sequential ids, and 400-700 ms at 1e6 with hashed 63-bit
keys like ours (the rebuilt ``unordered_map`` misses cache). HNSW cannot remove at all.
An exact single query costs 0.07 ms at 1e4 and 8 ms at 1e6. The engine upserts after
every labelled event (tens of thousands per second), so "remove + add" per upsert is not
an option. Instead:

* ``flat`` (exact, the default): ``IndexIDMap(IndexFlatIP(d))`` plus a Python
  ``key -> row`` dict. Overwriting a known task writes its row of the flat storage in
  place through a numpy view of the C++ buffer (``faiss.rev_swig_ptr(get_xb())``): O(d),
  no scan, and the next search sees it (about 15 us a call at any size, 2 us a task in
  batches of 256). New tasks are appended with one ``add_with_ids`` per batch.
  ``IndexIDMap`` rather than ``IndexIDMap2``: the latter's reverse map cannot be read
  from Python, duplicates our dict (about 50 bytes a task) and its rebuild dominates
  ``remove_ids``.
* Removal is batched: one ``remove_ids`` a call. Before it, the rows to remove are swapped
  to the tail of the storage (vectors and ``id_map`` entries, written in place), so the
  compaction inside ``remove_ids`` moves nothing and only the O(#removed) swapped rows
  change in the ``key -> row`` dict. What is left is the scan: 0.07 ms at 1e4, 0.4 ms at
  1e5, 4 ms at 1e6.
* ``ivf`` (approximate, for 1e5+ tasks): ``IndexIVFFlat`` (inner product, spherical
  k-means) with a hashtable ``DirectMap``, so ``remove_ids`` and ``update_vectors`` cost
  O(1) a vector plus one coarse assignment. It needs training: until
  ``max(nlist, min(train_size, 39 * nlist))`` tasks exist the index serves exactly from
  the flat layout above; the upsert that crosses the threshold trains on (a seeded
  sample of at most ``train_size`` of) the vectors present and migrates them,
  transparently but synchronously (1 s at 1e5 tasks, 5 s at 1e6, at the defaults).

FAISS calls that open an OpenMP region (searches, IVF adds) wait for every thread; on a
small machine shared with other processes that costs milliseconds a call. The library
leaves the thread count alone; a latency-bound entry point may set it (e.g. to 1).

The index is not thread-safe: one writer, and no search while a write is in progress
(the engine serves from a snapshot). It never changes FAISS's global state (threads).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> index = TaskIndex(d=8)
    >>> index.upsert(["sine-a", "sine-b", "digits-3"], rng.standard_normal((3, 8)))
    >>> len(index), "sine-a" in index
    (3, True)
    >>> xq = index.reconstruct(["sine-a"])
    >>> D, I = index.search(xq, k=2, exclude=["sine-a"])
    >>> I.shape, bool(I[0, 0] != task_key("sine-a"))
    ((1, 2), True)
    >>> index.upsert(["sine-b"], xq)  # overwrite in place: sine-b now equals sine-a
    >>> D, I = index.search(xq, k=1, exclude=["sine-a"])
    >>> index.task_id_of(I[0]), round(float(D[0, 0]), 4)
    (['sine-b'], 1.0)
    >>> index.remove(["sine-a", "unknown"])
    1
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from stream_meta.atomic import atomic_file
from stream_meta.packing import pack_strings, unpack_strings

__all__ = ["IndexLoadError", "TaskIndex", "task_key", "task_keys"]

Kind = Literal["flat", "ivf"]

_KEY_MASK = (1 << 63) - 1
_FORMAT = "stream-meta/task-index"
_FORMAT_VERSION = 1
_KEY_SCHEME = "blake2b-8-big-endian-top-bit-cleared"
_MIN_POINTS_PER_CENTROID = 39  # below this FAISS k-means warns that training is too thin
_HASHTABLE_BYTES_PER_ENTRY = 56  # std::unordered_map<int64, int64> node + bucket, approx.
_INT_OBJECT_BYTES = 36  # a Python int of up to 63 bits
_HASHTABLE = faiss.DirectMap.Hashtable  # type: ignore[attr-defined]


class IndexLoadError(ValueError):
    """A saved task index is missing, corrupt or inconsistent; nothing was loaded."""


def task_key(task_id: str) -> int:
    """Stable non-negative int63 key of a task id, identical across processes and runs.

    The key is the first 8 bytes of ``blake2b(task_id.encode("utf-8"), digest_size=8)``
    read big-endian, with the top bit cleared (so it fits FAISS's signed int64 ids and is
    never the padding id -1).

    >>> task_key("task-0")
    6592250732523420890
    >>> task_key("task-0") == task_key("task-0") != task_key("task-1")
    True
    """
    if not isinstance(task_id, str):
        raise TypeError(f"task id must be str, got {type(task_id).__name__}")
    digest = hashlib.blake2b(task_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _KEY_MASK


def task_keys(task_ids: Iterable[str]) -> np.ndarray:
    """Keys of many task ids: ``[n] int64``, in order (see :func:`task_key`)."""
    return np.fromiter((task_key(t) for t in _id_list(task_ids)), dtype=np.int64)


def _id_list(task_ids: Iterable[str]) -> list[str]:
    if isinstance(task_ids, str | bytes):
        raise TypeError("task_ids must be a sequence of str, not a single string")
    ids = list(task_ids)
    for t in ids:
        if not isinstance(t, str):
            raise TypeError(f"task id must be str, got {type(t).__name__}")
    return ids


class TaskIndex:
    """Per-task embeddings in FAISS, upserted in place, searched by cosine similarity.

    Args:
        d: embedding dimension.
        kind: ``"flat"`` (exact) or ``"ivf"`` (approximate once trained, exact before).
        nlist: number of IVF lists (``ivf`` only).
        nprobe: IVF lists visited per query (``ivf`` only; capped at ``nlist``).
        train_size: the most vectors the IVF is trained on; training happens once
            ``max(nlist, min(train_size, 39 * nlist))`` tasks exist (``ivf`` only).
        seed: seeds the training sample and k-means.

    See the module docstring for the design and an example.
    """

    def __init__(
        self,
        d: int,
        *,
        kind: Kind = "flat",
        nlist: int = 1024,
        nprobe: int = 16,
        train_size: int = 50_000,
        seed: int = 0,
    ) -> None:
        for name, value in (("d", d), ("nlist", nlist), ("nprobe", nprobe)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise ValueError(f"train_size must be a positive int, got {train_size!r}")
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
        self._d = d
        self._kind: Kind = kind
        self._nlist = nlist
        self._nprobe = min(nprobe, nlist)
        self._train_size = train_size
        self._seed = int(seed)
        self._names: dict[int, str] = {}  # key -> task id, for every stored task
        self._name_bytes = 0  # sum of sys.getsizeof over the task id strings
        self._index: Any = faiss.IndexIDMap(faiss.IndexFlatIP(d))
        self._flat: Any = faiss.downcast_index(self._index.index)
        self._rows: dict[int, int] | None = {}  # key -> row of the flat storage; None on IVF

    # ------------------------------------------------------------------ properties

    @property
    def d(self) -> int:
        """Embedding dimension."""
        return self._d

    @property
    def kind(self) -> Kind:
        """``"flat"`` or ``"ivf"``, as configured."""
        return self._kind

    @property
    def exact(self) -> bool:
        """True while searches are exact (always for ``flat``; ``ivf`` before training)."""
        return self._rows is not None

    @property
    def train_threshold(self) -> int:
        """Number of tasks at which an ``ivf`` index trains and migrates."""
        return max(self._nlist, min(self._train_size, _MIN_POINTS_PER_CENTROID * self._nlist))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and self._names.get(task_key(task_id)) == task_id

    def __repr__(self) -> str:
        state = "exact" if self.exact else f"ivf nlist={self._nlist} nprobe={self._nprobe}"
        return f"TaskIndex(d={self._d}, kind={self._kind!r}, n={len(self)}, {state})"

    # ------------------------------------------------------------------ validation

    def _vectors(self, x: Any, name: str, n: int | None = None) -> np.ndarray:
        """Validate ``x`` as ``[n, d]`` finite reals; return a C-contiguous float32
        L2-normalised copy (zero vectors stay zero)."""
        a = np.asarray(x)
        if a.dtype == object or not (
            np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
        ):
            raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
        if a.ndim != 2 or a.shape[1] != self._d:
            raise ValueError(f"{name} must have shape [n, {self._d}], got {a.shape}")
        if n is not None and a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} rows for {n} task ids")
        a = np.array(a, dtype=np.float32, order="C", copy=True)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        norms = np.sqrt(np.einsum("ij,ij->i", a, a))[:, None]
        np.divide(a, norms, out=a, where=norms > 0)
        return a

    def _known_keys(self, ids: list[str]) -> list[int]:
        """Keys of the ids that are stored, deduplicated, in first-seen order."""
        keys: dict[int, None] = {}
        for t in ids:
            key = task_key(t)
            if self._names.get(key) == t:
                keys[key] = None
        return list(keys)

    def _flat_view(self) -> np.ndarray:
        """``[ntotal, d]`` float32 view of the flat storage (valid until the next add)."""
        n = self._flat.ntotal
        return faiss.rev_swig_ptr(self._flat.get_xb(), n * self._d).reshape(n, self._d)

    def _id_map_view(self) -> np.ndarray:
        """``[ntotal]`` int64 view of ``IndexIDMap.id_map`` (valid until the next add)."""
        return faiss.rev_swig_ptr(self._index.id_map.data(), self._index.ntotal)

    # ------------------------------------------------------------------ writes

    def upsert(self, task_ids: Sequence[str], xb: np.ndarray) -> None:
        """Insert or overwrite the embeddings of ``task_ids``.

        Args:
            task_ids: ``n`` task ids; when one repeats, its last vector wins.
            xb: ``[n, d]`` real, finite; stored L2-normalised as float32.

        Raises:
            ValueError: bad shape, dtype, NaN/inf, or a (astronomically unlikely) key
                collision between two distinct task ids. Nothing is written then.
        """
        ids = _id_list(task_ids)
        xb = self._vectors(xb, "xb", len(ids))
        if not ids:
            return
        if len(set(ids)) != len(ids):
            last = {t: i for i, t in enumerate(ids)}
            ids, xb = list(last), xb[list(last.values())]
        keys = [task_key(t) for t in ids]
        if len(set(keys)) != len(keys):
            raise ValueError("task key collision between two ids of the batch")
        old: list[int] = []
        new: list[int] = []
        for i, (key, t) in enumerate(zip(keys, ids, strict=True)):
            known = self._names.get(key)
            if known is None:
                new.append(i)
            elif known == t:
                old.append(i)
            else:
                raise ValueError(f"task key collision between {known!r} and {t!r}")

        if old:
            if self._rows is not None:
                rows = [self._rows[keys[i]] for i in old]
                self._flat_view()[rows] = xb[old]
            else:
                self._index.update_vectors(np.array([keys[i] for i in old], np.int64), xb[old])
        if new:
            new_keys = np.array([keys[i] for i in new], dtype=np.int64)
            start = self._index.ntotal
            self._index.add_with_ids(xb[new], new_keys)
            if self._rows is not None:
                self._rows.update(
                    zip(new_keys.tolist(), range(start, start + len(new)), strict=True)
                )
            for i in new:
                self._names[keys[i]] = ids[i]
                self._name_bytes += sys.getsizeof(ids[i])
            self._maybe_train()

    def remove(self, task_ids: Sequence[str]) -> int:
        """Remove the stored tasks among ``task_ids`` (unknown ids are ignored) with one
        ``remove_ids`` call. Returns the number removed."""
        keys = self._known_keys(_id_list(task_ids))
        if not keys:
            return 0
        key_array = np.array(keys, dtype=np.int64)
        if self._rows is not None:
            self._swap_to_tail(key_array)
        removed = int(self._index.remove_ids(key_array))
        if removed != len(keys):  # pragma: no cover - would mean the bookkeeping is broken
            raise RuntimeError(f"removed {removed} vectors for {len(keys)} known tasks")
        for key in keys:
            self._name_bytes -= sys.getsizeof(self._names.pop(key))
            if self._rows is not None:
                del self._rows[key]
        return removed

    def _swap_to_tail(self, keys: np.ndarray) -> None:
        """Move the rows of ``keys`` to the end of the flat storage, in place, so that the
        compaction in ``remove_ids`` moves nothing; update the rows of the moved tasks."""
        assert self._rows is not None
        n, m = self._index.ntotal, len(keys)
        rows = np.array([self._rows[k] for k in keys.tolist()], dtype=np.int64)
        holes = np.sort(rows[rows < n - m])  # removed rows outside the tail
        if holes.size == 0:
            return
        movers = np.setdiff1d(np.arange(n - m, n), rows)  # kept rows inside the tail
        xb_view, ids_view = self._flat_view(), self._id_map_view()
        xb_view[holes] = xb_view[movers]
        moved = ids_view[movers].copy()
        ids_view[movers] = ids_view[holes]
        ids_view[holes] = moved
        self._rows.update(zip(moved.tolist(), holes.tolist(), strict=True))

    def _maybe_train(self) -> None:
        if self._kind != "ivf" or self._rows is None or len(self) < self.train_threshold:
            return
        xb = self._flat_view().copy()
        keys = self._id_map_view().copy()
        n_train = min(len(keys), max(self._train_size, self._nlist))
        rng = np.random.default_rng(self._seed)
        sample = np.sort(rng.choice(len(keys), size=n_train, replace=False))
        quantizer = faiss.IndexFlatIP(self._d)
        ivf = faiss.IndexIVFFlat(quantizer, self._d, self._nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.spherical = True
        ivf.cp.seed = self._seed
        ivf.train(xb[sample])
        ivf.set_direct_map_type(_HASHTABLE)
        ivf.add_with_ids(xb, keys)
        ivf.nprobe = self._nprobe
        self._index, self._flat, self._rows = ivf, None, None

    # ------------------------------------------------------------------ reads

    def search(
        self, xq: np.ndarray, k: int, *, exclude: Sequence[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` tasks most similar to each query.

        Args:
            xq: ``[nq, d]`` real, finite; normalised before searching.
            k: number of neighbours, >= 1.
            exclude: ``nq`` task ids (or None); ``exclude[i]`` is never returned for
                query ``i`` (typically the query task itself).

        Returns:
            ``D [nq, k] float32`` cosine similarities, best first, and ``I [nq, k] int64``
            task keys; padded with ``-inf`` / ``-1`` when fewer than ``k`` tasks qualify.
        """
        xq = self._vectors(xq, "xq")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = int(k)
        nq = xq.shape[0]
        excluded: np.ndarray | None = None
        if exclude is not None:
            ex = list(exclude)
            if len(ex) != nq:
                raise ValueError(f"exclude has {len(ex)} entries for {nq} queries")
            if any(t is not None for t in ex):
                excluded = np.array([-2 if t is None else task_key(t) for t in ex], np.int64)
        if nq == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        D, I = self._index.search(xq, k if excluded is None else k + 1)
        if excluded is not None:
            # stable sort on "is excluded" keeps the order and pushes the hit past column k
            order = np.argsort(excluded[:, None] == I, axis=1, kind="stable")[:, :k]
            D = np.take_along_axis(D, order, axis=1)
            I = np.take_along_axis(I, order, axis=1)
        D = np.ascontiguousarray(D, dtype=np.float32)
        I = np.ascontiguousarray(I, dtype=np.int64)
        D[I < 0] = -np.inf
        return D, I

    def reconstruct(self, task_ids: Sequence[str]) -> np.ndarray:
        """Stored (normalised) embeddings ``[n, d] float32``; KeyError for an unknown id."""
        keys = []
        for t in _id_list(task_ids):
            key = task_key(t)
            if self._names.get(key) != t:
                raise KeyError(t)
            keys.append(key)
        return self.reconstruct_keys(np.array(keys, dtype=np.int64))

    def reconstruct_keys(self, keys: np.ndarray | Sequence[int]) -> np.ndarray:
        """Stored (normalised) embeddings of task keys, e.g. the ``I`` of a search:
        ``[*keys.shape, d] float32``. KeyError for -1 or an unknown key."""
        keys = np.asarray(keys, dtype=np.int64)
        key_list = keys.ravel().tolist()
        for key in key_list:
            if key not in self._names:
                raise KeyError(key)
        if not key_list:
            return np.empty((*keys.shape, self._d), np.float32)
        if self._rows is not None:
            xb = self._flat_view()[[self._rows[k] for k in key_list]]
        else:
            xb = self._index.reconstruct_batch(np.array(key_list, dtype=np.int64))
        return xb.reshape(*keys.shape, self._d)

    def task_id_of(self, keys: np.ndarray | Sequence[int]) -> list[str | None]:
        """Task ids of keys (flattened), None for -1 or an unknown key."""
        return [self._names.get(k) for k in np.asarray(keys, dtype=np.int64).ravel().tolist()]

    def memory_bytes(self) -> int:
        """Approximate resident bytes: vectors, FAISS ids and maps, and the Python dicts."""
        n = len(self)
        total = n * (self._d * 4 + 8)  # vectors + stored ids (id_map or inverted-list ids)
        if self._rows is not None:
            total += sys.getsizeof(self._rows) + n * (_INT_OBJECT_BYTES + 32)
        else:
            total += self._nlist * self._d * 4 + n * _HASHTABLE_BYTES_PER_ENTRY
        total += sys.getsizeof(self._names) + n * _INT_OBJECT_BYTES + self._name_bytes
        return total

    # ------------------------------------------------------------------ persistence

    def _stored_keys(self) -> np.ndarray:
        """Every stored key, as FAISS holds them (storage order for the flat layout)."""
        if self._rows is not None:
            return self._id_map_view().copy()
        return _ivf_ids(self._index)

    def vectors(self) -> np.ndarray:
        """A copy of every stored embedding ``[n, d]`` (storage order)."""
        if len(self) == 0:
            return np.zeros((0, self._d), dtype=np.float32)
        return self.reconstruct_keys(self._stored_keys())

    def empty_like(self) -> TaskIndex:
        """A new, empty index with the same settings."""
        return TaskIndex(
            self._d,
            kind=self._kind,
            nlist=self._nlist,
            nprobe=self._nprobe,
            train_size=self._train_size,
            seed=self._seed,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The index as plain numpy arrays (no pickle): what :meth:`save` writes, and what a
        state checkpoint embeds. :meth:`from_arrays` reverses it."""
        keys = self._stored_keys()
        names_utf8, offsets = pack_strings([self._names[k] for k in keys.tolist()])
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "key_scheme": _KEY_SCHEME,
            "d": self._d,
            "kind": self._kind,
            "nlist": self._nlist,
            "nprobe": self._nprobe,
            "train_size": self._train_size,
            "seed": self._seed,
            "exact": self.exact,
            "ntotal": len(keys),
        }
        return {
            "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            "faiss_index": faiss.serialize_index(self._index),
            "keys": keys,
            "names_utf8": names_utf8,
            "names_offsets": offsets,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TaskIndex:
        """Rebuild an index from :meth:`to_arrays` output, validating every part.

        Raises:
            IndexLoadError: missing, corrupt or inconsistent arrays.
        """
        missing = {"meta", "faiss_index", "keys", "names_utf8", "names_offsets"}
        missing -= set(arrays)
        if missing:
            raise IndexLoadError(f"not a task index (missing {sorted(missing)})")
        try:
            meta = json.loads(np.asarray(arrays["meta"]).tobytes().decode("utf-8"))
            return cls._from_parts(
                meta,
                np.asarray(arrays["faiss_index"]),
                np.asarray(arrays["keys"]),
                np.asarray(arrays["names_utf8"]).tobytes(),
                np.asarray(arrays["names_offsets"]),
            )
        except IndexLoadError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise IndexLoadError(f"corrupt task index: {e}") from e

    def save(self, path: Path | str) -> None:
        """Write the index to one ``.npz`` file (no pickle), atomically: a temp file in the
        same directory, fsync, then ``os.replace``."""
        with atomic_file(Path(path), mode=0o600) as f:
            np.savez(f, **self.to_arrays())  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path | str) -> TaskIndex:
        """Read an index written by :meth:`save`.

        Raises:
            IndexLoadError: missing, unreadable, corrupt or inconsistent file.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise IndexLoadError(f"{path}: cannot read task index: {e}") from e
        try:
            return cls.from_arrays(arrays)
        except IndexLoadError as e:
            raise IndexLoadError(f"{path}: {e}") from e

    @classmethod
    def _from_parts(
        cls,
        meta: dict[str, Any],
        blob: np.ndarray,
        keys: np.ndarray,
        names_utf8: bytes,
        offsets: np.ndarray,
    ) -> TaskIndex:
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise IndexLoadError("not a task index file")
        if meta.get("version") != _FORMAT_VERSION or meta.get("key_scheme") != _KEY_SCHEME:
            raise IndexLoadError(
                f"unsupported version {meta.get('version')!r} / {meta.get('key_scheme')!r}"
            )
        self = cls(
            meta["d"],
            kind=meta["kind"],
            nlist=meta["nlist"],
            nprobe=meta["nprobe"],
            train_size=meta["train_size"],
            seed=meta["seed"],
        )
        n = int(meta["ntotal"])
        if keys.dtype != np.int64 or keys.shape != (n,) or offsets.shape != (n + 1,):
            raise IndexLoadError("key or name arrays do not match ntotal")
        try:
            names = unpack_strings(names_utf8, offsets)
        except ValueError as e:
            raise IndexLoadError(f"bad task ids: {e}") from e
        key_list = keys.tolist()
        if len(set(key_list)) != n or any(
            task_key(t) != k for t, k in zip(names, key_list, strict=True)
        ):
            raise IndexLoadError("task ids do not match their keys")

        index = faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        if index.d != self._d or index.ntotal != n:
            raise IndexLoadError(f"FAISS index has d={index.d}, ntotal={index.ntotal}")
        if meta["exact"]:
            if not isinstance(index, faiss.IndexIDMap):
                raise IndexLoadError(f"expected IndexIDMap, got {type(index).__name__}")
            flat = faiss.downcast_index(index.index)
            if not isinstance(flat, faiss.IndexFlatIP):
                raise IndexLoadError(f"expected IndexFlatIP, got {type(flat).__name__}")
            self._index, self._flat = index, flat
            if not np.array_equal(self._id_map_view(), keys):
                raise IndexLoadError("FAISS ids do not match the stored keys")
            self._rows = dict(zip(key_list, range(n), strict=True))
        else:
            if not isinstance(index, faiss.IndexIVFFlat) or index.nlist != self._nlist:
                raise IndexLoadError(f"expected IndexIVFFlat, got {type(index).__name__}")
            if not np.array_equal(np.sort(_ivf_ids(index)), np.sort(keys)):
                raise IndexLoadError("FAISS ids do not match the stored keys")
            if index.direct_map.type != _HASHTABLE:
                index.set_direct_map_type(_HASHTABLE)
            index.nprobe = self._nprobe
            self._index, self._flat, self._rows = index, None, None
        self._names = dict(zip(key_list, names, strict=True))
        self._name_bytes = sum(sys.getsizeof(t) for t in names)
        return self


def _ivf_ids(index: Any) -> np.ndarray:
    """Every id stored in an IVF index's inverted lists."""
    invlists = index.invlists
    parts = [np.empty(0, np.int64)]
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size:
            ptr = invlists.get_ids(list_no)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            invlists.release_ids(list_no, ptr)
    return np.concatenate(parts)


def neighbour_arrays(
    index: TaskIndex, xq: np.ndarray, k: int, exclude: Sequence[str | None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` nearest tasks' embeddings as dense arrays, for a model's neighbour input.

    Returns ``zn [nq, k, d]`` (zeros where fewer than ``k`` exist), ``sim [nq, k]`` cosine
    similarities (0 there) and ``mask [nq, k]`` (1.0 = a real neighbour), all float32.
    """
    nq = xq.shape[0]
    if k == 0 or len(index) == 0:
        return (
            np.zeros((nq, 0, index.d), np.float32),
            np.zeros((nq, 0), np.float32),
            np.zeros((nq, 0), np.float32),
        )
    D, I = index.search(xq, k, exclude=exclude)
    valid = I >= 0
    zn = np.zeros((nq, k, index.d), dtype=np.float32)
    if valid.any():
        zn[valid] = index.reconstruct_keys(I[valid])
    sim = np.where(valid, D, 0.0).astype(np.float32)
    return zn, sim, valid.astype(np.float32)
