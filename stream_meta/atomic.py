"""Atomic file replacement: write beside the target, fsync, rename over it.

Readers see the old file or the new one, never a torn one, also when the writer dies midway.
Used by every on-disk artefact (checkpoints, index snapshots).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The data and the directory entry are fsynced; on any exception the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, mode)  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_file(path) as fh:
        fh.write(data)


def fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
