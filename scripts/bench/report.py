"""The report: the machine it ran on, ``docs/BENCHMARKS.md`` (:func:`render`) and the raw
results beside it (``docs/benchmarks.json``), and the summary on stderr."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scripts.bench.common import ROOT, Section, loadavg, rel, say
from scripts.bench.registry import MEASUREMENTS

#: environment variables that change how the native thread pools behave (recorded in the report)
THREAD_ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "TORCH_")


def _cpu_and_ram() -> tuple[str, int | None]:
    """The CPU's model name and the RAM in bytes (Linux ``/proc``; else what ``platform``
    says and None)."""
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    ram = None
    try:
        found = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        ram = int(found.group(1)) * 1024 if found else None
    except OSError:
        pass
    return cpu, ram


def _git_revision() -> str | None:
    """The short commit of the source, marked when the working tree has changes."""
    if not shutil.which("git"):
        return None
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
    )
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """CPU, cores, memory, software versions, load average and the source revision."""
    import faiss
    import numpy as np
    import torch

    cpu, ram = _cpu_and_ram()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "ram_bytes": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "loadavg_start": loadavg(),
        "git": _git_revision(),
        "thread_env": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith(THREAD_ENV_PREFIXES)
        },
    }


def fmt_bytes(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.1f} GiB"


@dataclass(frozen=True)
class Kept:
    """A section of an earlier report that this run did not measure (``--only ... --keep``):
    its summary rows and its block of markdown, as they were, with when they were measured."""

    title: str
    summary_rows: list[str]
    block: list[str]
    measured: str


def kept_sections(path: Path, skip_titles: set[str]) -> list[Kept]:
    """The sections of the report at ``path`` whose titles are not in ``skip_titles``."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    when = next((ln for ln in lines if ln.startswith("Written by ")), "")
    date = re.search(r" on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", when)
    source = next((ln for ln in lines if ln.startswith("| source |")), "| source | ? |")
    measured = (
        f"the run of {date.group(1) if date else '?'} (source {source.split('|')[2].strip()})"
    )
    summary = [ln for ln in lines if ln.startswith("| ") and ln.count("|") == 5]
    heads = [i for i, ln in enumerate(lines) if re.match(r"## \d+\. ", ln)]
    out = []
    for j, i in enumerate(heads):
        title = lines[i].split(". ", 1)[1]
        if title in skip_titles:
            continue
        # a block kept before already says when it was measured
        already = "*Kept from " in " ".join(lines[i + 1 : i + 4])
        measured_here = "" if already else measured
        end = heads[j + 1] if j + 1 < len(heads) else len(lines)
        rows = [ln for ln in summary if ln.startswith(f"| {title} |")]
        out.append(Kept(title, rows, lines[i + 1 : end], measured_here))
    return out


