"""The replay report as one self-contained HTML page, and ``compare`` of two reports.

The page embeds its plots as PNG data URIs (matplotlib, Agg backend: no display needed, no file
beside it), so it can be mailed or attached to a CI run as it is:

* prequential loss per window of events, one line per strategy, with the drift alarms and
  meta-updates of each strategy marked;
* loss against the number of examples the task had (the shots curve);
* one-task adaptation latency per strategy (its distribution);
* a comparison table, with each strategy's uncertainty: the coverage of its central 90%
  interval and its calibration error (regression), or its expected calibration error
  (classification); "-" for a strategy that gives no uncertainty.

:func:`compare` is what ``stream-meta compare A B`` prints: a markdown table of the differences
between two reports and whether B regresses past a threshold (to gate a model version in CI).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["compare", "load_report", "write_data_html", "write_html"]

SHOTS_SHOWN = ("0", "1", "2", "5", "10", "20")


def load_report(path: str | Path) -> dict[str, Any]:
    """A ``report.json`` (or the replay directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(f"no replay report at {p}")
    report = json.loads(p.read_text())
    if not isinstance(report, dict) or "strategies" not in report:
        raise ValueError(f"{p} is not a stream-meta replay report (no 'strategies')")
    return report


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["strategies"]
    out = []
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in runs.items():
        w = r.get("loss_windows", [])
        line = ax.plot([x["start"] for x in w], [x["loss"] for x in w], label=name)[0]
        for u in r.get("meta_updates", []):
            if u["outcome"] in ("promoted", "rolled_back"):
                ax.axvline(u["event_index"], color=line.get_color(), ls="--", lw=1)
        for a in r.get("alarms", [])[:50]:
            ax.axvline(a["event_index"], color=line.get_color(), ls=":", lw=0.6, alpha=0.6)
    ax.set(
        xlabel="event",
        ylabel="prequential loss (per window)",
        yscale="log",
        title="Loss over the stream (dashed: model swaps, dotted: drift alarms)",
    )
    ax.legend()
    out.append(("Loss over time", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        by = r.get("loss_by_shots", {})
        xs = sorted((int(k), v) for k, v in by.items() if k.isdigit())
        ax.plot([k for k, _ in xs], [v for _, v in xs], marker="o", ms=3, label=name)
    ax.set(
        xlabel="examples the task had", ylabel="mean loss", yscale="log", title="Loss against shots"
    )
    ax.legend()
    out.append(("Loss against shots", _png(fig)))
    plt.close(fig)

    labelled = {n: r["labels"]["curve"] for n, r in runs.items() if r.get("labels")}
    if labelled:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in labelled.items():
            points = [(u, loss) for u, _, loss in curve if loss is not None]
            ax.plot([u for u, _ in points], [v for _, v in points], label=name)
        ax.set(
            xlabel="labels used",
            ylabel="prequential loss so far",
            yscale="log",
            title=f"Loss against labels used (budget {report.get('label_budget')})",
        )
        ax.legend()
        out.append(("Loss against labels used", _png(fig)))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [n for n, r in runs.items() if r.get("adapt_latency_ms")]
    if names:
        ax.boxplot([runs[n]["adapt_latency_ms"] for n in names], tick_labels=names)
    ax.set(ylabel="ms", title="One-task adaptation latency (one thread)")
    out.append(("Adaptation latency", _png(fig)))
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rate(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _table(report: dict[str, Any]) -> str:
    cols = [
        "prequential_loss",
        "cold_start_loss",
        *(f"shots {s}" for s in SHOTS_SHOWN),
        "coverage_90",
        "calibration_error",
        "events_per_s",
        "adapt_latency_ms_p50",
        "model_version",
        "meta-updates",
    ]
    rows = []
    for name, r in report["strategies"].items():
        by = r.get("loss_by_shots", {})
        cells = [
            r.get("prequential_loss"),
            r.get("cold_start_loss"),
            *(by.get(s) for s in SHOTS_SHOWN),
            r.get("coverage_90"),
            r.get("calibration_error"),
            r.get("events_per_s"),
            r.get("adapt_latency_ms_p50"),
            r.get("model_version"),
            len(r.get("meta_updates", [])),
        ]
        rows.append(
            "<tr><th>"
            + html.escape(name)
            + "</th>"
            + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in cells)
            + "</tr>"
        )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["strategy", *cols])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _families(report: dict[str, Any]) -> str:
    """Each strategy's per-family matrix (rows: phase ends; columns: families), if any."""
    parts = []
    for name, r in report["strategies"].items():
        fam = r.get("families")
        if not fam:
            continue
        head = "".join(f"<th>{html.escape(f)}</th>" for f in ["after phase", *fam["families"]])
        rows = "".join(
            f"<tr><th>{i + 1}: {html.escape(p['family'])} [{p['start']}, {p['end']})</th>"
            + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row)
            + "</tr>"
            for i, (p, row) in enumerate(zip(fam["phases"], fam["matrix"], strict=True))
        )
        summary = (
            f"{fam['metric']}: average {_fmt(fam['average'])}, backward transfer "
            f"{_fmt(fam['backward_transfer'])}, "
            f"forgetting {_fmt(fam['forgetting'])}"
        )
        parts.append(
            f"<h3>{html.escape(name)}</h3><p>{html.escape(summary)}</p><table>"
            f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        )
    if not parts:
        return ""
    return "<h2>Per-family matrix</h2>" + "".join(parts)


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report page to ``path``; returns it."""
    plots = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{data}">'
        for title, data in _plots(report)
    )
    meta = (
        f"log <code>{html.escape(str(report.get('log')))}</code>, {report.get('events')} "
        f"events, label delay {report.get('label_delay', 0)}, checkpoint "
        f"<code>{html.escape(str(report.get('checkpoint')))}</code>"
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>stream-meta replay report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
img{{max-width:100%}}</style></head>
<body><h1>stream-meta replay report</h1><p>{meta}</p>
<h2>Comparison</h2>{_table(report)}
{plots}
{_families(report)}
</body></html>
"""
    out = Path(path)
    out.write_text(page, encoding="utf-8")
    return out


def compare(
    a: dict[str, Any], b: dict[str, Any], *, threshold: float = 0.05
) -> tuple[str, list[str]]:
    """Markdown table of B against A per strategy both hold, and the regressions: a strategy
    whose prequential loss in B exceeds A's by more than ``threshold`` (relative), or that B
    lacks."""
    lines = [
        "| strategy | prequential loss A | B | change | 1 shot A | B | 10 shots A | B | "
        "events/s A | B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    regressions = []
    for name, ra in a["strategies"].items():
        rb = b["strategies"].get(name)
        if rb is None:
            regressions.append(f"{name}: missing from B")
            continue
        la, lb = ra.get("prequential_loss"), rb.get("prequential_loss")
        change = (lb / la - 1) if la and lb is not None else math.nan
        if lb is None or (la is not None and lb > la * (1 + threshold)):
            regressions.append(
                f"{name}: prequential loss {_fmt(la)} -> {_fmt(lb)} "
                f"({change:+.1%} > {threshold:+.0%})"
            )
        sa, sb = ra.get("loss_by_shots", {}), rb.get("loss_by_shots", {})
        lines.append(
            f"| {name} | {_fmt(la)} | {_fmt(lb)} | {change:+.1%} | {_fmt(sa.get('1'))} | "
            f"{_fmt(sb.get('1'))} | {_fmt(sa.get('10'))} | {_fmt(sb.get('10'))} | "
            f"{_rate(ra.get('events_per_s'))} | {_rate(rb.get('events_per_s'))} |"
        )
    return "\n".join(lines), regressions


def write_data_html(report: dict[str, Any], path: str | Path) -> Path:
    """The page of an ``evaluate --data`` report: the table of losses by support size, one row
    per strategy, and its plot (loss against support-size bucket)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["strategies"]
    labels = list(report["events_by_bucket"])
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in runs.items():
        ys = [math.nan if v is None else v for v in r["buckets"].values()]
        ax.plot(labels, ys, marker="o", label=name, lw=2.5 if name == "stream-meta" else 1.2)
    ax.set_xlabel("examples the task had when predicted")
    ax.set_ylabel(report["metric"])
    ax.legend(fontsize=8)
    plot = _png(fig)
    plt.close(fig)
    head = "".join(f"<th>{html.escape(b)}</th>" for b in labels)
    counts = "".join(f"<td>{report['events_by_bucket'][b]}</td>" for b in labels)
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{_fmt(r['loss'])}</td>"
        + "".join(f"<td>{_fmt(v)}</td>" for v in r["buckets"].values())
        + "</tr>"
        for name, r in runs.items()
    )
    meta = (
        f"log <code>{html.escape(str(report.get('data')))}</code>, {report['split']} split: "
        f"{report['tasks']} tasks, {report['events']} labelled events, prequential in stream "
        f"order; checkpoint <code>{html.escape(str(report.get('checkpoint')))}</code>; best "
        f"baseline {html.escape(report['best_baseline'])}, stream-meta / best "
        f"{report['ratio_to_best_baseline']:.3f}"
    )
    if "best_strategy" in report:
        meta += (
            f"; best of all {html.escape(report['best_strategy'])}, stream-meta / best "
            f"{report['ratio_to_best_strategy']:.3f}"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>stream-meta evaluation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
img{{max-width:100%}}</style></head>
<body><h1>stream-meta evaluation on held-out tasks</h1><p>{meta}</p>
<h2>{html.escape(report["metric"])} by support size</h2>
<table><tr><th>strategy</th><th>all</th>{head}</tr><tr><th>events</th>
<td>{report["events"]}</td>{counts}</tr>{rows}</table>
<h2>Loss against support size</h2>
<img alt="loss by support size" src="data:image/png;base64,{plot}">
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
