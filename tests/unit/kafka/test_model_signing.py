"""Signed model versions: a follower hands back only versions signed by a trusted key, for the
version and checkpoint they were signed for; unsigned ones only in the explicit development
mode; replays of versions already read are refused and counted. (Through the suite's broker,
with a replica: tests/integration/test_model_signing.py.)"""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_meta.cli import main
from stream_meta.kafka.model_signing import (
    Signer,
    SigningError,
    Verifier,
    generate_keys,
    load_public_keys,
    verifier_from_settings,
)
from stream_meta.kafka.model_topic import _HEAD2, Assembler, ModelFollower, chunk_messages
from stream_meta.metrics import ServiceMetrics
from stream_meta.testing.kafka import FakeModelConsumer

BLOB = b"a checkpoint's bytes " * 100


def _assembled(verifier: Verifier, values: list[bytes]) -> tuple[list[int], list[str]]:
    asm = Assembler(verifier)
    versions = [v for v, _ in asm.feed(values)]
    return versions, [label for _, _, label in asm.refused]


def test_a_signed_version_is_accepted_by_a_verifier_that_trusts_its_key() -> None:
    signer = Signer.generate()
    msgs = chunk_messages(BLOB, version=5, chunk=300, signer=signer)
    assert len(msgs) > 1 and all(m[:4] == b"SMM2" for m in msgs)
    asm = Assembler(Verifier([signer.public_key]))
    assert list(asm.feed(msgs)) == [(5, BLOB)] and asm.refused == []


def test_unknown_keys_tampered_and_moved_signatures_are_refused() -> None:
    trusted, stranger = Signer.generate(), Signer.generate()
    verifier = Verifier([trusted.public_key])
    assert _assembled(verifier, chunk_messages(BLOB, version=2, signer=stranger)) == (
        [],
        ["unknown_key"],
    )
    (msg,) = chunk_messages(BLOB, version=2, signer=trusted)
    tampered = bytearray(msg)
    tampered[_HEAD2.size - 1] ^= 0x01  # the signature's last byte
    assert _assembled(verifier, [bytes(tampered)]) == ([], ["bad_signature"])
    # a valid signature moved onto another version, or onto another checkpoint (its hash)
    (other,) = chunk_messages(BLOB, version=3, signer=trusted)
    moved = other[: _HEAD2.size - 72] + msg[_HEAD2.size - 72 : _HEAD2.size] + other[_HEAD2.size :]
    assert _assembled(verifier, [moved]) == ([], ["bad_signature"])
    (third,) = chunk_messages(BLOB + b"!", version=2, signer=trusted)
    swapped = third[: _HEAD2.size - 72] + msg[_HEAD2.size - 72 : _HEAD2.size] + BLOB + b"!"
    assert _assembled(verifier, [swapped]) == ([], ["bad_signature"])


def test_unsigned_versions_are_refused_unless_accept_unsigned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signer = Signer.generate()
    unsigned = chunk_messages(BLOB, version=4)  # SMM1, as earlier releases wrote
    assert unsigned[0][:4] == b"SMM1"
    assert _assembled(Verifier([signer.public_key]), unsigned) == ([], ["unsigned"])
    with caplog.at_level("WARNING"):
        dev = Verifier([signer.public_key], accept_unsigned=True)
        assert _assembled(dev, unsigned) == ([4], [])
    assert "UNSIGNED" in caplog.text
    # development mode does not excuse a bad signature
    assert _assembled(dev, chunk_messages(BLOB, version=4, signer=Signer.generate())) == (
        [],
        ["unknown_key"],
    )


def test_key_rotation_several_trusted_keys_are_accepted(tmp_path: Path) -> None:
    _, old_pub, _ = generate_keys(tmp_path / "old")
    _, new_pub, _ = generate_keys(tmp_path / "new")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "old.pem").write_bytes(old_pub.read_bytes())
    settings = SimpleNamespace(trusted_keys=[new_pub], trusted_keys_dir=trusted)
    verifier = verifier_from_settings(settings)
    assert len(verifier.keys) == 2
    old = Signer.from_file(tmp_path / "old" / "model-signing.key")
    new = Signer.from_file(tmp_path / "new" / "model-signing.key")
    values = [
        *chunk_messages(BLOB, version=1, signer=old),
        *chunk_messages(BLOB, version=2, signer=new),
    ]
    assert _assembled(verifier, values) == ([1, 2], [])


