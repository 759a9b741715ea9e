"""Retrieval by evidence: a few-shot task borrows the examples of the tasks that explain its own.

Cosine k-NN on a one- or two-shot embedding rarely finds the right neighbours, and even the
right neighbour loses most of its information on its way through the hypernetwork's attention.
This module lets a task use its neighbours' *data*, weighted by Bayesian evidence:

* an :class:`EvidenceBank` keeps a bounded set of *entries*, each an experienced task's newest
  examples (``points`` of them) and the network the meta-model adapts to them. A task enters
  once it has seen ``min_examples`` examples and refreshes its entry each time it has doubled
  them; a task that an entry already explains as well as its own network does (within
  ``merge_nats`` per example: a recurring task under a new id) only adds to that entry's
  member count; when the bank is full the least useful entry (the least posterior weight won,
  decayed) is retired. The bank is bounded at any number of tasks;
* the entries are clustered by k-means (FAISS) in *function space*, on their networks'
  outputs at shared anchor inputs. A task with ``1..max_shots`` examples scores every cluster's
  representative by the exact likelihood of its examples, then every member of the
  ``probe_clusters`` best clusters. The likelihood is Gaussian with a variance learned from the
  stream (how far an experienced task's examples typically lie from the best *other* entry), or
  the class probability. Beside the entries stands the *null*: the population prior (the
  model's zero-shot network with its head's prior uncertainty), weighted by its own marginal
  likelihood. The weights are the posterior over ``{null, entries}``, with prior mass
  ``null_prior`` on the null and the rest in proportion to each entry's members;
* the task's head is then the posterior mean of the mixture over the kept components (at most
  ``candidates`` entries, those holding ``mass`` of the entries' posterior, each >=
  ``min_weight``): given the null, its own posterior; given an entry, a two-level posterior in
  which the entry's examples are evidence about a *related* task (its head = the entry's plus a
  deviation of ``spread`` times the prior covariance) and its own examples update that exactly
  (:func:`solve_head_borrowed`). The body is generated from the pooled encoder state of its own
  and the borrowed examples, each counted with its entry's weight. A wrong entry gets no
  weight and changes nothing; with none, the task is served exactly as without retrieval.

Everything stays one forward pass per batch of requests: the entries' networks are evaluated
at the requests' examples grouped by entry, the heads are solved in closed form, and entries
are re-adapted only when they change or the model is swapped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import faiss
import numpy as np
import torch

from stream_meta.model import HeadPosterior, MetaModel, no_neighbours, stable_cholesky
from stream_meta.packing import pack_strings, unpack_strings

__all__ = ["Borrowed", "EvidenceBank", "RetrievalConfig", "null_log_evidence"]

_LOG_2PI = math.log(2.0 * math.pi)
#: inputs at which entries' networks are compared to cluster them
ANCHORS = 32
#: rows (entry x example) evaluated together when scoring entries
_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class RetrievalConfig:
    """Knobs of retrieval by evidence (the engine's ``retrieval_*`` settings give the first
    four; the others were chosen on the related-task stream of ``make bench``)."""

    bank_size: int = 1024
    min_examples: int = 8
    max_shots: int = 8
    candidates: int = 8
    probe_clusters: int = 4  # clusters of entries whose members are scored exactly
    points: int = 32  # an entry's examples: its task's newest
    null_prior: float = 0.9  # prior probability that no entry is related
    spread: float = 0.5  # a task's head around its entry's: this fraction of the prior covariance
    merge_nats: float = 0.0  # merge a task into an entry explaining it this close (per example)
    mass: float = 0.9  # share of the entries' posterior the kept entries must hold
    min_weight: float = 0.01  # entries below this posterior weight are not borrowed from
    offers_per_batch: int = 256


@dataclass
class Borrowed:
    """What a batch of requests borrows: for request row ``rows[i]``, the entries
    ``entries[i, j]`` with posterior weights ``weights[i, j]`` (0 = unused slot), and the null
    component's weight ``null[i]``."""

    rows: np.ndarray  # [b] rows of the request batch
    entries: np.ndarray  # [b, M] entry indices
    weights: np.ndarray  # [b, M]
    null: np.ndarray  # [b]


