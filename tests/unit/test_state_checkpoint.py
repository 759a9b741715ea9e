"""State checkpoints: exact continuation, rotation, corruption fallback, layout and model checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from stream_meta.engine import Engine, EngineConfig
from stream_meta.metrics import EngineMetrics
from stream_meta.state_checkpoint import StateDir, StateError, model_fingerprint
from tests.conftest import sinusoid_events

BATCH = 64
CUT = 23 * BATCH  # a checkpoint between two micro-batches, mid-stream


@pytest.fixture(scope="module")
def stream() -> list[dict]:
    return sinusoid_events(3000, 50, seed=1)


def _feed(engine: Engine, events: list[dict]) -> list[tuple]:
    """Process ``events`` in micro-batches; every output as a comparable tuple."""
    out = []
    for lo in range(0, len(events), BATCH):
        for p in engine.process(events[lo : lo + BATCH]).predictions:
            out.append((p.event_id, p.prediction, p.shots, p.loss, p.labelled, p.duplicate))
    return out


def _assert_same_state(a: Engine, b: Engine) -> None:
    sa, sb = a.state_arrays(), b.state_arrays()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert np.array_equal(sa[name], sb[name]), name


def _live_embeddings(engine: Engine) -> dict[str, np.ndarray]:
    return {s.task_id: s.embedding for s in engine.store if s.n}


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"support_size": 8, "support_policy": "recent"}, id="recent-wrapping"),
        pytest.param({"support_size": 8, "support_policy": "reservoir"}, id="reservoir"),
        pytest.param(
            {"support_size": 8, "support_policy": "recent", "max_live_tasks": 35},
            id="recent-with-eviction",
        ),
    ],
)
def test_restored_engine_continues_exactly_when_loaded_mid_stream(
    tmp_path, make_model, make_engine, stream, config
) -> None:
    model = make_model()
    a = make_engine(model, **config)
    _feed(a, stream[:CUT])
    StateDir(tmp_path).save(a)
    b = make_engine(model, **config)
    header = StateDir(tmp_path).load(b)
    assert header is not None
    assert b.summary() == a.summary()
    _assert_same_state(a, b)
    # Adapted weights are a cache that is not saved, and a cached row keeps the neighbours it
    # was adapted with: drop A's cache too, so both engines adapt the same requests.
    a.clear_weights_cache()
    rest = stream[CUT:]
    pa, pb = _feed(a, rest), _feed(b, rest)
    assert len(pa) == len(rest)
    assert pa == pb  # values, shots, losses: bit for bit
    assert np.array_equal([p[1] for p in pa], [p[1] for p in pb])
    assert a.summary() == b.summary()
    assert len(a.index) == len(b.index) > 0
    _assert_same_state(a, b)


def test_restored_engine_diverges_when_reservoir_state_is_lost(
    tmp_path, make_model, make_engine, stream
) -> None:
    """Control for the test above: the same comparison sees a reservoir that restarted."""
    model = make_model()
    config = {"support_size": 8, "support_policy": "reservoir"}
    a = make_engine(model, **config)
    _feed(a, stream[:CUT])
    StateDir(tmp_path).save(a)
    b = make_engine(model, **config)
    StateDir(tmp_path).load(b)
    b.store._rng = np.random.default_rng(12345)  # what a missing generator state would give
    a.clear_weights_cache()
    assert _feed(a, stream[CUT:]) != _feed(b, stream[CUT:])


def test_replayed_event_is_not_learned_again_when_restored_from_a_checkpoint(
    tmp_path, make_model, make_engine, stream
) -> None:
    model = make_model()
    a = make_engine(model)
    _feed(a, stream[:CUT])
    StateDir(tmp_path).save(a)
    replay = next(ev for ev in reversed(stream[:CUT]) if "y" in ev)
    restored, fresh = make_engine(model), make_engine(model)
    StateDir(tmp_path).load(restored)
    n_before = restored.store.get(replay["task_id"]).seen
    pred = restored.process([replay]).predictions[0]
    assert pred.duplicate and not pred.labelled and pred.loss is None
    assert restored.store.get(replay["task_id"]).seen == n_before
    assert not fresh.process([replay]).predictions[0].duplicate


# -- files and headers --------------------------------------------------------------------------


def test_load_returns_none_and_changes_nothing_when_directory_is_empty(
    tmp_path, make_model, make_engine
) -> None:
    engine = make_engine(make_model())
    engine.process(sinusoid_events(20, tasks=3))
    before = engine.summary()
    assert StateDir(tmp_path).load(engine) is None
    assert StateDir(tmp_path / "missing").load(engine) is None
    assert StateDir(tmp_path).checkpoints() == []
    assert engine.summary() == before


def test_header_carries_extra_and_model_version_when_saved(tmp_path, make_model) -> None:
    model = make_model()
    engine = Engine(
        model, EngineConfig(), metrics=EngineMetrics(CollectorRegistry()), model_version=7
    )
    engine.process(sinusoid_events(50, tasks=4))
    extra = {"offsets": {"events/0": 1234, "events/1": 99}, "note": "ü"}
    path = StateDir(tmp_path).save(engine, extra)
    assert path.parent == tmp_path and path.exists()
    other = Engine(model, EngineConfig(), metrics=EngineMetrics(CollectorRegistry()))
    header = StateDir(tmp_path).load(other)
    assert header["extra"] == extra
    assert header["model_version"] == 7
    assert header["model_fingerprint"] == model_fingerprint(model)
    assert header["path"] == str(path)
    assert other.summary()["events"] == 50


def test_save_keeps_the_newest_files_when_more_than_keep_are_written(
    tmp_path, make_model, make_engine
) -> None:
    engine = make_engine(make_model())
    state_dir = StateDir(tmp_path, keep=2)
    paths = []
    for i in range(4):
        engine.process(sinusoid_events(10, tasks=2, seed=i))
        paths.append(state_dir.save(engine, {"i": i}))
    seqs = [int(p.stem.split("-")[1]) for p in paths]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert state_dir.checkpoints() == [paths[3], paths[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([paths[2].name, paths[3].name])
    # a new StateDir on the same directory numbers on from the files
    later = StateDir(tmp_path, keep=2).save(engine)
    assert int(later.stem.split("-")[1]) > seqs[-1]
    assert StateDir(tmp_path).load(make_engine(make_model()))["path"] == str(later)


# -- damaged checkpoints ------------------------------------------------------------------------


def _two_checkpoints(tmp_path, make_model, make_engine):
    engine = make_engine(make_model())
    state_dir = StateDir(tmp_path, keep=2)
    engine.process(sinusoid_events(100, tasks=5, seed=0))
    older = state_dir.save(engine, {"n": 100})
    engine.process(sinusoid_events(100, tasks=5, seed=1))
    newer = state_dir.save(engine, {"n": 200})
    return state_dir, older, newer


def _garbage(path) -> None:
    path.write_bytes(b"\x00garbage, not a zip file" * 40)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _inconsistent(path) -> None:
    """A readable file whose task arrays do not fit together."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    arrays["store.xs"] = arrays["store.xs"][:-1]
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("damage", [_garbage, _truncate, _inconsistent])
def test_load_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(
    tmp_path, make_model, make_engine, caplog, damage
) -> None:
    state_dir, older, newer = _two_checkpoints(tmp_path, make_model, make_engine)
    damage(newer)
    engine = make_engine(make_model())
    with caplog.at_level(logging.ERROR, logger="stream_meta.state_checkpoint"):
        header = state_dir.load(engine)
    assert header["path"] == str(older) and header["extra"] == {"n": 100}
    assert engine.summary()["events"] == 100
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and newer.name in errors[0].getMessage()


