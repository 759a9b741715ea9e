"""Contract checks every engine must pass, whatever its adapter (River's ``check_estimator``).

Each check is a plain function taking an *engine factory* (a callable returning a fresh
:class:`~stream_meta.engine.Engine`, so runs can be compared from the same start); it feeds the
engine a small deterministic stream fitted to its schema and raises ``AssertionError`` when the
contract is broken:

* :func:`check_output_order`: one output per input, in input order, rejections included;
* :func:`check_rejections_change_no_state`: a rejected event changes no state (only the event
  and rejection counters move);
* :func:`check_batch_size_invariance`: the micro-batch size changes nothing an event is served
  with: same support set, same learned state, same predictions (to float rounding); a strategy
  that reads the task index finds it updated once per batch (see :mod:`stream_meta.engine`),
  so its predictions are compared only where the index is settled;
* :func:`check_duplicates_learned_once`: a labelled event re-sent with its id is predicted and
  flagged, never learned again.

:func:`check_engine` runs them all (``CHECKS`` lists them); ``tests/unit/test_checks.py`` runs
them over every replay strategy's engine. A new strategy or adapter should pass them too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from stream_meta.engine import BatchResult, Engine

__all__ = [
    "BATCH_SIZES",
    "CHECKS",
    "EngineFactory",
    "Retrieval",
    "bad_events",
    "check_batch_size_invariance",
    "check_duplicates_learned_once",
    "check_engine",
    "check_output_order",
    "check_rejections_change_no_state",
    "solo_for",
    "stream_for",
]

EngineFactory = Callable[[], Engine]
#: how a strategy reads the task index (see :func:`check_batch_size_invariance`)
Retrieval = Literal["none", "others", "shared"]
#: micro-batch sizes compared by :func:`check_batch_size_invariance`
BATCH_SIZES = (1, 7, 64, 512)
#: how close two predictions of the same event must be (float rounding of batched kernels)
RTOL, ATOL = 1e-3, 1e-3


# -- streams ------------------------------------------------------------------------------------
def stream_for(engine: Engine, n: int = 300, tasks: int = 12, seed: int = 0) -> list[dict]:
    """A deterministic stream of valid events for ``engine``'s schema: ``n`` events of ``tasks``
    interleaved tasks (about 70% labelled, each task its own function), then two interleaved
    tasks that learn more examples than the support set holds (so eviction is exercised).

    >>> from stream_meta.model import MetaModel, ModelConfig
    >>> events = stream_for(Engine(MetaModel(ModelConfig(x_dim=2))), n=10, tasks=3)
    >>> len(events) > 10 and all(len(e["x"]) == 2 for e in events)
    True
    """
    rng = np.random.default_rng(seed)
    heavy = int(1.5 * engine.config.support_size) + 1
    ids = rng.integers(0, tasks, n).tolist() + [tasks] * heavy + [tasks + 1] * heavy
    order = np.concatenate([np.arange(n), n + rng.permutation(2 * heavy)]).tolist()
    labelled = (rng.random(len(order)) < 0.7) | (np.array([ids[i] for i in order]) >= tasks)
    return _events(engine, [ids[i] for i in order], labelled, "e", rng)


def solo_for(engine: Engine, seed: int = 1) -> list[dict]:
    """Task ``solo`` alone, learning twice as many examples as the support set holds (every
    third event a query): what it is served with depends on no other task's progress."""
    rng = np.random.default_rng(seed)
    n = 3 * engine.config.support_size
    events = _events(engine, [0] * n, np.arange(n) % 3 > 0, "solo", rng)
    return [{**e, "task_id": "solo", "ts": e["ts"] + 1e6} for e in events]


def _events(
    engine: Engine, tasks: list[int], labelled: np.ndarray, prefix: str, rng: np.random.Generator
) -> list[dict]:
    """Event ``i`` of task ``t{tasks[i]}`` (each task its own function), labelled or not."""
    d, classes = engine.schema.x_dim, engine.schema.n_classes
    weights = rng.normal(size=(max(tasks) + 1, d))
    phase = rng.uniform(0, np.pi, max(tasks) + 1)
    out = []
    for i, t in enumerate(tasks):
        x = rng.uniform(-3, 3, d)
        event: dict[str, Any] = {
            "event_id": f"{prefix}{i}",
            "task_id": f"t{t}",
            "x": [float(v) for v in x],
            "ts": float(i),
        }
        if labelled[i]:
            s = float(x @ weights[t])
            if classes is None:
                event["y"] = float(2 * np.sin(s - phase[t]))
            else:
                event["y"] = int(abs(s) * classes) % classes
        out.append(event)
    return out