class EvidenceBank:
    """A bounded bank of experienced tasks' pooled examples; see the module docstring.

    Arrays (``E`` = capacity, ``P`` = points per entry): ``xs [E, P, x_dim]``, ``ys [E, P]``,
    ``count [E]`` (points held; 0 = a free slot), ``seen [E]`` (points stored at the entry's
    last refresh), ``members [E]`` (tasks merged), ``score [E]`` (decayed posterior weight won:
    usefulness), ``ids`` (the founding task of each entry), and what the served model makes of
    each entry: ``weights [E, n_params]`` (its adapted network), ``feature_sum [E, H]`` (the
    encoder's pooled state of its points) and ``z [E, embed]`` (its embedding, to shortlist).
    """

    def __init__(
        self,
        model: MetaModel,
        config: RetrievalConfig | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.config = c = config or RetrievalConfig()
        mc = model.config
        self.x_dim, self.regression = mc.x_dim, mc.kind == "regression"
        self.y_dtype = np.float32 if self.regression else np.int64
        cap, p = c.bank_size, c.points
        self.xs = np.zeros((cap, p, mc.x_dim), dtype=np.float32)
        self.ys = np.zeros((cap, p), dtype=self.y_dtype)
        self.count = np.zeros(cap, dtype=np.int64)
        self.seen = np.zeros(cap, dtype=np.int64)
        self.members = np.zeros(cap, dtype=np.float64)
        self.score = np.zeros(cap, dtype=np.float64)
        self.ids: list[str | None] = [None] * cap
        self._seed = seed  # of the clustering and its anchor inputs
        self.merged = self.added = self.retired = 0
        self.borrowings = 0  # sets that borrowed, ever
        self.log_var: float | None = None  # see evidence_var
        self._constants: tuple[MetaModel, ModelConstants] | None = None
        # the clusters of entries (see clusters()): each entry's cluster at the last build (-1:
        # added since), whether it represents it, and how many entries changed since
        self._cluster = np.full(cap, -1, dtype=np.int64)
        self._is_rep = np.zeros(cap, dtype=bool)
        self._changes = 0
        self._model_arrays(model)

    def _model_arrays(self, model: MetaModel) -> None:
        cap = len(self.count)
        self.weights = torch.zeros(cap, model.target.n_params)
        self.feature_sum = torch.zeros(cap, model.encoder.hidden)
        self.z = torch.zeros(cap, model.config.embed_dim)

    def __len__(self) -> int:
        return int((self.count > 0).sum())

    @property
    def live(self) -> np.ndarray:
        """Indices of the occupied entries."""
        return np.flatnonzero(self.count > 0)

    # -- evidence ---------------------------------------------------------------------------
    def constants(self, model: MetaModel) -> ModelConstants:
        """:class:`ModelConstants` of ``model``, computed once per model object."""
        if self._constants is None or self._constants[0] is not model:
            self._constants = (model, ModelConstants.of(model))
        return self._constants[1]

    def evidence_var(self, model: MetaModel) -> float:
        """The variance of a related task's examples around an entry's network (model units):
        learned from the stream, as the typical squared residual of an experienced task's
        examples under the best *other* entry (the model's noise until the bank has seen any)."""
        if self.log_var is None:
            return float(torch.exp(2.0 * model.log_noise))
        return math.exp(self.log_var)

    def shortlist(self, z: torch.Tensor, size: int) -> np.ndarray:
        """The ``size`` live entries nearest to each embedding ``z [B, E]`` (inner product, as
        the task index): ``[B, min(size, live)]`` entry indices."""
        live = self.live
        size = min(size, len(live))
        sims = z @ self.z[torch.from_numpy(live)].T
        top = torch.topk(sims, size, dim=1).indices.numpy()
        return live[top]

    def clusters(self, model: MetaModel) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """``(representatives [C], members of each cluster, entries added since)``.

        The live entries are clustered by k-means (FAISS, ``sqrt(entries)`` centroids) in
        *function space*: each entry is described by its network's outputs at the same
        ``ANCHORS`` inputs, drawn from the bank's own examples, so a cluster holds entries that
        predict alike and its representative (the member nearest the centroid) explains what
        its members explain. Rebuilt once a tenth of the bank has changed; entries added since
        the last build are listed apart.
        """
        live = self.live
        if self._changes > max(8, len(live) // 10) or not (self._is_rep & (self.count > 0)).any():
            self._cluster[:] = -1
            self._is_rep[:] = False
            k = round(math.sqrt(len(live)))
            if k < 4:  # a small bank: every entry its own cluster
                self._cluster[live] = np.arange(len(live))
                self._is_rep[live] = True
            else:
                prints = self._fingerprints(model, live)
                km = faiss.Kmeans(
                    prints.shape[1], k, niter=20, seed=self._seed + 1, min_points_per_centroid=1
                )
                km.train(prints)
                dist, assign = km.index.search(prints, 1)
                assign, dist = assign[:, 0], dist[:, 0]
                self._cluster[live] = assign
                for cl in np.unique(assign).tolist():
                    idx = np.flatnonzero(assign == cl)
                    self._is_rep[live[idx[np.argmin(dist[idx])]]] = True
            self._changes = 0
        alive = self.count > 0
        reps = np.flatnonzero(self._is_rep & alive)
        member = alive & (self._cluster >= 0)
        order = np.flatnonzero(member)
        by = self._cluster[order]
        groups = [order[by == self._cluster[r]] for r in reps.tolist()]
        fresh = np.flatnonzero(alive & (self._cluster < 0))
        return reps, groups, fresh

    def _fingerprints(self, model: MetaModel, entries: np.ndarray) -> np.ndarray:
        """Each entry's outputs at ``ANCHORS`` inputs drawn from the bank's examples (model
        units; class probabilities for a classifier): ``[len(entries), ANCHORS * out]``."""
        rng = np.random.default_rng(len(entries) + 1_000_003 * self._seed)
        pick = rng.choice(len(entries), size=ANCHORS)
        anchors = self.xs[entries[pick], rng.integers(0, self.count[entries[pick]])]
        x = torch.from_numpy(anchors).unsqueeze(0).expand(len(entries), -1, -1)
        out = model.predict(x, self.weights[torch.from_numpy(entries)])
        if self.regression:
            out = out / model.scaling.loss_scale().sqrt()
        else:
            out = torch.softmax(out, dim=-1)
        prints = out.reshape(len(entries), -1).numpy().astype(np.float32)
        # a model that overflows (rolled back by the updater) must not stop the clustering
        return np.ascontiguousarray(np.nan_to_num(prints, nan=0.0, posinf=1e6, neginf=-1e6))

    def candidates(
        self, model: MetaModel, x: torch.Tensor, y: torch.Tensor, offsets: np.ndarray
    ) -> np.ndarray:
        """The entries worth scoring exactly for each set: the members of the ``probe``
        clusters whose representatives explain the set's examples best, plus the entries added
        since the clusters were built: ``[B, S]`` entry indices, ``-1`` = padding."""
        reps, groups, fresh = self.clusters(model)
        b = len(offsets) - 1
        if len(reps) == 0:
            return np.tile(fresh, (b, 1))
        rep_ll = self.pair_log_likelihood(model, x, y, offsets, np.tile(reps, (b, 1)))
        probe = min(self.config.probe_clusters, len(reps))
        top = torch.topk(rep_ll, probe, dim=1).indices.numpy()
        rows = [np.concatenate([*(groups[c] for c in t), fresh]) for t in top.tolist()]
        width = max(len(r) for r in rows)
        out = np.full((b, width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def pair_log_likelihood(
        self,
        model: MetaModel,
        x: torch.Tensor,
        y: torch.Tensor,
        offsets: np.ndarray,
        entries: np.ndarray,
    ) -> torch.Tensor:
        """Log-likelihood of each set's examples under each of its entries' networks.

        Set ``i``'s examples are ``x[offsets[i]:offsets[i+1]]`` (``y`` likewise); ``entries
        [B, S]`` are the entries to score it under; ``-> [B, S]`` summed over the set's
        examples (model units for regression). Work is grouped by entry: every entry's network
        runs once, on all the examples of the sets that shortlisted it.
        """
        b, s = entries.shape
        pad = entries < 0
        entries = np.where(pad, 0, entries)
        n = np.diff(offsets)
        pair_entry = entries.ravel()
        pair_set = np.repeat(np.arange(b), s)
        # one row per (pair, example of its set)
        pt_pair = np.repeat(np.arange(b * s), n[pair_set])
        start = np.repeat(offsets[pair_set], n[pair_set])
        within = np.arange(len(pt_pair)) - np.repeat(
            np.cumsum(n[pair_set]) - n[pair_set], n[pair_set]
        )
        pt_example = start + within
        out = torch.zeros(b * s, dtype=torch.float32)
        if not len(pt_pair):
            return out.reshape(b, s)
        order = np.argsort(pair_entry[pt_pair], kind="stable")
        ent_sorted = pair_entry[pt_pair][order]
        uniq, first, size = np.unique(ent_sorted, return_index=True, return_counts=True)
        src_all = pt_example[order]
        ll = torch.empty(len(order))
        # entries in chunks of similar load, each padded to its largest (bounded memory)
        by_size = np.argsort(size, kind="stable")
        lo = 0
        while lo < len(by_size):
            hi = lo + 1
            while hi < len(by_size) and (hi - lo + 1) * size[by_size[hi]] <= _CHUNK_ROWS:
                hi += 1
            grp = by_size[lo:hi]
            width = int(size[grp[-1]])
            rows = np.concatenate([np.arange(first[g], first[g] + size[g]) for g in grp])
            gi = np.repeat(np.arange(len(grp)), size[grp])
            ci = rows - np.repeat(first[grp], size[grp])
            xp = torch.zeros(len(grp), width, self.x_dim)
            yp = torch.zeros(len(grp), width, dtype=y.dtype)
            src = torch.from_numpy(src_all[rows])
            gi_t, ci_t = torch.from_numpy(gi), torch.from_numpy(ci)
            xp[gi_t, ci_t] = x[src]
            yp[gi_t, ci_t] = y[src]
            pred = model.predict(xp, self.weights[torch.from_numpy(uniq[grp])])
            ll[torch.from_numpy(rows)] = _log_likelihood(model, pred, yp, self.evidence_var(model))[
                gi_t, ci_t
            ]
            lo = hi
        out = out.index_add_(0, torch.from_numpy(pt_pair[order]), ll).reshape(b, s)
        return out.masked_fill(torch.from_numpy(pad), -math.inf)

    def borrow(
        self, model: MetaModel, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]
    ) -> Borrowed | None:
        """The posterior over ``{null, entries}`` of each support set ``(xs[i] [n_i, x_dim],
        ys[i] [n_i])``: the entries :meth:`candidates` picks are scored exactly, and up to
        ``candidates`` of the most probable kept (those holding ``mass`` of the entries'
        posterior, each >= ``min_weight``); None when nothing is borrowed. Entries are
        credited with the weight they won (their usefulness)."""
        if not len(self) or not len(xs):
            return None
        c = self.config
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in ys])])
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32, copy=False))
        y = torch.from_numpy(np.concatenate(ys).astype(self.y_dtype, copy=False))
        cand = self.candidates(model, x, y, offsets)  # [B, S], -1 = padding
        ll = self.pair_log_likelihood(model, x, y, offsets, cand)
        null = null_log_evidence(model, xs, ys, self.constants(model))  # [B]
        members = np.where(cand >= 0, self.members[np.maximum(cand, 0)], 1.0)
        log_prior = np.log1p(-c.null_prior) + np.log(members / self.members.sum())
        logits = torch.cat(
            [
                (null + math.log(c.null_prior)).unsqueeze(1),
                ll + torch.from_numpy(log_prior).to(ll.dtype),
            ],
            dim=1,
        )
        logits = torch.nan_to_num(logits.double(), nan=-math.inf, posinf=-math.inf)
        # a set that nothing explains (every log-likelihood -inf or not finite) borrows nothing
        finite = torch.isfinite(logits).any(dim=1)
        logits[~finite, 0] = 0.0
        post = torch.softmax(logits, dim=1).numpy()  # [B, 1 + S]
        post[~finite.numpy(), 1:] = 0.0
        held = cand >= 0
        np.add.at(self.score, cand[held], post[:, 1:][held])
        m = min(c.candidates, cand.shape[1])
        top = np.argsort(-post[:, 1:], axis=1)[:, :m]
        w = np.take_along_axis(post[:, 1:], top, axis=1)
        # the fewest entries holding `mass` of the entries' posterior: many where one or two
        # examples leave it broad, few where it is sharp (more would only dilute it)
        total = post[:, 1:].sum(axis=1, keepdims=True)
        before = np.cumsum(w, axis=1) - w
        w[(before >= c.mass * total) | (w < c.min_weight)] = 0.0
        rows = np.flatnonzero(w.sum(axis=1) > 0)
        if len(rows) == 0:
            return None
        entries = np.take_along_axis(cand, top, axis=1)
        self.borrowings += len(rows)
        return Borrowed(rows, entries[rows], w[rows], post[rows, 0])

    # -- admission --------------------------------------------------------------------------
    def admit(self, model: MetaModel, offers: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Offer experienced tasks ``(task_id, xs [n, x_dim], ys [n])`` (their support sets,
        newest examples last).

        A task that founded an entry refreshes it with its newest examples (it has learned
        more since). Any other task founds a new entry, unless one of its shortlisted entries
        explains its examples about as well as the task's own adapted network does (mean
        log-likelihood per example within ``merge_nats``): a duplicate, which only adds to that
        entry's member count (its prior mass). When the bank is full the least useful entry
        (decayed posterior weight won) is retired.
        """
        if not offers:
            return
        c = self.config
        offers = list(offers)[: c.offers_per_batch]
        sets = [(o[1][-c.points :], o[2][-c.points :]) for o in offers]
        fsum, own_w, own_z = self._fit_many(model, sets)
        self.score *= 0.99
        slot_of = {t: i for i, t in enumerate(self.ids) if t is not None}
        founders = [i for i, o in enumerate(offers) if o[0] in slot_of]
        others = np.array([i for i, o in enumerate(offers) if o[0] not in slot_of], dtype=int)
        dup = np.zeros(len(others), dtype=bool)
        if len(others) and len(self):
            offsets = np.concatenate([[0], np.cumsum([len(sets[i][1]) for i in others])])
            x = torch.from_numpy(np.concatenate([sets[i][0] for i in others]).astype(np.float32))
            y = torch.from_numpy(np.concatenate([sets[i][1] for i in others]).astype(self.y_dtype))
            n = torch.from_numpy(np.diff(offsets).astype(np.float32))
            seg = torch.from_numpy(_set_of(offsets))
            rows = own_w[torch.from_numpy(others)][seg]
            own = _log_likelihood(
                model, model.predict(x.unsqueeze(1), rows)[:, 0], y, self.evidence_var(model)
            )
            own_mean = torch.zeros(len(others)).index_add_(0, seg, own) / n
            cand = self.shortlist(own_z[torch.from_numpy(others)], 16)
            ll = self.pair_log_likelihood(model, x, y, offsets, cand) / n.unsqueeze(1)
            best = ll.argmax(dim=1)
            if self.regression:  # the evidence's variance: squared residuals under the best
                var = self.evidence_var(model)
                top = ll.gather(1, best.unsqueeze(1))[:, 0]
                msr = (-2.0 * top - math.log(2.0 * math.pi * var)) * var
                obs = float(torch.log(msr.clamp(min=1e-6)).median())
                self.log_var = obs if self.log_var is None else 0.9 * self.log_var + 0.1 * obs
            dup = (ll.gather(1, best.unsqueeze(1))[:, 0] >= own_mean - c.merge_nats).numpy()
            hit = cand[np.arange(len(others)), best.numpy()][dup]
            np.add.at(self.members, hit, 1.0)
            np.add.at(self.score, hit, 1.0)
            self.merged += int(dup.sum())
        protect: set[int] = set()
        for i in founders:
            slot = slot_of[offers[i][0]]
            self._store(slot, sets[i], fsum[i], own_w[i], own_z[i])
            protect.add(slot)
        for i in others[~dup].tolist():
            slot = self._free_slot(protect)
            if slot < 0:  # every entry was written by this call: the rest wait for later
                break
            if self.ids[slot] is not None and self.count[slot]:
                self.retired += 1
            self.ids[slot] = offers[i][0]
            self.members[slot], self.score[slot] = 1.0, 1.0
            if self._is_rep[slot]:  # its cluster loses its representative: re-cluster
                self._changes = len(self.count)
            self._cluster[slot], self._is_rep[slot] = -1, False
            self._store(slot, sets[i], fsum[i], own_w[i], own_z[i])
            protect.add(slot)
            self.added += 1

    def _store(
        self,
        slot: int,
        support: tuple[np.ndarray, np.ndarray],
        fsum: torch.Tensor,
        weights: torch.Tensor,
        z: torch.Tensor,
    ) -> None:
        xs, ys = support
        self.xs[slot, : len(ys)], self.ys[slot, : len(ys)] = xs, ys
        self.count[slot] = self.seen[slot] = len(ys)
        self.feature_sum[slot], self.weights[slot], self.z[slot] = fsum, weights, z
        self._changes += 1

    def refit_all(self, model: MetaModel) -> None:
        """Re-adapt every entry with ``model`` (after a model swap)."""
        self._model_arrays(model)
        self._changes = len(self.count)  # re-cluster in the new model's embedding space
        self._refit(model, self.live.tolist())

    def _free_slot(self, protect: set[int]) -> int:
        empty = np.flatnonzero(self.count == 0)
        if len(empty):
            return int(empty[0])
        if len(protect) >= len(self.count):
            return -1
        score = self.score.copy()
        score[list(protect)] = np.inf
        return int(np.argmin(score))

    def _refit(self, model: MetaModel, slots: list[int], chunk: int = 1024) -> None:
        for lo in range(0, len(slots), chunk):
            part = slots[lo : lo + chunk]
            sets = [(self.xs[s, : self.count[s]], self.ys[s, : self.count[s]]) for s in part]
            idx = torch.as_tensor(part, dtype=torch.long)
            self.feature_sum[idx], self.weights[idx], self.z[idx] = self._fit_many(model, sets)

    def _fit_many(
        self,
        model: MetaModel,
        sets: Sequence[tuple[np.ndarray, np.ndarray]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pooled encoder states ``[B, H]``, adapted networks ``[B, n_params]`` (no
        neighbours) and embeddings ``[B, E]`` of support sets."""
        b = len(sets)
        xs, ys, mask = _padded(model, [x for x, _ in sets], [y for _, y in sets])
        feats = model.point_features(xs, ys) * mask.unsqueeze(-1)
        fsum, cnt = feats.sum(dim=1), mask.sum(dim=1)
        z = model.encoder.readout(fsum, cnt)
        return fsum, model.adapt(z, *no_neighbours(b, z.shape[1]), xs, ys, mask), z

    # -- persistence ------------------------------------------------------------------------
    _ARRAYS = ("xs", "ys", "count", "seen", "members", "score", "_cluster", "_is_rep")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The bank's data, its clusters and what the served model made of it."""
        utf8, offsets = pack_strings([i or "" for i in self.ids])
        out = {name.lstrip("_"): getattr(self, name).copy() for name in self._ARRAYS}
        out.update(
            ids_utf8=utf8,
            ids_offsets=offsets,
            changes=np.array([self._changes]),
            log_var=np.array([np.nan if self.log_var is None else self.log_var]),
            weights=self.weights.numpy().copy(),
            feature_sum=self.feature_sum.numpy().copy(),
            z=self.z.numpy().copy(),
        )
        return out

    def restore(self, model: MetaModel, arrays: Mapping[str, np.ndarray], *, refit: bool) -> None:
        """Load :meth:`to_arrays` output; ``refit``: the arrays were saved with another model,
        so the entries are re-adapted with ``model``. Raises ``ValueError`` when the arrays do
        not fit this bank (the bank is then unchanged)."""
        xs, ys = np.asarray(arrays["xs"]), np.asarray(arrays["ys"])
        if xs.shape != self.xs.shape or ys.dtype != self.ys.dtype:
            raise ValueError(
                f"the saved retrieval bank {xs.shape} does not fit this one {self.xs.shape} "
                "(retrieval_bank_size or the model changed)"
            )
        ids = unpack_strings(arrays["ids_utf8"], arrays["ids_offsets"])
        for name in self._ARRAYS:
            setattr(self, name, np.asarray(arrays[name.lstrip("_")]).copy())
        self.ids = [i or None for i in ids]
        self._changes = int(np.asarray(arrays["changes"])[0])
        log_var = float(np.asarray(arrays["log_var"])[0])
        self.log_var = None if math.isnan(log_var) else log_var
        if refit:
            self.refit_all(model)
        else:
            self.weights = torch.from_numpy(np.asarray(arrays["weights"]).copy())
            self.feature_sum = torch.from_numpy(np.asarray(arrays["feature_sum"]).copy())
            self.z = torch.from_numpy(np.asarray(arrays["z"]).copy())


