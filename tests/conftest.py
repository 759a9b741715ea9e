"""Shared fixtures: small seeded models, the shipped checkpoint, engines on fresh registries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from stream_meta.engine import Engine, EngineConfig
from stream_meta.metrics import EngineMetrics
from stream_meta.model import MetaModel, ModelConfig

#: the drift scenarios every release ships (``stream-meta scenarios`` lists them)
REQUIRED_SCENARIOS = (
    "sinusoid-stationary",
    "sinusoid-amplitude-shift",
    "sinusoid-new-family",
    "sinusoid-gradual",
    "sinusoid-recurring",
    "digits-new-transform",
)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker() -> None:
    """Tests run two workers on two cores: one intra-op thread each avoids oversubscription."""
    torch.set_num_threads(1)


@pytest.fixture
def make_model() -> Callable[..., MetaModel]:
    """Factory: a small, seeded, untrained meta-model."""

    def make(x_dim: int = 1, seed: int = 0, **kwargs: Any) -> MetaModel:
        torch.manual_seed(seed)
        defaults: dict[str, Any] = {
            "embed_dim": 8,
            "encoder_hidden": 16,
            "target_hidden": (8, 8),
            "hyper_hidden": 16,
        }
        defaults.update(kwargs)
        return MetaModel(ModelConfig(x_dim=x_dim, **defaults)).eval()

    return make


@pytest.fixture(scope="session")
def shipped_sinusoid() -> tuple[MetaModel, dict[str, Any]]:
    """The trained sinusoid checkpoint shipped inside the package."""
    from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint

    return load_checkpoint(shipped_checkpoint("sinusoid"))


@pytest.fixture(scope="session")
def shipped_bandit() -> tuple[MetaModel, dict[str, Any]]:
    """The trained bandit checkpoint shipped inside the package."""
    from stream_meta.model_checkpoint import load_checkpoint, shipped_checkpoint

    return load_checkpoint(shipped_checkpoint("bandit"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Any:
    """Bootstrap address of a real Kafka-protocol broker (see stream_meta/testing/broker.py)."""
    from stream_meta.testing.broker import kafka_broker

    with kafka_broker() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def model_keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An Ed25519 key pair that signs model versions, as ``stream-meta keygen`` writes it:
    ``.private`` (PEM file), ``.public`` (PEM file), ``.dir`` (holding only the public key, for
    ``models.trusted_keys_dir``), ``.signer`` and ``.verifier`` (trusting that key only)."""
    from types import SimpleNamespace

    from stream_meta.kafka.model_signing import Signer, Verifier, generate_keys

    out = tmp_path_factory.mktemp("model-keys")
    private, public, kid = generate_keys(out / "private")
    trusted = out / "trusted"
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    signer = Signer.from_file(private)
    return SimpleNamespace(
        private=private,
        public=public,
        dir=trusted,
        key_id=kid,
        signer=signer,
        verifier=Verifier([signer.public_key]),
    )


@pytest.fixture
def make_engine() -> Callable[..., Engine]:
    """Factory: an engine with its own Prometheus registry."""

    def make(model: MetaModel, **config: Any) -> Engine:
        return Engine(model, EngineConfig(**config), metrics=EngineMetrics(CollectorRegistry()))

    return make


def sinusoid_events(n: int, tasks: int, seed: int = 0, labelled: float = 0.7) -> list[dict]:
    """A small interleaved sinusoid stream as event dicts (deterministic)."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.1, 5.0, tasks)
    phase = rng.uniform(0, np.pi, tasks)
    out = []
    for i in range(n):
        t = int(rng.integers(0, tasks))
        x = float(rng.uniform(-5, 5))
        ev: dict[str, Any] = {"event_id": f"e{i}", "task_id": f"t{t}", "x": [x], "ts": float(i)}
        if rng.random() < labelled:
            ev["y"] = float(amp[t] * np.sin(x - phase[t]))
        out.append(ev)
    return out
