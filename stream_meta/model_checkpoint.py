"""Safe, atomic model checkpoints: safetensors weights plus a JSON manifest.

A checkpoint is one ``.safetensors`` file: the tensors of a :class:`~stream_meta.model.MetaModel`
and, in the safetensors metadata, a manifest (format version, family, model configuration,
training settings, final metrics, creation time, library version). A human-readable copy of
the manifest is written beside it as ``<name>.json``. Nothing is unpickled on load: safetensors
holds raw tensors only, so a checkpoint from an untrusted place cannot run code.

A served set of experts (:mod:`stream_meta.experts`) is one checkpoint too: the primary's
tensors as above, each other expert's under ``experts.<id>.``, and their ids in the manifest
(``expert_id``, ``experts``), so a set is saved, published and followed like a single model.

Writes are atomic: to a temporary file in the same directory, fsync, then ``os.replace``.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from stream_meta import __version__
from stream_meta.atomic import atomic_write_bytes
from stream_meta.model import MetaModel, ModelConfig

FORMAT_VERSION = 1
SHIPPED = {
    "sinusoid": "sinusoid.safetensors",
    "digits": "digits.safetensors",
    "bandit": "bandit.safetensors",
}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of an unknown format or does not fit the model."""


def save_checkpoint(
    path: Path,
    model: MetaModel,
    *,
    family: str,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    model_version: int = 1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save ``model`` atomically to ``path``; returns the manifest written. ``extra``: more
    manifest entries (a model trained on a user's log: its ``schema``, ``scaling``, ``data``
    and ``validation``)."""
    others = model.experts
    tensors = dict(model.state_dict())
    for expert_id, expert in others:
        tensors.update({f"experts.{expert_id}.{k}": v for k, v in expert.state_dict().items()})
    manifest = {
        "schema": model_schema(model.config),
        **(extra or {}),
        "format_version": FORMAT_VERSION,
        "family": family,
        "model_version": model_version,
        "model": model.config.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        "expert_id": int(model.expert_id or model_version),
        "experts": [int(i) for i, _ in others],
        "created_unix": time.time(),
        "stream_meta_version": __version__,
        "torch_version": torch.__version__,
    }
    return write_tensors(path, tensors, manifest)


def model_schema(config: ModelConfig) -> dict[str, Any]:
    """The task schema a model serves, from its configuration (a built-in family's checkpoint
    has no declared one: its features are unnamed, its classes are their indices)."""
    schema: dict[str, Any] = {"x_dim": config.x_dim, "target": config.kind}
    if config.kind == "classification":
        schema["classes"] = [str(i) for i in range(int(config.n_classes or 0))]
    return schema


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write ``tensors`` with ``manifest`` atomically (and ``<name>.json`` beside them)."""
    path = Path(path)
    manifest = json.loads(json.dumps(manifest))  # exactly what a reader will get back
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata={"manifest": json.dumps(manifest)}))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint, validated; raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint: {exc}") from exc
    try:
        manifest = json.loads(meta["manifest"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has no valid stream-meta manifest") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {manifest.get('format_version')!r} is not supported "
            f"(this build reads format {FORMAT_VERSION})"
        )
    return dict(manifest)


def load_checkpoint(
    path: Path, *, device: str | torch.device = "cpu"
) -> tuple[MetaModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint; returns ``(model in eval mode, manifest)``."""
    manifest = read_manifest(path)
    try:
        config = ModelConfig.from_dict(manifest["model"])
        model = MetaModel(config)
        tensors = load_file(str(path), device=str(device))
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path}: tensor {name!r} holds NaN or inf")
        own = {k: v for k, v in tensors.items() if not k.startswith("experts.")}
        # checkpoints from before the scaling (or the variance's calibration) existed hold
        # none: theirs is the identity (the exact Bayesian predictive variance)
        for name, default in model.state_dict().items():
            if name.startswith(("scaling.", "calibration.")) and name not in own:
                own[name] = default.to(device)
        model.load_state_dict(own, strict=True)
        others = []
        for expert_id in manifest.get("experts", []):
            prefix = f"experts.{int(expert_id)}."
            expert = MetaModel(config)
            expert.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
                strict=True,
            )
            others.append((int(expert_id), expert.to(device).eval()))
        expected = tuple(f"experts.{int(i)}." for i in manifest.get("experts", []))
        stray = [k for k in tensors if k.startswith("experts.") and not k.startswith(expected)]
        if stray:
            raise CheckpointError(
                f"{path}: tensors of experts the manifest does not list: {stray[:3]}"
            )
        if others:
            from stream_meta.experts import with_experts

            primary_id = int(manifest.get("expert_id") or manifest.get("model_version") or 1)
            model = with_experts(model, primary_id, others)
    except CheckpointError:
        raise
    except (KeyError, TypeError, RuntimeError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit the model: {exc}") from exc
    return model.to(device).eval(), manifest


def load_checkpoint_bytes(blob: bytes) -> tuple[MetaModel, dict[str, Any]]:
    """:func:`load_checkpoint` of a checkpoint held in memory (e.g. received from Kafka)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stream-meta-model-") as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        return load_checkpoint(path)


def shipped_checkpoint(family: str) -> Path:
    """Path of the checkpoint shipped inside the package for ``family``."""
    if family not in SHIPPED:
        raise CheckpointError(f"no shipped checkpoint for family {family!r}; use --checkpoint")
    path = Path(str(resources.files("stream_meta") / "checkpoints" / SHIPPED[family]))
    if not path.is_file():
        raise CheckpointError(
            f"the shipped {family} checkpoint is missing ({path}); rebuild it with "
            f"`make checkpoints` or pass --checkpoint"
        )
    return path