class ModelConstants(NamedTuple):
    """What retrieval computes once per served model: its zero-shot generated weights
    ``[1, n_params]`` (the population prior) and the head's prior covariance
    ``Lambda0^-1 [F, F]``."""

    zero_shot: torch.Tensor
    prior_cov: torch.Tensor

    @classmethod
    def of(cls, model: MetaModel) -> ModelConstants:
        empty = model.encoder.readout(torch.zeros(1, model.encoder.hidden), torch.zeros(1))
        gen = model.hyper(empty, *no_neighbours(1, empty.shape[1]), torch.zeros(1))
        return cls(gen, torch.cholesky_inverse(stable_cholesky(model.prior_precision())))


def _padded(
    model: MetaModel, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sets of examples padded to the largest: ``x [B, n, x_dim], y [B, n], mask [B, n]``."""
    b, n_max = len(ys), max(len(y) for y in ys)
    regression = model.config.kind == "regression"
    x = torch.zeros(b, n_max, model.config.x_dim)
    y = torch.zeros(b, n_max, dtype=torch.float32 if regression else torch.long)
    mask = torch.zeros(b, n_max)
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        x[i, : len(yi)] = torch.from_numpy(np.asarray(xi, dtype=np.float32))
        y[i, : len(yi)] = torch.from_numpy(np.asarray(yi))
        mask[i, : len(yi)] = 1.0
    return x, y, mask


def _set_of(offsets: np.ndarray) -> np.ndarray:
    """Which set each example belongs to, from the sets' ``offsets``."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _log_likelihood(
    model: MetaModel, pred: torch.Tensor, y: torch.Tensor, var: torch.Tensor | float
) -> torch.Tensor:
    """Per-example log-likelihood of labels ``y [.., N]`` given predictions ``pred`` (user
    units; ``[.., N]`` values or ``[.., N, C]`` logits): Gaussian with variance ``var`` in the
    model's units, or the class probability."""
    if model.config.kind == "regression":
        var = torch.as_tensor(var, dtype=pred.dtype)
        r2 = (pred - y) ** 2 / model.scaling.loss_scale()
        return -0.5 * (r2 / var + torch.log(var) + _LOG_2PI)
    logp = torch.log_softmax(pred, dim=-1)
    return logp.gather(-1, y.long().unsqueeze(-1).expand(*logp.shape[:-1], 1)).squeeze(-1)


