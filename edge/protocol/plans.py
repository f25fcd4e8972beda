"""How the edge paces work over many sockets, and what a change of the live edges means. No I/O."""

from __future__ import annotations

import math
from collections.abc import Container
from typing import TypeVar

T = TypeVar("T")


def spread_plan(count: int, over_s: float, slice_size: int, step_s: float) -> tuple[int, float]:
    """(sockets per slice, seconds from one slice to the next) for a pass over `count`
    sockets spread over `over_s`: slices at least `step_s` apart, of at most `slice_size`
    sockets (more sockets than that allows: slices closer together).

    Spread, not in one go: a burst of KV writes (or of closes) holds up every frame.
    """
    if count == 0 or over_s <= 0:
        return slice_size, 0.0
    size = max(1, min(slice_size, math.ceil(count * step_s / over_s)))
    return size, over_s / math.ceil(count / size)


def drain_order(rooms: list[tuple[str, T]]) -> list[list[T]]:
    """The sockets of a drain, `(room id, socket)` each, grouped by room in first-seen order:
    both sides of a room on this edge close together, so neither waits for a peer that is
    about to leave too."""
    groups: dict[str, list[T]] = {}
    for room_id, socket in rooms:
        groups.setdefault(room_id, []).append(socket)
    return list(groups.values())


def edges_gone(before: dict[str, str], after: dict[str, str]) -> list[tuple[str, str]]:
    """Edge incarnations (edge_id, boot_id) alive in `before` and not in `after`."""
    return [(edge_id, boot_id) for edge_id, boot_id in before.items() if after.get(edge_id) != boot_id]


def adopt_view(current: dict[str, str], new: dict[str, str], gone: Container[tuple[str, str]]) -> dict[str, str]:
    """The lease view to adopt (edge_id → boot_id): `new`, but where it names an incarnation
    known to be gone, what `current` holds for that edge (or nothing). Boot ids never come
    back: such a lease is a stale read (storage answering from behind, as while a NATS
    node rejoins its cluster), and taking it would tell the peers of the edge's live
    incarnation `timeout`, and judge its slots dead."""
    view = {}
    for edge_id, boot_id in new.items():
        if (edge_id, boot_id) not in gone:
            view[edge_id] = boot_id
        elif edge_id in current:
            view[edge_id] = current[edge_id]
    return view


def backlog_over_bounds(messages: int, bytes_waiting: int, max_messages: int, max_bytes: int) -> bool:
    """Whether a socket's backlog (`messages`, and `bytes_waiting` with its write buffer)
    shows a reader that cannot keep up: it is closed 1013, nobody else waits for it."""
    return messages > max_messages or bytes_waiting > max_bytes
