"""What edges keep in JetStream KV. Every change of a `RoomRecord` is a compare-and-set."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

Role = Literal["mac", "ios"]


class SlotHolder(Struct, frozen=True, kw_only=True):
    """The socket that holds one role's slot of a room, and where it lives.

    A holder counts as connected only while the lease of its edge incarnation
    (`edge_id` + `boot_id`) is alive: an edge that dies without a word loses its
    slots when its lease expires.
    """

    socket_id: str
    edge_id: str
    boot_id: str
    user_id: str


class RoomRecord(Struct, kw_only=True):
    """A room's durable state: identity (kept forever) and per-connection state (dropped when idle)."""

    room_id: str
    owner_user_id: str
    secret_hash: str
    mac_public_key: str
    created_at: int  # epoch ms
    last_activity_at: int  # epoch ms of the last change of this record
    mac_session_nonce: str = ""
    mac_ephemeral_key: str = ""
    ios_public_key: str = ""
    ios_session_nonce: str = ""
    ios_ephemeral_key: str = ""
    pairing_token_hash: str = ""
    pairing_token_used: bool = False
    pairing_token_expires_at: int | None = None  # unix seconds, as the Mac sends it
    mac: SlotHolder | None = None
    ios: SlotHolder | None = None


class EdgeLease(Struct, kw_only=True):
    """One edge incarnation's presence; it lives only while the edge renews it."""

    edge_id: str
    boot_id: str
    started_at: int  # epoch ms


room_record_decoder = msgspec.json.Decoder(RoomRecord)
edge_lease_decoder = msgspec.json.Decoder(EdgeLease)