def null_log_evidence(
    model: MetaModel,
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    constants: ModelConstants | None = None,
) -> torch.Tensor:
    """Log marginal likelihood of each support set under the population prior: the model's
    zero-shot network with its head's prior uncertainty (regression: ``N(Phi m0,
    Phi Lambda0^-1 Phi^T + noise I)`` in the model's units), or its zero-shot class
    probabilities. ``-> [B]``."""
    mc = model.config
    x, y, mask = _padded(model, xs, ys)
    b, n_max = mask.shape
    k = constants or ModelConstants.of(model)
    gen = k.zero_shot
    if mc.kind != "regression":
        logits = model.predict(x.reshape(1, -1, mc.x_dim), gen)
        ll = _log_likelihood(model, logits.reshape(b, n_max, -1), y, 0.0)
        return (ll * mask).sum(dim=1)
    x_std = model.scaling.inputs(x)
    t = model.scaling.targets(x_std, y)
    phi = model.target.features(x_std.reshape(1, -1, mc.x_dim), gen).reshape(b, n_max, -1)
    r = (t - (phi @ model.target.head(gen)[0]).squeeze(-1)) * mask
    noise = torch.exp(2.0 * model.log_noise)
    cov = phi @ k.prior_cov @ phi.transpose(1, 2) + noise * torch.eye(n_max)
    pair = mask.unsqueeze(-1) * mask.unsqueeze(-2)
    cov = cov * pair + torch.diag_embed(1.0 - mask)  # padding: independent, zero residual
    chol, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0  # not positive definite: a model that overflows (no evidence at all)
    if bool(bad.any()):
        chol = torch.where(bad[:, None, None], torch.eye(n_max).expand_as(chol), chol)
    alpha = torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    out = -0.5 * ((r * alpha).sum(-1) + logdet + mask.sum(-1) * _LOG_2PI)
    return out.masked_fill(bad, -math.inf)


