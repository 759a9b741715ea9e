"""Gradient baselines (scratch, fine-tuning, MAML with torch.func) and the strategy adapters."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from stream_meta.engine import Engine, EngineConfig
from stream_meta.evaluation.baselines import (
    GradientInit,
    InnerLoop,
    _task_loss,
    evaluate_init,
    fit,
    load_init,
    maml_adapt,
    predict,
    save_init,
    scratch_init,
    shipped_init,
    target_for,
    train_init,
    tune_lr,
)
from stream_meta.evaluation.families import build_probes, matrix_summary, phases
from stream_meta.evaluation.strategies import GradientAdapter, NearestTaskAdapter, adapter
from stream_meta.meta_training import TrainConfig
from stream_meta.metrics import EngineMetrics
from stream_meta.model import ModelConfig
from stream_meta.model_checkpoint import CheckpointError
from stream_meta.tasks import SinusoidFamily
from tests.conftest import sinusoid_events

CONFIG = ModelConfig(x_dim=1)  # the sinusoid target network: 1-40-40-1


def _episode(shots: int, tasks: int = 64, seed: int = 0) -> list[torch.Tensor]:
    fam, rng = SinusoidFamily(), np.random.default_rng(seed)
    return [
        torch.from_numpy(a)
        for a in fam.sample_episode(fam.sample_params(tasks, rng), shots, 20, rng)
    ]


def _init(theta: torch.Tensor, loop: InnerLoop, method: str = "t") -> GradientInit:
    return GradientInit(method, "sinusoid", "regression", theta, target_for(CONFIG), loop, {})


def test_maml_meta_gradient_flows_through_the_inner_steps_and_first_order_drops_a_part() -> None:
    net = target_for(CONFIG)
    xs, ys, xq, yq = _episode(5, tasks=8)
    grads = {}
    for first_order in (False, True):
        theta = scratch_init(CONFIG).requires_grad_()
        w = maml_adapt(
            net,
            "regression",
            theta,
            xs,
            ys,
            torch.ones(ys.shape),
            InnerLoop(3, 0.01),
            first_order=first_order,
        )
        ((predict(net, "regression", xq, w) - yq) ** 2).mean().backward()
        grads[first_order] = theta.grad
    assert all(bool(torch.isfinite(g).all()) and float(g.norm()) > 0 for g in grads.values())
    assert not torch.allclose(grads[False], grads[True])  # the second-order term is there


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_the_serving_fit_and_the_torch_func_inner_loop_agree(kind: str) -> None:
    config = CONFIG if kind == "regression" else ModelConfig(x_dim=3, kind=kind, n_classes=4)
    net, gen = target_for(config), torch.Generator().manual_seed(1)
    xs = torch.randn(5, 6, config.x_dim, generator=gen)
    ys = torch.randn(5, 6, generator=gen) if kind == "regression" else torch.randint(0, 4, (5, 6))
    m = (torch.rand(5, 6, generator=gen) > 0.3).float()
    theta, loop = scratch_init(config), InnerLoop(4, 0.05)
    served = fit(net, kind, theta, xs, ys, m, loop, keep_best=False)
    torch.testing.assert_close(served, maml_adapt(net, kind, theta, xs, ys, m, loop).detach())


def test_each_task_is_fitted_alone_whatever_the_batch() -> None:
    xs, ys, _, _ = _episode(5, tasks=6)
    loop = InnerLoop(20, 0.01, "adam")
    theta = scratch_init(CONFIG)
    both = fit(target_for(CONFIG), "regression", theta, xs, ys, torch.ones(ys.shape), loop)
    one = fit(target_for(CONFIG), "regression", theta, xs[2:3], ys[2:3], torch.ones(1, 5), loop)
    torch.testing.assert_close(both[2:3], one, rtol=1e-4, atol=1e-5)
    # a task without examples keeps the initialisation
    none = fit(target_for(CONFIG), "regression", theta, xs[:2], ys[:2], torch.zeros(2, 5), loop)
    torch.testing.assert_close(none, theta.expand(2, -1))


def test_a_diverging_step_size_never_serves_a_worse_support_fit_than_the_start() -> None:
    net = target_for(CONFIG)
    xs, ys, _, _ = _episode(5, tasks=32)
    theta, m = scratch_init(CONFIG), torch.ones(ys.shape)
    start = torch.stack(
        [_task_loss(net, "regression", theta, xs[i], ys[i], m[i]) for i in range(32)]
    )
    wild = InnerLoop(10, 10.0)
    raw = fit(net, "regression", theta, xs, ys, m, wild, keep_best=False)
    kept = fit(net, "regression", theta, xs, ys, m, wild)
    after = torch.stack(
        [_task_loss(net, "regression", kept[i], xs[i], ys[i], m[i]) for i in range(32)]
    )
    raw_loss = torch.stack(
        [_task_loss(net, "regression", raw[i], xs[i], ys[i], m[i]) for i in range(32)]
    )
    assert not bool((raw_loss <= start).all())  # lr 10 blows some tasks up...
    assert bool((after <= start + 1e-6).all())  # ...but never the served fit


def test_the_gradient_cap_bounds_every_step() -> None:
    xs, ys, _, _ = _episode(1, tasks=16)
    theta = scratch_init(CONFIG)
    w = fit(
        target_for(CONFIG),
        "regression",
        theta,
        xs,
        ys,
        torch.ones(ys.shape),
        InnerLoop(1, 0.5, clip=2.0),
        keep_best=False,
    )
    assert float((w - theta).norm(dim=1).max()) <= 0.5 * 2.0 + 1e-5
    with pytest.raises(ValueError, match="clip > 0"):
        InnerLoop(clip=0.0)


def test_a_short_maml_run_adapts_far_better_than_the_random_start() -> None:
    cfg = TrainConfig(
        steps=200, batch_tasks=16, max_shots=10, query_points=16, bank_tasks=32, lr=0.01
    )
    theta, summary = train_init(
        "maml", SinusoidFamily(), CONFIG, cfg, InnerLoop(3, 0.01), progress=False
    )
    assert summary["steps"] == 200 and math.isfinite(summary["final_loss"])
    loop = InnerLoop(10, 0.01, clip=100.0)
    shots = [5]
    trained = evaluate_init(_init(theta, loop), SinusoidFamily(), shots=shots, tasks=200)
    scratch = evaluate_init(
        _init(scratch_init(CONFIG), loop), SinusoidFamily(), shots=shots, tasks=200
    )
    assert trained["5"]["mean"] < 0.7 * scratch["5"]["mean"], (trained, scratch)


def test_pretraining_fits_the_family_average_and_the_step_size_is_tuned() -> None:
    cfg = TrainConfig(steps=100, batch_tasks=16, max_shots=10, query_points=16, bank_tasks=32)
    theta, _ = train_init("pretrained", SinusoidFamily(), CONFIG, cfg, InnerLoop(), progress=False)
    init = _init(theta, InnerLoop(5, 0.01, clip=100.0))
    best, tried = tune_lr(init, SinusoidFamily(), (1e-4, 0.01), shots=(5,), tasks=50)
    assert set(tried) == {"0.0001", "0.01"} and best == min(
        (1e-4, 0.01), key=lambda v: tried[str(v)]
    )
    with pytest.raises(ValueError, match="unknown method"):
        train_init("reptile", SinusoidFamily(), CONFIG, cfg, InnerLoop(), progress=False)


def test_an_initialisation_round_trips_and_a_bad_file_is_refused(tmp_path) -> None:
    theta = scratch_init(CONFIG, seed=3)
    path = tmp_path / "sinusoid-maml.safetensors"
    save_init(
        path,
        theta,
        method="maml",
        family="sinusoid",
        model_config=CONFIG,
        loop=InnerLoop(10, 0.02, clip=50.0),
        training={"steps": 1},
        metrics={},
    )
    init = load_init(path)
    assert torch.equal(init.theta, theta) and init.loop == InnerLoop(10, 0.02, clip=50.0)
    assert load_init(path, steps=3).loop == InnerLoop(3, 0.02, clip=50.0)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError):
        load_init(bad)
    for wrong in (torch.zeros(7), torch.full_like(theta, math.nan)):
        save_init(
            bad,
            wrong,
            method="maml",
            family="sinusoid",
            model_config=CONFIG,
            loop=InnerLoop(),
            training={},
            metrics={},
        )
        with pytest.raises(CheckpointError, match="finite values"):
            load_init(bad)
    with pytest.raises(CheckpointError, match="train-baseline"):
        shipped_init("digits-nope", "maml")


@pytest.mark.parametrize("method", ["maml", "pretrained"])
def test_the_shipped_initialisations_load_and_fit_the_shipped_model(
    method, shipped_sinusoid
) -> None:
    init = load_init(shipped_init("sinusoid", method))
    model, _ = shipped_sinusoid
    assert init.net.n_params == model.target.n_params and init.kind == "regression"
    assert init.manifest["training"]["steps"] == 8000  # the meta-model's budget


def _engines(model, init):
    config = EngineConfig(k_neighbours=0)
    return Engine(
        model, config, metrics=EngineMetrics(CollectorRegistry()), adapter=GradientAdapter(init)
    )


def test_the_gradient_engine_serves_each_event_with_its_tasks_support_set_at_arrival(
    shipped_sinusoid,
) -> None:
    model, _ = shipped_sinusoid
    init = _init(scratch_init(CONFIG), InnerLoop(15, 0.01, "adam"))
    engine = _engines(model, init)
    events = sinusoid_events(300, tasks=12, seed=4)
    served = []
    for lo in range(0, 300, 64):
        out = engine.process(events[lo : lo + 64]).outputs
        served += list(zip(out.values, out.shots, strict=True))
    support: dict[str, list] = {}
    net = init.net
    for ev, (value, shots) in zip(events, served, strict=True):
        seen = support.setdefault(ev["task_id"], [])
        assert shots == len(seen)
        if seen:
            xs = torch.tensor([[s[0] for s in seen]], dtype=torch.float32)
            ys = torch.tensor([[s[1] for s in seen]], dtype=torch.float32)
            w = fit(net, "regression", init.theta, xs, ys, torch.ones(ys.shape), init.loop)
        else:
            w = init.theta[None]
        expect = predict(net, "regression", torch.tensor([[ev["x"]]]), w.detach())
        assert value == pytest.approx(float(expect), rel=1e-3, abs=1e-4)
        if "y" in ev:
            seen.append((ev["x"], ev["y"]))
    assert len(engine.index) == 0  # no encoder, no embedding: the adapter says embeds=False


def test_a_diverged_fit_serves_the_initialisation_and_is_counted(shipped_sinusoid) -> None:
    model, _ = shipped_sinusoid
    theta = scratch_init(CONFIG)
    theta[0] = math.inf  # every fit of a task with examples becomes non-finite
    engine = _engines(model, _init(theta, InnerLoop(2, 0.01), method="broken"))
    out = engine.process(sinusoid_events(50, tasks=3)).outputs
    assert engine.adapter.diverged > 0
    assert all(isinstance(v, float) for v in out.values)


def test_nearest_task_serves_the_adaptation_of_its_nearest_other_task(
    shipped_sinusoid, make_engine
) -> None:
    model, _ = shipped_sinusoid
    near = Engine(
        model,
        EngineConfig(),
        metrics=EngineMetrics(CollectorRegistry()),
        adapter=NearestTaskAdapter(),
    )
    full = Engine(model, EngineConfig(), metrics=EngineMetrics(CollectorRegistry()))
    xs = np.linspace(-4.5, 4.5, 20)
    teach = [
        {"event_id": f"a{i}", "task_id": "a", "x": [float(x)], "y": float(2 * np.sin(x))}
        for i, x in enumerate(xs)
    ]
    # b is another function: with two tasks, each is the other's nearest
    other = [
        {"event_id": f"b{i}", "task_id": "b", "x": [float(x)], "y": float(-3 * np.sin(x))}
        for i, x in enumerate(xs[::4])
    ]
    query_a = {"event_id": "qa", "task_id": "a", "x": [1.3]}
    query_b = {"event_id": "qb", "task_id": "b", "x": [1.3]}
    for engine in (near, full):
        engine.process(teach)
        engine.process(other)
    served_b = near.process([query_b]).outputs.values[0]
    served_a = full.process([query_a]).outputs.values[0]
    own_b = full.process([query_b]).outputs.values[0]
    assert served_b == pytest.approx(served_a, rel=1e-4)  # b is served with a's adaptation
    assert abs(served_b - own_b) > 1.0  # ...not with its own examples
    # the one-task adapter the report and probes use does the same
    probe = adapter(near, 8)(
        np.array([[[x] for x in xs[::4]]], dtype=np.float32),
        np.array([[-3 * np.sin(x) for x in xs[::4]]], dtype=np.float32),
        np.array([[[1.3]]], dtype=np.float32),
        ["b"],
    )
    assert float(probe[0, 0]) == pytest.approx(served_a, rel=1e-4)


# -- the per-family matrix ---------------------------------------------------------------------
def _ev(task: str, y: float | None = 1.0, x: float = 0.0) -> dict:
    e = {"event_id": "e", "task_id": task, "x": [x]}
    return e if y is None else {**e, "y": y}


def test_phases_follow_the_dominant_family_and_a_returning_family_starts_a_new_one() -> None:
    events = [_ev("a:1")] * 30 + [_ev("b:1")] * 25 + [_ev("a:1", None)] * 5 + [_ev("a:2")] * 20
    assert [(p["family"], p["start"], p["end"]) for p in phases(events, 10)] == [
        ("a", 0, 30),
        ("b", 30, 60),
        ("a", 60, 80),
    ]


def test_the_matrix_summary_follows_gem_and_chaudhry() -> None:
    events = [_ev(f"a:{i % 2}", float(i)) for i in range(40)] + [
        _ev(f"b:{i % 2}", float(i)) for i in range(40)
    ]
    probes = build_probes(events, "regression", window=20, tasks=2, shots=5, queries=5)
    assert probes is not None and probes.families == ["a", "b"]
    assert [p["family"] for p in probes.phases] == ["a", "b"]
    # mse: a is 1.0 after its own phase and 3.0 at the end (forgotten); b 2.0 then 0.5
    s = matrix_summary(probes, [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 0.5}])
    assert s["matrix"] == [[1.0, 2.0], [3.0, 0.5]] and s["average"] == 1.75
    assert s["backward_transfer"] == -2.0  # negative: worse after its phase
    assert s["forgetting"] == 2.0
    assert build_probes([_ev("t1")] * 50, "regression") is None  # no family prefix


def test_probes_read_the_state_and_never_change_it(shipped_sinusoid) -> None:
    model, _ = shipped_sinusoid
    events = [
        dict(e, task_id=f"{'a' if int(e['task_id'][1:]) < 4 else 'b'}:{e['task_id']}")
        for e in sinusoid_events(600, tasks=8, seed=2, labelled=1.0)
    ]
    probes = build_probes(events, "regression", window=100, tasks=3)
    assert probes is not None
    engine = Engine(model, EngineConfig(), metrics=EngineMetrics(CollectorRegistry()))
    engine.process(events[:300])
    adapt = adapter(engine, 8)
    first = probes.score(adapt)
    assert first == probes.score(adapt)
    after = engine.process(events[300:]).outputs.values
    again = Engine(model, EngineConfig(), metrics=EngineMetrics(CollectorRegistry()))
    again.process(events[:300])
    assert again.process(events[300:]).outputs.values == after
    assert all(0 <= v < 5 for v in first.values())


def test_a_gradient_init_that_does_not_fit_the_model_is_refused(tmp_path, shipped_sinusoid) -> None:
    from stream_meta.evaluation.strategies import StrategyOptions, load_gradient_init

    model, _ = shipped_sinusoid
    small = dataclasses.replace(CONFIG, target_hidden=(8,))
    save_init(
        tmp_path / "sinusoid-maml.safetensors",
        scratch_init(small),
        method="maml",
        family="sinusoid",
        model_config=small,
        loop=InnerLoop(),
        training={},
        metrics={},
    )
    with pytest.raises(ValueError, match="differs from the model"):
        load_gradient_init("maml", model, "sinusoid", StrategyOptions(baseline_dir=tmp_path))


def test_probes_follow_a_model_swap(shipped_sinusoid, make_model) -> None:
    """The adapter reads the engine's model at every call: after a meta-update swaps it, the
    probes score the new model (a stale one would mix it with the re-encoded index)."""
    model, _ = shipped_sinusoid
    engine = Engine(model, EngineConfig(), metrics=EngineMetrics(CollectorRegistry()))
    engine.process(sinusoid_events(300, tasks=6, labelled=1.0))
    adapt = adapter(engine, 8)
    xs = np.linspace(-3, 3, 5, dtype=np.float32).reshape(1, 5, 1)
    ys, xq = np.sin(xs[..., 0]), np.array([[[0.5]]], dtype=np.float32)
    before = adapt(xs, ys, xq)
    other = make_model(
        x_dim=1, seed=3, embed_dim=64, encoder_hidden=128, target_hidden=(40, 40), hyper_hidden=256
    )  # the shipped architecture, other weights
    engine.swap_model(other, version=2)
    after = adapt(xs, ys, xq)
    fresh = adapter(engine, 8)(xs, ys, xq)
    assert torch.equal(after, fresh) and not torch.equal(before, after)


# -- in a checkpoint's units (train-baseline --data) -------------------------------------------
def _scaling(kind: str = "regression", x_dim: int = 2, y_dim: int = 1):
    from stream_meta.scaling import Scaling

    s = Scaling(x_dim, y_dim, regression=kind == "regression")
    s.set(
        x_shift=[100.0 + i for i in range(x_dim)],
        x_scale=[20.0] * x_dim,
        y_shift=[50.0 + c for c in range(y_dim)],
        y_coef=[[3.0 * (i + 1) - c for c in range(y_dim)] for i in range(x_dim)],
        y_scale=4.0 if kind == "regression" else 1.0,
    )
    return s


def test_an_init_in_a_checkpoints_units_starts_from_the_pooled_fit_and_fits_user_units() -> None:
    config = ModelConfig(x_dim=2, target_hidden=(8,), skip_input=True)
    net, scaling = target_for(config), _scaling()
    theta = torch.zeros(net.n_params)  # the network adds nothing: the pooled linear fit
    init = GradientInit("t", "custom", "regression", theta, net, InnerLoop(200, 0.05, "adam"), {})
    scaled = dataclasses.replace(init, scaling=scaling)
    gen = torch.Generator().manual_seed(0)
    xs = 100.0 + 20.0 * torch.randn(3, 8, 2, generator=gen)
    pooled = scaling.outputs(scaling.inputs(xs), torch.zeros(3, 8))
    torch.testing.assert_close(scaled.predict(xs, theta.expand(3, -1)), pooled)
    # each task is the pooled fit plus its own shift, in user units (grams, not z-scores)
    ys = pooled + torch.tensor([[-8.0], [0.0], [12.0]])
    w = scaled.fit(xs, ys, torch.ones(3, 8))
    assert float(((scaled.predict(xs, w) - ys) ** 2).mean()) < 0.05 * 64
    # without a scaling the same network sees the raw numbers (and fits them worse)
    raw = init.fit(xs, ys, torch.ones(3, 8))
    assert float(((init.predict(xs, raw) - ys) ** 2).mean()) > 10 * float(
        ((scaled.predict(xs, w) - ys) ** 2).mean()
    )


def test_classification_in_a_checkpoints_units_adds_the_pooled_logits() -> None:
    config = ModelConfig(x_dim=2, kind="classification", n_classes=3, target_hidden=(8,))
    net, scaling = target_for(config), _scaling("classification", y_dim=3)
    gen = torch.Generator().manual_seed(2)
    xs = 100.0 + 20.0 * torch.randn(4, 6, 2, generator=gen)
    ys = torch.randint(0, 3, (4, 6), generator=gen)
    m = (torch.rand(4, 6, generator=gen) > 0.3).float()
    init = GradientInit(
        "t", "c", "classification", torch.zeros(net.n_params), net, InnerLoop(4, 0.05), {}, scaling
    )
    x_std = scaling.inputs(xs)
    torch.testing.assert_close(
        init.predict(xs, init.theta.expand(4, -1)), scaling.offset(x_std)
    )  # a zero network serves the pooled logistic model
    theta, loop = scratch_init(config), InnerLoop(4, 0.05)
    base = scaling.offset(x_std)
    served = fit(net, "classification", theta, x_std, ys, m, loop, keep_best=False, base=base)
    adapted = maml_adapt(net, "classification", theta, x_std, ys, m, loop, base=base)
    torch.testing.assert_close(served, adapted.detach())
    plain = fit(net, "classification", theta, x_std, ys, m, loop, keep_best=False)
    assert not torch.allclose(served, plain)  # the pooled logits change the fit


def test_masked_episode_losses_ignore_the_padding() -> None:
    from stream_meta.evaluation.baselines import _batch_loss

    out, y = torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    assert float(_batch_loss("regression", out, y, torch.tensor([[1.0, 1.0, 0.0]]))) == 2.5
    logits = torch.tensor([[[0.0, 0.0], [50.0, -50.0]]])
    labels = torch.tensor([[0, 1]])
    kept = _batch_loss("classification", logits, labels, torch.tensor([[1.0, 0.0]]))
    assert float(kept) == pytest.approx(math.log(2.0))


def test_an_init_keeps_its_scaling_through_a_file_and_a_family_one_has_none(tmp_path) -> None:
    config = ModelConfig(x_dim=2, target_hidden=(8,), skip_input=True)
    theta, scaling = scratch_init(config), _scaling()
    path = tmp_path / "custom-maml.safetensors"
    kw = {"method": "maml", "family": "custom", "model_config": config, "loop": InnerLoop()}
    save_init(path, theta, **kw, training={}, metrics={}, scaling=scaling, extra={"data": {}})
    init = load_init(path)
    assert init.scaling is not None and init.scaling.to_dict() == scaling.to_dict()
    assert init.manifest["scaling"] == scaling.to_dict() and init.manifest["data"] == {}
    save_init(path, theta, **kw, training={}, metrics={})
    assert load_init(path).scaling is None  # raw units, as the built-in families' inits
    # a scaling of the wrong shape is refused like any broken file
    from stream_meta.model_checkpoint import write_tensors

    write_tensors(path, {"theta": theta, "scaling.x_shift": torch.zeros(5)}, init.manifest)
    with pytest.raises(CheckpointError, match="not a baseline initialisation"):
        load_init(path)


def test_scratch_serves_in_the_meta_models_units(make_model) -> None:
    from stream_meta.evaluation.strategies import StrategyOptions, load_gradient_init

    model = make_model()
    assert load_gradient_init("scratch", model, "sinusoid", StrategyOptions()).scaling is None
    model.scaling.set(x_shift=[3.0], x_scale=[2.0], y_shift=[7.0], y_scale=0.5)
    init = load_gradient_init("scratch", model, "custom", StrategyOptions())
    assert init.scaling is not None and init.scaling.to_dict() == model.scaling.to_dict()
    assert init.scaling is not model.scaling  # a copy: the served model's stays its own


def test_nearest_task_without_another_indexed_task_serves_the_prior_not_its_own(
    shipped_sinusoid,
) -> None:
    model, _ = shipped_sinusoid

    def engine(adapter=None) -> Engine:
        metrics = EngineMetrics(CollectorRegistry())
        return Engine(model, EngineConfig(), metrics=metrics, adapter=adapter)

    near, full = engine(NearestTaskAdapter()), engine()
    teach = [
        {"event_id": f"a{i}", "task_id": "a", "x": [float(x)], "y": float(2 * np.sin(x))}
        for i, x in enumerate(np.linspace(-4.5, 4.5, 20))
    ]
    for e in (near, full):
        e.process(teach)  # a alone is indexed
    query = {"event_id": "q", "task_id": "a", "x": [1.3]}
    served = near.process([query]).outputs.values[0]
    prior = engine().process([{**query, "task_id": "new"}]).outputs.values[0]
    own = full.process([query]).outputs.values[0]
    assert served == pytest.approx(prior, rel=1e-5)
    assert abs(served - own) > 0.5