def test_load_raises_naming_the_directory_when_every_checkpoint_is_damaged(
    tmp_path, make_model, make_engine, caplog
) -> None:
    state_dir, older, newer = _two_checkpoints(tmp_path, make_model, make_engine)
    _garbage(newer)
    _truncate(older)
    engine = make_engine(make_model())
    with caplog.at_level(logging.ERROR), pytest.raises(StateError) as err:
        state_dir.load(engine)
    assert str(tmp_path) in str(err.value)
    assert older.name in str(err.value) and newer.name in str(err.value)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    assert engine.summary()["events"] == 0 and len(engine.store) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"support_size": 16}, "support_size", id="support-size"),
        pytest.param({"support_policy": "reservoir"}, "policy", id="policy"),
    ],
)
def test_load_raises_when_the_engine_layout_differs(
    tmp_path, make_model, make_engine, change, field
) -> None:
    model = make_model()
    saved = make_engine(model, support_size=8)
    saved.process(sinusoid_events(50, tasks=4))
    StateDir(tmp_path).save(saved)
    engine = make_engine(model, **{"support_size": 8, **change})
    with pytest.raises(StateError, match=field) as err:
        StateDir(tmp_path).load(engine)
    assert str(tmp_path) in str(err.value)
    assert len(engine.store) == 0


