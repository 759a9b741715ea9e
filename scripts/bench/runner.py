"""``python -m scripts.bench``: the command line, one section after the other, the report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import scripts.bench
from scripts.bench import report
from scripts.bench.common import DEFAULT_CHECKPOINTS, ROOT, Context, Section, loadavg, rel, say
from scripts.bench.registry import MEASUREMENTS


def run_section(ctx: Context, name: str) -> Section:
    """One section; an exception is recorded in it (the run then exits with 1)."""
    title, fn = MEASUREMENTS[name]
    section = Section(name, title)
    say(f"== {name}: {title}")
    t0 = time.perf_counter()
    try:
        fn(ctx, section)
    except Exception as exc:  # recorded in the report, and the run exits with 1
        section.error = f"{type(exc).__name__}: {exc}"
        say(f"{name} failed:\n{traceback.format_exc()}")
    section.seconds = time.perf_counter() - t0
    say(f"   {name} took {section.seconds:.1f} s")
    return section


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=(scripts.bench.__doc__ or "").splitlines()[0],
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help="comma-separated sections: " + ",".join(MEASUREMENTS),
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="with --only: keep the other sections of the existing report (marked with the "
        "run that measured them) instead of dropping them",
    )
    p.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINTS)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    p.add_argument(
        "--json-out", type=Path, help="raw results (default: benchmarks.json beside --out)"
    )
    args = p.parse_args(argv)
    unknown = [n for n in args.only or [] if n not in MEASUREMENTS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(MEASUREMENTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    names = [n for n in MEASUREMENTS if args.only is None or n in args.only]
    json_path = args.json_out or args.out.parent / "benchmarks.json"
    if any(k.upper().startswith("STREAM_META_") for k in os.environ):
        say("note: STREAM_META_* variables are set; the benchmark ignores them (defaults only)")
    ctx = Context(args.quick, args.checkpoint_dir.resolve())
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    mach = report.machine()
    say(f"load average {mach['loadavg_start']} on {mach['cores']} cores; sections: {names}")
    sections = [run_section(ctx, n) for n in names]
    mach["loadavg_end"] = loadavg()
    meta = {
        "command": shlex.join(["python", "-m", "scripts.bench", *raw_argv]),
        "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.perf_counter() - t0,
        "quick": args.quick,
        "sizes": asdict(ctx.sizes),
        "checkpoint_dir": rel(ctx.checkpoint_dir),
        "json_path": rel(json_path),
        "machine": mach,
    }
    report.write(meta, sections, args.out, json_path, keep=args.keep)
    report.print_summary(sections)
    return 1 if any(s.error for s in sections) else 0
