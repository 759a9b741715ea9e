"""How an engine turns support sets into weights: the adapter it holds.

An :class:`~stream_meta.engine.Engine` parses, validates, de-duplicates, stores support sets,
caches adapted weights and scores; *how* a support set becomes weights, and how a query point is
predicted with them, is its adapter's (learn2learn's wrap-and-adapt: the strategy is an object
the engine holds, not a subclass of it). An adapter is anything with this shape:

* ``row_width(model) -> int``: the width of the rows ``adapt`` returns and the engine caches,
  ``n_params`` plus whatever the adapter keeps beside the weights (the meta-adapter: the
  head's posterior, for the predictive standard deviation);
* ``adapt(sets, engine) -> rows [B, row_width]``: one row per :class:`SupportSet` of the
  chunk (each one task's examples *as an event of the batch saw them*); called once per
  micro-batch chunk of adaptation requests, never per event;
* ``predict(x [N, q, x_dim], rows [N, row_width], engine) -> (out, std)``: ``[N, q]`` values,
  or ``[N, q, C]`` logits, and for regression the predictive standard deviation ``[N, q]`` in
  the target's units, or None when the adapter has none (rows from the cache or from
  ``adapt``);
* ``embeds``: whether the engine keeps every task's pooled encoder state and embedding up to
  date as examples arrive (and so indexes it for the k-NN search); an adapter that never reads
  them says False and the engine skips that work.

``engine`` is the :class:`EngineView` (what an adapter may read: the served model snapshot, the
task index and store, the k-NN search); adapters must not change it. The default,
:class:`MetaAdapter`, is the meta-model's one forward pass. The replay strategies' adapters
(gradient baselines, nearest task) are in :mod:`stream_meta.evaluation.strategies`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from stream_meta.index import TaskIndex
from stream_meta.model import HeadPosterior, MetaModel
from stream_meta.retrieval import Borrowed, EvidenceBank, solve_head_borrowed
from stream_meta.state import TaskState, TaskStore

__all__ = ["SUPPORT_GROUPS", "Adapter", "EngineView", "MetaAdapter", "SupportSet", "support_groups"]

#: support sets of a chunk are padded in this many groups of similar size (see support_groups)
SUPPORT_GROUPS = 4


class SupportSet:
    """One task's support set as one of the batch's events saw it (what an adapter adapts).

    Adapters read ``task_id``, ``n``, ``xs [n, x_dim]`` and ``ys [n]`` (None while the task has
    never learned an example), ``feature_sum`` (the pooled encoder state of those ``n``
    examples) and ``embedding`` (the task's stored embedding, used while ``n == 0``: a returning
    task's indexed one, or None). ``state``, ``version`` and ``ops_before`` are the engine's
    bookkeeping. Everything is read-only to adapters (``xs``/``ys`` may view a live buffer).
    """

    __slots__ = ("embedding", "feature_sum", "n", "ops_before", "state", "version", "xs", "ys")

    def __init__(self, state: TaskState, ops_before: int = 0) -> None:
        self.state = state
        self.version = state.version
        self.n = state.n
        self.ops_before = ops_before  # examples this batch added to the task before the request
        # views of the live buffer: the planner snapshots them (copy-on-write) only if the task
        # learns another example before the batch is adapted
        self.xs = state.xs[: state.n] if state.xs is not None else None
        self.ys = state.ys[: state.n] if state.ys is not None else None
        self.feature_sum: np.ndarray = state.feature_sum
        self.embedding = state.embedding  # used while n == 0 (a returning task's stored one)

    @property
    def task_id(self) -> str:
        return self.state.task_id


class EngineView(Protocol):
    """What an adapter may read of the engine that holds it (an :class:`Engine` is one)."""

    @property
    def model(self) -> MetaModel:
        """The served model snapshot (swapped only between batches)."""

    @property
    def empty_embedding(self) -> np.ndarray:
        """The served model's embedding of an empty support set ``[E]``."""

    @property
    def index(self) -> TaskIndex: ...

    @property
    def store(self) -> TaskStore: ...

    @property
    def bank(self) -> EvidenceBank | None:
        """The retrieval bank (None: retrieval by evidence is off)."""

    def neighbours(
        self, z: np.ndarray, exclude: Sequence[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k`` nearest indexed tasks of each embedding: ``zn [B,k,E], sim [B,k], mask [B,k]``."""


class Adapter(Protocol):
    """A strategy that turns support sets into weights (see the module docstring)."""

    @property
    def embeds(self) -> bool:
        """Whether the engine must keep pooled encoder states and task embeddings up to date."""

    def row_width(self, model: MetaModel) -> int:
        """Columns of a row of :meth:`adapt` (``>= model.target.n_params``)."""

    def adapt(self, sets: Sequence[SupportSet], engine: EngineView) -> torch.Tensor:
        """Rows ``[len(sets), row_width]`` (the target network's weights first), one per set."""

    def predict(
        self, x: torch.Tensor, rows: torch.Tensor, engine: EngineView
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N, q, x_dim], [N, row_width] -> ([N, q]`` values or ``[N, q, C]`` logits, the
        predictive standard deviation ``[N, q]`` or None)."""


def support_groups(
    sets: Sequence[SupportSet], x_dim: int, y_dtype: type, groups: int = SUPPORT_GROUPS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The support sets in ``groups`` of similar size, each padded to its largest:
    ``(indices into sets, xs [g, n, x_dim], ys [g, n], smask [g, n])``.

    Work that costs O(n) in the padded support size (the closed-form head, gradient steps) is
    done per group, so short support sets are not padded to the longest.

    >>> from stream_meta.state import TaskStore
    >>> store = TaskStore(x_dim=1, feat_dim=2, support_size=4, policy="recent")
    >>> a, _ = store.touch("a", 0.0)
    >>> b, _ = store.touch("b", 0.0)
    >>> for i in range(3):
    ...     _ = store.add_example(a, np.array([float(i)]), 1.0)
    >>> [(g.tolist(), xs.shape, m.tolist()) for g, xs, ys, m in
    ...  support_groups([SupportSet(a), SupportSet(b)], 1, np.float32)]
    [([1], (1, 1, 1), [[0.0]]), ([0], (1, 3, 1), [[1.0, 1.0, 1.0]])]
    """
    counts = np.array([r.n for r in sets], dtype=np.int64)
    order = np.argsort(counts, kind="stable")
    for g in np.array_split(order, min(groups, len(sets))):
        n_max = max(1, int(counts[g[-1]]))
        xs = np.zeros((len(g), n_max, x_dim), dtype=np.float32)
        ys: np.ndarray = np.zeros((len(g), n_max), dtype=y_dtype)
        smask = np.zeros((len(g), n_max), dtype=np.float32)
        for j, ri in enumerate(g.tolist()):
            r = sets[ri]
            if r.n:
                xs[j, : r.n] = r.xs
                ys[j, : r.n] = r.ys
                smask[j, : r.n] = 1.0
        yield g, xs, ys, smask


class AdaptContext(NamedTuple):
    """:meth:`MetaAdapter.context` of a chunk of support sets."""

    z: torch.Tensor  # [B, E]
    zn: torch.Tensor  # [B, k, E]
    sim: torch.Tensor  # [B, k]
    nmask: torch.Tensor  # [B, k]
    shots: torch.Tensor  # [B] (borrowed examples counted with their weights)
    counts: np.ndarray  # [B] the sets' own example counts
    borrowed: Borrowed | None


class MetaAdapter:
    """The meta-model's adaptation in one forward pass (the engine's default).

    Encoder readout of each set's pooled state (a set without examples: its stored embedding,
    else the empty-set one), one batched k-NN search (a task never retrieves itself), the
    hypernetwork, and the closed-form head solved per group of similar support sizes. A
    regression row carries the head's posterior beside the weights
    (:meth:`~stream_meta.model.MetaModel.head_row`), so every prediction, from the cache or
    fresh, comes with its standard deviation.
    """

    embeds = True

    def row_width(self, model: MetaModel) -> int:
        return model.target.n_params + model.posterior_width

    def adapt(self, sets: Sequence[SupportSet], engine: EngineView) -> torch.Tensor:
        return self.adapt_in(self.context(sets, engine), sets, engine)

    def context(self, sets: Sequence[SupportSet], engine: EngineView) -> AdaptContext:
        """What the hypernetwork is conditioned on: each set's embedding (its pooled encoder
        state plus what it borrows from the retrieval bank), its neighbours and its shot
        count. Experts share the primary's encoder, so one context serves every expert that
        borrows alike (:meth:`adapt_in`)."""
        empty = engine.empty_embedding
        model = engine.model
        counts = np.array([r.n for r in sets], dtype=np.int64)
        sums = torch.from_numpy(np.stack([r.feature_sum for r in sets]).astype(np.float32))
        shots = torch.from_numpy(counts.astype(np.float32))
        borrowed = _borrow(sets, counts, engine)
        bank = engine.bank
        if borrowed is not None and bank is not None:
            # the borrowed examples join the pooled encoder state, each counted with its
            # entry's posterior weight: the hypernetwork sees the evidence it is lent
            rows = torch.from_numpy(borrowed.rows)
            w = torch.from_numpy(borrowed.weights.astype(np.float32))  # [b, M]
            ent = torch.from_numpy(borrowed.entries)
            held = torch.from_numpy(bank.count[borrowed.entries].astype(np.float32))
            sums[rows] += (w.unsqueeze(-1) * bank.feature_sum[ent]).sum(dim=1)
            shots[rows] += (w * held).sum(dim=1)
        z = model.encoder.readout(sums, shots).numpy()
        for j in np.flatnonzero(counts == 0).tolist():
            z[j] = sets[j].embedding if sets[j].embedding is not None else empty
        zn, sim, nmask = engine.neighbours(z, [r.task_id for r in sets])
        return AdaptContext(torch.from_numpy(z), zn, sim, nmask, shots, counts, borrowed)

    def adapt_in(
        self, ctx: AdaptContext, sets: Sequence[SupportSet], engine: EngineView
    ) -> torch.Tensor:
        """Rows of ``sets`` generated by ``engine.model`` in context ``ctx``: the body from
        the hypernetwork, the head solved on the set's own examples (and, for a set that
        borrows, on the bank entries' examples too)."""
        model, b, borrowed = engine.model, len(sets), ctx.borrowed
        generated = model.hyper(ctx.z, ctx.zn, ctx.sim, ctx.nmask, ctx.shots)
        n_body = model.target.n_body
        out = torch.empty(b, self.row_width(model))
        out[:, :n_body] = generated[:, :n_body]
        keep = np.arange(b)
        if borrowed is not None:
            rows = torch.from_numpy(borrowed.rows)
            post = _solve_borrowed(model, generated[rows], sets, borrowed, engine)
            out[rows, n_body:] = model.head_row(post)
            keep = np.setdiff1d(keep, borrowed.rows)
        own = [sets[j] for j in keep.tolist()]
        if own:
            store = engine.store
            for g, xs, ys, smask in support_groups(own, store.x_dim, store.y_dtype):
                gi = torch.from_numpy(keep[g])
                posterior = model.head_posterior(
                    generated[gi],
                    torch.from_numpy(xs),
                    torch.from_numpy(ys),
                    torch.from_numpy(smask),
                )
                out[gi, n_body:] = model.head_row(posterior)
        return out

    def predict(
        self, x: torch.Tensor, rows: torch.Tensor, engine: EngineView
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return engine.model.predict_with_std(x, rows)


def _borrow(sets: Sequence[SupportSet], counts: np.ndarray, engine: EngineView) -> Borrowed | None:
    """The retrieval bank's posterior for the sets with ``1..max_shots`` examples (None when
    retrieval is off, the bank is empty, or nothing is worth borrowing); rows index ``sets``."""
    bank = engine.bank
    if bank is None or not len(bank):
        return None
    rows = np.flatnonzero((counts >= 1) & (counts <= bank.config.max_shots))
    if not len(rows):
        return None
    borrowed = bank.borrow(
        engine.model,
        [sets[j].xs for j in rows.tolist()],  # type: ignore[misc]
        [sets[j].ys for j in rows.tolist()],  # type: ignore[misc]
    )
    if borrowed is not None:
        borrowed.rows = rows[borrowed.rows]
    return borrowed


def _solve_borrowed(
    model: MetaModel,
    generated: torch.Tensor,
    sets: Sequence[SupportSet],
    borrowed: Borrowed,
    engine: EngineView,
) -> HeadPosterior:
    """The head of each borrowing set: the posterior mean of its head under the mixture over
    ``{null, its entries}``. Given an entry, the head's posterior is the two-level one (the
    entry's examples, then the set's own; :func:`~stream_meta.retrieval.solve_head_borrowed`);
    given the null, it is the set's own posterior. All share the body generated for the set, so
    the mixture's mean is one head: the posterior-weighted sum of the components' heads. The
    uncertainty (precision factor, misfit) is the most probable component's: the spread
    between components is not represented."""
    bank = engine.bank
    assert bank is not None
    b = borrowed.entries.shape[0]
    n_own = max(sets[r].n for r in borrowed.rows.tolist())
    p = bank.config.points
    xs = np.zeros((b, n_own, bank.x_dim), dtype=np.float32)
    ys = np.zeros((b, n_own), dtype=bank.y_dtype)
    own = np.zeros((b, n_own), dtype=np.float32)
    for i, r in enumerate(borrowed.rows.tolist()):
        s = sets[r]
        xs[i, : s.n], ys[i, : s.n], own[i, : s.n] = s.xs, s.ys, 1.0
    xs_t, ys_t, own_t = torch.from_numpy(xs), torch.from_numpy(ys), torch.from_numpy(own)
    null = model.head_posterior(generated, xs_t, ys_t, own_t)  # [b, F, out]
    # one two-level solve per (set, entry) pair with some posterior weight
    pi, pm = np.nonzero(borrowed.weights > 0)
    ent = borrowed.entries[pi, pm]
    held = (np.arange(p)[None, :] < bank.count[ent][:, None]).astype(np.float32)  # [pairs, P]
    sel = torch.from_numpy(pi)
    lent = solve_head_borrowed(
        model,
        generated[sel],
        xs_t[sel],
        ys_t[sel],
        own_t[sel],
        torch.from_numpy(bank.xs[ent]),
        torch.from_numpy(bank.ys[ent]),
        torch.from_numpy(held),
        bank.config.spread,
        bank.constants(model),
    )
    # renormalised over the components kept (the entries not kept are mostly near-copies of
    # the ones kept: their mass is theirs, not the null's; measured: giving it to the null
    # doubled the 2-shot loss on the related-task stream)
    mass = np.concatenate([borrowed.null[:, None], borrowed.weights], axis=1)
    w = torch.from_numpy((mass / mass.sum(axis=1, keepdims=True)).astype(np.float32))
    mean = w[:, 0, None, None] * null.mean
    mean = mean.index_add(0, sel, w[sel, torch.from_numpy(pm) + 1, None, None] * lent.mean)
    # the uncertainty of the most probable component
    top = mass.argmax(axis=1)  # 0 = the null
    chol, misfit = null.chol.clone(), null.misfit.clone()
    pair_of = {(i, m + 1): j for j, (i, m) in enumerate(zip(pi.tolist(), pm.tolist(), strict=True))}
    for i in np.flatnonzero(top > 0).tolist():
        j = pair_of[(i, int(top[i]))]
        chol[i], misfit[i] = lent.chol[j], lent.misfit[j]
    return HeadPosterior(mean, chol, misfit, null.shots)