def test_load_raises_when_the_model_family_differs(tmp_path, make_model, make_engine) -> None:
    saved = make_engine(make_model(x_dim=1))
    saved.process(sinusoid_events(50, tasks=4))
    StateDir(tmp_path).save(saved)
    with pytest.raises(StateError, match="x_dim"):
        StateDir(tmp_path).load(make_engine(make_model(x_dim=2)))


# -- another model ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["recent", "reservoir"])
def test_load_reencodes_the_tasks_when_the_model_differs(
    tmp_path, make_model, make_engine, caplog, policy
) -> None:
    config = {"support_size": 8, "support_policy": policy, "max_live_tasks": 30}
    # 20 cold tasks learn one example each and are evicted by 30 hot ones that keep learning
    cold = [
        {"event_id": f"c{i}", "task_id": f"cold{i}", "x": [0.1 * i], "y": 0.5} for i in range(20)
    ]
    events = cold + sinusoid_events(CUT, 30, seed=2)
    old, new = make_model(seed=0), make_model(seed=1)
    a = make_engine(old, **config)
    _feed(a, events)
    StateDir(tmp_path).save(a)
    b = make_engine(new, **config)
    with caplog.at_level(logging.WARNING, logger="stream_meta.state_checkpoint"):
        StateDir(tmp_path).load(b)
    assert any("re-encoding" in r.getMessage() for r in caplog.records)
    reference = make_engine(new, **config)  # learned the same events with the new model
    _feed(reference, events)
    # the support sets are restored as they were
    live = [s.task_id for s in a.store if s.n]
    assert [s.task_id for s in b.store] == [s.task_id for s in a.store]
    assert len(live) == len(a.store) == 30
    assert all(a.store.get(t).seen > 8 for t in live)  # the buffers wrapped
    for task_id in live:
        sa, sb = a.store.get(task_id), b.store.get(task_id)
        assert (sa.n, sa.seen, sa.version) == (sb.n, sb.seen, sb.version)
        assert np.array_equal(sa.xs[: sa.n], sb.xs[: sb.n])
        assert np.array_equal(sa.ys[: sa.n], sb.ys[: sb.n])
    # the embeddings are the new model's, not the saved ones
    saved, got, want = _live_embeddings(a), _live_embeddings(b), _live_embeddings(reference)
    assert got.keys() == want.keys() == set(live)
    for task_id in live:
        assert not np.allclose(got[task_id], saved[task_id], atol=1e-3)
        np.testing.assert_allclose(got[task_id], want[task_id], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            b.store.get(task_id).feature_sum,
            reference.store.get(task_id).feature_sum,
            rtol=1e-5,
            atol=1e-5,
        )
    # the index holds the live tasks (those with examples) only, with the new embeddings
    assert len(a.index) == 50
    assert len(b.index) == len(live)
    assert all(t in b.index for t in live)
    assert all(f"cold{i}" in a.index and f"cold{i}" not in b.index for i in range(20))
    np.testing.assert_allclose(
        b.index.reconstruct(live), np.stack([want[t] for t in live]), rtol=1e-5, atol=1e-5
    )
    assert b.summary()["labelled"] == a.summary()["labelled"]


