"""Pack lists of strings into two numpy arrays (UTF-8 bytes + offsets) and back.

``.npz`` files written with ``allow_pickle=False`` cannot hold Python strings; fixed-width
``<U`` arrays waste four bytes a character at the longest id's width. Task ids, event ids and
the like are stored as one ``uint8`` buffer plus ``int64`` offsets instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def pack_strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(utf8 [total bytes] uint8, offsets [len + 1] int64)`` for ``items``."""
    encoded = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def unpack_strings(utf8: np.ndarray | bytes, offsets: np.ndarray) -> list[str]:
    """Reverse :func:`pack_strings`; raises ``ValueError`` on inconsistent arrays.

    >>> unpack_strings(*pack_strings(["task-1", "ü", ""]))
    ['task-1', 'ü', '']
    """
    data = utf8 if isinstance(utf8, bytes) else np.asarray(utf8, dtype=np.uint8).tobytes()
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or len(offsets) == 0 or offsets.dtype.kind not in "iu":
        raise ValueError("string offsets must be a non-empty 1-d integer array")
    if offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
        raise ValueError("string offsets do not match the packed bytes")
    return [data[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets.tolist())]
