"""State checkpoints: the engine's learned state and the consumer's offsets, in one file.

A checkpoint is one ``state-<sequence>.npz`` in the state directory: the task store (support
sets, pooled encoder states, embeddings, LRU order, the reservoir's random generator), the
FAISS index, the run statistics, the de-duplication window, and a JSON header with the format
version, the model's version and fingerprint, and the caller's extras (the service puts the
consumed offsets there). State and offsets are captured together between two batches, so they
always describe the same point of the stream.

Each checkpoint is written atomically (temporary file, fsync, rename, directory fsync) and the
newest ``keep`` are kept: a checkpoint that cannot be read (a damaged disk) is reported and the
previous one is used. Nothing is unpickled.

State written with a different model is restored by re-encoding every live task from its
support set (the model changed, the examples did not); state whose shape does not fit the
engine (another family, support size or policy) is refused with an explanation. Models
promoted by meta-updates are saved in ``models/model-v<version>.safetensors`` beside the
checkpoints: when a checkpoint was written with one of them, that model is served again
before the state is restored (no re-encoding, the served version survives the restart).

Other components add their own arrays under a prefix (``parts``: the meta-updater's replay
buffer and stream position are ``meta_update.*``); :meth:`StateDir.load` hands them back to
their ``restorers``.

Adapted weights are a cache and are not saved: after a restore each task is adapted again,
with the neighbours the index holds then, so predictions continue close to, not bit-equal
with, an uninterrupted run (the support sets, and so what is learned, are equal).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import weakref
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_meta.atomic import atomic_file
from stream_meta.engine import Engine
from stream_meta.index import IndexLoadError
from stream_meta.model import MetaModel

log = logging.getLogger(__name__)

FORMAT = "stream-meta-state"
FORMAT_VERSION = 1
_NAME = re.compile(r"^state-(\d{12})\.npz$")
_HEADER = "header"


def _sequence(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else 0


class StateError(RuntimeError):
    """A state directory that cannot be used (explains what to do)."""


def model_fingerprint(model: MetaModel) -> str:
    """sha256 over the model's configuration and parameters: equal iff the model is. A served
    set of experts (:mod:`stream_meta.experts`) is fingerprinted with its ids and every
    expert's parameters (its primary's ``state_dict`` holds none of the others'); a single
    model's fingerprint is unchanged by that."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    _hash_tensors(h, model)
    others = model.experts
    if others:
        ids = [int(model.expert_id), *(int(i) for i, _ in others)]
        h.update(f"experts:{ids}".encode())
        for _, expert in others:
            _hash_tensors(h, expert)
    return h.hexdigest()


def _hash_tensors(h: Any, model: MetaModel) -> None:
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