def _labelled_event(i: int, task_id: str) -> dict:
    return {"event_id": f"e{i}", "task_id": task_id, "x": [0.1 * i], "y": 1.0}


def test_load_drops_old_model_embeddings_when_a_live_task_has_no_examples(
    tmp_path, make_model, make_engine
) -> None:
    config = {"support_size": 8, "max_live_tasks": 3}
    learn = [_labelled_event(i, f"t{i % 4}") for i in range(8)]  # t0 is evicted at the end
    back = {"event_id": "back", "task_id": "t0", "x": [0.0]}  # t0 returns, without a label
    a = make_engine(make_model(seed=0), **config)
    a.process(learn)
    a.process([back])
    old = a.store.get("t0")
    assert old.n == 0 and old.embedding is not None  # taken from the index on return
    StateDir(tmp_path).save(a)
    b = make_engine(make_model(seed=1), **config)
    StateDir(tmp_path).load(b)
    got = b.store.get("t0").embedding
    assert got is None or not np.allclose(got, old.embedding)


def test_load_does_not_reencode_when_the_model_is_the_same(
    tmp_path, make_model, make_engine, caplog
) -> None:
    a = make_engine(make_model(seed=0), max_live_tasks=3)
    a.process(sinusoid_events(200, tasks=6))
    StateDir(tmp_path).save(a)
    b = make_engine(make_model(seed=0), max_live_tasks=3)  # equal weights, another object
    with caplog.at_level(logging.WARNING, logger="stream_meta.state_checkpoint"):
        StateDir(tmp_path).load(b)
    assert not any("re-encoding" in r.getMessage() for r in caplog.records)
    assert len(b.index) == len(a.index) == 6  # evicted tasks stay indexed


# -- fingerprints -------------------------------------------------------------------------------


def test_fingerprint_is_equal_when_weights_are_equal(make_model) -> None:
    assert model_fingerprint(make_model(seed=0)) == model_fingerprint(make_model(seed=0))
    assert model_fingerprint(make_model(seed=0)) != model_fingerprint(make_model(seed=1))


def test_fingerprint_changes_when_one_parameter_changes(make_model) -> None:
    model = make_model(seed=0)
    before = model_fingerprint(model)
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] += 1e-3
    assert model_fingerprint(model) != before, name
    with torch.no_grad():
        param.view(-1)[0] -= 1e-3
    assert model_fingerprint(model) == before


def test_fingerprint_of_a_set_of_experts_covers_every_expert_and_its_id(make_model) -> None:
    """A state checkpoint written while a set was served must name the set, not its primary
    alone: otherwise a restart serving the primary takes it for the set and never serves the
    saved set again (tests/integration/test_experts_kafka.py restarts one)."""
    import copy

    from stream_meta.experts import with_experts

    model = make_model(seed=0)
    single = model_fingerprint(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.startswith("hyper.")).view(-1)[0] += 1e-3
    served = with_experts(model, 1, [(2, other)])
    assert model_fingerprint(served) != single
    assert model_fingerprint(served) == model_fingerprint(
        with_experts(model, 1, [(2, copy.deepcopy(other))])
    )
    assert model_fingerprint(served) != model_fingerprint(with_experts(model, 1, [(3, other)]))
    assert model_fingerprint(served) != model_fingerprint(with_experts(model, 1, [(2, model)]))
    assert model_fingerprint(model) == single  # a single model's fingerprint is unchanged
