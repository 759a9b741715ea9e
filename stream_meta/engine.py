"""The per-event loop: predict with the task's adapted weights, score, learn, re-index.

For every event, in order: validate it (a bad one becomes a :class:`Rejection` and changes no
state); predict with the task's adapted weights; if it is labelled, score the prediction first
(prequential), then add the example to the task's support set, update its embedding
incrementally and queue the embedding for the FAISS index.

Throughput comes from micro-batching *across tasks* without changing these semantics. Learning
depends on the labels only, never on the predictions, so a batch is first walked in order to
update the support sets and to record, for every event, the support set its task had when the
event arrived. Every distinct ``(task, support version)`` that has no cached weights becomes an
adaptation request; all requests of the batch are adapted together (encoder readout from
incremental prefix sums, one batched k-NN search, hypernetwork, closed-form head), and all events
are predicted in one batched target-network call. Each event is thus served exactly with the
examples that came before it, as in a one-at-a-time loop; only the *neighbours* are looked up in
an index that is updated in batches: embedding upserts are applied once ``index_flush_every`` of
them have accumulated (which can happen while a large batch is being planned, before its
searches) and at the end of every batch. A task never retrieves itself.

With ``retrieval`` on, the engine also keeps a bank of experienced tasks
(:mod:`stream_meta.retrieval`): after each batch it offers the tasks that reached
``retrieval_min_examples`` examples (or doubled them since their last offer), and the adapter
lets tasks with few examples borrow from it. Like the index, the bank changes between
batches only.

How a support set becomes weights, and how an event is predicted with them, is the engine's
*adapter* (:mod:`stream_meta.adapters`; the meta-model's one forward pass by default), called
once per chunk of the batch's adaptation requests.

With *experts* (:mod:`stream_meta.experts`: a served model version that is a set of models
sharing one encoder, kept by meta-updates that help a new regime without overwriting the old),
every expert adapts each request and predicts each event, and the event is served by their
mixture, weighted per task by the experts' prequential evidence on the task's own examples
before it (a batch's routing, like its support sets, is walked in stream order). The cached row
of a task holds every expert's weights side by side.

Adapted weights live in a fixed pool of ``weights_cache_size`` rows (FIFO reuse); a row is valid
for a task while the task's support version and the model generation are unchanged. The model
is an immutable snapshot read once per batch: :meth:`Engine.swap_model` takes effect between
batches, so no batch mixes two model versions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from stream_meta.adapters import AdaptContext, Adapter, EngineView, MetaAdapter, SupportSet
from stream_meta.dedupe import DedupeWindow
from stream_meta.events import Event, EventSchema, Prediction, Rejection, parse_event
from stream_meta.experts import Router, RoutingConfig, log_density, members, mix, same_encoder
from stream_meta.index import TaskIndex, neighbour_arrays, task_key
from stream_meta.labels import label_value
from stream_meta.metrics import EngineMetrics
from stream_meta.model import MetaModel
from stream_meta.retrieval import EvidenceBank, RetrievalConfig
from stream_meta.state import TaskState, TaskStore
from stream_meta.uncertainty import Z90

log = logging.getLogger(__name__)

Raw = bytes | str | Mapping[str, Any]

#: exact shot counts reported in ``loss_by_shots``; larger counts are bucketed
SHOT_BUCKETS = ((21, 50, "21-50"), (51, 10**9, "51+"))


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs. The ``[engine]`` settings section takes its defaults from here and maps
    onto these fields by name (:meth:`stream_meta.config.EngineSettings.config`)."""

    support_size: int = 64
    support_policy: Literal["recent", "reservoir"] = "recent"
    k_neighbours: int = 8
    max_live_tasks: int = 100_000
    task_ttl_s: float | None = None
    index_flush_every: int = 256
    max_event_bytes: int = 65_536
    weights_cache_size: int = 0  # 0 = auto: 256 MiB worth of rows, at most max_live_tasks
    dedupe_window: int = 200_000  # learned event ids remembered (0 = no de-duplication)
    seed: int = 0
    # retrieval by evidence (stream_meta.retrieval): a bounded bank of experienced tasks, each
    # weighted by how well it explains a few-shot task's own examples
    retrieval: bool = True
    retrieval_bank_size: int = 1024
    retrieval_min_examples: int = 8
    retrieval_max_shots: int = 8
    retrieval_candidates: int = 8
    # routing among experts (stream_meta.experts): the population share's rate per labelled
    # event, and the floor of an expert's prior (divided by the number of experts)
    expert_share_rate: float = 0.03
    expert_share_floor: float = 0.01
    expert_evidence_decay: float = 1.0
    # an expert this many nats of log evidence behind a task's best is neither adapted nor
    # evaluated for it (its routing weight would be below exp(-this)); inf: never skipped
    expert_prune_nats: float = 12.0


@dataclass
class Outputs:
    """Column-wise outputs of the valid events of one batch (cheap to build, records on demand)."""

    event_ids: list[str]
    task_ids: list[str]
    values: list[Any]  # the prediction: a float, or a class index
    probabilities: list[Any] | None  # class probabilities (classification only)
    shots: list[int]
    labelled: list[bool]
    losses: list[float]  # NaN for unlabelled events
    latency_s: float
    model_version: int
    #: predictive standard deviations, target units (regression, when the adapter gives them)
    stds: list[float] | None = None
    #: with experts: the id of the expert with the largest routing weight for each event
    experts: list[int] | None = None
    duplicates: list[bool] | None = None  # labelled events already learned (not learned again)
    #: with ``Engine.label_scores`` on: what learning each event's label is worth
    #: (:func:`stream_meta.labels.label_value`), ``[N]``; None for a strategy without uncertainty
    label_scores: np.ndarray | None = None
    x: np.ndarray | None = None  # the events' features [N, x_dim] (for replay)
    y: list[Any] | None = None  # the labels learned (None: a query, or a duplicate)

    def __len__(self) -> int:
        return len(self.event_ids)

    def record(self, i: int) -> Prediction:
        loss = self.losses[i]
        return Prediction.model_construct(
            event_id=self.event_ids[i],
            task_id=self.task_ids[i],
            prediction=self.values[i],
            probabilities=None if self.probabilities is None else self.probabilities[i],
            std=None if self.stds is None else self.stds[i],
            model_version=self.model_version,
            shots=self.shots[i],
            labelled=self.labelled[i],
            loss=None if loss != loss else loss,
            latency_s=self.latency_s,
            duplicate=self.duplicates is not None and self.duplicates[i],
            expert=None if self.experts is None else self.experts[i],
        )


