"""Recordings: an append-only, rotating log of the events a process consumed.

``run --record DIR`` and ``serve --record DIR`` write every consumed event, valid or not, exactly
as it arrived, in consumption order, plus a record each time the served model changes, so the
stream can be replayed later (``run --input DIR``; replay-based evaluation builds on it).

Layout: ``DIR/events-<seq>.jsonl.gz``, numbered from 1. A file is closed and the next one started
once ``max_bytes`` (uncompressed) have gone into it; a new recorder never touches existing files
(it starts after the highest number), so a log only grows. Each line is one JSON object:

* ``{"kind": "event", "i": <stream position>, "raw": "<the message text>"}``; a message that is
  not valid UTF-8 has ``"raw_b64"`` instead; ``serve`` adds ``topic``, ``partition``, ``offset``
  and ``ts`` (the Kafka timestamp, ms);
* ``{"kind": "model", "i": <position of the first event it served>, "version": N, "outcome":
  ...}`` when a meta-update (or a rollback) changes the served model.

Writes are flushed at the end of every batch (a gzip sync point), so after a crash a log holds
every batch written before it; :func:`read_records` stops quietly at a torn last line or gzip
member end (and says so in the log).

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with EventRecorder(d) as rec:
...     rec.events([b'{"event_id": "e0", "task_id": "t", "x": [0.5]}', b"\\xff not utf-8"], start=0)
...     rec.model_change(2, index=2, outcome="promoted")
>>> [(r["kind"], r["i"]) for r in read_records(d)]
[('event', 0), ('event', 1), ('model', 2)]
>>> [raw for raw, _ in recorded_events(d)]
[b'{"event_id": "e0", "task_id": "t", "x": [0.5]}', b'\\xff not utf-8']
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = ["EventRecorder", "is_recording", "read_records", "recorded_events"]

_NAME = re.compile(r"^events-(\d{6})\.jsonl(\.gz)?$")


def _files(path: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in path.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def is_recording(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a recording."""
    p = Path(path)
    return p.is_dir() and bool(_files(p))


class EventRecorder:
    """Append consumed events (and model changes) to the recording in ``path``.

    Parameters
    ----------
    path:
        The recording's directory (created if missing).
    max_bytes:
        Uncompressed bytes per file before the next one is started.
    compress:
        gzip the files (``.jsonl.gz``); plain ``.jsonl`` otherwise.
    """

    def __init__(
        self, path: str | Path, *, max_bytes: int = 256 << 20, compress: bool = True
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.compress = max_bytes, compress
        existing = _files(self.path)
        last = _NAME.match(existing[-1].name) if existing else None
        self._seq = int(last.group(1)) if last else 0
        self._fh: IO[bytes] | None = None
        self._written = 0
        self.records = 0

    def _open(self) -> IO[bytes]:
        if self._fh is None or self._written >= self.max_bytes:
            self._close_file()
            self._seq += 1
            name = f"events-{self._seq:06d}.jsonl" + (".gz" if self.compress else "")
            target = self.path / name
            # a long-lived handle, closed by _close_file / close
            fh = gzip.open(target, "xb") if self.compress else target.open("xb")  # noqa: SIM115
            self._fh = fh  # type: ignore[assignment]
            self._written = 0
            log.debug("recording to %s", target)
        assert self._fh is not None
        return self._fh

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        fh = self._open()
        fh.write(data)
        self._written += len(data)
        self.records += len(lines)
        if isinstance(fh, gzip.GzipFile):
            fh.flush(zlib.Z_SYNC_FLUSH)  # readable up to here even if the process dies
        else:
            fh.flush()

    def events(
        self,
        raws: Sequence[Any],
        start: int,
        meta: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Record a batch of raw events (bytes, text, or event dicts) consumed from stream
        position ``start`` on; ``meta[i]`` adds fields to event ``i``'s record."""
        lines = []
        for k, raw in enumerate(raws):
            rec: dict[str, Any] = {"kind": "event", "i": start + k}
            if isinstance(raw, Mapping):
                rec["raw"] = json.dumps(raw, separators=(",", ":"))
            elif isinstance(raw, str):
                rec["raw"] = raw
            else:
                try:
                    rec["raw"] = bytes(raw).decode("utf-8")
                except UnicodeDecodeError:
                    rec["raw_b64"] = base64.b64encode(bytes(raw)).decode("ascii")
            if meta is not None:
                rec.update(meta[k])
            lines.append(json.dumps(rec, separators=(",", ":")).encode())
        self._write(lines)

    def model_change(self, version: int, *, index: int, outcome: str = "") -> None:
        """The model served from stream position ``index`` on is ``version``."""
        rec = {"kind": "model", "i": index, "version": version, "outcome": outcome}
        self._write([json.dumps(rec).encode()])

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        self._close_file()

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of the recording in ``path``, oldest first (a torn tail is skipped)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no recording directory: {p}")
    files = _files(p)
    if not files:
        raise FileNotFoundError(f"{p} holds no recording (events-<n>.jsonl[.gz] files)")
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rb") as fh:
            try:
                for line in fh:
                    if not line.endswith(b"\n"):
                        log.warning("%s: torn last line skipped (the writer stopped mid-line)", f)
                        break
                    yield json.loads(line)
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                log.warning("%s ends early (%s): the writer stopped; records before it kept", f,
                            exc)  # fmt: skip


def recorded_events(path: str | Path) -> Iterator[tuple[Any, None]]:
    """The recorded events as ``(raw, None)`` items (a source for :func:`run_stream`)."""
    for rec in read_records(path):
        if rec.get("kind") != "event":
            continue
        if "raw" in rec:
            yield rec["raw"].encode("utf-8"), None
        else:
            yield base64.b64decode(rec["raw_b64"]), None
