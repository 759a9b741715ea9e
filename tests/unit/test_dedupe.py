"""De-duplication window and string packing: bounded memory of ids, exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from stream_meta.dedupe import DedupeWindow
from stream_meta.packing import pack_strings, unpack_strings


def test_add_reports_a_duplicate_when_the_id_is_in_the_window() -> None:
    w = DedupeWindow(3)
    assert w.add("a") is True
    assert w.add("b") is True
    assert w.add("a") is False
    assert "a" in w and "b" in w and "c" not in w
    assert len(w) == 2


def test_oldest_id_is_forgotten_when_capacity_is_exceeded() -> None:
    w = DedupeWindow(3)
    for event_id in ["e0", "e1", "e2", "e3", "e4"]:
        assert w.add(event_id)
    assert len(w) == 3
    assert [e in w for e in ["e0", "e1", "e2", "e3", "e4"]] == [False, False, True, True, True]
    assert w.add("e0") is True  # forgotten, so it is new again


def test_repeated_id_does_not_refresh_its_age_when_added_again() -> None:
    """The window is first-seen order: a duplicate neither grows it nor saves its id."""
    w = DedupeWindow(2)
    w.add("a")
    w.add("b")
    assert w.add("a") is False
    assert len(w) == 2
    w.add("c")
    assert "a" not in w and "b" in w and "c" in w


@pytest.mark.parametrize("capacity", [0, -1])
def test_constructor_raises_when_capacity_is_below_one(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        DedupeWindow(capacity)


def test_restore_reproduces_the_window_when_given_its_arrays() -> None:
    w = DedupeWindow(4)
    for event_id in ["a", "b", "c", "d", "e", "f"]:
        w.add(event_id)
    arrays = w.to_arrays()
    assert set(arrays) == {"utf8", "offsets"}
    other = DedupeWindow(4)
    other.add("zzz")
    other.restore(arrays)
    assert len(other) == 4
    assert [e in other for e in "abcdef"] == [False, False, True, True, True, True]
    assert "zzz" not in other
    # the order came back too: the next id pushes out "c", the oldest
    other.add("g")
    assert "c" not in other and "d" in other


def test_restore_keeps_the_newest_ids_when_capacity_shrank() -> None:
    w = DedupeWindow(5)
    for event_id in ["a", "b", "c", "d", "e"]:
        w.add(event_id)
    small = DedupeWindow(2)
    small.restore(w.to_arrays())
    assert len(small) == 2
    assert [e in small for e in "abcde"] == [False, False, False, True, True]


def test_restore_is_empty_when_window_was_empty() -> None:
    w = DedupeWindow(3)
    w.add("x")
    w.restore(DedupeWindow(3).to_arrays())
    assert len(w) == 0 and "x" not in w


# -- packing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "items",
    [
        pytest.param(["task-1", "ü", "", "日本語", "emoji 🙂", ""], id="unicode-and-empty"),
        pytest.param([], id="no-strings"),
        pytest.param([""], id="one-empty"),
        pytest.param(["a" * 1000, "b"], id="long"),
    ],
)
def test_unpack_returns_the_strings_when_given_packed_arrays(items: list[str]) -> None:
    utf8, offsets = pack_strings(items)
    assert utf8.dtype == np.uint8 and offsets.dtype == np.int64
    assert offsets.shape == (len(items) + 1,)
    assert len(utf8) == sum(len(s.encode("utf-8")) for s in items)
    assert unpack_strings(utf8, offsets) == items
    assert unpack_strings(utf8.tobytes(), offsets) == items


def test_pack_counts_bytes_not_characters_when_strings_are_multibyte() -> None:
    utf8, offsets = pack_strings(["ü", "ab"])
    assert offsets.tolist() == [0, 2, 4]
    assert utf8.tobytes() == "üab".encode()


@pytest.mark.parametrize(
    "offsets",
    [
        pytest.param(np.array([0, 3, 5], dtype=np.int64), id="last-short"),
        pytest.param(np.array([0, 3, 7], dtype=np.int64), id="last-long"),
        pytest.param(np.array([1, 3, 6], dtype=np.int64), id="first-not-zero"),
        pytest.param(np.array([0, 4, 3, 6], dtype=np.int64), id="decreasing"),
        pytest.param(np.array([], dtype=np.int64), id="empty"),
        pytest.param(np.array([[0, 3, 6]], dtype=np.int64), id="two-d"),
        pytest.param(np.array([0.0, 3.0, 6.0]), id="float"),
        pytest.param(np.array([0, 1, 6], dtype=np.int64), id="splits-a-character"),
    ],
)
def test_unpack_raises_when_offsets_are_inconsistent(offsets: np.ndarray) -> None:
    utf8, good = pack_strings(["ü", "abcd"])  # 2 + 4 bytes
    assert unpack_strings(utf8, good) == ["ü", "abcd"]
    with pytest.raises(ValueError):
        unpack_strings(utf8, offsets)