class StateDir:
    """Checkpoints of one engine in a directory; see the module docstring."""

    def __init__(self, path: Path | str, *, keep: int = 2) -> None:
        self.path = Path(path)
        self.keep = max(1, keep)
        # per model object (models are immutable snapshots once served)
        self._fingerprints: weakref.WeakKeyDictionary[MetaModel, str] = weakref.WeakKeyDictionary()

    def checkpoints(self) -> list[Path]:
        """Checkpoint files present, newest first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def _fingerprint(self, model: MetaModel) -> str:
        if model not in self._fingerprints:
            self._fingerprints[model] = model_fingerprint(model)
        return self._fingerprints[model]

    @property
    def models_dir(self) -> Path:
        """Where promoted models are kept (``model-v<version>.safetensors``)."""
        return self.path / "models"

    def save(
        self,
        engine: Engine,
        extra: dict[str, Any] | None = None,
        parts: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> Path:
        """Write a new checkpoint of ``engine`` (plus ``extra``) and prune old ones."""
        return self.capture(engine, extra, parts)()

    def capture(
        self,
        engine: Engine,
        extra: dict[str, Any] | None = None,
        parts: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> Callable[[], Path]:
        """Capture ``engine`` now (between two batches; cheap); the returned function writes
        the checkpoint and prunes old ones, and may run in another thread while the engine
        goes on. Writers must not run concurrently. ``parts``: other components' arrays by
        prefix, already copied (they are written as they are)."""
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created_unix": time.time(),
            "model_version": engine.model_version,
            "model_fingerprint": self._fingerprint(engine.model),
            "layout": engine.state_layout(),
            "extra": extra or {},
        }
        pack = engine.capture_state()

        more = {f"{p}.{k}": v for p, a in (parts or {}).items() for k, v in a.items()}

        def write() -> Path:
            arrays = {**pack(), **more}
            arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
            existing = self.checkpoints()
            seq = _sequence(existing[0]) + 1 if existing else 1
            path = self.path / f"state-{seq:012d}.npz"
            self.path.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, mode=0o600) as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
            for old in self.checkpoints()[self.keep :]:
                old.unlink(missing_ok=True)
            return path

        return write

    def load(
        self,
        engine: Engine,
        restorers: dict[str, Callable[[dict[str, np.ndarray]], None]] | None = None,
    ) -> dict[str, Any] | None:
        """Restore the newest readable checkpoint into ``engine`` (and each ``restorers[p]``
        its ``p.*`` part, when present); returns its header, or None when the directory holds
        no checkpoint.

        Raises:
            StateError: checkpoints exist but none can be restored into this engine.
        """
        errors: list[str] = []
        for path in self.checkpoints():
            try:
                header, arrays = self._read(path)
            except StateError as exc:
                log.error("%s", exc)
                errors.append(str(exc))
                continue
            self._check_layout(path, header, engine)
            self._serve_saved_model(header, engine)
            reencode = header["model_fingerprint"] != self._fingerprint(engine.model)
            if reencode:
                log.warning(
                    "%s was written with another model (version %s): re-encoding its tasks",
                    path.name,
                    header.get("model_version"),
                )
            try:
                engine.restore_state(arrays, reencode=reencode)
            except (ValueError, KeyError, IndexLoadError) as exc:
                msg = f"{path}: inconsistent state checkpoint: {exc}"
                log.error("%s", msg)
                errors.append(msg)
                continue
            for prefix, restore in (restorers or {}).items():
                part = {
                    k.partition(".")[2]: v for k, v in arrays.items() if k.startswith(prefix + ".")
                }
                if part:
                    try:
                        restore(part)
                    except (ValueError, KeyError) as exc:
                        log.error(
                            "%s: its %s part cannot be restored (%s); starting that part empty",
                            path.name,
                            prefix,
                            exc,
                        )
            header["path"] = str(path)
            return header
        if errors:
            raise StateError(
                f"no usable state checkpoint in {self.path} ({'; '.join(errors)}); move the "
                "directory away to start without state"
            )
        return None

    def _serve_saved_model(self, header: dict[str, Any], engine: Engine) -> None:
        """Serve the promoted model a checkpoint was written with, when it is kept here."""
        version = header.get("model_version")
        if not isinstance(version, int):
            return
        path = self.models_dir / f"model-v{version}.safetensors"
        if header.get("model_fingerprint") == self._fingerprint(engine.model) or not path.is_file():
            return
        from stream_meta.model_checkpoint import CheckpointError, load_checkpoint

        try:
            model, _ = load_checkpoint(path)
        except CheckpointError as exc:
            log.error("cannot load the promoted model the state was written with: %s", exc)
            return
        if self._fingerprint(model) != header.get("model_fingerprint"):
            log.error("%s does not match the checkpoint's model fingerprint: not used", path)
            return
        engine.swap_model(model, version)
        log.info("serving the promoted model version %s again (%s)", version, path)

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
            header = json.loads(arrays.pop(_HEADER).tobytes().decode())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise StateError(f"{path}: unreadable state checkpoint: {exc}") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise StateError(f"{path}: not a stream-meta state checkpoint")
        if header.get("version") != FORMAT_VERSION:
            raise StateError(
                f"{path}: state format {header.get('version')!r} is not supported "
                f"(this build reads {FORMAT_VERSION})"
            )
        return header, arrays

    @staticmethod
    def _check_layout(path: Path, header: dict[str, Any], engine: Engine) -> None:
        saved, ours = header.get("layout", {}), engine.state_layout()
        diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise StateError(
                f"{path} does not fit this engine ({what}); restore those settings, or move "
                f"{path.parent} away to start without state"
            )
