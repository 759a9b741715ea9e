"""The records replicas exchange on Kafka: embeddings, task states, model chunks.

Whatever arrives (arbitrary bytes included) is either decoded exactly or refused; nothing
raises."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_meta.kafka import changelog, embedding_sync
from stream_meta.kafka.model_topic import _HEAD, MAX_MODEL_BYTES, Assembler, chunk_messages


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_arbitrary_bytes_never_crash_a_decoder(raw: bytes) -> None:
    assert embedding_sync.decode(raw, version=1, d=4) is None or len(raw) == 12 + 16
    rec = changelog.decode(raw, x_dim=2)
    assert rec is None or rec.xs.shape == (len(rec.ys), 2)
    list(Assembler().feed([raw]))  # refused or kept pending, never raised


def test_embeddings_round_trip_and_non_finite_ones_are_refused() -> None:
    z = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    assert np.array_equal(embedding_sync.decode(embedding_sync.encode(4, z), version=4, d=3), z)
    bad = z.copy()
    bad[1] = np.nan
    assert embedding_sync.decode(embedding_sync.encode(4, bad), version=4, d=3) is None
    assert embedding_sync.decode(embedding_sync.encode(4, z), version=4, d=2) is None


@pytest.mark.parametrize("ys", [np.array([1.5, -2.0], np.float32), np.array([3, 0], np.int64)])
def test_task_states_round_trip_exactly(ys: np.ndarray) -> None:
    xs = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    rec = changelog.decode(changelog.encode(9, 123, xs, ys), x_dim=2)
    assert rec is not None and (rec.seen, rec.applied_offset) == (9, 123)
    assert np.array_equal(rec.xs, xs) and np.array_equal(rec.ys, ys) and rec.ys.dtype == ys.dtype
    blob = changelog.encode(9, 123, xs, ys)
    assert changelog.decode(blob[:-1], x_dim=2) is None  # truncated
    assert changelog.decode(changelog.encode(1, 0, xs, ys), x_dim=2) is None  # seen < n


def test_model_chunks_reassemble_in_any_order_and_corruption_is_refused() -> None:
    blob = bytes(range(256)) * 50
    msgs = chunk_messages(blob, version=2, chunk=1000)
    assert list(Assembler().feed(reversed(msgs))) == [(2, blob)]
    tampered = [msgs[0][: _HEAD.size] + b"\xff" + msgs[0][_HEAD.size + 1 :], *msgs[1:]]
    asm = Assembler()
    assert list(asm.feed(tampered)) == [] and "sha256" in asm.refused[-1][1]
    asm = Assembler()
    huge = _HEAD.pack(b"SMM1", 3, 0, MAX_MODEL_BYTES, hashlib.sha256(b"").digest())
    assert list(asm.feed([huge, b"short", msgs[0][:-1].replace(b"SMM1", b"XXXX", 1)])) == []
    assert asm.refused[0][1].startswith("announces")
    assert len(asm.refused) == 3
    # a republication of the same version with another hash starts over
    other = chunk_messages(b"other model", version=2)
    asm = Assembler()
    assert list(asm.feed([msgs[0], *other])) == [(2, b"other model")]
    with pytest.raises(ValueError):
        chunk_messages(b"x", version=0)