@dataclass(frozen=True)
class ActionValues:
    """What a task's posterior says about one decision's candidate actions
    (:meth:`Engine.action_values`), user units, ``K`` actions: predicted values, the epistemic
    and noise standard deviations of each, ``draws [S, K]`` joint posterior draws of the
    noiseless values (or None), the task's support size and the serving expert's id (None with
    one model)."""

    mean: np.ndarray
    epistemic_std: np.ndarray
    noise_std: np.ndarray
    draws: np.ndarray | None
    shots: int
    expert: int | None = None


@dataclass
class BatchResult:
    """What one :meth:`Engine.process` call produced.

    ``order[i]`` says what became of input ``i``: ``j >= 0`` is its prediction
    (``outputs``/``predictions[j]``), ``-1 - j`` its rejection ``rejections[j]``.
    """

    rejections: list[Rejection] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    outputs: Outputs | None = None

    @property
    def predictions(self) -> list[Prediction]:
        """The prediction records, in input order (built on first access)."""
        cached = self.__dict__.get("_predictions")
        if cached is None:
            out = self.outputs
            cached = [] if out is None else [out.record(i) for i in range(len(out))]
            self.__dict__["_predictions"] = cached
        return cached


def retrieval_config(config: EngineConfig) -> RetrievalConfig:
    """The retrieval bank's knobs from the engine's ``retrieval_*`` settings."""
    return RetrievalConfig(
        bank_size=config.retrieval_bank_size,
        min_examples=config.retrieval_min_examples,
        max_shots=config.retrieval_max_shots,
        candidates=config.retrieval_candidates,
    )


def _offer_level(seen: int, least: int) -> int:
    """The last offer point a task with ``seen`` examples has passed: ``least * 2**k``, or 0."""
    if seen < least:
        return 0
    level = least
    while 2 * level <= seen:
        level *= 2
    return level


