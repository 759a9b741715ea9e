"""What each replay strategy is: an engine that serves the same events its own way.

Every strategy runs inside a plain :class:`~stream_meta.engine.Engine`, which holds the
strategy's :class:`~stream_meta.adapters.Adapter` (how a support set becomes weights, and how a
query is predicted with them): the meta-model's own by default, :class:`GradientAdapter` or
:class:`NearestTaskAdapter` here. So all of them parse, validate, de-duplicate, store support
sets (same size and policy) and are scored identically: each event is served with the examples
its task had when it arrived, then learns its label.

* ``full``: the whole system (neighbours, drift monitor, meta-updates trained inline);
* ``no-neighbours``: the hypernetwork without retrieved neighbours (``k = 0``);
* ``no-meta-update``: meta-updates off (the drift monitor still runs);
* ``global``: no adaptation: labels are scored, never taught, so every task gets the
  meta-model's prior (one function for all tasks);
* ``scratch``, ``finetune``, ``maml``: the target network fitted by gradient steps on the
  support set from a random, a pre-trained or a MAML initialisation
  (:mod:`stream_meta.evaluation.baselines`), in the units of the initialisation's scaling:
  a checkpoint trained on a user's log (``train --data``) has one, and so do the
  initialisations ``train-baseline --data`` trains for it; ``scratch`` takes the meta-model's;
* ``nearest-task``: the weights the system adapts for the task's nearest *other* live task
  (by the task's embedding in the FAISS index), never the task's own examples; the prior while
  the task has no example or no other task is indexed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_meta.adapters import EngineView, MetaAdapter, SupportSet, support_groups
from stream_meta.engine import Engine
from stream_meta.evaluation.baselines import (
    GradientInit,
    InnerLoop,
    load_init,
    scratch_init,
    shipped_init,
    target_for,
)
from stream_meta.model import MetaModel
from stream_meta.model_checkpoint import CheckpointError
from stream_meta.scaling import Scaling
from stream_meta.state import TaskState

__all__ = [
    "NO_LEARNING",
    "STRATEGIES",
    "GradientAdapter",
    "NearestTaskAdapter",
    "StrategyOptions",
    "adapter",
    "build_strategy_engine",
    "strategy_settings",
]

_OFF = {"meta_update": {"enabled": False}, "drift": {"enabled": False}}
#: strategy name -> settings overrides (on top of the user's settings)
STRATEGIES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"meta_update": {"worker": "inline"}},
    "no-neighbours": {"engine": {"k_neighbours": 0}, "meta_update": {"worker": "inline"}},
    "no-meta-update": {"meta_update": {"enabled": False}},
    "global": {"engine": {"k_neighbours": 0}, **_OFF},
    "scratch": _OFF,
    "finetune": _OFF,
    "maml": _OFF,
    "nearest-task": {"meta_update": {"enabled": False}},
}
#: strategies that never learn a label (scored only)
NO_LEARNING = frozenset({"global"})
#: gradient baselines -> the initialisation they start from
_INIT = {"scratch": "scratch", "finetune": "pretrained", "maml": "maml"}


@dataclass(frozen=True)
class StrategyOptions:
    """Knobs of the baselines (``stream-meta replay --inner-steps ...``)."""

    #: where ``<family>-maml.safetensors`` and ``<family>-pretrained.safetensors`` are found
    #: (None: the ones shipped in the package)
    baseline_dir: Path | None = None
    #: SGD steps of ``finetune`` and ``maml`` at serving time
    inner_steps: int = 10
    #: Adam steps and learning rate of ``scratch``
    scratch_steps: int = 100
    scratch_lr: float = 0.01
    seed: int = 0


def strategy_settings(settings: Any, name: str) -> Any:
    """``settings`` with strategy ``name``'s overrides; ``ValueError`` for an unknown name."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(STRATEGIES)}, all")
    data = settings.model_dump()
    for section, values in STRATEGIES[name].items():
        data[section] = {**data[section], **values}
    return type(settings).model_validate(data)


