"""Where events come from (sources) and where outputs go (sinks), for in-process runs.

A source yields ``(raw, truth)`` pairs: ``raw`` is what arrives on the wire (JSON bytes, or an
event dict from the built-in generator) and ``truth`` the true label of an *unlabelled* event
when the source knows it (the synthetic stream does; a recorded log does not), so queries can be
scored offline too. Kafka sources and sinks belong to the service (``stream-meta serve``).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from stream_meta.tasks import TaskFamily, TaskStream

Item = tuple[Any, Any]


def synthetic_source(family: TaskFamily, **stream_kwargs: Any) -> Iterator[Item]:
    """The built-in interleaved task stream (infinite); ``stream_kwargs`` as in :class:`TaskStream`
    (the ``[stream]`` settings section maps onto them one to one)."""
    stream = TaskStream(family, **stream_kwargs)
    for item in stream:
        yield item.event, item.truth


def jsonl_source(path: str | Path, stdin: IO[bytes] | None = None) -> Iterator[Item]:
    """Raw lines of a JSON-lines file (``-`` = standard input); blank lines are skipped."""
    if str(path) == "-":
        fh: IO[bytes] = stdin if stdin is not None else sys.stdin.buffer
        yield from _lines(fh)
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    opener = _open_gzip if p.suffix == ".gz" else open
    with opener(p, "rb") as fh:
        yield from _lines(fh)


def _open_gzip(path: Path, mode: str) -> IO[bytes]:
    import gzip

    return gzip.open(path, mode)  # type: ignore[return-value]


def _lines(fh: IO[bytes]) -> Iterator[Item]:
    for line in fh:
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield line, None


class JsonlSink:
    """Append JSON objects to a file, one a line (``-`` = standard output), buffered."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path == "-":
            self._fh: IO[str] = io.TextIOWrapper(sys.stdout.buffer, write_through=True)
            self._owned = False
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
            self._owned = True
        self.count = 0

    def write_lines(self, lines: list[str]) -> None:
        if lines:
            self._fh.write("\n".join(lines))
            self._fh.write("\n")
            self.count += len(lines)

    def write(self, record: dict[str, Any]) -> None:
        self.write_lines([json.dumps(record)])

    def close(self) -> None:
        self._fh.flush()
        if self._owned:
            self._fh.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: the kinds of invalid event ``bad_event`` makes, one per rejection reason it exercises
BAD_KINDS = (
    "malformed_json",
    "not_an_object",
    "missing_field",
    "invalid_type",
    "wrong_dimension",
    "non_finite",
    "oversized",
)


def bad_event(event: dict[str, Any], rng: Any, x_dim: int, max_bytes: int = 65_536) -> bytes:
    """An invalid version of ``event`` (one of :data:`BAD_KINDS`, chosen by ``rng``)."""
    kind = BAD_KINDS[int(rng.integers(0, len(BAD_KINDS)))]
    e = dict(event)
    if kind == "malformed_json":
        return json.dumps(e).encode()[:-1]
    if kind == "not_an_object":
        return json.dumps([e]).encode()
    if kind == "missing_field":
        e.pop("x")
    elif kind == "invalid_type":
        e["x"] = ["a"] * x_dim
    elif kind == "wrong_dimension":
        e["x"] = [0.0] * (x_dim + 1)
    elif kind == "non_finite":
        return json.dumps({**e, "x": [float("nan")] * x_dim}).encode()  # NaN literal
    elif kind == "oversized":
        e["pad"] = "z" * max_bytes
    return json.dumps(e).encode()