def _newest_last(state: TaskState, support_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A task's support set with its most recently learned examples last (the buffer is a
    ring once full)."""
    assert state.xs is not None and state.ys is not None
    n = state.n
    if n < support_size:
        return state.xs[:n].copy(), state.ys[:n].copy()
    order = (np.arange(state.seen - n, state.seen)) % support_size
    return state.xs[order], state.ys[order]


class _Plan:
    """What :meth:`Engine._plan` worked out for a batch of valid events."""

    def __init__(self, n: int) -> None:
        self.states: list[TaskState] = []
        self.shots = np.zeros(n, dtype=np.int64)  # support size each event was served with
        self.request_of = np.zeros(n, dtype=np.int64)  # -1 = cached weights
        self.requests: list[SupportSet] = []
        #: per task key: (event position, evicted index) of each example learned in the batch
        self.ops: dict[int, list[tuple[int, int]]] = {}
        self.evicted: list[tuple[np.ndarray, Any] | None] = []
        self.x = torch.empty(0)


class _ExpertView:
    """What an expert other than the primary sees of the engine: its own model, the primary's
    embeddings, index and store (experts share its encoder), no retrieval bank (the bank's
    entries are the primary's adapted networks)."""

    bank = None

    def __init__(self, engine: Engine, model: MetaModel) -> None:
        self._engine, self.model = engine, model

    @property
    def empty_embedding(self) -> np.ndarray:
        return self._engine.empty_embedding

    @property
    def index(self) -> Any:
        return self._engine.index

    @property
    def store(self) -> TaskStore:
        return self._engine.store

    def neighbours(
        self, z: np.ndarray, exclude: Sequence[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._engine.neighbours(z, exclude)


def _same_weights(a: MetaModel, b: MetaModel) -> bool:
    if a is b:
        return True
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _ready(arrays: dict[str, np.ndarray]) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: arrays


class RunningStats:
    """Prequential counters behind the run summary (cheap, vectorised updates)."""

    def __init__(self, max_shots: int) -> None:
        self.events = self.labelled = self.queries = self.rejected = 0
        self.loss_sum = 0.0
        self.correct = 0
        self.shot_loss = np.zeros(max_shots + 2, dtype=np.float64)
        self.shot_count = np.zeros(max_shots + 2, dtype=np.int64)

    def add_labelled(self, losses: np.ndarray, shots: np.ndarray, correct: int = 0) -> None:
        self.labelled += len(losses)
        self.loss_sum += float(losses.sum())
        self.correct += correct
        idx = np.minimum(shots, len(self.shot_loss) - 1)
        np.add.at(self.shot_loss, idx, losses)
        np.add.at(self.shot_count, idx, 1)

    _SCALARS = ("events", "labelled", "queries", "rejected", "loss_sum", "correct")

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "scalars": np.array([getattr(self, k) for k in self._SCALARS], dtype=np.float64),
            "shot_loss": self.shot_loss.copy(),
            "shot_count": self.shot_count.copy(),
        }

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        scalars = np.asarray(arrays["scalars"]).tolist()
        if len(scalars) != len(self._SCALARS) or arrays["shot_count"].shape != (
            len(self.shot_count),
        ):
            raise ValueError("run statistics do not match this engine's support size")
        for name, value in zip(self._SCALARS, scalars, strict=True):
            setattr(self, name, value if name == "loss_sum" else int(value))
        self.shot_loss = np.asarray(arrays["shot_loss"], dtype=np.float64).copy()
        self.shot_count = np.asarray(arrays["shot_count"], dtype=np.int64).copy()

    @property
    def prequential_loss(self) -> float | None:
        return self.loss_sum / self.labelled if self.labelled else None

    def loss_by_shots(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in range(min(21, len(self.shot_count))):
            if self.shot_count[s]:
                out[str(s)] = float(self.shot_loss[s] / self.shot_count[s])
        for lo, hi, name in SHOT_BUCKETS:
            sl = slice(lo, min(hi + 1, len(self.shot_count)))
            n = int(self.shot_count[sl].sum())
            if n:
                out[name] = float(self.shot_loss[sl].sum() / n)
        return out


class Engine:
    """Adapts every task of a stream; see the module docstring.

    Parameters
    ----------
    model:
        The meta-model to serve (put in eval mode; never trained here).
    config:
        Engine knobs; see :class:`EngineConfig`.
    index:
        The task index (shared with other components); a flat exact one by default.
    metrics:
        Prometheus metrics; a private registry when omitted.
    model_version:
        Version reported with every prediction.
    adapter:
        How support sets become weights and queries predictions
        (:class:`~stream_meta.adapters.Adapter`); the meta-model's one forward pass
        (:class:`~stream_meta.adapters.MetaAdapter`) by default.
    """

    def __init__(
        self,
        model: MetaModel,
        config: EngineConfig | None = None,
        *,
        index: TaskIndex | None = None,
        metrics: EngineMetrics | None = None,
        model_version: int = 1,
        adapter: Adapter | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.adapter: Adapter = adapter if adapter is not None else MetaAdapter()
        mc = model.config
        self.kind = mc.kind
        self.schema = EventSchema(
            x_dim=mc.x_dim,
            task=mc.kind,
            n_classes=mc.n_classes,
            max_bytes=config.max_event_bytes,
        )
        self.index = index if index is not None else TaskIndex(mc.embed_dim)
        if self.index.d != mc.embed_dim:
            raise ValueError(f"index dimension {self.index.d} != embedding {mc.embed_dim}")
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.store = TaskStore(
            x_dim=mc.x_dim,
            feat_dim=model.encoder.hidden,
            support_size=config.support_size,
            policy=config.support_policy,
            max_live_tasks=config.max_live_tasks,
            ttl_s=config.task_ttl_s,
            y_dtype=np.float32 if mc.kind == "regression" else np.int64,
            key=task_key,
            seed=config.seed,
        )
        self.stats = RunningStats(config.support_size)
        self.dedupe = DedupeWindow(config.dedupe_window) if config.dedupe_window else None
        #: compute ``Outputs.label_scores`` (what each event's label is worth; label requests)
        self.label_scores = False
        self._cache_size = 0
        self.router: Router | None = None
        self._share_labels: set[str] = set()  # expert ids with a share gauge
        self.bank: EvidenceBank | None = None
        self._borrowings = 0  # the bank's count already reported to the metrics
        if config.retrieval and config.retrieval_max_shots > 0 and self.adapter.embeds:
            self.bank = EvidenceBank(model, retrieval_config(config), seed=config.seed)
        self._pending: dict[str, np.ndarray] = {}
        #: embeddings changed since the last drain (for other replicas), when sharing is on
        self._outbox: dict[str, np.ndarray] | None = None
        #: tasks whose support set changed since the last drain (for a state changelog)
        self._changed: dict[str, TaskState] | None = None
        self._install(model, model_version)
        self.metrics.model_version.set(model_version)

    # -- model snapshot ---------------------------------------------------------------------
    def _install(self, model: MetaModel, version: int) -> None:
        model.eval()
        with torch.inference_mode():
            empty = model.encoder.readout(torch.zeros(1, model.encoder.hidden), torch.zeros(1))[
                0
            ].numpy()
        self._members = members(model, version)
        for _, m in self._members:
            m.eval()
        # experts need the meta-model's adapter (the replay strategies' adapters serve one)
        k = len(self._members) if isinstance(self.adapter, MetaAdapter) else 1
        self._views: list[EngineView] = [self] + [
            _ExpertView(self, m) for _, m in self._members[1:k]
        ]
        width = self.adapter.row_width(model) * k
        self._cache_size = self.config.weights_cache_size or max(
            1, min(self.config.max_live_tasks, (256 << 20) // (4 * width))
        )
        ids = [i for i, _ in self._members[:k]]
        if self.router is None:
            c = self.config
            self.router = Router(
                ids,
                RoutingConfig(
                    c.expert_share_rate,
                    c.expert_share_floor,
                    c.expert_evidence_decay,
                    c.expert_prune_nats,
                ),
            )
        else:
            self.router.remap(ids, list(self.store))
        self.metrics.experts.set(k)
        for gone in self._share_labels - {str(i) for i in ids}:
            self.metrics.expert_share.remove(gone)
        self._share_labels = {str(i) for i in ids} if k > 1 else set()
        if k == 1:
            self.metrics.expert_share.clear()
        pool = torch.zeros(self._cache_size, width)
        self._snapshot = (model, version, empty, pool)
        self._slot_key = np.full(self._cache_size, -1, dtype=np.int64)
        self._slot_version = np.full(self._cache_size, -1, dtype=np.int64)
        self._next_slot = 0
        for state in self.store:
            state.slot = -1

    @property
    def model(self) -> MetaModel:
        """The served model (with experts: the primary, carrying the others)."""
        return self._snapshot[0]

    @property
    def expert_ids(self) -> list[int]:
        """Ids of the served experts, the primary first (one id: a single model)."""
        return [i for i, _ in self._members[: len(self._views)]]

    @property
    def empty_embedding(self) -> np.ndarray:
        """The served model's embedding of an empty support set ``[E]``."""
        return self._snapshot[2]

    @property
    def weights_cache_rows(self) -> int:
        """Rows in the pool of adapted weights (allocated up front)."""
        return self._cache_size

    @property
    def model_version(self) -> int:
        return self._snapshot[1]

    def clear_weights_cache(self) -> None:
        """Forget every adapted weight row: each task is adapted again when next seen."""
        self._install(self.model, self.model_version)

    def swap_model(self, model: MetaModel, version: int) -> None:
        """Serve ``model`` from the next batch on, with every task re-encoded by it.

        Embeddings of two models live in different spaces, so the index is rebuilt from the
        live tasks' support sets (pooled encoder states recomputed with the new encoder);
        embeddings of evicted tasks, whose examples are gone, leave the index, and a live task
        without examples falls back to the new model's empty-set embedding.
        """
        if model.config != self.model.config:
            raise ValueError("the new model's configuration differs from the served one")
        old = self.model
        self._install(model, version)
        if not same_encoder(model, old):  # the same encoder: the same embeddings (experts)
            self._rebuild_embeddings()
        if self.bank is not None and not _same_weights(model, old):
            with torch.inference_mode():
                self.bank.refit_all(model)
        self.metrics.model_version.set(version)

    # -- the loop ---------------------------------------------------------------------------
    def process(
        self,
        raws: Sequence[Raw],
        received_at: float | None = None,
        *,
        learned: Sequence[bool] | None = None,
    ) -> BatchResult:
        """Validate, predict, score and learn a batch of raw events, in order.

        ``learned[i]``: raw ``i`` is known to be learned already (a redelivery after a state
        restore): it is predicted and reported as a duplicate, never learned again.
        """
        t0 = time.perf_counter() if received_at is None else received_at
        result = BatchResult()
        events: list[Event] = []
        positions: list[int] = []
        for pos, raw in enumerate(raws):
            parsed = parse_event(raw, self.schema)
            if isinstance(parsed, Rejection):
                result.order.append(-1 - len(result.rejections))
                result.rejections.append(parsed)
                self.metrics.rejections.labels(parsed.reason.value).inc()
            else:
                result.order.append(-1)  # patched below
                positions.append(pos)
                events.append(parsed)
        n_bad = len(result.rejections)
        self.stats.rejected += n_bad
        self.stats.events += len(raws)
        if n_bad:
            self.metrics.events.labels("invalid", "rejected").inc(n_bad)
        duplicates = self._dedupe(events)
        if learned is not None:
            duplicates = self._already_learned(events, [learned[p] for p in positions], duplicates)
        if events:
            result.outputs = self._process_events(events, t0)
            result.outputs.duplicates = duplicates
            for i, pos in enumerate(positions):
                result.order[pos] = i
        self.flush_index()
        self._evict(events)
        return result

    def _dedupe(self, events: list[Event]) -> list[bool] | None:
        """Turn labelled events already learned (by id) into queries, in place; their flags."""
        if self.dedupe is None:
            return None
        flags = [False] * len(events)
        add = self.dedupe.add
        n_dup = 0
        for i, ev in enumerate(events):
            if ev.y is not None and not add(ev.event_id):
                events[i] = Event.model_construct(
                    event_id=ev.event_id, task_id=ev.task_id, x=ev.x, y=None, ts=ev.ts
                )
                flags[i] = True
                n_dup += 1
        if not n_dup:
            return None
        self.metrics.duplicates.inc(n_dup)
        return flags

    def _already_learned(
        self, events: list[Event], learned: list[bool], flags: list[bool] | None
    ) -> list[bool] | None:
        """Turn labelled events marked as learned into queries, in place; the duplicate flags."""
        n = 0
        for i, ev in enumerate(events):
            if learned[i] and ev.y is not None:
                if flags is None:
                    flags = [False] * len(events)
                events[i] = Event.model_construct(
                    event_id=ev.event_id, task_id=ev.task_id, x=ev.x, y=None, ts=ev.ts
                )
                flags[i] = True
                n += 1
        if n:
            self.metrics.duplicates.inc(n)
        return flags

    def _process_events(self, events: list[Event], t0: float) -> Outputs:
        with torch.inference_mode():
            plan = self._plan(events)
            weights = self._weights_for(plan)
            noise: torch.Tensor | None = None
            if len(self._views) == 1:
                out, std = self.adapter.predict(plan.x.unsqueeze(1), weights, self)
                out, std = out[:, 0], None if std is None else std[:, 0]
                top = None
                if self.label_scores and std is not None:
                    noise = self._noise_var(self.model, weights)
            else:
                out, std, top, noise = self._route(events, plan, weights)
        outputs = self._score(events, plan, out, std, t0)
        outputs.experts = top
        if self.label_scores:
            outputs.label_scores = self._label_values(out, std, noise)
        if self.bank is not None:
            self._offer(plan)
        outputs.x = plan.x.numpy()
        outputs.y = [ev.y for ev in events]
        return outputs

    def _noise_var(self, model: MetaModel, rows: torch.Tensor) -> torch.Tensor | None:
        """The noise part of each row's predictive variance ``[N]`` (user units): what no label
        removes. None for rows without the head posterior (a classifier, another adapter)."""
        n_params, width = model.target.n_params, model.posterior_width
        if width == 0 or rows.shape[1] < n_params + width:
            return None
        scale = rows[:, n_params + width - 1]
        cal = model.calibration
        return scale * cal.noise_scale * model.noise_variance() * model.scaling.y_scale**2

    def _label_values(
        self, out: torch.Tensor, std: torch.Tensor | None, noise: torch.Tensor | None
    ) -> np.ndarray | None:
        if self.kind == "regression":
            if std is None or noise is None:
                return None
            return label_value(
                self.kind, variance=std.double().numpy() ** 2, noise=noise.double().numpy()
            )
        return label_value(self.kind, probabilities=torch.softmax(out.double(), -1).numpy())

    def _route(
        self, events: list[Event], plan: _Plan, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], torch.Tensor | None]:
        """Every expert's prediction of every event, mixed by the routing posterior of the
        event's task (its evidence before the event); labelled events then add each expert's
        predictive density of their label to their task's evidence. Returns the mixture's
        values (or log probabilities), standard deviations and each event's top expert id."""
        width = weights.shape[1] // len(self._views)
        x = plan.x.unsqueeze(1)
        n = len(events)
        outs, stds, noises = [], [], []
        first: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for e, view in enumerate(self._views):
            rows = weights[:, e * width : (e + 1) * width]
            if self.label_scores:
                noises.append(self._noise_var(view.model, rows))
            ok = ~torch.isnan(rows[:, 0])  # a NaN row: the expert was skipped for the task
            if bool(ok.all()):
                o, sd = self.adapter.predict(x, rows, view)
                first = first or (o, sd)
            else:  # the primary (never skipped) came first: its outputs give the shapes
                assert first is not None
                o, sd = torch.zeros_like(first[0]), None
                sd = None if first[1] is None else torch.ones_like(first[1])
                if bool(ok.any()):
                    o_ok, sd_ok = self.adapter.predict(x[ok], rows[ok], view)
                    o[ok] = o_ok
                    if sd is not None and sd_ok is not None:
                        sd[ok] = sd_ok
            outs.append(o[:, 0])
            stds.append(None if sd is None else sd[:, 0])
        labelled = np.array([ev.y is not None for ev in events])
        dens = np.zeros((n, len(outs)))
        li = np.flatnonzero(labelled)
        if len(li):
            ys = np.array([events[i].y for i in li])
            sel = torch.from_numpy(li)
            for e, (o, sd) in enumerate(zip(outs, stds, strict=True)):
                dens[li, e] = log_density(self.kind, o[sel], None if sd is None else sd[sel], ys)
        assert self.router is not None
        w = self.router.route(plan.states, dens, labelled)
        out, std = mix(self.kind, outs, stds, w)
        ids = np.asarray(self.expert_ids)
        for expert_id, share in self.router.shares().items():
            self.metrics.expert_share.labels(str(expert_id)).set(share)
        noise = None
        if noises and all(v is not None for v in noises):
            # the mixture's noise: each expert's, weighted (a ruled-out expert's NaN weighs 0);
            # the experts' disagreement counts as epistemic, which labels resolve
            stacked = torch.nan_to_num(torch.stack(noises, dim=-1))  # type: ignore[arg-type]
            noise = (stacked * torch.from_numpy(w.astype(np.float32))).sum(-1)
        return out, std, ids[w.argmax(axis=1)].tolist(), noise

    # -- decisions: each task's posterior over candidate actions ----------------------------
    def action_values(
        self,
        task_ids: Sequence[str],
        actions: Sequence[np.ndarray],
        *,
        draws: int = 0,
        seeds: Sequence[int] | None = None,
        ts: Sequence[float | None] | None = None,
    ) -> list[ActionValues]:
        """What each task's current posterior says about its candidate actions: for decision
        ``i``, task ``task_ids[i]`` and action features ``actions[i] [K_i, x_dim]``, the
        predicted values, their epistemic and noise standard deviations and, with ``draws``,
        that many joint draws of the noiseless values from the head posterior (Thompson
        sampling; ``seeds[i]`` seeds decision ``i``'s draws, so a redelivered decision draws
        the same). Tasks are served as events are (a new task gets the prior, a known one its
        cached or freshly adapted weights); nothing is learned. With experts, each decision is
        served by one expert: drawn from the task's routing weights with ``draws`` (posterior
        sampling over the mixture), else the one with the largest weight. ``ts[i]``: decision
        ``i``'s event time (a task's last activity, as an event's ``ts``; None: now).
        Regression models with the meta-model's adapter only."""
        if self.kind != "regression" or not isinstance(self.adapter, MetaAdapter):
            raise ValueError("decisions need a regression model served by its own adapter")
        n = len(task_ids)
        if len(actions) != n or any(a is not None and len(a) != n for a in (seeds, ts)):
            raise ValueError("task_ids, actions, seeds and ts must have the same length")
        if n == 0:
            return []
        x_dim = self.schema.x_dim
        zeros = (0.0,) * x_dim
        events = [
            Event.model_construct(
                event_id="", task_id=t, x=zeros, y=None, ts=None if ts is None else ts[i]
            )
            for i, t in enumerate(task_ids)
        ]
        rngs = [np.random.default_rng(None if seeds is None else seeds[i]) for i in range(n)]
        k_max = max(len(a) for a in actions)
        x = np.zeros((n, k_max, x_dim), dtype=np.float32)
        for i, a in enumerate(actions):
            a = np.asarray(a, dtype=np.float32).reshape(-1, x_dim)
            x[i, : len(a)] = a
        with torch.inference_mode():
            plan = self._plan(events)
            weights = self._weights_for(plan)
            k = len(self._views)
            chosen = np.zeros(n, dtype=np.int64)
            if k > 1:
                assert self.router is not None
                w = self.router.route(plan.states, None, np.zeros(n, dtype=bool))
                for i in range(n):
                    if draws:
                        chosen[i] = rngs[i].choice(k, p=w[i] / w[i].sum())
                    else:
                        chosen[i] = int(w[i].argmax())
            width = weights.shape[1] // k
            out: list[ActionValues | None] = [None] * n
            ids = self.expert_ids
            for e in np.unique(chosen).tolist():
                idx = np.flatnonzero(chosen == e)
                model = self._views[e].model
                rows = weights[torch.from_numpy(idx), e * width : (e + 1) * width]
                xe = torch.from_numpy(x[idx])
                parts = model.variance_parts(xe, rows)
                if parts is None:
                    raise ValueError("the served rows carry no posterior to decide with")
                mean, epi, noise = (t.double().numpy() for t in parts)
                samples = None
                if draws:
                    f = model.target.n_features
                    # float32 normals: a third cheaper than float64 ones, and the model's dtype
                    eps = np.empty((len(idx), draws, f), dtype=np.float32)
                    for j, i in enumerate(idx.tolist()):
                        rngs[i].standard_normal((draws, f), dtype=np.float32, out=eps[j])
                    samples = model.sample_values(xe, rows, torch.from_numpy(eps)).double().numpy()
                for j, i in enumerate(idx.tolist()):
                    kk = len(actions[i])
                    out[i] = ActionValues(
                        mean=mean[j, :kk],
                        epistemic_std=np.sqrt(np.maximum(epi[j, :kk], 0.0)),
                        noise_std=np.sqrt(np.maximum(noise[j, :kk], 0.0)),
                        draws=None if samples is None else samples[j, :, :kk],
                        shots=int(plan.shots[i]),
                        expert=ids[e] if k > 1 else None,
                    )
        self.flush_index()
        return [v for v in out if v is not None]

    # -- planning: walk the batch in order, learning as we go --------------------------------
    def _plan(self, events: list[Event]) -> _Plan:
        """Update support sets in event order and record what each event must be served with.

        Learning depends on the labels only, never on predictions, so the whole batch's support
        evolution is known before anything is predicted. Each event is served with the weights
        of its task's support set *as it was when the event arrived*: the cached weights when
        the task is unchanged since its last adaptation, else an adaptation *request* capturing
        that support set, shared by consecutive events of the task at the same version.
        """
        plan = _Plan(len(events))
        store, now = self.store, time.time()
        last_req: dict[int, tuple[int, int]] = {}  # key -> (version, request index)
        live: dict[int, SupportSet] = {}  # requests still viewing their task's live buffer
        for i, ev in enumerate(events):
            state, created = store.touch(ev.task_id, ev.ts or now)
            if created and ev.task_id in self.index:  # a returning task, evicted earlier
                state.embedding = self.index.reconstruct([ev.task_id])[0]
            plan.states.append(state)
            plan.shots[i] = state.n
            prev = last_req.get(state.key)
            if prev is not None and prev[0] == state.version:
                plan.request_of[i] = prev[1]
            elif prev is None and self._valid(state):
                plan.request_of[i] = -1
            else:
                plan.request_of[i] = len(plan.requests)
                last_req[state.key] = (state.version, len(plan.requests))
                req = SupportSet(state, len(plan.ops.get(state.key, ())))
                plan.requests.append(req)
                live[state.key] = req
            if ev.y is not None:
                viewing = live.pop(state.key, None)
                if viewing is not None and viewing.xs is not None and viewing.ys is not None:
                    viewing.xs, viewing.ys = viewing.xs.copy(), viewing.ys.copy()
                kept, evicted = store.add_example(state, ev.x, ev.y)
                if kept and self._changed is not None:
                    self._changed[state.task_id] = state
                if kept:
                    plan.ops.setdefault(state.key, []).append((i, len(plan.evicted)))
                    plan.evicted.append(evicted)
        plan.x = torch.as_tensor(np.array([ev.x for ev in events], dtype=np.float32))
        if self.adapter.embeds:
            self._replay_features(events, plan)
        return plan

    def _replay_features(self, events: list[Event], plan: _Plan) -> None:
        """Bring every touched task's pooled encoder state up to date, and give each request
        the pooled state it saw (prefix sums of the batch's feature deltas)."""
        if not plan.ops:
            for r in plan.requests:
                r.feature_sum = r.state.feature_sum
            return
        model = self.model
        lab = [i for i, ev in enumerate(events) if ev.y is not None]
        row = {i: j for j, i in enumerate(lab)}
        f_add = self._point_features([events[i].x for i in lab], [events[i].y for i in lab])
        ev_rows = [j for j, e in enumerate(plan.evicted) if e is not None]
        f_sub = np.zeros((len(plan.evicted), model.encoder.hidden), dtype=np.float64)
        if ev_rows:
            f_sub[ev_rows] = self._point_features(
                [plan.evicted[j][0] for j in ev_rows],  # type: ignore[index]
                [plan.evicted[j][1] for j in ev_rows],  # type: ignore[index]
            )
        prefix: dict[int, np.ndarray] = {}
        for key, ops in plan.ops.items():
            adds = np.array([row[i] for i, _ in ops])
            subs = np.array([e for _, e in ops])
            prefix[key] = np.cumsum(f_add[adds] - f_sub[subs], axis=0)
        for r in plan.requests:
            cums = prefix.get(r.state.key)
            r.feature_sum = (
                r.state.feature_sum
                if cums is None or r.ops_before == 0
                else r.state.feature_sum + cums[r.ops_before - 1]
            )
        touched: list[TaskState] = []
        seen: set[int] = set()
        for s in plan.states:
            if s.key in prefix and s.key not in seen:
                seen.add(s.key)
                s.feature_sum = s.feature_sum + prefix[s.key][-1]
                touched.append(s)
        self._reembed(touched)

    def _offer(self, plan: _Plan) -> None:
        """Offer the batch's experienced tasks to the retrieval bank: a task once it has seen
        ``retrieval_min_examples`` examples, then each time it has doubled them."""
        bank = self.bank
        assert bank is not None
        m = self.metrics
        if bank.borrowings > self._borrowings:
            m.borrowed.inc(bank.borrowings - self._borrowings)
        self._borrowings = bank.borrowings
        least = self.config.retrieval_min_examples
        offers = []
        done: set[int] = set()
        for s in plan.states:
            if s.key in done or s.n < least:
                continue
            done.add(s.key)
            level = _offer_level(s.seen, least)
            if level > s.offered:
                xs, ys = _newest_last(s, self.store.support_size)
                offers.append((s.task_id, xs, ys))
                s.offered = level
        if not offers:
            return
        before = (bank.merged, bank.added, bank.retired)
        with torch.inference_mode():
            bank.admit(self.model, offers)
        for outcome, old, new in zip(
            ("merged", "added", "retired"),
            before,
            (bank.merged, bank.added, bank.retired),
            strict=True,
        ):
            if new > old:
                m.bank_changes.labels(outcome).inc(new - old)
        m.bank_entries.set(len(bank))

    def _point_features(self, xs: Sequence[Any] | np.ndarray, ys: Sequence[Any]) -> np.ndarray:
        model = self.model
        x = torch.as_tensor(np.asarray(xs, dtype=np.float32).reshape(len(xs), -1))
        y_dtype = torch.float32 if self.kind == "regression" else torch.long
        y = torch.as_tensor(ys, dtype=y_dtype)
        return model.point_features(x, y).double().numpy()

    # -- adaptation ---------------------------------------------------------------------------
    def _weights_for(self, plan: _Plan) -> torch.Tensor:
        """Per-event rows ``[N, row_width]``: cached ones, or freshly adapted requests."""
        pool = self._snapshot[3]
        req = torch.as_tensor(plan.request_of)
        cached = req < 0
        weights = torch.empty(len(plan.states), pool.shape[1])
        if bool(cached.any()):
            idx = cached.nonzero()[:, 0]
            slots = torch.as_tensor([plan.states[i].slot for i in idx.tolist()], dtype=torch.long)
            weights[idx] = pool[slots]
        if plan.requests:
            fresh = self._adapt(plan.requests)
            idx = (~cached).nonzero()[:, 0]
            weights[idx] = fresh[req[idx]]
            self._cache(plan.requests, fresh)
        return weights

    def _adapt(self, requests: list[SupportSet], chunk: int = 4096) -> torch.Tensor:
        """Adapt every request with the engine's adapter, in chunks -> rows ``[R, row_width]``."""
        adapt, parts = self.adapter.adapt, []
        for lo in range(0, len(requests), chunk):
            part = requests[lo : lo + chunk]
            parts.append(adapt(part, self) if len(self._views) == 1 else self._adapt_experts(part))
            self.metrics.adapt_batch.observe(len(part))
        self.metrics.adaptations.inc(len(requests))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _adapt_experts(self, sets: list[SupportSet]) -> torch.Tensor:
        """Every expert's rows of ``sets``, side by side. The experts share the primary's
        encoder: one context (embeddings, neighbours) serves them all, plus the primary's own
        where its sets borrow from the retrieval bank (the bank is the primary's)."""
        adapter = self.adapter
        assert isinstance(adapter, MetaAdapter)
        own = adapter.context(sets, self)
        shared = own if own.borrowed is None else adapter.context(sets, self._views[1])
        rows = [adapter.adapt_in(own, sets, self)]
        k = len(self._views)
        evidence = [r.state.evidence for r in sets]
        skipped = 0
        for e, view in enumerate(self._views[1:], start=1):
            # an expert the task's evidence has ruled out (-inf, see Router.route) is not
            # adapted for it (a NaN row); the primary never is ruled out
            keep = [
                j for j, ev in enumerate(evidence) if ev is None or len(ev) != k or ev[e] > -np.inf
            ]
            if len(keep) == len(sets):
                rows.append(adapter.adapt_in(shared, sets, view))
                continue
            out = torch.full_like(rows[0], math.nan)
            if keep:
                idx = torch.as_tensor(keep)
                sub = AdaptContext(
                    shared.z[idx],
                    shared.zn[idx],
                    shared.sim[idx],
                    shared.nmask[idx],
                    shared.shots[idx],
                    shared.counts[keep],
                    None,
                )
                out[idx] = adapter.adapt_in(sub, [sets[j] for j in keep], view)
            rows.append(out)
            skipped += len(sets) - len(keep)
        if skipped:
            self.metrics.experts_skipped.inc(skipped)
        return torch.cat(rows, dim=1)

    def _cache(self, requests: list[SupportSet], weights: torch.Tensor) -> None:
        """Keep each task's newest adaptation when it still matches the task's support set."""
        newest: dict[int, int] = {}
        for j, r in enumerate(requests):
            if r.version == r.state.version:
                newest[r.state.key] = j
        if not newest:
            return
        rows = list(newest.values())
        slots = self._alloc_slots(len(rows))
        self._snapshot[3][torch.from_numpy(slots)] = weights[rows]
        for j, slot in zip(rows, slots.tolist(), strict=True):
            s = requests[j].state
            s.slot = slot
            self._slot_key[slot] = s.key
            self._slot_version[slot] = s.version

    def _valid(self, s: TaskState) -> bool:
        return (
            s.slot >= 0
            and self._slot_key[s.slot] == s.key
            and self._slot_version[s.slot] == s.version
        )

    def _alloc_slots(self, b: int) -> np.ndarray:
        """``b`` rows of the weights pool, reused in FIFO order (grown if ``b`` exceeds it)."""
        if b > self._cache_size:
            model, version, empty, pool = self._snapshot
            grow = b - self._cache_size
            pool = torch.cat([pool, torch.zeros(grow, pool.shape[1])])
            self._slot_key = np.concatenate([self._slot_key, np.full(grow, -1, np.int64)])
            self._slot_version = np.concatenate([self._slot_version, np.full(grow, -1, np.int64)])
            self._cache_size += grow
            self._snapshot = (model, version, empty, pool)
            log.warning("weights cache grown to %d rows for a batch of %d tasks", b, b)
        slots = (self._next_slot + np.arange(b)) % self._cache_size
        self._next_slot = int((self._next_slot + b) % self._cache_size)
        return slots

    def neighbours(
        self, z: np.ndarray, exclude: Sequence[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k`` nearest indexed tasks of each embedding: ``zn [B,k,E], sim [B,k], mask [B,k]``."""
        arrays = neighbour_arrays(self.index, z, self.config.k_neighbours, exclude)
        return tuple(torch.from_numpy(a) for a in arrays)  # type: ignore[return-value]

    # -- scoring and outputs ------------------------------------------------------------------
    def _score(
        self,
        events: list[Event],
        plan: _Plan,
        out: torch.Tensor,
        std: torch.Tensor | None,
        t0: float,
    ) -> Outputs:
        version = self.model_version
        shots = plan.shots
        labelled = np.array([ev.y is not None for ev in events])
        losses = np.full(len(events), math.nan)
        li = np.flatnonzero(labelled)
        if self.kind == "regression":
            values = out.numpy().astype(np.float64)
            predictions: list[Any] = values.tolist()
            probs: list[Any] = [None] * len(events)
            if len(li):
                ys = np.array([events[i].y for i in li], dtype=np.float64)
                losses[li] = (values[li] - ys) ** 2
                if std is not None:
                    self._score_intervals(values[li], std.numpy()[li], ys)
            correct = 0
        else:
            p = torch.softmax(out, dim=-1).numpy().astype(np.float64)
            predictions = p.argmax(axis=1).tolist()
            probs = [tuple(row) for row in p.round(6).tolist()]
            correct = 0
            if len(li):
                ys_i = np.array([events[i].y for i in li], dtype=np.int64)
                losses[li] = -np.log(np.clip(p[li, ys_i], 1e-12, None))
                correct = int((p[li].argmax(axis=1) == ys_i).sum())
        n_lab = len(li)
        if n_lab:
            self.stats.add_labelled(losses[li], shots[li], correct)
        self.stats.queries += len(events) - n_lab
        latency = time.perf_counter() - t0
        m = self.metrics
        if n_lab:
            m.events.labels("labelled", "predicted").inc(n_lab)
            m.loss.observe_many(losses[li])
            m.loss_mean.set(self.stats.prequential_loss or 0.0)
        if len(events) - n_lab:
            m.events.labels("query", "predicted").inc(len(events) - n_lab)
        m.latency.observe(latency, len(events))
        return Outputs(
            event_ids=[ev.event_id for ev in events],
            task_ids=[ev.task_id for ev in events],
            values=predictions,
            probabilities=None if self.kind == "regression" else probs,
            stds=None if std is None else std.numpy().astype(np.float64).tolist(),
            shots=shots.tolist(),
            labelled=labelled.tolist(),
            losses=losses.tolist(),
            latency_s=latency,
            model_version=version,
        )

    def _score_intervals(self, values: np.ndarray, std: np.ndarray, ys: np.ndarray) -> None:
        """Count labelled events whose label fell inside their central 90% interval
        (``mean +- 1.645 std``): the served coverage, which should stay near 0.9."""
        ok = np.isfinite(std) & (std > 0)
        n = int(ok.sum())
        if n:
            inside = int((np.abs(ys[ok] - values[ok]) <= Z90 * std[ok]).sum())
            self.metrics.interval_labels.inc(n)
            self.metrics.interval_hits.inc(inside)

    def _reembed(self, states: list[TaskState]) -> None:
        """Recompute embeddings from the pooled encoder state and queue them for the index."""
        if not states:
            return
        model = self._snapshot[0]
        with torch.inference_mode():
            sums = torch.from_numpy(np.stack([s.feature_sum for s in states]).astype(np.float32))
            counts = torch.tensor([float(s.n) for s in states])
            z = model.encoder.readout(sums, counts).numpy()
        for s, row in zip(states, z, strict=True):
            s.embedding = row
            self._pending[s.task_id] = row
        if self._outbox is not None:
            self._outbox.update((s.task_id, row) for s, row in zip(states, z, strict=True))
        if len(self._pending) >= self.config.index_flush_every:
            self.flush_index()

    def flush_index(self) -> None:
        """Apply the buffered embedding upserts to the index in one batch."""
        if not self._pending:
            return
        ids = list(self._pending)
        self.index.upsert(ids, np.stack(list(self._pending.values())))
        self._pending.clear()
        self.metrics.index_size.set(len(self.index))

    # -- sharing embeddings with other replicas ------------------------------------------------
    def share_embeddings(self) -> None:
        """From now on, collect every task embedding this engine computes for
        :meth:`drain_embeddings` (an engine that serves a share of the tasks publishes them)."""
        if self._outbox is None:
            self._outbox = {}

    def drain_embeddings(self) -> dict[str, np.ndarray]:
        """The embeddings computed since the last drain (task id -> ``[E]``), newest kept."""
        if not self._outbox:
            return {}
        out, self._outbox = self._outbox, {}
        return out

    def merge_embeddings(self, task_ids: Sequence[str], z: np.ndarray) -> int:
        """Index embeddings of tasks another replica serves; returns how many were taken.

        A task this engine holds itself keeps its own (fresher) embedding; the others become
        neighbours like local ones (a task a replica takes over starts from its indexed
        embedding). ``z`` must come from the served model version (the caller checks).
        """
        keep = [i for i, t in enumerate(task_ids) if t not in self.store]
        if keep:
            self.index.upsert([task_ids[i] for i in keep], z[keep])
            self.metrics.index_size.set(len(self.index))
        return len(keep)

    # -- a task-state changelog ---------------------------------------------------------------
    def track_changes(self) -> None:
        """From now on, note every task whose support set changes (see :meth:`drain_changes`)."""
        if self._changed is None:
            self._changed = {}

    def drain_changes(self) -> list[TaskState]:
        """The tasks whose support set changed since the last drain (live states: read them
        before the next batch)."""
        if not self._changed:
            return []
        out, self._changed = list(self._changed.values()), {}
        return out

    def restore_tasks(self, tasks: Sequence[tuple[str, int, np.ndarray, np.ndarray]]) -> int:
        """Load ``(task_id, seen, xs [n, x_dim], ys [n])`` support sets (from a changelog), each
        unless this engine already holds the task with as many examples seen; re-encodes and
        re-indexes them. Returns how many were loaded."""
        now = time.time()
        states = []
        n_classes = self.model.config.n_classes
        for task_id, seen, xs, ys in tasks:
            current = self.store.get(task_id)
            if current is not None and current.seen >= seen:
                continue
            store = self.store
            if (
                len(ys) > store.support_size
                or xs.shape != (len(ys), store.x_dim)
                or (
                    n_classes is not None
                    and len(ys)
                    and not (ys.min() >= 0 and ys.max() < n_classes)
                )
            ):
                log.warning(
                    "changelog state of task %r does not fit this engine (%d examples "
                    "x %s): skipped",
                    task_id,
                    len(ys),
                    xs.shape[1:],
                )
                continue
            state, _ = store.touch(task_id, now)
            store.load(state, xs, ys, seen)
            states.append(state)
        if states:
            self._encode_support(states)
            self.flush_index()
        return len(states)

    def _encode_support(self, states: list[TaskState], chunk: int = 4096) -> None:
        """Pooled encoder sums of ``states``' support sets from scratch, then embeddings."""
        for lo in range(0, len(states), chunk):
            part = states[lo : lo + chunk]
            with torch.inference_mode():
                feats = self._point_features(
                    np.concatenate([s.xs[: s.n] for s in part]),  # type: ignore[index]
                    np.concatenate([s.ys[: s.n] for s in part]).tolist(),  # type: ignore[index]
                )
            starts = np.concatenate([[0], np.cumsum([s.n for s in part])[:-1]])
            sums = np.add.reduceat(feats, starts, axis=0)
            for s, row in zip(part, sums, strict=True):
                s.feature_sum = row
            self._reembed(part)

    def _evict(self, events: list[Event]) -> None:
        now = max((ev.ts or 0.0 for ev in events), default=0.0) or time.time()
        evicted = self.store.evict(now)
        if evicted:
            self.metrics.tasks_evicted.inc(len(evicted))
        self.metrics.tasks.set(len(self.store))

    # -- persistence --------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The engine's learned state as named arrays: task store, index, run statistics and
        de-duplication window (adapted weights are a cache and are not saved)."""
        return self.capture_state()()

    def capture_state(self) -> Callable[[], dict[str, np.ndarray]]:
        """Capture the state between two batches, cheaply; the returned function builds
        :meth:`state_arrays`'s result later, e.g. in a writer thread while serving goes on."""
        self.flush_index()
        packers = {
            "store": self.store.capture(self.model.config.embed_dim),
            "index": _ready(self.index.to_arrays()),
            "stats": _ready(self.stats.to_arrays()),
        }
        if self.dedupe is not None:
            packers["dedupe"] = self.dedupe.capture()
        if self.bank is not None:
            packers["bank"] = _ready(self.bank.to_arrays())
        if len(self._views) > 1 and self.router is not None:
            packers["experts"] = _ready(self.router.to_arrays(list(self.store)))

        def pack() -> dict[str, np.ndarray]:
            return {f"{p}.{k}": v for p, f in packers.items() for k, v in f().items()}

        return pack

    def state_layout(self) -> dict[str, Any]:
        """What saved state must match to be restored into this engine."""
        return {**self.store.layout(), "embed_dim": self.model.config.embed_dim}

    def restore_state(self, arrays: Mapping[str, np.ndarray], *, reencode: bool = False) -> None:
        """Load :meth:`state_arrays` output. ``reencode``: the state was built with another
        model, so pooled encoder states and embeddings are recomputed from the support sets and
        the index keeps only live tasks.

        Raises ``ValueError`` (or :class:`~stream_meta.index.IndexLoadError`) on inconsistent
        arrays; the engine is then unchanged.
        """
        part: dict[str, dict[str, np.ndarray]] = {}
        for name, value in arrays.items():
            prefix, _, key = name.partition(".")
            part.setdefault(prefix, {})[key] = value
        index = TaskIndex.from_arrays(part.get("index", {}))
        if index.d != self.model.config.embed_dim:
            raise ValueError(f"saved index has d={index.d}, the model embeds in {self.index.d}")
        stats = RunningStats(self.config.support_size)
        stats.restore(part["stats"])
        bank: EvidenceBank | None = self.bank
        if self.bank is not None and "bank" in part:
            bank = EvidenceBank(self.model, self.bank.config, seed=self.config.seed)
            with torch.inference_mode():
                bank.restore(self.model, part["bank"], refit=reencode)
        self.store.restore(part["store"])  # the last check that can fail
        if self.router is not None:
            if "experts" in part and len(self._views) > 1:
                try:
                    self.router.restore(part["experts"], self.store)
                except (KeyError, ValueError) as exc:  # routing restarts level, state is fine
                    log.warning("saved expert routing not restored (%s): tasks start level", exc)
            self.router.remap(self.expert_ids, list(self.store))
        self.bank = bank
        least = self.config.retrieval_min_examples
        for s in self.store:  # offers depend on examples seen only
            s.offered = _offer_level(s.seen, least)
        self.stats = stats
        if self.dedupe is not None and "dedupe" in part:
            self.dedupe.restore(part["dedupe"])
        self._pending.clear()
        self.index = index
        if reencode:
            self._rebuild_embeddings()
        self.metrics.tasks.set(len(self.store))
        self.metrics.index_size.set(len(self.index))

    def _rebuild_embeddings(self, chunk: int = 4096) -> None:
        """Re-encode every live task with the current model into a fresh index (see
        :meth:`swap_model`)."""
        self._pending.clear()
        self.index = self.index.empty_like()
        states = []
        for s in self.store:
            if s.n:
                states.append(s)
            else:
                s.feature_sum = np.zeros_like(s.feature_sum)
                s.embedding = None
        self._encode_support(states, chunk)
        self.flush_index()

    # -- reporting ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        st = self.stats
        out: dict[str, Any] = {
            "events": st.events,
            "labelled": st.labelled,
            "queries": st.queries,
            "rejected": st.rejected,
            "tasks": len(self.store),
            "index_size": len(self.index),
            "model_version": self.model_version,
            "prequential_loss": st.prequential_loss,
            "loss_by_shots": st.loss_by_shots(),
        }
        if self.kind == "classification" and st.labelled:
            out["prequential_accuracy"] = st.correct / st.labelled
        return out
