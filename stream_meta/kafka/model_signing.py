"""Ed25519 signatures of published model versions (``<prefix>.models``).

The publisher (``stream-meta publish-model``, the trainer) signs each version with its private
key; every replica verifies the signature against its trusted public keys before it loads the
checkpoint. What is signed binds the version number to the checkpoint's bytes, so a signature
cannot be moved to another version nor to another checkpoint::

    b"stream-meta model v1" + version (uint32, little-endian) + sha256(checkpoint)

A key is named by its **key id**: the first 8 bytes of the sha256 of the raw (32-byte) public
key, carried beside the signature so a replica picks the right trusted key. Several public keys
can be trusted at once (key rotation: trust the new key everywhere, then sign with it, then
drop the old one).

A :class:`Verifier` with ``accept_unsigned=True`` (``models.accept_unsigned``) is the explicit
development mode: unsigned versions are accepted, loudly (a WARNING when it is built and per
version). A badly signed version is refused in every mode.

>>> signer = Signer.generate()
>>> v = Verifier([signer.public_key])
>>> key_id, sig = signer.sign(3, bytes(32))
>>> v.check(3, bytes(32), key_id, sig) is None
True
>>> v.check(4, bytes(32), key_id, sig)  # moved to another version
('bad_signature', 'the signature does not match the version and checkpoint')
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KEY_ID_BYTES",
    "SIGNATURE_BYTES",
    "Signer",
    "SigningError",
    "Verifier",
    "generate_keys",
    "key_id",
    "load_public_keys",
    "signed_payload",
    "signer_from_settings",
    "verifier_from_settings",
]

log = logging.getLogger(__name__)

KEY_ID_BYTES = 8
SIGNATURE_BYTES = 64
_CONTEXT = b"stream-meta model v1"


class SigningError(Exception):
    """A key cannot be read or is not an Ed25519 key."""


def signed_payload(version: int, digest: bytes) -> bytes:
    """The bytes a version's signature covers: a context, the version, the sha256."""
    return _CONTEXT + struct.pack("<I", version) + digest


def key_id(public_key: Ed25519PublicKey) -> bytes:
    """The first 8 bytes of the sha256 of the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_BYTES]


class Signer:
    """Signs model versions with an Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: Path, password: bytes | None = None) -> Signer:
        """The private key in a PEM file (PKCS#8, optionally encrypted with ``password``)."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
        except (OSError, ValueError, TypeError) as exc:
            raise SigningError(f"cannot read the signing key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, version: int, digest: bytes) -> tuple[bytes, bytes]:
        """``(key id, signature)`` of model ``version`` whose checkpoint has sha256 ``digest``."""
        return self.key_id, self._key.sign(signed_payload(version, digest))


class Verifier:
    """Checks versions against trusted public keys; see the module docstring."""

    def __init__(
        self, public_keys: Iterable[Ed25519PublicKey], *, accept_unsigned: bool = False
    ) -> None:
        self.keys = {key_id(k): k for k in public_keys}
        self.accept_unsigned = accept_unsigned

    def check(
        self, version: int, digest: bytes, kid: bytes | None, signature: bytes | None
    ) -> tuple[str, str] | None:
        """None when the version may be loaded, else ``(reason label, why)``: ``unsigned``,
        ``unknown_key`` or ``bad_signature``."""
        if kid is None or signature is None:
            if self.accept_unsigned:
                log.warning(
                    "model version %d is UNSIGNED and accepted: models.accept_unsigned is on "
                    "(development only)",
                    version,
                )
                return None
            return "unsigned", "the version is not signed (models.accept_unsigned is off)"
        key = self.keys.get(kid)
        if key is None:
            return "unknown_key", f"signed by key {kid.hex()}, which is not trusted"
        try:
            key.verify(signature, signed_payload(version, digest))
        except InvalidSignature:
            return "bad_signature", "the signature does not match the version and checkpoint"
        return None


def _load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SigningError(f"cannot read the public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 public key")
    return key


def load_public_keys(
    files: Iterable[Path], directory: Path | None = None
) -> list[Ed25519PublicKey]:
    """The public keys (PEM) in ``files`` and in ``directory``'s ``*.pem`` files (sorted)."""
    paths = [Path(f) for f in files]
    if directory is not None:
        if not Path(directory).is_dir():
            raise SigningError(f"the trusted keys directory {directory} does not exist")
        paths += sorted(Path(directory).glob("*.pem"))
    return [_load_public_key(p) for p in paths]


def verifier_from_settings(models: object) -> Verifier:
    """A :class:`Verifier` from the ``[models]`` settings (``trusted_keys``,
    ``trusted_keys_dir``, ``accept_unsigned``); logs what it trusts, loudly in development
    mode or when it trusts no key (then every signed version is refused)."""
    keys = load_public_keys(
        getattr(models, "trusted_keys", ()), getattr(models, "trusted_keys_dir", None)
    )
    accept = bool(getattr(models, "accept_unsigned", False))
    verifier = Verifier(keys, accept_unsigned=accept)
    if accept:
        log.warning(
            "models.accept_unsigned is on: UNSIGNED model versions will be served "
            "(development only; never in production)"
        )
    if keys:
        log.info(
            "model versions are verified against %d trusted key(s): %s",
            len(keys),
            ", ".join(sorted(k.hex() for k in verifier.keys)),
        )
    elif not accept:
        log.warning(
            "no trusted model keys (models.trusted_keys / models.trusted_keys_dir): every "
            "published model version will be refused"
        )
    return verifier


def signer_from_settings(models: object) -> Signer | None:
    """The publisher's :class:`Signer` (``models.signing_key_file``), or None when unset."""
    path = getattr(models, "signing_key_file", None)
    if path is None:
        return None
    secret = getattr(models, "signing_key_password", None)
    password = secret.get_secret_value().encode() if secret is not None else None
    return Signer.from_file(Path(path), password)


def generate_keys(directory: Path, name: str = "model-signing") -> tuple[Path, Path, str]:
    """Write a new key pair to ``directory``: ``<name>.key`` (private, PEM PKCS#8, mode 0600)
    and ``<name>.pub.pem`` (public, PEM); returns both paths and the key id (hex). Refuses to
    overwrite an existing key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub.pem"
    for p in (private, public):
        if p.exists():
            raise SigningError(f"{p} exists: not overwritten")
    signer = Signer.generate()
    pem = signer._key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(
        signer.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public, signer.key_id.hex()
