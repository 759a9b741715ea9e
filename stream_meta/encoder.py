"""Permutation-invariant set encoder: a task's support set -> its task embedding.

A Deep Sets encoder (Zaheer et al., 2017). Every support example ``(x, y)`` goes through the same
point network ``phi``; the features are summed and divided by the count, and a readout network
``rho`` maps ``[mean, log1p(n)]`` to an L2-normalised embedding. Because the pooled state is just
``(sum, n)``, the embedding can be kept up to date incrementally as examples arrive (add a point's
features) or leave a bounded support buffer (subtract them), and the empty set (``n = 0``) is
well defined: it maps to the learned *prior* embedding.

Shapes: ``x [..., n, x_dim]``, ``y_enc [..., n, y_dim]``, ``mask [..., n]`` (1 = real example,
0 = padding), features ``[..., n, H]``, state sum ``[..., H]``, count ``[...]``, embedding
``[..., E]``.

>>> import torch
>>> enc = SetEncoder(x_dim=1, y_dim=1, hidden=16, embed_dim=8)
>>> x, y = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
>>> z = enc(x, y, torch.ones(2, 5))
>>> z.shape, bool(torch.allclose(z, enc(x.flip(1), y.flip(1), torch.ones(2, 5)), atol=1e-6))
(torch.Size([2, 8]), True)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SetEncoder(nn.Module):
    """Deep Sets encoder over ``(x, y)`` pairs with an incremental ``(sum, count)`` state.

    Parameters
    ----------
    x_dim, y_dim:
        Input and (encoded) label dimensions; a class label is one-hot encoded by the caller.
    hidden:
        Width ``H`` of the point features (and of the pooled state).
    embed_dim:
        Embedding dimension ``E``; embeddings are L2-normalised so inner product = cosine.
    max_shots:
        Scale for the ``log1p(n)`` count feature (only a normalisation, any ``n`` works).
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        hidden: int = 128,
        embed_dim: int = 64,
        max_shots: int = 64,
    ) -> None:
        super().__init__()
        self.x_dim, self.y_dim, self.hidden, self.embed_dim = x_dim, y_dim, hidden, embed_dim
        self.count_scale = 1.0 / math.log1p(max_shots)
        self.phi = nn.Sequential(
            nn.Linear(x_dim + y_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
        )
        self.rho = nn.Sequential(
            nn.Linear(hidden + 1, hidden),
            nn.ReLU(),
            nn.Linear(hidden, embed_dim),
        )

    def point_features(self, x: torch.Tensor, y_enc: torch.Tensor) -> torch.Tensor:
        """``[..., n, x_dim], [..., n, y_dim] -> [..., n, H]``: one feature row per example."""
        return self.phi(torch.cat([x, y_enc], dim=-1))

    @staticmethod
    def pool(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked sum and count: ``[..., n, H], [..., n] -> ([..., H], [...])``."""
        return (features * mask.unsqueeze(-1)).sum(dim=-2), mask.sum(dim=-1)

    def readout(self, feature_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``([..., H], [...]) -> [..., E]``: the embedding of a pooled state (count 0 = prior)."""
        mean = feature_sum / count.clamp(min=1.0).unsqueeze(-1)
        n_feat = (torch.log1p(count) * self.count_scale).unsqueeze(-1)
        z = self.rho(torch.cat([mean, n_feat], dim=-1))
        return nn.functional.normalize(z, dim=-1)

    def forward(self, x: torch.Tensor, y_enc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embed padded support sets: ``[..., n, x_dim], [..., n, y_dim], [..., n] -> [..., E]``."""
        return self.readout(*self.pool(self.point_features(x, y_enc), mask))
