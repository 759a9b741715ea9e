"""Retrieval by evidence (issue 15): section ``retrieval``.

The shipped sinusoid model on two :class:`~stream_meta.tasks.RelatedTaskStream` streams of the
same shapes: ``related`` (history tasks around 20 fresh cluster centres, then probe tasks of the
same clusters under new ids) and its ``control`` (every task drawn independently). On each,
:func:`stream_meta.evaluation.retrieval.compare` serves the very same events with three engine
configurations (``no-retrieval``, ``attention`` = ``retrieval=False``, ``retrieval`` = the
default) and computes two references outside the engine (``oracle-neighbour``,
``bayes-mixture``); the probes' query loss per shot count, the attainable gain and the fraction
of it realised go into a table per stream. Then the cost:
:func:`stream_meta.evaluation.retrieval.speed` with 10,000 live tasks, ``retrieval=False``
against the default in the same run. Every target row is computed from these numbers.
"""

from __future__ import annotations

from typing import Any

from scripts.bench.common import Check, Context, Section, change, need_checkpoint, say, shots

#: loss cut of the ``retrieval`` strategy against ``no-retrieval`` on the related stream
LOSS_CUTS = {1: 0.30, 2: 0.40}
#: share of the attainable gain it must realise there, at the same shot counts
GAIN_SHARE = 0.60
#: on the control stream, at most this much worse than no retrieval at any shot count
CONTROL_SLACK = 0.01
#: cost against ``retrieval=False``: adaptation p50 at most this ratio, events/s at least that
LATENCY_RATIO = 1.2
EVENTS_RATIO = 0.9
SEED = 0
#: torch threads of the whole section: one, so that the speed ratios measure the engines and
#: not how two threads contend with other work on a shared machine (the throughput section
#: measures `run`'s own two threads); restored afterwards
THREADS = 1
HOW = "`scripts/bench/retrieval.py`: `stream_meta.evaluation.retrieval.compare`"


def measure_retrieval(ctx: Context, section: Section) -> None:
    live = ctx.sizes.retrieval_live_tasks
    targets = [
        *(
            f"related: loss at {shots(str(n))} >= {cut:.0%} below no retrieval"
            for n, cut in LOSS_CUTS.items()
        ),
        *(
            f"related: >= {GAIN_SHARE:.0%} of the attainable gain at {shots(str(n))}"
            for n in LOSS_CUTS
        ),
        f"control: no more than {CONTROL_SLACK:.0%} worse than no retrieval at any shot count",
        f"adaptation p50 <= {LATENCY_RATIO}x `retrieval=False`'s with {live:,} live tasks",
        f"events/s >= {EVENTS_RATIO}x `retrieval=False`'s with {live:,} live tasks",
    ]
    if not need_checkpoint(ctx, section, "sinusoid", targets):
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        _measure(ctx, section, targets)
    finally:
        torch.set_num_threads(threads)


def _measure(ctx: Context, section: Section, targets: list[str]) -> None:
    from stream_meta.engine import EngineConfig
    from stream_meta.evaluation.retrieval import compare, speed
    from stream_meta.model_checkpoint import load_checkpoint
    from stream_meta.tasks import RelatedTaskStream, SinusoidFamily

    ck = ctx.checkpoint("sinusoid")
    assert ck is not None
    model, _manifest = load_checkpoint(ck)
    family = SinusoidFamily()
    sizes = ctx.sizes
    reports: dict[str, dict[str, Any]] = {}
    for name, related in (("related", True), ("control", False)):
        stream = RelatedTaskStream(
            family,
            related=related,
            history_tasks=sizes.retrieval_history_tasks,
            probe_tasks=sizes.retrieval_probe_tasks,
            seed=SEED,
        )
        say(f"retrieval: {name} stream, {len(stream.events()):,} events")
        reports[name] = compare(model, stream)
        section.tables.append(_table(name, reports[name]))
    section.raw["quality"] = reports
    _quality_checks(section, targets, reports)
    say(f"retrieval: speed with {sizes.retrieval_live_tasks:,} live tasks")
    configs = {"retrieval=False": EngineConfig(retrieval=False), "default": EngineConfig()}
    cost = speed(
        model,
        family,
        configs,
        live_tasks=sizes.retrieval_live_tasks,
        timed_events=sizes.retrieval_timed_events,
        latency_samples=sizes.retrieval_latency_samples,
        seed=SEED,
    )
    section.raw["speed"] = cost
    _speed_checks(section, targets[-2:], cost)
    _notes(section, reports)


