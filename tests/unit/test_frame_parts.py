"""The pure part of frames larger than NATS carries: cutting them, and putting them together
(`edge.protocol.parts`). The edges and a real nats-server: tests/integration/test_frames_in_parts.py."""

from __future__ import annotations

import pytest

from edge.protocol.parts import FrameParts, cut, parse_part_kind, part_kind
from schemas.edge_events import KIND_EVENT, KIND_FRAME


def _send(parts: FrameParts, sender: str, data: bytes, part_bytes: int, now: float = 0.0) -> list[tuple[bytes | None, str | None]]:
    pieces = cut(data, part_bytes)
    return [parts.add(sender, part_kind(n, n == len(pieces) - 1), piece, now) for n, piece in enumerate(pieces)]


def test_cut_gives_consecutive_parts_no_larger_than_asked():
    data = bytes(range(256)) * 41
    pieces = cut(data, 1000)
    assert b"".join(pieces) == data
    assert [len(p) for p in pieces] == [1000] * 10 + [496]
    assert cut(b"abc", 3) == [b"abc"]
    with pytest.raises(ValueError):
        cut(b"abc", 0)


def test_part_kinds_say_index_and_whether_last_and_differ_from_frames_and_events():
    assert [part_kind(0, False), part_kind(7, False), part_kind(12, True)] == ["p0", "p7", "l12"]
    assert parse_part_kind("p7") == (7, False)
    assert parse_part_kind("l12") == (12, True)
    for other in (KIND_FRAME, KIND_EVENT, "p", "l", "px", "q1", "p-1", ""):
        assert parse_part_kind(other) is None


def test_parts_in_order_give_the_whole_frame_once_and_leave_nothing_behind():
    parts = FrameParts(max_bytes=10_000)
    data = b"x" * 2500 + b"y" * 2500 + b"z"
    results = _send(parts, "mac1", data, 1000)
    assert results[:-1] == [(None, None)] * 5
    assert results[-1] == (data, None)
    assert not parts.under_way and parts.size == 0


def test_a_gap_drops_the_frame_and_its_rest_and_the_next_frame_comes_whole():
    parts = FrameParts(max_bytes=10_000)
    assert parts.add("mac1", "p0", b"a" * 10, 0.0) == (None, None)
    frame, dropped = parts.add("mac1", "p2", b"c" * 10, 0.0)  # p1 lost
    assert frame is None and dropped is not None
    assert parts.add("mac1", "l3", b"d" * 10, 0.0) == (None, None)  # the rest of it: dropped too
    assert _send(parts, "mac1", b"next" * 10, 16)[-1] == (b"next" * 10, None)


def test_a_new_frame_before_the_last_part_drops_the_unfinished_one():
    parts = FrameParts(max_bytes=10_000)
    parts.add("mac1", "p0", b"old", 0.0)
    parts.add("mac1", "p1", b"old", 0.0)
    results = _send(parts, "mac1", b"new!" * 4, 4)
    assert results[0][1] is not None  # the old one, dropped at the new one's first part
    assert results[-1][0] == b"new!" * 4


def test_a_frame_from_a_new_peer_drops_the_old_peers_unfinished_one():
    parts = FrameParts(max_bytes=10_000)
    parts.add("mac-old", "p0", b"old", 0.0)
    assert parts.add("mac-new", "p1", b"mid", 0.0)[0] is None  # not a beginning: nothing to join to
    assert not parts.under_way
    parts.add("mac-old", "p0", b"old", 0.0)
    assert parts.interrupt("mac-new") == "the peer changed"
    assert parts.interrupt("mac-new") is None  # nothing under way any more


def test_a_whole_frame_from_the_same_sender_before_the_last_part_drops_the_unfinished_one():
    parts = FrameParts(max_bytes=10_000)
    parts.add("mac1", "p0", b"old", 0.0)
    assert parts.interrupt("mac1") == "a frame came before its last part"
    assert parts.add("mac1", "l1", b"rest", 0.0) == (None, None)


def test_a_frame_growing_past_the_bound_is_dropped_not_buffered():
    parts = FrameParts(max_bytes=100)
    assert parts.add("mac1", "p0", b"a" * 60, 0.0) == (None, None)
    frame, dropped = parts.add("mac1", "p1", b"b" * 60, 0.0)
    assert frame is None and dropped is not None and "100 bytes" in dropped
    assert not parts.under_way and parts.size == 0
    assert parts.add("mac1", "l2", b"c", 0.0) == (None, None)


def test_an_unfinished_frame_expires_after_the_timeout():
    parts = FrameParts(max_bytes=100)
    parts.add("mac1", "p0", b"a" * 10, now=100.0)
    assert parts.expired(104.9, timeout_s=5) is None and parts.under_way
    assert parts.expired(105.1, timeout_s=5) is not None
    assert not parts.under_way
    assert parts.expired(200.0, timeout_s=5) is None


def test_a_message_of_unknown_kind_is_never_joined_to_a_frame():
    parts = FrameParts(max_bytes=100)
    parts.add("mac1", "p0", b"a", 0.0)
    frame, dropped = parts.add("mac1", "zz", b"b", 0.0)
    assert frame is None and dropped is not None and not parts.under_way