def solve_head_borrowed(
    model: MetaModel,
    generated: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    smask: torch.Tensor,
    xb: torch.Tensor,
    yb: torch.Tensor,
    wb: torch.Tensor,
    spread: float,
    constants: ModelConstants | None = None,
) -> HeadPosterior:
    """The head of tasks that borrow: a two-level posterior.

    The borrowed examples ``xb [B, m, x_dim], yb [B, m]`` (weights ``wb [B, m]``: their
    entries' posterior probabilities) are evidence about the *entry's* head; a task's head is
    the entry's plus a deviation ``N(0, spread * Lambda0^-1)`` (related tasks are alike, not
    equal). Their message about the task's head is therefore the Gaussian likelihood
    ``N(G^-1 b, G^-1)`` (``G = beta Phi_b^T W Phi_b``, ``b = beta Phi_b^T W y_b``) with that
    deviation added to its covariance: precision ``(I + G K)^-1 G`` and information
    ``(I + G K)^-1 b``, ``K = spread * Lambda0^-1``. It multiplies the generated prior and the
    task's own likelihood exactly as in :meth:`MetaModel.head_posterior`. ``spread -> inf`` gives
    the task's own posterior back; ``spread -> 0`` pools the borrowed examples with its own.
    """
    beta = torch.exp(-2.0 * model.log_noise)
    phi_b, t_b = model.head_design(generated, xb, yb, wb.sqrt())  # A [B, P, F], t [B, P, out]
    k = spread * (constants or ModelConstants.of(model)).prior_cov
    # with G = beta A^T A: (I + G K)^-1 G = beta A^T S^-1 A and (I + G K)^-1 (beta A^T t) =
    # beta A^T S^-1 t, S = I + beta A K A^T: one P x P Cholesky instead of F x F solves
    eye_p = torch.eye(phi_b.shape[1], dtype=phi_b.dtype)
    s_chol = stable_cholesky(eye_p + beta * phi_b @ k @ phi_b.transpose(1, 2))
    s_inv_a = torch.cholesky_solve(phi_b, s_chol)  # [B, P, F]
    msg_prec = beta * phi_b.transpose(1, 2) @ s_inv_a
    msg_prec = 0.5 * (msg_prec + msg_prec.transpose(1, 2))
    msg_info = beta * s_inv_a.transpose(1, 2) @ t_b
    return model.head_posterior(generated, xs, ys, smask, message=(msg_prec, msg_info))
