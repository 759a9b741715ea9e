"""The meta-model: set encoder + hypernetwork + a closed-form Bayesian head.

Adapting a task is one forward pass, no gradient step:

1. ``embed``: the support set -> task embedding ``z`` (set encoder);
2. the caller retrieves the ``k`` nearest task embeddings ``zn`` (FAISS at serving time, an exact
   in-batch search during training);
3. ``adapt``: the hypernetwork generates the target network's body weights and a *prior* for its
   last layer from ``z`` and the neighbours; the last layer is then the Bayesian linear-regression
   posterior mean on the support set under that prior (ALPaCA, Harrison et al. 2018; R2-D2,
   Bertinetto et al. 2019). With no example the head is the prior, i.e. what the neighbours and
   the prior embedding suggest; every example sharpens it exactly, in closed form.

The posterior solve is differentiable, so everything is meta-trained end to end. The same
solve gives the head's posterior covariance, hence a predictive standard deviation for every
regression prediction (:meth:`MetaModel.head_posterior`, :meth:`MetaModel.predict_with_std`;
the variance's calibration, and how it travels in a cached weight row:
:mod:`stream_meta.uncertainty`).

Shapes: support ``xs [B, n, x_dim]``, labels ``ys [B, n]`` (float, or int class), ``smask [B, n]``,
neighbours ``zn [B, k, E]``, ``sim [B, k]``, ``nmask [B, k]``; weights ``[B, n_params]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from stream_meta.encoder import SetEncoder
from stream_meta.hypernet import HyperNetwork, TargetNet
from stream_meta.scaling import Scaling
from stream_meta.uncertainty import Calibration


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`MetaModel` (stored in the checkpoint manifest)."""

    x_dim: int
    kind: Literal["regression", "classification"] = "regression"
    n_classes: int | None = None
    embed_dim: int = 64
    encoder_hidden: int = 128
    target_hidden: tuple[int, ...] = (40, 40)
    hyper_hidden: int = 256
    generate: str = "film"
    skip_input: bool = False
    max_shots: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "classification" and not (self.n_classes and self.n_classes >= 2):
            raise ValueError("classification needs n_classes >= 2")
        object.__setattr__(self, "target_hidden", tuple(self.target_hidden))

    @property
    def y_dim(self) -> int:
        return 1 if self.kind == "regression" else int(self.n_classes or 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


#: the architecture ``stream-meta train`` gives each task family's model, as
#: :class:`ModelConfig` fields (the family supplies ``x_dim``, ``kind`` and ``n_classes``; the
#: checkpoint manifest records the whole config)
PRESETS: dict[str, dict[str, Any]] = {
    "sinusoid": {"target_hidden": (40, 40), "hyper_hidden": 256},
    "digits": {"target_hidden": (128,), "hyper_hidden": 256, "skip_input": True},
    "bandit": {"target_hidden": (32, 32), "hyper_hidden": 128, "embed_dim": 32},
}


class HeadPosterior(NamedTuple):
    """The head's Gaussian posterior given a support set (model units): ``mean [B, F, out]``;
    ``chol [B, F, F]``, the lower Cholesky factor of its precision
    ``G = beta Phi^T Phi + Lambda0`` (the covariance is ``G^{-1}``, shared by the outputs);
    and the evidence for the task's own scale (:func:`~stream_meta.uncertainty.task_scale`):
    ``misfit [B]``, ``beta ||y - Phi m||^2 + (m - m0)^T Lambda0 (m - m0)`` at the posterior
    mean ``m`` (chi-squared with ``shots`` degrees of freedom when the task is as the prior
    says), and ``shots [B]``, the support size (sum of squared masks)."""

    mean: torch.Tensor
    chol: torch.Tensor
    misfit: torch.Tensor
    shots: torch.Tensor


class MetaModel(nn.Module):
    """Set encoder, hypernetwork and closed-form head; see the module docstring."""

    #: a served set of experts (stream_meta.experts): this model's id in the set, and the other
    #: ``(expert id, model)`` pairs served beside it (none: a single model)
    expert_id: int = 0
    experts: tuple[tuple[int, MetaModel], ...] = ()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.target = TargetNet(
            config.x_dim, config.target_hidden, config.y_dim, skip_input=config.skip_input
        )
        self.encoder = SetEncoder(
            config.x_dim,
            config.y_dim,
            hidden=config.encoder_hidden,
            embed_dim=config.embed_dim,
            max_shots=config.max_shots,
        )
        gen = torch.Generator().manual_seed(0)
        self.hyper = HyperNetwork(
            config.embed_dim,
            self.target,
            hidden=config.hyper_hidden,
            mode=config.generate,
            generator=gen,
        )
        n_feat = self.target.n_features
        # prior precision of the head, Lambda0 = L L^T + eps I, and the observation noise
        self.prior_chol = nn.Parameter(torch.eye(n_feat))
        self.log_noise = nn.Parameter(torch.tensor(-1.0))
        self.log_temperature = nn.Parameter(torch.tensor(0.0))  # classification logits scale
        # user units <-> model units (identity unless fitted on a user's training tasks)
        self.scaling = Scaling(config.x_dim, config.y_dim, regression=config.kind == "regression")
        # the served variance's two fitted numbers (identity: the exact Bayesian predictive)
        self.calibration = Calibration()

    # -- encoding -------------------------------------------------------------------------
    def encode_labels(self, y: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` labels -> ``[..., n, y_dim]`` (the value, or a one-hot class)."""
        if self.config.kind == "regression":
            return y.to(torch.float32).unsqueeze(-1)
        return nn.functional.one_hot(y.long(), self.config.y_dim).to(torch.float32)

    def embed(self, xs: torch.Tensor, ys: torch.Tensor, smask: torch.Tensor) -> torch.Tensor:
        """Support sets (user units) -> L2-normalised embeddings ``[B, E]``."""
        x_std = self.scaling.inputs(xs)
        return self.encoder(x_std, self.encode_labels(self.scaling.targets(x_std, ys)), smask)

    def point_features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The encoder's features of examples in user units: ``[..., n, x_dim], [..., n] ->
        [..., n, H]`` (what an incrementally pooled support state sums)."""
        x_std = self.scaling.inputs(x)
        return self.encoder.point_features(
            x_std, self.encode_labels(self.scaling.targets(x_std, y))
        )

    # -- adaptation -----------------------------------------------------------------------
    def prior_precision(self) -> torch.Tensor:
        chol = torch.tril(self.prior_chol)
        eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
        return chol @ chol.T + 1e-3 * eye

    def adapt(
        self,
        z: torch.Tensor,
        zn: torch.Tensor,
        sim: torch.Tensor,
        nmask: torch.Tensor,
        xs: torch.Tensor,
        ys: torch.Tensor,
        smask: torch.Tensor,
        *,
        posterior: bool = False,
    ) -> torch.Tensor:
        """Generate and adapt the target network's weights: ``-> [B, n_params]``; with
        ``posterior`` the rows carry the head's posterior factor too (``[B, n_params +
        posterior_width]``, what :meth:`predict_with_std` reads)."""
        generated = self.hyper(z, zn, sim, nmask, smask.sum(dim=-1))
        if not posterior:
            return self.with_head(generated, self.solve_head(generated, xs, ys, smask))
        post = self.head_posterior(generated, xs, ys, smask)
        return torch.cat([generated[:, : self.target.n_body], self.head_row(post)], dim=-1)

    def with_head(self, generated: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Generated body weights with the solved head ``[B, F, out]`` -> ``[B, n_params]``."""
        return torch.cat([generated[:, : self.target.n_body], head.flatten(1)], dim=-1)

    def solve_head(
        self,
        generated: torch.Tensor,
        xs: torch.Tensor,
        ys: torch.Tensor,
        smask: torch.Tensor,
    ) -> torch.Tensor:
        """Posterior mean of the head ``[B, F, out]`` under the generated prior mean, given
        the support set ``xs [B, n, x_dim], ys [B, n]`` in user units."""
        return self.head_posterior(generated, xs, ys, smask).mean

    def head_design(
        self, generated: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, smask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's regression problem in model units: features ``[B, n, F]`` and targets
        ``[B, n, out]`` (centred one-hot for a classifier), both rows multiplied by ``smask``."""
        x_std = self.scaling.inputs(xs)
        y_enc = self.encode_labels(self.scaling.targets(x_std, ys))
        phi = self.target.features(x_std, generated) * smask.unsqueeze(-1)  # [B, n, F]
        targets = y_enc
        if self.config.kind == "classification":
            targets = y_enc - 1.0 / self.config.y_dim  # centred one-hot
        return phi, targets * smask.unsqueeze(-1)

    def head_posterior(
        self,
        generated: torch.Tensor,
        xs: torch.Tensor,
        ys: torch.Tensor,
        smask: torch.Tensor,
        message: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> HeadPosterior:
        """The head's posterior under the generated prior, given the support set
        ``xs [B, n, x_dim], ys [B, n]`` in user units (``smask [B, n]``: an example's features
        and label are both multiplied by its mask value, so a fractional one ``m`` counts as
        ``m**2`` of an example). ``message``: a further Gaussian factor on the head, as its
        precision ``[B, F, F]`` and information ``[B, F, out]`` (what borrowed evidence says,
        :func:`stream_meta.retrieval.solve_head_borrowed`)."""
        phi, targets = self.head_design(generated, xs, ys, smask)
        prior_mean = self.target.head(generated)  # [B, F, out]
        beta = torch.exp(-2.0 * self.log_noise)
        lam0 = self.prior_precision()
        gram = beta * phi.transpose(1, 2) @ phi + lam0  # [B, F, F]
        # Lambda0 @ m0 for every task as one GEMM: (m0^T Lambda0^T)^T, Lambda0 symmetric
        prior_term = (prior_mean.transpose(1, 2) @ lam0).transpose(1, 2)
        rhs = beta * phi.transpose(1, 2) @ targets + prior_term
        if message is not None:
            gram, rhs = gram + message[0], rhs + message[1]
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool(info.any()):  # numerically indefinite: fall back to a general solve
            mean, chol = torch.linalg.solve(gram, rhs), _jittered_cholesky(gram)
        else:
            mean = torch.cholesky_solve(rhs, chol)
        resid = targets - phi @ mean  # [B, n, out] (padding: 0)
        shift = mean - prior_mean
        misfit = beta * (resid * resid).sum(dim=(1, 2)) + (shift * (lam0 @ shift)).sum(dim=(1, 2))
        return HeadPosterior(mean, chol, misfit, (smask * smask).sum(dim=-1))

    @property
    def posterior_width(self) -> int:
        """Numbers a cached weight row carries beside the weights for the predictive variance:
        the posterior precision's Cholesky factor (``F * F``, zeros above the diagonal
        included) and the task's variance scale (none for a classifier, whose probabilities are its
        uncertainty)."""
        if self.config.kind != "regression":
            return 0
        return self.target.n_features**2 + 1

    def head_row(self, post: HeadPosterior) -> torch.Tensor:
        """What a solved posterior puts in a row after the generated body: ``[B, n_head +
        posterior_width]``, the head (the posterior mean), then, for regression, the
        precision's Cholesky factor ``L`` flattened (the epistemic variance of a query is
        ``||L^{-1} phi||^2``, one triangular solve) and the task's variance scale
        (:meth:`Calibration.task_scale`).

        ``L`` is stored whole, not as its packed lower triangle (half the numbers), nor
        inverted: on the sinusoid model (F = 41, 512 tasks, one thread) packing and unpacking
        cost 1.2 ms each and the inverse 1.7 ms, where a view costs nothing and the solve at
        serving time costs what the product with an inverse would (0.3 ms)."""
        head = post.mean.flatten(1)
        if self.posterior_width == 0:
            return head
        scale = self.calibration.task_scale(post.misfit, post.shots).to(head.dtype)
        return torch.cat([head, post.chol.flatten(1), scale.unsqueeze(-1)], dim=-1)

    def noise_variance(self) -> torch.Tensor:
        """The head's observation noise ``1 / beta`` (model units)."""
        return torch.exp(2.0 * self.log_noise)

    # -- prediction -----------------------------------------------------------------------
    def predict(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[B, n, x_dim], [B, n_params] -> [B, n]`` values, or ``[B, n, C]`` class logits,
        in user units (wider rows: their first ``n_params`` columns)."""
        x_std = self.scaling.inputs(x)
        w = weights[:, : self.target.n_params]
        return self._outputs(x_std, self.target.forward(x_std, w))

    def predict_with_std(
        self, x: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict` and, for regression rows that carry the posterior
        (``[B, n_params + posterior_width]``, see :meth:`head_row`), the calibrated
        predictive standard deviation ``[B, n]`` in user units (else None)."""
        x_std = self.scaling.inputs(x)
        n_params = self.target.n_params
        w = rows[:, :n_params]
        phi = self.target.features(x_std, w)
        out = self._outputs(x_std, torch.bmm(phi, self.target.head(w)))
        if self.posterior_width == 0 or rows.shape[-1] < n_params + self.posterior_width:
            return out, None
        var = self.predictive_variance(phi, rows[:, n_params:])
        return out, torch.sqrt(var) * self.scaling.y_scale

    def variance_parts(
        self, x: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The predictive variance of regression rows that carry the posterior, in its two
        parts, user units: ``[B, n, x_dim], [B, W] -> (values [B, n], epistemic [B, n],
        noise [B, n])``; their sum is the square of :meth:`predict_with_std`'s std. The
        epistemic part is what learning labels can remove, the noise part is not. None for a
        classifier or rows without the posterior."""
        n_params = self.target.n_params
        if self.posterior_width == 0 or rows.shape[-1] < n_params + self.posterior_width:
            return None
        x_std = self.scaling.inputs(x)
        w = rows[:, :n_params]
        phi = self.target.features(x_std, w)
        out = self._outputs(x_std, torch.bmm(phi, self.target.head(w)))
        post = rows[:, n_params : n_params + self.posterior_width]
        f = phi.shape[-1]
        chol = post[:, :-1].reshape(-1, f, f)
        v = torch.linalg.solve_triangular(chol, phi.transpose(1, 2), upper=False)  # [B, F, n]
        cal, scale = self.calibration, post[:, -1:]
        unit = self.scaling.y_scale**2
        epistemic = scale * cal.var_scale * (v * v).sum(dim=1) * unit
        noise = (scale * cal.noise_scale * self.noise_variance() * unit).expand_as(epistemic)
        return out, epistemic, noise

    def sample_values(self, x: torch.Tensor, rows: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Draws of the noiseless function values at ``x [B, q, x_dim]`` from the task's
        calibrated head posterior (Thompson sampling), user units: ``rows [B, W]`` with the
        posterior, ``eps [B, S, F]`` standard normal draws -> ``[B, S, q]``. A head draw is
        ``m + sqrt(s * var_scale) L^-T eps``, whose covariance ``s * var_scale * G^-1`` is the
        calibrated epistemic part of :meth:`variance_parts`."""
        n_params = self.target.n_params
        if self.posterior_width == 0 or rows.shape[-1] < n_params + self.posterior_width:
            raise ValueError("sampling needs regression rows that carry the head posterior")
        x_std = self.scaling.inputs(x)
        w = rows[:, :n_params]
        phi = self.target.features(x_std, w)  # [B, q, F]
        f = phi.shape[-1]
        post = rows[:, n_params : n_params + self.posterior_width]
        chol = post[:, :-1].reshape(-1, f, f)
        # L^T d = eps^T: d [B, F, S] has covariance G^-1 per column
        d = torch.linalg.solve_triangular(chol.transpose(1, 2), eps.transpose(1, 2), upper=True)
        d = d * torch.sqrt(post[:, -1:] * self.calibration.var_scale).unsqueeze(-1)
        heads = self.target.head(w)[..., 0].unsqueeze(-1) + d  # [B, F, S]
        out = torch.bmm(phi, heads).transpose(1, 2)  # [B, S, q]
        return self.scaling.offset(x_std)[..., 0].unsqueeze(1) + self.scaling.y_scale * out

    def predictive_variance(self, phi: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """Calibrated predictive variance ``[B, n]`` (model units) of the head at features
        ``phi [B, n, F]``, from the rows' posterior part ``[B, posterior_width]``
        (:meth:`head_row`)."""
        f = phi.shape[-1]
        chol = post[:, :-1].reshape(-1, f, f)
        v = torch.linalg.solve_triangular(chol, phi.transpose(1, 2), upper=False)  # [B, F, n]
        return self.calibration.variance((v * v).sum(dim=1), self.noise_variance(), post[:, -1:])

    def _outputs(self, x_std: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The target network's output ``[B, n, out]`` -> values or logits in user units."""
        if self.config.kind == "regression":
            return self.scaling.outputs(x_std, out.squeeze(-1))
        return self.scaling.outputs(
            x_std, out * torch.exp(self.log_temperature) * self.config.y_dim
        )

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Elementwise loss ``[B, n]`` in user units: squared error, or cross-entropy."""
        if self.config.kind == "regression":
            return (out - y) ** 2
        return nn.functional.cross_entropy(out.transpose(1, 2), y.long(), reduction="none")

    def train_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`loss` in the model's units (a squared error divided by ``y_scale**2``): what
        training minimises, so that step sizes and gradient clipping do not depend on the
        scale of the user's labels."""
        return self.loss(out, y) / self.scaling.loss_scale()


def stable_cholesky(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``a [..., F, F]``; where it is not numerically positive definite,
    with the smallest diagonal jitter that makes it so (:func:`_jittered_cholesky`)."""
    chol, info = torch.linalg.cholesky_ex(a)
    return _jittered_cholesky(a) if bool(info.any()) else chol


def _jittered_cholesky(gram: torch.Tensor, tries: int = 8) -> torch.Tensor:
    """Cholesky factor of ``gram [..., F, F]`` with the smallest diagonal jitter (1e-6 of the
    mean diagonal, growing tenfold) that makes every matrix positive definite."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1e-12)[..., None, None]
    jitter = 1e-6
    for _ in range(tries):
        chol, info = torch.linalg.cholesky_ex(gram + jitter * scale * eye)
        if not bool(info.any()):
            break
        jitter *= 10.0
    return chol


def no_neighbours(
    batch: int, embed_dim: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty neighbour tensors ``(zn [B, 0, E], sim [B, 0], nmask [B, 0])``."""
    return (
        torch.zeros(batch, 0, embed_dim, device=device),
        torch.zeros(batch, 0, device=device),
        torch.zeros(batch, 0, device=device),
    )
