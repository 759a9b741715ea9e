"""What every section needs: paths, progress, the ``stream-meta`` command, results.

A leaf of the package: it imports no section (the sections import it), only the standard
library, :mod:`scripts.bench.sizes` and ``stream_meta.testing.processes``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.bench.sizes import FULL, QUICK
from stream_meta.testing.processes import clean_env

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINTS = ROOT / "stream_meta" / "checkpoints"
CHECKPOINT_FILES = {
    "sinusoid": "sinusoid.safetensors",
    "digits": "digits.safetensors",
    "bandit": "bandit.safetensors",
}


class MeasurementError(RuntimeError):
    """A command or measurement failed; the section reports it and the run exits with 1."""


# -- results -----------------------------------------------------------------------------------
@dataclass
class Check:
    """One row of a section's table. ``ok`` is None for context rows and unmeasured targets."""

    target: str
    measured: str
    ok: bool | None
    how: str

    @property
    def status(self) -> str:
        if self.ok is None:
            return "n/a" if self.measured.startswith("not measured") else "context"
        return "pass" if self.ok else "**FAIL**"


@dataclass
class Section:
    """What one measurement function produced."""

    name: str
    title: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


class Context:
    """What every measurement needs: sizes, checkpoint paths, a cache of CLI results."""

    def __init__(self, quick: bool, checkpoint_dir: Path) -> None:
        self.quick = quick
        self.sizes = QUICK if quick else FULL
        self.checkpoint_dir = checkpoint_dir
        self.cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def checkpoint(self, family: str) -> Path | None:
        path = self.checkpoint_dir / CHECKPOINT_FILES[family]
        return path if path.is_file() else None


def need_checkpoint(ctx: Context, section: Section, family: str, targets: Sequence[str]) -> bool:
    """Whether the ``family`` checkpoint exists; if not, mark ``targets`` as not measured."""
    if ctx.checkpoint(family) is not None:
        return True
    missing = f"not measured: no {family} checkpoint"
    for target in targets:
        section.checks.append(Check(target, missing, None, "-"))
    section.notes.append(
        f"`{rel(ctx.checkpoint_dir / CHECKPOINT_FILES[family])}` does not exist "
        f"(train it with `stream-meta train --family {family} --out ...`)."
    )
    return False


# -- helpers -----------------------------------------------------------------------------------
def say(msg: str) -> None:
    """Progress, to stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rel(path: Path | str) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def tail(text: str, n: int = 20) -> str:
    """The last ``n`` lines of ``text`` (a log, for an error message)."""
    return "\n".join(text.strip().splitlines()[-n:])


def loadavg() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def shots(s: str) -> str:
    """``"1 shot"``, ``"5 shots"``."""
    return f"{s} shot" if s == "1" else f"{s} shots"


def change(with_: float, without: float) -> str:
    """``"12.3% lower"`` / ``"4.5% higher"``: ``with_`` relative to ``without``."""
    r = with_ / without - 1.0
    return f"{abs(r):.1%} {'lower' if r < 0 else 'higher'}"


def mean_ci(entry: dict[str, float], digits: int = 4) -> str:
    """``{"mean": m, "ci95": c}`` -> ``"m ± c"``."""
    return f"{entry['mean']:.{digits}g} ± {entry['ci95']:.2g}"


# -- the stream-meta command -------------------------------------------------------------------
def cli_argv0() -> list[str]:
    """How to start the ``stream-meta`` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "stream-meta"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "stream_meta.cli"]


def cli_json(
    args: Sequence[str], *, prefix: Sequence[str] = ()
) -> tuple[dict[str, Any], float, str]:
    """Run ``stream-meta ARGS`` (which must include ``--json``) from the repository root, in
    the environment without ``STREAM_META_*`` settings; ``(result, seconds, command)``.

    ``command`` is the command as it reads in the report. The JSON is the last line of stdout.
    """
    display = shlex.join([*prefix, "stream-meta", *args])
    say(f"$ {display}")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*prefix, *cli_argv0(), *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise MeasurementError(
            f"`{display}` exited with {proc.returncode}:\n{tail(proc.stderr, 15)}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise MeasurementError(f"`{display}` printed no JSON result: {exc}") from exc
    say(f"  done in {seconds:.1f} s")
    return result, seconds, display


def evaluate_cli(
    ctx: Context, family: str, shots: Sequence[int], tasks: int, *extra: str
) -> tuple[dict[str, Any], str]:
    """``stream-meta evaluate`` of the ``family`` checkpoint (cached per argument list)."""
    ck = ctx.checkpoint(family)
    assert ck is not None
    args = [
        "evaluate",
        "--family",
        family,
        "--checkpoint",
        rel(ck),
        "--shots",
        *map(str, shots),
        "--tasks",
        str(tasks),
        *extra,
        "--json",
        "-q",
    ]
    return cached_cli(ctx, args)


def cached_cli(ctx: Context, args: list[str]) -> tuple[dict[str, Any], str]:
    """:func:`cli_json` of ``args``, run once per argument list in a bench run:
    ``(result, command)``."""
    key = tuple(args)
    if key not in ctx.cache:
        result, seconds, display = cli_json(args)
        ctx.cache[key] = {"result": result, "seconds": seconds, "command": display}
    hit = ctx.cache[key]
    return hit["result"], hit["command"]


def run_cli(ctx: Context, events: int, *extra: str) -> tuple[dict[str, Any], str]:
    """``stream-meta run`` on the built-in synthetic stream with the sinusoid checkpoint."""
    ck = ctx.checkpoint("sinusoid")
    assert ck is not None
    args = [
        "run",
        "--checkpoint",
        rel(ck),
        "--events",
        str(events),
        "--metrics-port",
        "0",
        *extra,
        "--json",
        "-q",
    ]
    result, _seconds, display = cli_json(args)
    return result, display


def scenario_run(
    ctx: Context, name: str, strategy: str, tmp: Path, *extra: str
) -> tuple[dict[str, Any], str, Path, Path]:
    """``stream-meta run --scenario name`` (``ctx.sizes.meta_events`` events) with its
    predictions in ``tmp/<name>-<strategy>.jsonl`` and its models in
    ``tmp/<name>-<strategy>-models``: ``(result, command, predictions, models dir)``."""
    out = tmp / f"{name}-{strategy}.jsonl"
    models = tmp / f"{name}-{strategy}-models"
    result, cmd = run_cli(
        ctx,
        ctx.sizes.meta_events,
        "--scenario",
        name,
        "--output",
        rel(out),
        "--models-dir",
        rel(models),
        *extra,
    )
    return result, cmd, out, models
