"""The models topic carries a served set of experts like any model version: a follower fed the
chunks of a set's checkpoint hands back the whole set. (Against a real broker, with a replica,
a restart and the trainer: tests/integration/test_experts_kafka.py.)"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from stream_meta.experts import members, with_experts
from stream_meta.kafka.model_topic import ModelFollower, chunk_messages
from stream_meta.model import MetaModel
from stream_meta.model_checkpoint import save_checkpoint
from stream_meta.testing.kafka import FakeModelConsumer


def _noisy(model: MetaModel) -> MetaModel:
    """A copy of ``model`` with noise on its hypernetwork (the encoder kept)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.startswith("hyper.") and p.numel() > 1:
                p += 0.5 * p.std() * torch.randn(p.shape, generator=gen)
    return out.eval()


def test_the_follower_hands_back_a_published_set_of_experts(
    shipped_sinusoid: Any, tmp_path: Path, model_keys: Any
) -> None:
    shipped, _ = shipped_sinusoid
    other = _noisy(shipped)
    path = tmp_path / "set.safetensors"
    save_checkpoint(path, with_experts(shipped, 1, [(2, other)]), family="s", model_version=2)
    blob = path.read_bytes()
    # small chunks: the set arrives in many pieces, an older single version before it
    single = tmp_path / "one.safetensors"
    save_checkpoint(single, shipped, family="s", model_version=1)
    values = [
        *chunk_messages(single.read_bytes(), version=1, signer=model_keys.signer),
        *chunk_messages(blob, version=2, chunk=4096, signer=model_keys.signer),
    ]
    assert len(values) > 64  # more than one poll's worth
    follower = ModelFollower(FakeModelConsumer(values), "p.models", verifier=model_keys.verifier)
    found = None
    for _ in range(len(values)):
        found = follower.newer(shipped, 1)
        if found is not None:
            break
    assert found is not None
    version, model = found
    assert version == 2
    assert [i for i, _ in members(model, version)] == [1, 2]
    (_, primary), (_, expert) = members(model, version)
    for k, v in shipped.state_dict().items():
        torch.testing.assert_close(primary.state_dict()[k], v)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(expert.state_dict()[k], v)
    assert follower.newer(model, 2) is None  # nothing newer since
