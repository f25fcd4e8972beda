"""Control events that edges send each other on a room's subjects.

They travel on the same subjects as the frames of that direction, so they stay in order
with them. The subject's last token tells a control event (`e`) from a frame (`f`) or a
part of one; the body of a frame is the exact text the receiving edge writes to its socket. See
`schemas.subjects.addressed_subject`.
"""

from __future__ import annotations

from typing import Union

import msgspec
from msgspec import Struct

from schemas.records import SlotHolder

# The last token of a message's subject: what it carries.
KIND_FRAME = "f"  # a frame, written to the socket as it is
KIND_EVENT = "e"  # a control event (a request: the addressee's edge acknowledges it)
# A frame over NATS's max_payload travels in parts (`edge.protocol.parts`): `p<n>` is its
# part n (from 0), `l<n>` its last part, which carries the frame's reply subject.
KIND_PART = "p"
KIND_LAST_PART = "l"


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


class LastSeenQuery(Struct, kw_only=True):
    """To the edge holding these sockets: when did each last send something?"""

    socket_ids: list[str]


class LastSeenAnswer(Struct, kw_only=True):
    """socket id → epoch ms of its last inbound message (sockets it no longer has are left out)."""

    last_seen: dict[str, int]


last_seen_query_decoder = msgspec.json.Decoder(LastSeenQuery)
last_seen_answer_decoder = msgspec.json.Decoder(LastSeenAnswer)