def bad_events(engine: Engine, task_id: str = "t0") -> list[bytes | str | dict]:
    """One input per way an event can be refused, for ``engine``'s schema."""
    d = engine.schema.x_dim
    x = [0.5] * d
    good = {"event_id": "bad", "task_id": task_id, "x": x, "y": 1}

    def raw(**fields: Any) -> bytes:
        return json.dumps({**good, **fields}).encode()

    classes = engine.schema.n_classes
    return [
        b'{"event_id": "bad", "task_id": "t0", "x": [0.1]',  # malformed JSON
        b"[1, 2, 3]",  # not an object
        "null",
        json.dumps({k: v for k, v in good.items() if k != "task_id"}).encode(),  # missing
        json.dumps({k: v for k, v in good.items() if k != "event_id"}),
        {k: v for k, v in good.items() if k != "x"},
        raw(x=[*x, 0.5]),  # wrong dimension
        raw(x=[]),
        raw(x=["a"] * d),  # invalid type
        raw(event_id=7),
        raw(x=[float("nan")] * d),  # NaN / infinite (json.dumps writes NaN, Infinity)
        raw(y=float("inf")),
        {**good, "x": [float("nan")] * d},
        raw(pad="z" * (engine.config.max_event_bytes + 1)),  # oversized
        raw(y=classes) if classes else raw(y="1.0"),  # a class out of range / a string label
    ]


# -- what is compared ---------------------------------------------------------------------------
def _served(result: BatchResult) -> list[tuple[Any, ...]]:
    """Per valid event: what it was served with, exactly (identity, shots, flags)."""
    o = result.outputs
    if o is None:
        return []
    dup = o.duplicates or [False] * len(o)
    return list(zip(o.event_ids, o.task_ids, o.shots, o.labelled, dup, strict=True))


def _values(result: BatchResult) -> list[Any]:
    """Per valid event: its prediction (class probabilities for a classifier)."""
    o = result.outputs
    if o is None:
        return []
    return list(o.values if o.probabilities is None else o.probabilities)


def _learned(engine: Engine) -> dict[str, tuple[Any, ...]]:
    """Every live task's support set and counts (what learning changed), exactly."""
    out = {}
    for s in engine.store:
        xs = None if s.xs is None else s.xs[: s.n].tobytes()
        ys = None if s.ys is None else s.ys[: s.n].tobytes()
        out[s.task_id] = (s.n, s.seen, s.version, xs, ys)
    return out


def _feed(engine: Engine, raws: Sequence[Any], batch: int) -> tuple[list[Any], list[Any]]:
    served: list[Any] = []
    values: list[Any] = []
    for lo in range(0, len(raws), batch):
        result = engine.process(raws[lo : lo + batch])
        served += _served(result)
        values += _values(result)
    return served, values


def _assert_close(got: list[Any], ref: list[Any], what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(got, dtype=np.float64),
        np.asarray(ref, dtype=np.float64),
        rtol=RTOL,
        atol=ATOL,
        err_msg=what,
    )


def _assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: state parts {sorted(a)} != {sorted(b)}"
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f"), (
            f"{what}: {key} changed"
        )


