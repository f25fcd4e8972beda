"""What the pure core asks the edge to do: actions, carried out in order by the asyncio side.

A `Session` returns these; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.client import JoinRoom, RegisterRoom
from schemas.edge_events import EdgeEvent
from schemas.records import SlotHolder

# Actions are made per frame: plain slotted dataclasses (a frozen one costs three times as
# much to build). Nobody changes an action after it is made.


@dataclass(slots=True)
class Send:
    """Write this text frame to the session's own socket."""

    data: bytes


@dataclass(slots=True)
class Forward:
    """Publish this frame (already the text the peer receives) to the peer's socket."""

    data: bytes
    to: SlotHolder
    payloads: int = 1  # how many payloads it carries (a `relay_batch` may carry several)


@dataclass(frozen=True)
class RoomRequest:
    """Run the room logic for this request, then hand the outcome to `Session.apply`."""

    message: RegisterRoom | JoinRoom


@dataclass(frozen=True)
class Notify:
    """Publish a control event to `to`, the holder of `role`'s slot."""

    to: SlotHolder
    role: str
    event: EdgeEvent


@dataclass(frozen=True)
class Close:
    """Close the session's socket, after sending `farewell` if the client still reads."""

    code: int
    reason: str
    farewell: bytes | None = None


Action = Send | Forward | RoomRequest | Notify | Close


@dataclass(frozen=True, slots=True)
class Undelivered:
    """News from NATS about a frame this session forwarded: it reached nobody.

    `edge_gone`: nobody subscribes for the addressee `to_socket_id` any more (NATS answered
    "no responders": its edge crashed or lost NATS); else its edge has no such socket (it
    left, and its edge's `peer_left` is on its way). Not charged: the edge refunds it.
    """

    to_socket_id: str
    edge_gone: bool
