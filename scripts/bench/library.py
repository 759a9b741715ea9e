"""Library plumbing: what ``stream-meta run`` does, without the CLI (the throughput and memory
sections time the engine in-process). The library is imported when called."""

from __future__ import annotations

from typing import Any


def serving_threads() -> None:
    """The thread settings of ``stream-meta run`` (see ``cmd_run``)."""
    import faiss
    import torch

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(1)


def default_settings(overrides: dict[str, Any] | None = None) -> Any:
    from stream_meta.config import load_settings

    return load_settings(None, env=None, overrides=overrides or {})


def build_engine(model: Any, settings: Any, manifest: dict[str, Any]) -> Any:
    """An :class:`Engine` built the way ``cmd_run`` builds it (private metrics registry)."""
    from stream_meta import app

    return app.build_engine(model, settings, model_version=int(manifest.get("model_version", 1)))


def family_for(name: str) -> Any:
    """The held-out task family, as ``stream-meta run`` uses it."""
    from stream_meta.tasks import get_family

    return get_family(name, split="test") if name == "digits" else get_family(name)
