"""The functional target network and the hypernetwork that generates its weights.

Following hypnettorch, the target network owns no parameters: it declares ``param_shapes`` and
runs ``forward(x, weights)`` with a flat weight vector per task, batched over tasks. The
hypernetwork is built from those shapes. Task embeddings live outside it (in the FAISS index) and
come in as inputs: the task's own embedding ``z [B, E]`` and its ``k`` retrieved neighbours
``zn [B, k, E]`` with their cosine similarities ``sim [B, k]``.

Neighbours are aggregated by a learned attention with a *null slot*: when no neighbour is
relevant (a novel task) the model learns to put its weight on the null slot, so retrieval can
help but cannot hurt much.

>>> import torch
>>> net = TargetNet(x_dim=1, hidden=(8, 8), out_dim=1)
>>> net.n_params, net.n_body, net.n_features
(97, 88, 9)
>>> hyper = HyperNetwork(embed_dim=4, target=net, hidden=16)
>>> w = hyper(torch.randn(3, 4), torch.randn(3, 2, 4), torch.rand(3, 2), torch.ones(3, 2),
...           torch.tensor([0.0, 1.0, 5.0]))
>>> w.shape, net.forward(torch.randn(3, 7, 1), w).shape
(torch.Size([3, 97]), torch.Size([3, 7, 1]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class TargetNet:
    """A functional MLP ``x_dim -> hidden... -> out_dim`` (ReLU), batched over tasks.

    The last layer (the *head*, ``[n_features, out_dim]`` with a bias row) is kept apart so the
    meta-model can solve for it in closed form; ``features`` runs the body only.
    """

    def __init__(
        self,
        x_dim: int,
        hidden: Sequence[int] = (40, 40),
        out_dim: int = 1,
        *,
        skip_input: bool = False,
    ) -> None:
        self.x_dim, self.hidden, self.out_dim = x_dim, tuple(hidden), out_dim
        self.skip_input = skip_input
        shapes: list[tuple[str, tuple[int, ...]]] = []
        fan_in = x_dim
        for i, width in enumerate(self.hidden):
            shapes += [(f"w{i}", (fan_in, width)), (f"b{i}", (width,))]
            fan_in = width
        # last hidden layer (plus the raw input when skip_input) plus a constant 1 (the bias)
        self.n_features = fan_in + (x_dim if skip_input else 0) + 1
        shapes.append(("head", (self.n_features, out_dim)))
        self.param_shapes: tuple[tuple[str, tuple[int, ...]], ...] = tuple(shapes)
        self.sizes = [math.prod(s) for _, s in shapes]
        self.n_params = sum(self.sizes)
        self.n_body = self.n_params - self.sizes[-1]

    def init_flat(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A standard (Kaiming-uniform-like) initialisation as one flat vector ``[n_params]``."""
        parts = []
        for _name, shape in self.param_shapes:
            bound = 1.0 / math.sqrt(shape[0])
            parts.append((torch.rand(shape, generator=generator) * 2 - 1).flatten() * bound)
        return torch.cat(parts)

    def unflatten(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """``[B, n_params] -> [[B, *shape] for each entry of param_shapes]``."""
        chunks = torch.split(weights, self.sizes, dim=-1)
        lead = weights.shape[:-1]
        return [c.reshape(*lead, *s) for c, (_, s) in zip(chunks, self.param_shapes, strict=True)]

    def features(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Body features with a bias column: ``[B, n, x_dim], [B, >=n_body] -> [B, n, F]``."""
        parts = self.unflatten_body(weights)
        h = x
        for i in range(len(self.hidden)):
            h = torch.relu(torch.baddbmm(parts[2 * i + 1].unsqueeze(1), h, parts[2 * i]))
        extra = [x] if self.skip_input else []
        return torch.cat([h, *extra, torch.ones_like(h[..., :1])], dim=-1)

    def unflatten_body(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """The body's parameter tensors from ``[B, n_body or n_params]``."""
        body = weights[..., : self.n_body]
        chunks = torch.split(body, self.sizes[:-1], dim=-1)
        return [
            c.reshape(*weights.shape[:-1], *s)
            for c, (_, s) in zip(chunks, self.param_shapes[:-1], strict=True)
        ]

    def head(self, weights: torch.Tensor) -> torch.Tensor:
        """``[B, n_params] -> [B, F, out_dim]``."""
        return weights[..., self.n_body :].reshape(*weights.shape[:-1], self.n_features, -1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[B, n, x_dim], [B, n_params] -> [B, n, out_dim]``."""
        return torch.bmm(self.features(x, weights), self.head(weights))


class NeighbourAttention(nn.Module):
    """Similarity-weighted, learned aggregation of neighbour embeddings with a null slot.

    ``z [B, E], zn [B, k, E], sim [B, k], mask [B, k] -> (context [B, E], weights [B, k + 1])``;
    ``weights[:, 0]`` is the null slot (no neighbour is relevant).
    """

    def __init__(self, embed_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(embed_dim + 1, hidden)
        self.key = nn.Linear(embed_dim, hidden)
        self.value = nn.Linear(embed_dim, embed_dim)
        self.sim_gain = nn.Parameter(torch.tensor(5.0))
        self.null_score = nn.Parameter(torch.tensor(0.0))
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(
        self,
        z: torch.Tensor,
        zn: torch.Tensor,
        sim: torch.Tensor,
        mask: torch.Tensor,
        shots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.query(torch.cat([z, torch.log1p(shots).unsqueeze(-1)], dim=-1))
        scores = torch.einsum("bh,bkh->bk", q, self.key(zn)) * self.scale + self.sim_gain * sim
        scores = scores.masked_fill(mask <= 0, float("-inf"))
        null = self.null_score.expand(z.shape[0], 1)
        weights = torch.softmax(torch.cat([null, scores], dim=-1), dim=-1)
        context = torch.einsum("bk,bke->be", weights[:, 1:], self.value(zn))
        return context, weights


class HyperNetwork(nn.Module):
    """``(z, neighbours, shots) -> flat target-network weights [B, n_params]``.

    Two ways to generate the weights, both starting (delta = 0) as one shared, well-initialised
    network:

    - ``"full"``: a learned base vector plus an embedding-conditioned delta over every weight;
    - ``"film"`` (default): the hypernetwork outputs a per-unit scale and shift for every hidden
      layer (FiLM, Perez et al. 2018) and a delta for the head; the full weights are then
      materialised as ``W' = W * (1 + gamma)``, ``b' = b * (1 + gamma) + beta``. Far fewer
      outputs (``2 * sum(hidden) + n_head`` instead of ``n_params``), so generating weights for a
      task costs a fraction of the ``full`` mode at the same quality on our families.
    """

    def __init__(
        self,
        embed_dim: int,
        target: TargetNet,
        *,
        hidden: int = 256,
        mode: str = "film",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("full", "film"):
            raise ValueError(f"mode must be 'full' or 'film', got {mode!r}")
        self.mode, self.target = mode, target
        n_head = target.sizes[-1]
        n_out = target.n_params if mode == "full" else 2 * sum(target.hidden) + n_head
        self.attention = NeighbourAttention(embed_dim)
        self.net = nn.Sequential(
            nn.Linear(2 * embed_dim + 1, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)
        self.base = nn.Parameter(target.init_flat(generator))

    def forward(
        self,
        z: torch.Tensor,
        zn: torch.Tensor,
        sim: torch.Tensor,
        mask: torch.Tensor,
        shots: torch.Tensor,
    ) -> torch.Tensor:
        """``z [B, E], zn [B, k, E], sim [B, k], mask [B, k], shots [B] -> [B, n_params]``."""
        if zn.shape[1] == 0:
            context = torch.zeros_like(z)
        else:
            context, _ = self.attention(z, zn, sim, mask, shots)
        n_feat = torch.log1p(shots).unsqueeze(-1)
        out = self.net(torch.cat([z, context, n_feat], dim=-1))
        if self.mode == "full":
            return self.base + out
        return self._modulate(out)

    def _modulate(self, out: torch.Tensor) -> torch.Tensor:
        """FiLM outputs ``[B, 2 * sum(hidden) + n_head]`` -> materialised weights."""
        t = self.target
        parts = t.unflatten(self.base.unsqueeze(0))
        pieces, pos = [], 0
        for i, width in enumerate(t.hidden):
            gamma = 1.0 + out[:, pos : pos + width]
            beta = out[:, pos + width : pos + 2 * width]
            pos += 2 * width
            w, b = parts[2 * i], parts[2 * i + 1]  # [1, fan_in, width], [1, width]
            pieces.append((w * gamma.unsqueeze(1)).flatten(1))
            pieces.append(b * gamma + beta)
        pieces.append(self.base[t.n_body :] + out[:, pos:])
        return torch.cat(pieces, dim=-1)
