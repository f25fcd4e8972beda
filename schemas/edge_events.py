"""Control events that edges send each other on a room's subjects.

They travel on the same subject as the frames of that direction, so they stay in order
with them. A NATS header tells a control event (`Relay-Event`) from a frame; the body
of a frame is the exact text the receiving edge writes to its socket.
"""

from __future__ import annotations

from typing import Union

import msgspec
from msgspec import Struct

from schemas.records import SlotHolder

# Headers of every message on a room subject.
HEADER_TO = "Relay-To"  # socket id of the addressee; other sockets drop the message
HEADER_FROM = "Relay-From"  # socket id of the sender
HEADER_EVENT = "Relay-Event"  # present (value "1") on control events only


class PeerJoinedEvent(Struct, tag="peer_joined", tag_field="event", kw_only=True):
    """The sender now holds the other slot of the room; forward its keys as `peer_joined`.

    `revision` is the room record's revision that made it so: of two such events, the
    later revision wins, whatever order they arrive in.
    """

    peer: SlotHolder
    public_key: str
    session_nonce: str = ""
    ephemeral_key: str = ""
    revision: int = 0


class PeerLeftEvent(Struct, tag="peer_left", tag_field="event"):
    """The sender's socket left the room; tell the addressee `peer_disconnected`."""

    reason: str


class ReplacedEvent(Struct, tag="replaced", tag_field="event"):
    """A newer socket of the addressee's role authenticated; close the addressee with 4001."""

    by_socket_id: str


EdgeEvent = Union[PeerJoinedEvent, PeerLeftEvent, ReplacedEvent]

edge_event_decoder = msgspec.json.Decoder(EdgeEvent)