def build_strategy_engine(
    name: str,
    model: MetaModel,
    settings: Any,
    metrics: Any,
    family: str,
    options: StrategyOptions,
) -> Engine:
    """The engine of strategy ``name`` (``settings`` already carry its overrides)."""
    from stream_meta.app import build_engine

    if name in _INIT:
        init = load_gradient_init(name, model, family, options)
        return Engine(
            model, settings.engine.config(), metrics=metrics, adapter=GradientAdapter(init)
        )
    adapter = NearestTaskAdapter() if name == "nearest-task" else None
    return build_engine(model, settings, metrics=metrics, adapter=adapter)


def load_gradient_init(
    name: str, model: MetaModel, family: str, options: StrategyOptions
) -> GradientInit:
    """The initialisation and inner loop of gradient baseline ``name`` for ``model``'s family.

    ``scratch`` works in the meta-model's units (a copy of its scaling; none for the built-in
    families' identity scaling); a trained initialisation in the units it was trained in."""
    method = _INIT[name]
    config = model.config
    if method == "scratch":
        loop = InnerLoop(options.scratch_steps, options.scratch_lr, "adam")
        return GradientInit(
            "scratch",
            family,
            config.kind,
            scratch_init(config, options.seed),
            target_for(config),
            loop,
            {},
            _copy_scaling(model.scaling),
        )
    if options.baseline_dir is None:
        path = shipped_init(family, method)
    else:
        path = options.baseline_dir / f"{family}-{method}.safetensors"
        if not path.is_file():
            source = (
                "--data LOG --checkpoint CKPT"
                if not model.scaling.is_identity
                else f"--family {family}"
            )
            raise CheckpointError(
                f"no {method} initialisation at {path}; build it with `stream-meta "
                f"train-baseline {source} --method {method} --out {path}`"
            )
    init = load_init(path, steps=options.inner_steps)
    if init.net.n_params != model.target.n_params or init.kind != config.kind:
        raise ValueError(
            f"{path}: its target network ({init.net.n_params} weights, {init.kind}) differs "
            f"from the model's ({model.target.n_params}, {config.kind})"
        )
    return init


def _copy_scaling(scaling: Scaling) -> Scaling | None:
    """A copy of a model's scaling, or None for the identity (raw units: nothing to map)."""
    if scaling.is_identity:
        return None
    copy = Scaling(len(scaling.x_shift), len(scaling.y_shift), regression=scaling.regression)
    copy.set(**{k: v.detach().clone() for k, v in scaling.named_buffers()})
    return copy


