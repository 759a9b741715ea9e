"""Recordings: an append-only, rotating log of the events a process consumed.

``run --record DIR`` and ``serve --record DIR`` write every consumed event, valid or not, exactly
as it arrived, in consumption order, plus a record each time the served model changes, so the
stream can be replayed later (``run --input DIR``; replay-based evaluation builds on it).

Layout: ``DIR/events-<seq>.jsonl.gz`` (or ``.parquet`` with ``format="parquet"``: the same
records as columns, through pyarrow), numbered from 1. A file is closed and the next one started
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
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "EventRecorder", "is_recording", "read_records", "recorded_events"]

_NAME = re.compile(r"^events-(\d{6})\.(jsonl|jsonl\.gz|parquet)$")
FORMATS = ("jsonl", "parquet")
#: the columns of a Parquet recording (a record's absent fields are nulls)
_COLUMNS = (
    ("kind", "string"),
    ("i", "int64"),
    ("raw", "string"),
    ("raw_b64", "string"),
    ("topic", "string"),
    ("partition", "int64"),
    ("offset", "int64"),
    ("ts", "int64"),
    ("version", "int64"),
    ("outcome", "string"),
)


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # an optional dependency
        raise RuntimeError(
            "Parquet recordings need pyarrow: pip install 'stream-meta[parquet]'"
        ) from exc
    return pa, pq


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
    format:
        ``"jsonl"`` (the default), or ``"parquet"`` (``events-<seq>.parquet``, one row group a
        batch, needs pyarrow). A Parquet file is readable once closed (at rotation or
        :meth:`close`): after a crash its open file is lost, where a JSON-lines log keeps every
        flushed batch. Choose Parquet for compact logs read by other tools, JSON lines for
        crash safety.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 256 << 20,
        compress: bool = True,
        format: str = "jsonl",
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if format not in FORMATS:
            raise ValueError(f"unknown recording format {format!r}; known: {', '.join(FORMATS)}")
        self.path = Path(path)
        self.max_bytes, self.compress, self.format = max_bytes, compress, format
        self._schema = None
        if format == "parquet":
            pa, _ = _pyarrow()
            self._schema = pa.schema([(n, getattr(pa, t)()) for n, t in _COLUMNS])
        self.path.mkdir(parents=True, exist_ok=True)
        existing = _files(self.path)
        last = _NAME.match(existing[-1].name) if existing else None
        self._seq = int(last.group(1)) if last else 0
        self._fh: Any = None  # a binary file, or a pyarrow ParquetWriter
        self._written = 0
        self.records = 0

    def _open(self) -> Any:
        if self._fh is None or self._written >= self.max_bytes:
            self._close_file()
            self._seq += 1
            suffix = {"parquet": ".parquet"}.get(
                self.format, ".jsonl.gz" if self.compress else ".jsonl"
            )
            target = self.path / f"events-{self._seq:06d}{suffix}"
            # a long-lived handle, closed by _close_file / close
            if self.format == "parquet":
                _, pq = _pyarrow()
                if target.exists():  # never overwrite, as "xb" guarantees for JSON lines
                    raise FileExistsError(target)
                self._fh = pq.ParquetWriter(str(target), self._schema)
            else:
                self._fh = gzip.open(target, "xb") if self.compress else target.open("xb")  # noqa: SIM115
            self._written = 0
            log.debug("recording to %s", target)
        return self._fh

    def _write(self, recs: list[dict[str, Any]]) -> None:
        if not recs:
            return
        lines = [json.dumps(r, separators=(",", ":")).encode() for r in recs]
        fh = self._open()
        size = sum(len(line) + 1 for line in lines)  # rotation counts JSON bytes in any format
        if self.format == "parquet":
            pa, _ = _pyarrow()
            fh.write_table(pa.Table.from_pylist(recs, schema=self._schema))
        else:
            fh.write(b"\n".join(lines) + b"\n")
            if isinstance(fh, gzip.GzipFile):
                fh.flush(zlib.Z_SYNC_FLUSH)  # readable up to here even if the process dies
            else:
                fh.flush()
        self._written += size
        self.records += len(recs)

    def events(
        self,
        raws: Sequence[Any],
        start: int,
        meta: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Record a batch of raw events (bytes, text, or event dicts) consumed from stream
        position ``start`` on; ``meta[i]`` adds fields to event ``i``'s record."""
        recs = []
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
            recs.append(rec)
        self._write(recs)

    def model_change(self, version: int, *, index: int, outcome: str = "") -> None:
        """The model served from stream position ``index`` on is ``version``."""
        self._write([{"kind": "model", "i": index, "version": version, "outcome": outcome}])

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
        raise FileNotFoundError(
            f"{p} holds no recording (events-<n>.jsonl[.gz] or events-<n>.parquet files)"
        )
    for f in files:
        if f.suffix == ".parquet":
            yield from _parquet_records(f)
            continue
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rb") as fh:
            try:
                for line in fh:
                    if not line.endswith(b"\n"):
                        log.warning("%s: torn last line skipped (the writer stopped mid-line)", f)
                        break
                    yield json.loads(line)
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                log.warning(
                    "%s ends early (%s): the writer stopped; records before it kept", f, exc
                )


def _parquet_records(f: Path) -> Iterator[dict[str, Any]]:
    pa, pq = _pyarrow()
    try:
        reader = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as exc:
        log.warning("%s is unreadable (%s): skipped (the writer stopped before closing it)", f, exc)
        return
    for batch in reader.iter_batches():
        for row in batch.to_pylist():
            yield {k: v for k, v in row.items() if v is not None}


def recorded_events(path: str | Path) -> Iterator[tuple[Any, None]]:
    """The recorded events as ``(raw, None)`` items (a source for :func:`run_stream`)."""
    for rec in read_records(path):
        if rec.get("kind") != "event":
            continue
        if "raw" in rec:
            yield rec["raw"].encode("utf-8"), None
        else:
            yield base64.b64decode(rec["raw_b64"]), None