# -- the checks ---------------------------------------------------------------------------------
def check_output_order(make: EngineFactory) -> None:
    """One output per input, in input order, rejections included, whatever the input form
    (a mapping, JSON text or JSON bytes)."""
    engine = make()
    good = stream_for(engine, n=60, tasks=5)[:60]
    bad = bad_events(engine)
    forms: list[Callable[[dict], Any]] = [lambda e: e, json.dumps, lambda e: json.dumps(e).encode()]
    raws: list[Any] = []
    sent: list[dict | None] = []  # the event behind each input, None for a bad one
    for i, event in enumerate(good):
        raws.append(forms[i % 3](event))
        sent.append(event)
        if i % 4 == 0:
            raws.append(bad[(i // 4) % len(bad)])
            sent.append(None)
    for lo, hi in ((0, 1), (1, 9), (9, len(raws))):
        result = engine.process(raws[lo:hi])
        assert len(result.order) == hi - lo, "not one output per input"
        kept = [ref for ref in result.order if ref >= 0]
        refused = [-1 - ref for ref in result.order if ref < 0]
        assert kept == list(range(len(kept))), f"predictions out of input order: {kept}"
        assert refused == list(range(len(refused))), f"rejections out of order: {refused}"
        assert len(result.rejections) == len(refused) and len(result.predictions) == len(kept)
        o = result.outputs
        for k, ref in enumerate(result.order, lo):
            expected, raw = sent[k], raws[k]
            if ref < 0:
                assert expected is None, f"input {k} (valid) was rejected"
                if not isinstance(raw, dict):
                    assert result.rejections[-1 - ref].raw == _bytes(raw), f"input {k}"
                continue
            assert expected is not None and o is not None and o.x is not None
            got = (o.event_ids[ref], o.task_ids[ref], o.x[ref].tolist())
            want = (expected["event_id"], expected["task_id"], np.float32(expected["x"]).tolist())
            assert got == want, f"input {k} got the output of another event: {got} != {want}"
            assert result.predictions[ref].event_id == expected["event_id"]


def _bytes(raw: bytes | str) -> bytes:
    return (raw.encode() if isinstance(raw, str) else raw)[:4096]


def check_rejections_change_no_state(make: EngineFactory) -> None:
    """A batch of only bad events changes no state (only the event and rejection counters
    move); bad events mixed into a batch leave the state of the good ones alone."""
    engine = make()
    events = stream_for(engine, n=120, tasks=6)
    engine.process(events[:100])
    before, summary = engine.state_arrays(), engine.summary()
    bad = bad_events(engine)
    result = engine.process(bad)
    assert result.outputs is None and len(result.rejections) == len(bad)
    assert result.order == [-1 - j for j in range(len(bad))]
    after = engine.state_arrays()
    scalars = after["stats.scalars"].copy()
    assert scalars[0] - before["stats.scalars"][0] == len(bad), "events not counted"
    assert scalars[3] - before["stats.scalars"][3] == len(bad), "rejections not counted"
    scalars[[0, 3]] = before["stats.scalars"][[0, 3]]
    _assert_same_arrays(before, {**after, "stats.scalars": scalars}, "a rejected batch")
    now = engine.summary()
    assert (now["events"], now["rejected"]) == (
        summary["events"] + len(bad),
        summary["rejected"] + len(bad),
    )
    for key in ("events", "rejected"):
        del now[key], summary[key]
    assert now == summary, "the summary changed"
    # mixed with good events: the same state and predictions as the good events alone
    mixed, clean = make(), make()
    mixed.process(events[:100])
    clean.process(events[:100])
    tail = events[100:]
    raws = [r for pair in zip(tail, bad, strict=False) for r in pair] + tail[len(bad) :]
    got, want = mixed.process(raws), clean.process(tail)
    assert _served(got) == _served(want) and _values(got) == _values(want)
    a, b = mixed.state_arrays(), clean.state_arrays()
    scalars = a["stats.scalars"].copy()
    scalars[[0, 3]] = b["stats.scalars"][[0, 3]]
    _assert_same_arrays(b, {**a, "stats.scalars": scalars}, "bad events mixed in")


def check_batch_size_invariance(
    make: EngineFactory, *, retrieval: Retrieval = "none", sizes: Sequence[int] = BATCH_SIZES
) -> None:
    """The same events fed in batches of each of ``sizes`` are served with the same support
    sets, leave the same learned state and get the same predictions (to float rounding).

    A strategy that reads the task index sees it updated only at the end of a batch (or every
    ``index_flush_every`` upserts), so while many tasks learn its predictions depend on the
    batch size by design; ``retrieval`` says how far they are compared:

    * ``"none"``: the index is never read: every prediction is compared;
    * ``"others"``: each task is served with other tasks' embeddings (a task never retrieves
      itself): compared for a task that learns alone after the stream (:func:`solo_for`) and
      for a query of every task at the end (weights adapted afresh);
    * ``"shared"``: a task may be served with what its own indexed embedding changed (the
      nearest task's adaptation retrieves that task's neighbours): compared for the queries.

    A strategy that borrows from a retrieval bank (``engine.bank``: updated between batches
    too, its entries holding their tasks' examples as of their last offer) is compared only on
    the events it served without borrowing: with no example, or more than the bank's
    ``max_shots``.

    Support sets served and learned are compared exactly in every case.
    """
    events = stream_for(make())
    solo = solo_for(make())
    queries = [
        {"event_id": f"q{t}", "task_id": t, "x": events[0]["x"]}
        for t in sorted({e["task_id"] for e in events + solo})
    ]
    runs = []
    borrows = 0
    for batch in sizes:
        engine = make()
        borrows = engine.bank.config.max_shots if engine.bank is not None else 0
        served, values = _feed(engine, events, batch)
        solo_served, solo_values = _feed(engine, solo, batch)
        learned = _learned(engine)
        engine.clear_weights_cache()
        q_served, q_values = _feed(engine, queries, batch)
        runs.append(((served, solo_served, q_served), learned, (values, solo_values, q_values)))
    ref_served, ref_learned, ref_values = runs[0]
    compared = {"none": 3, "others": 2, "shared": 1}[retrieval]
    for batch, (served2, learned2, values2) in zip(sizes[1:], runs[1:], strict=True):
        what = f"batches of {batch} vs {sizes[0]}"
        assert served2 == ref_served, f"{what}: events served with other support sets"
        assert learned2 == ref_learned, f"{what}: other support sets learned"
        for part in range(3 - compared, 3):
            # served with 1..borrows examples: possibly borrowed from the bank
            keep = [i for i, ev in enumerate(ref_served[part]) if not 1 <= ev[2] <= borrows]
            _assert_close(
                [values2[part][i] for i in keep],
                [ref_values[part][i] for i in keep],
                f"{what}: {_PARTS[part]} differ",
            )


_PARTS = ("predictions of the stream", "predictions of a task learning alone", "final queries")


def check_duplicates_learned_once(make: EngineFactory) -> None:
    """A labelled event re-sent with its id (same or another label, in a later batch, in the
    same batch, or marked ``learned`` after a restore) is predicted, flagged as a duplicate and
    never learned again."""
    engine = make()
    assert engine.dedupe is not None, "de-duplication is off: duplicates would be learned"
    events = stream_for(engine, n=120, tasks=6)
    engine.process(events)
    labelled = [e for e in events if "y" in e]
    before, stats = _learned(engine), (engine.stats.labelled, engine.stats.queries)
    again = [
        {**e, "y": e["y"] if i % 2 else _other_label(engine, e["y"])}
        for i, e in enumerate(labelled[::5])
    ]
    result = engine.process(again)
    assert _learned(engine) == before, "a duplicate was learned"
    assert _flags(result) == [_DUP] * len(again), "duplicates not reported as such"
    assert engine.stats.labelled == stats[0] and engine.stats.queries == stats[1] + len(again)
    fresh = {**labelled[0], "event_id": "fresh"}
    result = engine.process([fresh, {**fresh, "y": _other_label(engine, fresh["y"])}, fresh])
    seen = engine.store.get(fresh["task_id"])
    assert seen is not None and seen.seen == before[fresh["task_id"]][1] + 1, "learned twice"
    assert _flags(result) == [(True, False), _DUP, _DUP], "repeats in a batch not reported"
    redelivered = [{**e, "event_id": f"r{i}"} for i, e in enumerate(labelled[:10])]
    now = _learned(engine)
    result = engine.process(redelivered, learned=[True] * len(redelivered))
    assert _learned(engine) == now, "an event marked learned was learned"
    assert _flags(result) == [_DUP] * len(redelivered), "events marked learned not reported"


#: (labelled, duplicate) of a duplicate's output: served as a query, flagged
_DUP = (False, True)


def _flags(result: BatchResult) -> list[tuple[Any, ...]]:
    return [s[3:] for s in _served(result)]


def _other_label(engine: Engine, y: Any) -> Any:
    classes = engine.schema.n_classes
    return (y + 1) % classes if classes else y + 1.0


#: every check, in the order :func:`check_engine` runs them
CHECKS = (
    check_output_order,
    check_rejections_change_no_state,
    check_batch_size_invariance,
    check_duplicates_learned_once,
)


def check_engine(make: EngineFactory, *, retrieval: Retrieval = "none") -> None:
    """Run every contract check on engines from ``make`` (see the module docstring)."""
    check_output_order(make)
    check_rejections_change_no_state(make)
    check_batch_size_invariance(make, retrieval=retrieval)
    check_duplicates_learned_once(make)