def test_a_replay_of_an_older_or_the_same_version_is_refused_and_counted(
    shipped_sinusoid: Any, tmp_path: Path
) -> None:
    from stream_meta.model_checkpoint import save_checkpoint

    shipped, _ = shipped_sinusoid
    signer = Signer.generate()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, shipped, family="sinusoid", model_version=1)
    blob = path.read_bytes()
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    consumer = FakeModelConsumer()
    follower = ModelFollower(consumer, "p.models", metrics, verifier=Verifier([signer.public_key]))
    # the topic's history, read in order after a (re)start, is not a replay
    consumer.values += chunk_messages(blob, version=2, signer=signer)
    consumer.values += chunk_messages(blob, version=3, signer=signer)
    found = follower.newer(shipped, 1)
    assert found is not None and found[0] == 3

    def refused(reason: str) -> float:
        labels = {"reason": reason}
        return registry.get_sample_value("stream_meta_model_messages_refused_total", labels) or 0

    assert refused("stale") == 0
    consumer.values += chunk_messages(blob, version=2, signer=signer)  # replayed: older
    assert follower.newer(shipped, 3) is None and refused("stale") == 1
    consumer.values += chunk_messages(blob, version=3, signer=signer)  # replayed: the same
    assert follower.newer(shipped, 3) is None and refused("stale") == 2
    consumer.values += chunk_messages(blob, version=4, signer=signer)
    found = follower.newer(shipped, 3)
    assert found is not None and found[0] == 4


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k"), "--json", "-q"]) == 0
    private, public = tmp_path / "k" / "model-signing.key", tmp_path / "k" / "model-signing.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signer = Signer.from_file(private)
    (key,) = load_public_keys([public])
    assert Verifier([key]).keys.keys() == {signer.key_id}
    with pytest.raises(SigningError, match="exists"):
        generate_keys(tmp_path / "k")  # never overwritten
    with pytest.raises(SigningError, match=r"not an Ed25519 private key|cannot read"):
        Signer.from_file(public)


def test_publish_model_without_a_key_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream_meta.model_checkpoint import shipped_checkpoint

    args = ["publish-model", "--bootstrap-servers", "127.0.0.1:9", "-q"]
    args += ["--checkpoint", str(shipped_checkpoint("sinusoid")), "--version", "2"]
    assert main(args) == 2  # before any connection: nothing to reach
    assert "no signing key" in capsys.readouterr().err


def test_an_encrypted_signing_key_is_read_with_its_password(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from pydantic import SecretStr

    from stream_meta.kafka.model_signing import signer_from_settings

    key = Ed25519PrivateKey.generate()
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    models = SimpleNamespace(signing_key_file=path, signing_key_password=SecretStr("s3cret"))
    signer = signer_from_settings(models)
    assert signer is not None and Verifier([key.public_key()]).keys.keys() == {signer.key_id}
    wrong = SimpleNamespace(signing_key_file=path, signing_key_password=SecretStr("nope"))
    with pytest.raises(SigningError) as exc:
        signer_from_settings(wrong)
    assert "nope" not in str(exc.value)  # the password is never in the message
    assert signer_from_settings(SimpleNamespace(signing_key_file=None)) is None


def test_trusted_keys_from_the_environment_are_comma_separated() -> None:
    from stream_meta.config import load_settings

    env = {"STREAM_META_MODELS__TRUSTED_KEYS": "/keys/a.pem, /keys/b.pem"}
    settings = load_settings(None, env=env)
    assert settings.models.trusted_keys == [Path("/keys/a.pem"), Path("/keys/b.pem")]
    assert settings.models.accept_unsigned is False  # development mode only when asked