def render(meta: dict[str, Any], sections: list[Section], kept: Sequence[Kept] = ()) -> str:
    m = meta["machine"]
    lines = ["# Benchmarks", ""]
    if meta["quick"]:
        lines += [
            "> **QUICK smoke run**: small sizes (`--quick`); these are not the project's "
            "reference numbers. Run `make bench` for the full measurement.",
            "",
        ]
    lines += [
        f"Written by `{meta['command']}` on {meta['date_utc']}, in {meta['seconds']:.0f} s. "
        "Every number below was measured by that run (raw results: "
        f"`{meta['json_path']}`), except the published results quoted for comparison and the "
        "training time read from the checkpoint's manifest. Do not edit by hand: run "
        "`make bench` again."
        + (
            " Exception: the sections marked *kept* were not measured by this run (`--keep`); "
            "each names the earlier run (date, source) that measured it, on its machine."
            if kept
            else ""
        ),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']} |",
        f"| cores | {m['cores']} ({m['cores_usable']} usable by this process) |",
        f"| RAM | {fmt_bytes(m['ram_bytes'])} |",
        f"| OS | {m['os']} |",
        f"| Python | {m['python']} |",
        f"| torch | {m['torch']} |",
        f"| faiss | {m['faiss']} |",
        f"| numpy | {m['numpy']} |",
        f"| load average (1 / 5 / 15 min) | {m['loadavg_start']} at the start, "
        f"{m['loadavg_end']} at the end |",
        f"| thread settings in the environment | "
        f"{', '.join(f'`{k}={v}`' for k, v in m['thread_env'].items()) or 'none'} |",
        f"| source | {m['git'] or '?'} |",
        f"| checkpoints | `{meta['checkpoint_dir']}` |",
        "",
        "The machine may be shared: a load average above the core count means other work "
        "competed for the CPU during the run, and the speed numbers are then pessimistic.",
        "",
        "## Summary",
        "",
        "| section | target | measured | result |",
        "|---|---|---|---|",
    ]
    for s in sections:
        if s.error:
            lines.append(f"| {s.title} | - | **error**: see the section | **ERROR** |")
        for c in s.checks:
            if c.ok is not None or c.status == "n/a":
                lines.append(f"| {s.title} | {c.target} | {c.measured} | {c.status} |")
    for k in kept:
        lines += k.summary_rows
    skipped = [
        n
        for n, (title, _) in MEASUREMENTS.items()
        if n not in {s.name for s in sections} and title not in {k.title for k in kept}
    ]
    if skipped:
        lines += ["", f"Not run this time (`--only`): {', '.join(skipped)}."]
    if kept:
        lines += [
            "",
            "Kept from earlier runs (`--keep`), not measured by this one: "
            + ", ".join(k.title for k in kept)
            + ". Their sections say when they were measured.",
        ]
    for i, s in enumerate(sections, 1):
        lines += ["", f"## {i}. {s.title}", "", f"Section `{s.name}`, {s.seconds:.0f} s.", ""]
        if s.error:
            lines += ["**Measurement failed:**", "", "```", s.error, "```", ""]
        if s.checks:
            lines += ["| target | measured | result | measured by |", "|---|---|---|---|"]
            lines += [f"| {c.target} | {c.measured} | {c.status} | {c.how} |" for c in s.checks]
            lines.append("")
        for note in s.notes:
            lines += [note, ""]
        for table in s.tables:
            lines += [table, ""]
    for i, k in enumerate(kept, len(sections) + 1):
        lines += ["", f"## {i}. {k.title}"]
        block = list(k.block)
        if k.measured:
            block[:1] = ["", f"*Kept from {k.measured}: not measured by this run.*", ""]
        lines += block
    return "\n".join(lines).rstrip() + "\n"


def write(
    meta: dict[str, Any],
    sections: list[Section],
    out: Path,
    json_path: Path,
    keep: bool = False,
) -> None:
    """The markdown report to ``out``, every section's raw results to ``json_path``; with
    ``keep``, the sections of the existing report and JSON that this run did not measure are
    kept (marked with when they were measured)."""
    kept = kept_sections(out, {s.title for s in sections}) if keep else []
    old: dict[str, Any] = {}
    if keep and json_path.is_file():
        old = json.loads(json_path.read_text()).get("sections", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(meta, sections, kept))
    run = {
        s.name: {
            "title": s.title,
            "seconds": round(s.seconds, 2),
            "error": s.error,
            "checks": [{**asdict(c), "status": c.status} for c in s.checks],
            "notes": s.notes,
            "raw": s.raw,
        }
        for s in sections
    }
    kept_json = {k: v for k, v in old.items() if k not in run}
    payload = {**meta, "sections": {**run, **kept_json}}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    say(f"wrote {rel(out)} and {rel(json_path)} in {meta['seconds']:.0f} s")


def print_summary(sections: list[Section]) -> None:
    """Every judged row and every error, one line each, to stderr."""
    for s in sections:
        for c in s.checks:
            if c.ok is not None or c.status == "n/a":
                print(f"{c.status:>8}  {s.name}: {c.target}: {c.measured}", file=sys.stderr)
        if s.error:
            lines = s.error.strip().splitlines()
            last = f" ... {lines[-1][:200]}" if len(lines) > 1 else ""
            print(f"{'ERROR':>8}  {s.name}: {lines[0]}{last}", file=sys.stderr)
