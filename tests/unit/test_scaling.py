"""The scaling a model carries: user units in, user units out, the population offset."""

from __future__ import annotations

import numpy as np
import torch

from stream_meta.model import MetaModel, ModelConfig, no_neighbours
from stream_meta.model_checkpoint import load_checkpoint, save_checkpoint, shipped_checkpoint
from stream_meta.scaling import Scaling, fit_scaling


def test_targets_and_outputs_round_trip() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(50.0, 10.0, size=(300, 3))
    y = 2000.0 + x @ np.array([5.0, -3.0, 0.0]) + rng.normal(0, 20.0, 300)
    s = Scaling(3, 1)
    s.set(**fit_scaling(x, y, kind="regression"))
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    x_std = s.inputs(xt)
    assert torch.allclose(x_std.mean(0), torch.zeros(3), atol=1e-4)
    r = s.targets(x_std, yt)
    assert abs(float(r.std()) - 1.0) < 0.05  # residuals of the pooled fit in its own units
    assert torch.allclose(s.outputs(x_std, r), yt, rtol=1e-5)
    assert torch.allclose(s.outputs(x_std, torch.zeros(300)), yt, atol=80.0)  # the pooled fit


def test_a_constant_feature_and_classification_offsets() -> None:
    rng = np.random.default_rng(1)
    x = np.column_stack([np.ones(400), rng.normal(size=400)])
    y = (x[:, 1] + 0.3 * rng.normal(size=400) > 0).astype(np.int64)
    stats = fit_scaling(x, y, kind="classification", n_classes=3)  # class 2 never seen
    assert stats["x_scale"][0] == 1.0
    s = Scaling(2, 3, regression=False)
    s.set(**stats)
    logits = s.outputs(s.inputs(torch.tensor([[1.0, 2.0], [1.0, -2.0]])), torch.zeros(2, 3))
    probs = torch.softmax(logits, -1)
    assert probs[0, 1] > 0.9 and probs[1, 0] > 0.9 and (probs[:, 2] < 0.01).all()


def small_model(**scaling: object) -> MetaModel:
    model = MetaModel(ModelConfig(x_dim=2, target_hidden=(8,), embed_dim=8, encoder_hidden=16))
    if scaling:
        model.scaling.set(**scaling)
    return model.eval()


def test_a_model_in_user_units_is_equivariant_to_the_label_scale() -> None:
    torch.manual_seed(0)
    base = small_model()
    scaled = small_model(y_shift=[100.0], y_scale=1000.0)
    scaled.load_state_dict(
        base.state_dict()
        | {"scaling.y_shift": torch.tensor([100.0]), "scaling.y_scale": torch.tensor(1000.0)}
    )
    xs, ys, m = torch.randn(1, 4, 2), torch.randn(1, 4), torch.ones(1, 4)
    xq = torch.randn(1, 5, 2)

    def predict(model: MetaModel, labels: torch.Tensor) -> torch.Tensor:
        z = model.embed(xs, labels, m)
        w = model.adapt(z, *no_neighbours(1, 8), xs, labels, m)
        return model.predict(xq, w)

    p = predict(base, ys)
    q = predict(scaled, 100.0 + 1000.0 * ys)
    assert torch.allclose(q, 100.0 + 1000.0 * p, rtol=1e-4, atol=1e-2)
    yq = torch.randn(1, 5)
    loss_base = base.train_loss(p, yq)
    loss_scaled = scaled.train_loss(q, 100.0 + 1000.0 * yq)
    assert torch.allclose(loss_scaled, loss_base, rtol=1e-3)  # training sees model units
    assert torch.allclose(scaled.loss(q, 100.0 + 1000.0 * yq), 1e6 * base.loss(p, yq), rtol=1e-3)


def test_the_scaling_travels_in_the_checkpoint(tmp_path) -> None:
    model = small_model(x_shift=[1.0, 2.0], x_scale=[3.0, 4.0], y_scale=7.0)
    save_checkpoint(tmp_path / "m.safetensors", model, family="custom")
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.scaling.to_dict() == model.scaling.to_dict()


def test_checkpoints_from_before_the_scaling_load_as_the_identity() -> None:
    model, _ = load_checkpoint(shipped_checkpoint("sinusoid"))
    assert model.scaling.is_identity


def test_a_meta_update_candidate_keeps_the_served_scaling() -> None:
    """The update job rebuilds the served model and its candidate from the served weights:
    the scaling comes with them, so a meta-update retrains on the same units."""
    from stream_meta.continual.update_job import model_arrays, model_from_arrays

    model = small_model(x_shift=[1.0, 2.0], x_scale=[3.0, 4.0], y_shift=[5.0], y_scale=7.0)
    rebuilt = model_from_arrays(model.config.to_dict(), model_arrays(model))
    assert rebuilt.scaling.to_dict() == model.scaling.to_dict()
    assert "scaling.y_scale" not in dict(rebuilt.named_parameters())  # never trained