class GradientAdapter:
    """Serves each task with the target network fitted to its support set by gradient steps.

    There is no set encoder, embedding or neighbour (``embeds`` is False: the engine's index
    stays empty). ``diverged`` counts fits with non-finite weights (served the initialisation).
    The support set and the predictions are in the user's units; with a scaling
    (:attr:`GradientInit.scaling`) the network is fitted to ``inputs(xs)`` and
    ``targets(x_std, ys)`` and predicts ``outputs(x_std, net(x_std))``.
    """

    embeds = False

    def __init__(self, init: GradientInit) -> None:
        self.init = init
        self.diverged = 0

    def row_width(self, model: MetaModel) -> int:
        return self.init.net.n_params

    def adapt(self, sets: Sequence[SupportSet], engine: EngineView) -> torch.Tensor:
        init = self.init
        parts = []
        # the engine predicts under inference mode; fitting needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            for g, xs, ys, smask in support_groups(sets, engine.store.x_dim, engine.store.y_dtype):
                w = init.fit(torch.from_numpy(xs), torch.from_numpy(ys), torch.from_numpy(smask))
                parts.append((g, w.detach()))
        weights = torch.empty(len(sets), init.net.n_params)
        for g, w in parts:
            weights[torch.from_numpy(g)] = w
        diverged = ~torch.isfinite(weights).all(dim=1)
        if bool(diverged.any()):  # a fit that blew up serves the initialisation instead
            weights[diverged] = init.theta
            self.diverged += int(diverged.sum())
        return weights

    def predict(
        self, x: torch.Tensor, rows: torch.Tensor, engine: EngineView
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fitted network's predictions; no standard deviation (a point estimate)."""
        return self.init.predict(x, rows), None


class NearestTaskAdapter:
    """Serves each task with the weights the meta-model adapts for its nearest other live task
    (by the task's embedding in the engine's index), never with the task's own examples."""

    embeds = True

    def __init__(self) -> None:
        self.meta = MetaAdapter()

    def row_width(self, model: MetaModel) -> int:
        return self.meta.row_width(model)

    def adapt(self, sets: Sequence[SupportSet], engine: EngineView) -> torch.Tensor:
        return self.meta.adapt(self._nearest(sets, engine), engine)

    def predict(
        self, x: torch.Tensor, rows: torch.Tensor, engine: EngineView
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The neighbour's adaptation; no standard deviation (its posterior measures how
        unsure the model is of the neighbour, not of this task)."""
        return self.meta.predict(x, rows, engine)[0], None

    @staticmethod
    def _nearest(sets: Sequence[SupportSet], engine: EngineView) -> Sequence[SupportSet]:
        """Each set replaced by its task's nearest indexed neighbour's current support set; a
        task without examples keeps its own (empty) set, and one without a live neighbour with
        examples (none indexed yet) gets an empty set: the prior, never its own examples."""
        own = [j for j, r in enumerate(sets) if r.n > 0]
        index = engine.index
        if not own:
            return sets
        out = list(sets)
        for j in own:  # the prior unless a neighbour is found below
            out[j] = SupportSet(TaskState(sets[j].task_id, -1, len(sets[j].feature_sum)))
        if len(index) == 0:
            return out
        sums = np.stack([sets[j].feature_sum for j in own]).astype(np.float32)
        counts = torch.tensor([float(sets[j].n) for j in own])
        z = engine.model.encoder.readout(torch.from_numpy(sums), counts).numpy()
        _D, I = index.search(z, 1, exclude=[sets[j].task_id for j in own])
        for j, key in zip(own, I[:, 0].tolist(), strict=True):
            neighbour = None if key < 0 else engine.store.get(index.task_id_of([key])[0] or "")
            if neighbour is not None and neighbour.n > 0:
                out[j] = SupportSet(neighbour)
        return out


def adapter(engine: Engine, k: int) -> Callable[..., torch.Tensor]:
    """``(xs [B, n, d], ys [B, n], xq [B, q, d], exclude=None) -> predictions [B, q]`` (or
    logits ``[B, q, C]``): the strategy's whole adaptation of each support set with its current
    state, ``exclude[i]`` a task id never retrieved for row ``i`` (for the one-task latency of
    the report and the per-family probes)."""
    from stream_meta.evaluation.fewshot import adapt_batch

    if isinstance(engine.adapter, GradientAdapter):
        init = engine.adapter.init

        def gradient(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, exclude: Any = None) -> Any:
            with torch.enable_grad():
                w = init.fit(torch.from_numpy(xs), torch.from_numpy(ys), torch.ones(ys.shape))
            with torch.no_grad():
                return init.predict(torch.from_numpy(xq), w.detach())

        return gradient

    # the engine's model and index are read at every call: a meta-update swaps both
    def hypernetwork(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, exclude: Any = None) -> Any:
        model = engine.model
        with torch.inference_mode():
            w = adapt_batch(model, engine.index, xs, ys, k, exclude)
            return model.predict(torch.from_numpy(xq), w)

    if not isinstance(engine.adapter, NearestTaskAdapter):
        return hypernetwork

    def nearest(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, exclude: Any = None) -> Any:
        """Each row served with the adaptation of its nearest indexed task's support set."""
        with torch.inference_mode():
            z = engine.model.embed(torch.from_numpy(xs), torch.from_numpy(ys), torch.ones(ys.shape))
            _D, I = engine.index.search(z.numpy(), 1, exclude=exclude)
        rows = []
        for i, key in enumerate(I[:, 0].tolist()):
            state = None if key < 0 else engine.store.get(engine.index.task_id_of([key])[0] or "")
            sx, sy = xs[i : i + 1], ys[i : i + 1]
            if state is not None and state.n > 0 and state.xs is not None and state.ys is not None:
                sx, sy = state.xs[None, : state.n], state.ys[None, : state.n]
            rows.append(hypernetwork(sx, sy, xq[i : i + 1], [state.task_id] if state else None))
        return torch.cat(rows)

    return nearest