def _slot(report: dict[str, Any], n: int) -> int | None:
    return report["shots"].index(n) if n in report["shots"] else None


def _quality_checks(
    section: Section, targets: list[str], reports: dict[str, dict[str, Any]]
) -> None:
    rel, ctl = reports["related"], reports["control"]
    loss = rel["loss"]
    for target, (n, cut) in zip(targets, LOSS_CUTS.items(), strict=False):
        i = _slot(rel, n)
        if i is None:
            section.checks.append(Check(target, f"not measured: no {n}-shot queries", None, HOW))
            continue
        a, b = loss["retrieval"][i], loss["no-retrieval"][i]
        got = 1.0 - a / b
        measured = f"{a:.4g} vs {b:.4g} without: {change(a, b)}"
        section.checks.append(Check(target, measured, got >= cut, HOW))
    for target, n in zip(targets[len(LOSS_CUTS) :], LOSS_CUTS, strict=False):
        i = _slot(rel, n)
        if i is None:
            section.checks.append(Check(target, f"not measured: no {n}-shot queries", None, HOW))
            continue
        frac, gain = rel["fraction"]["retrieval"][i], rel["attainable"][i]
        best = min(("oracle-neighbour", "bayes-mixture"), key=lambda r: loss[r][i])
        if frac is None:
            measured = f"not measured: no attainable gain ({gain:.4g})"
            section.checks.append(Check(target, measured, None, HOW))
            continue
        measured = (
            f"{frac:.1%} of {gain:.4g} (no retrieval {loss['no-retrieval'][i]:.4g}, "
            f"retrieval {loss['retrieval'][i]:.4g}, best reference {best} {loss[best][i]:.4g})"
        )
        section.checks.append(Check(target, measured, frac >= GAIN_SHARE, HOW))
    ratios = [
        a / b if b > 0 else float("inf")
        for a, b in zip(ctl["loss"]["retrieval"], ctl["loss"]["no-retrieval"], strict=True)
    ]
    measured = ", ".join(f"{s}: {r:.3f}x" for s, r in zip(ctl["shots"], ratios, strict=True))
    section.checks.append(
        Check(targets[2 * len(LOSS_CUTS)], measured, max(ratios) <= 1.0 + CONTROL_SLACK, HOW)
    )
    # context: today's attention, and the share of the exact mixture's own gain
    for n in LOSS_CUTS:
        i = _slot(rel, n)
        if i is None:
            continue
        a, b = loss["attention"][i], loss["no-retrieval"][i]
        mix_gain = b - loss["bayes-mixture"][i]
        share = (b - loss["retrieval"][i]) / mix_gain if mix_gain > 0 else None
        section.checks.append(
            Check(
                f"related, {shots(str(n))}: attention (`retrieval=False`) vs no retrieval; "
                "retrieval's share of the Bayes mixture's gain (no target)",
                f"{a:.4g} vs {b:.4g}: {change(a, b)}; "
                + ("no mixture gain" if share is None else f"{share:.1%} of {mix_gain:.4g}"),
                None,
                HOW,
            )
        )


