"""Set encoder, target network, hypernetwork and the closed-form head."""

from __future__ import annotations

import pytest
import torch

from stream_meta.encoder import SetEncoder
from stream_meta.hypernet import HyperNetwork, TargetNet
from stream_meta.model import MetaModel, ModelConfig, no_neighbours


def test_embedding_is_permutation_invariant_when_support_is_shuffled() -> None:
    torch.manual_seed(0)
    enc = SetEncoder(x_dim=3, y_dim=1, hidden=16, embed_dim=8)
    x, y = torch.randn(4, 10, 3), torch.randn(4, 10, 1)
    perm = torch.randperm(10)
    z1 = enc(x, y, torch.ones(4, 10))
    z2 = enc(x[:, perm], y[:, perm], torch.ones(4, 10))
    torch.testing.assert_close(z1, z2, atol=1e-6, rtol=0)


def test_empty_set_gives_the_same_prior_embedding_when_padding_differs() -> None:
    torch.manual_seed(0)
    enc = SetEncoder(x_dim=1, y_dim=1, hidden=16, embed_dim=8)
    z = enc(torch.randn(3, 5, 1), torch.randn(3, 5, 1), torch.zeros(3, 5))
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[0], z[1])
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


def test_padding_is_ignored_when_masked() -> None:
    torch.manual_seed(0)
    enc = SetEncoder(x_dim=1, y_dim=1, hidden=16, embed_dim=8)
    x, y = torch.randn(1, 4, 1), torch.randn(1, 4, 1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(enc(x, y, mask), enc(x[:, :2], y[:, :2], torch.ones(1, 2)))


def test_incremental_sum_equals_batch_embedding_when_examples_arrive_one_by_one() -> None:
    torch.manual_seed(0)
    enc = SetEncoder(x_dim=2, y_dim=1, hidden=16, embed_dim=8)
    x, y = torch.randn(1, 6, 2), torch.randn(1, 6, 1)
    total = torch.zeros(1, 16)
    for i in range(6):
        total = total + enc.point_features(x[:, i], y[:, i])
    # evict the first example, as a bounded buffer does
    total = total - enc.point_features(x[:, 0], y[:, 0])
    torch.testing.assert_close(
        enc.readout(total, torch.tensor([5.0])),
        enc(x[:, 1:], y[:, 1:], torch.ones(1, 5)),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("mode", ["film", "full"])
def test_hypernetwork_output_matches_param_shapes_when_batched(mode: str) -> None:
    net = TargetNet(x_dim=3, hidden=(8, 6), out_dim=2)
    assert net.n_params == 3 * 8 + 8 + 8 * 6 + 6 + 7 * 2
    hyper = HyperNetwork(embed_dim=4, target=net, hidden=16, mode=mode)
    w = hyper(
        torch.randn(5, 4),
        torch.randn(5, 3, 4),
        torch.rand(5, 3),
        torch.ones(5, 3),
        torch.arange(5.0),
    )
    assert w.shape == (5, net.n_params)
    shapes = [p.shape for p in net.unflatten(w)]
    assert shapes == [(5, *s) for _, s in net.param_shapes]
    assert net.forward(torch.randn(5, 11, 3), w).shape == (5, 11, 2)


def test_film_hypernetwork_starts_as_the_shared_network_when_untrained() -> None:
    net = TargetNet(x_dim=1, hidden=(8, 8), out_dim=1)
    hyper = HyperNetwork(embed_dim=4, target=net, hidden=16, mode="film")
    torch.nn.init.zeros_(hyper.net[-1].weight)
    w = hyper(
        torch.randn(3, 4),
        torch.zeros(3, 0, 4),
        torch.zeros(3, 0),
        torch.zeros(3, 0),
        torch.zeros(3),
    )
    torch.testing.assert_close(w, hyper.base.expand(3, -1))


def test_null_slot_takes_all_weight_when_every_neighbour_is_masked(make_model) -> None:
    model = make_model()
    att = model.hyper.attention
    ctx, weights = att(
        torch.randn(2, 8), torch.randn(2, 3, 8), torch.rand(2, 3), torch.zeros(2, 3), torch.ones(2)
    )
    torch.testing.assert_close(weights[:, 0], torch.ones(2))
    torch.testing.assert_close(ctx, torch.zeros(2, 8))


def test_head_interpolates_support_when_prior_is_weak_and_noise_small(make_model) -> None:
    model = make_model()
    with torch.no_grad():
        model.prior_chol.mul_(1e-3)
        model.log_noise.fill_(-6.0)
    xs = torch.linspace(-2, 2, 20).reshape(1, 20, 1)
    # any function in the span of the (random) features is fitted exactly: use the features
    e = model.config.embed_dim
    z = model.embed(xs, torch.zeros(1, 20), torch.ones(1, 20))
    gen = model.hyper(z, *no_neighbours(1, e), torch.tensor([20.0]))
    target_w = torch.randn(1, model.target.n_features, 1)
    ys = (model.target.features(xs, gen) @ target_w)[..., 0]
    w = model.adapt(z, *no_neighbours(1, e), xs, ys, torch.ones(1, 20))
    torch.testing.assert_close(model.predict(xs, w), ys, atol=2e-2, rtol=1e-2)


def test_adapt_with_no_examples_returns_the_generated_prior_head(make_model) -> None:
    model = make_model()
    e = model.config.embed_dim
    z = model.embed(torch.zeros(2, 1, 1), torch.zeros(2, 1), torch.zeros(2, 1))
    gen = model.hyper(z, *no_neighbours(2, e), torch.zeros(2))
    w = model.adapt(
        z, *no_neighbours(2, e), torch.zeros(2, 1, 1), torch.zeros(2, 1), torch.zeros(2, 1)
    )
    torch.testing.assert_close(w, gen, atol=1e-4, rtol=1e-4)


def test_classification_model_outputs_class_logits_when_n_classes_given() -> None:
    torch.manual_seed(0)
    model = MetaModel(
        ModelConfig(
            x_dim=4,
            kind="classification",
            n_classes=3,
            embed_dim=8,
            encoder_hidden=16,
            target_hidden=(8,),
            hyper_hidden=16,
        )
    )
    xs, ys = torch.randn(2, 6, 4), torch.randint(0, 3, (2, 6))
    z = model.embed(xs, ys, torch.ones(2, 6))
    w = model.adapt(z, *no_neighbours(2, 8), xs, ys, torch.ones(2, 6))
    out = model.predict(torch.randn(2, 5, 4), w)
    assert out.shape == (2, 5, 3)
    assert model.loss(out, torch.randint(0, 3, (2, 5))).shape == (2, 5)


def test_model_config_rejects_classification_without_classes() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        ModelConfig(x_dim=4, kind="classification")


def test_loss_falls_as_shots_grow_when_model_is_trained(shipped_sinusoid) -> None:
    """Held-out tasks, seed never used in training: MSE at 1 > 5 > 10 > 20 shots."""
    import numpy as np

    from stream_meta.tasks import SinusoidFamily

    model, _ = shipped_sinusoid
    fam = SinusoidFamily()
    rng = np.random.default_rng(987_654)
    params = fam.sample_params(300, rng)
    losses = []
    with torch.no_grad():
        for shots in (1, 5, 10, 20):
            xs, ys, xq, yq = (
                torch.from_numpy(a) for a in fam.sample_episode(params, shots, 50, rng)
            )
            z = model.embed(xs, ys, torch.ones(ys.shape))
            w = model.adapt(
                z, *no_neighbours(300, model.config.embed_dim), xs, ys, torch.ones(ys.shape)
            )
            losses.append(float(((model.predict(xq, w) - yq) ** 2).mean()))
    assert losses == sorted(losses, reverse=True), losses
    assert losses[-1] < 0.05 * losses[0], losses  # 20 shots: a small fraction of 1-shot