def _speed_checks(section: Section, targets: list[str], cost: dict[str, Any]) -> None:
    off, on = cost["retrieval=False"], cost["default"]
    lat = on["adapt_latency_ms_p50"] / off["adapt_latency_ms_p50"]
    # window by window (the same events, one right after the other), then the median: a burst
    # of other work on the machine spoils a window, not the ratio
    per_window = sorted(
        a / b for a, b in zip(off["window_seconds"], on["window_seconds"], strict=True)
    )
    eps = per_window[len(per_window) // 2]
    overall = on["events_per_s"] / off["events_per_s"]
    live = min(cost["live_tasks"].values())
    how = (
        "`stream_meta.evaluation.retrieval.speed` (both engines in one process, interleaved; "
        f"{live:,} live tasks, torch {cost['torch_threads']} threads)"
    )
    section.checks += [
        Check(
            targets[0],
            f"{lat:.2f}x: p50 {on['adapt_latency_ms_p50']:.3g} ms vs "
            f"{off['adapt_latency_ms_p50']:.3g} ms (p99 {on['adapt_latency_ms_p99']:.3g} vs "
            f"{off['adapt_latency_ms_p99']:.3g} ms)",
            lat <= LATENCY_RATIO,
            how,
        ),
        Check(
            targets[1],
            f"{eps:.2f}x (median of {len(per_window)} windows; overall {overall:.2f}x: "
            f"{on['events_per_s']:,.0f} vs {off['events_per_s']:,.0f} events/s inside "
            f"`Engine.process`, {cost['timed_events']:,} events each)",
            eps >= EVENTS_RATIO,
            how,
        ),
    ]


def _table(name: str, report: dict[str, Any]) -> str:
    cols = report["shots"]
    head = f"| {name} stream | " + " | ".join(shots(str(s)) for s in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for strategy, values in report["loss"].items():
        cis = report["ci95"][strategy]
        cells = " | ".join(f"{v:.4g} ± {c:.2g}" for v, c in zip(values, cis, strict=True))
        lines.append(f"| {strategy} | {cells} |")
    lines.append(
        "| attainable gain | " + " | ".join(f"{g:.4g}" for g in report["attainable"]) + " |"
    )
    for strategy, fr in report["fraction"].items():
        cells = " | ".join("-" if f is None else f"{f:.1%}" for f in fr)
        lines.append(f"| fraction realised: {strategy} | {cells} |")
    mix = report["mixture"]
    cells = " | ".join(
        f"{v:.3g}, {p:g}" for v, p in zip(mix["variance"], mix["null_prior"], strict=True)
    )
    lines.append(f"| mixture sigma2, null prior | {cells} |")
    s = report["stream"]
    caption = (
        f"**{name}** (`related={s['related']}`, {s['clusters']} clusters, jitter {s['jitter']}, "
        f"{s['history_tasks']:,} history tasks x {s['history_examples']} examples, "
        f"{s['probe_tasks']} probe tasks x {s['queries']} queries per shot count, seed "
        f"{s['seed']}): query MSE ± 95% CI over probe tasks."
    )
    return caption + "\n\n" + "\n".join(lines)


def _notes(section: Section, reports: dict[str, dict[str, Any]]) -> None:
    same = all(r["loss"]["retrieval"] == r["loss"]["attention"] for r in reports.values())
    if same:
        section.notes.append(
            "`retrieval` and `attention` gave identical losses on both streams: in this build "
            "the `retrieval` switch changes nothing (retrieval by evidence is not active)."
        )
    section.notes.append(
        "Strategies: `no-retrieval` = `EngineConfig(k_neighbours=0, retrieval=False)`, "
        "`attention` = `EngineConfig(retrieval=False)` (the neighbour attention), `retrieval` = "
        "`EngineConfig()`; each a fresh engine over the same events in the same order "
        "(micro-batches of 512). References, outside the engine: `oracle-neighbour` copies a "
        "random same-cluster history task's function (the model adapted on its examples, no "
        "neighbours); `bayes-mixture` is the posterior mean over every history task's function "
        "and the no-retrieval model (prequential likelihood), Gaussian likelihood of the "
        "probe's support points, its variance and null prior chosen per shot count on a "
        "calibration stream of the same kind (another seed). Attainable gain = no-retrieval "
        "loss minus the better reference's; fraction realised = the strategy's gain over it "
        "(`-` where nothing is attainable). The oracle knows the cluster, which one or two "
        "points may not reveal, so at few shots the attainable gain can exceed what any "
        "predictor could reach; the mixture's share is shown beside it as context."
    )


__all__ = ["measure_retrieval"]
