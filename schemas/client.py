"""WebSocket messages of the TermOnMac relay protocol (protocol.md §3).

Each message is a JSON object told apart by `type`. Decoding is tolerant the way the
Swift clients need (protocol.md §3.1): optional fields may be absent, `null` or `""`,
and unknown fields are ignored, so newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from msgspec import Meta, Struct

#: Most payloads a `relay_batch` may carry (protocol.md §12 item 7).
MAX_BATCH_PAYLOADS = 256

RoomId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,128}(?!\n)$", description="Room id")]
# Hashes and keys are short in practice (64 hex / 44 base64 chars); the bound stops a
# client from parking megabytes in a room record.
KeyText = Annotated[str, Meta(max_length=512)]
Payload = Annotated[str, Meta(description="base64 of nonce ‖ ciphertext ‖ tag; opaque to the relay")]


# --- client → server -------------------------------------------------------------


class RegisterRoom(Struct, tag="register_room", tag_field="type", kw_only=True):
    """The Mac claims its room, or re-registers on the same socket after rotating the secret."""

    room_id: RoomId
    secret_hash: KeyText
    public_key: KeyText
    session_nonce: KeyText | None = None
    ephemeral_key: KeyText | None = None
    pairing_token_hash: KeyText | None = None
    pairing_token_expires_at: int | None = None


class JoinRoom(Struct, tag="join_room", tag_field="type", kw_only=True):
    """The iPhone joins a registered room with the room secret's hash or a pairing token's hash."""

    room_id: RoomId
    public_key: KeyText
    secret_hash: KeyText | None = None
    session_nonce: KeyText | None = None
    ephemeral_key: KeyText | None = None
    pairing_token_hash: KeyText | None = None


class Relay(Struct, tag="relay", tag_field="type"):
    """One encrypted payload for the peer (both directions)."""

    payload: Payload


class RelayBatch(Struct, tag="relay_batch", tag_field="type"):
    """Several encrypted payloads for the peer, in send order (both directions)."""

    payloads: Annotated[list[Payload], Meta(max_length=MAX_BATCH_PAYLOADS)]


class Heartbeat(Struct, tag="heartbeat", tag_field="type"):
    """Liveness from either side; answered with `heartbeat_ack`."""


ClientMessage = Union[RegisterRoom, JoinRoom, Relay, RelayBatch, Heartbeat]


# --- server → client -------------------------------------------------------------


class RoomRegistered(Struct, tag="room_registered", tag_field="type", omit_defaults=True):
    """Reply to every accepted `register_room`."""

    room_id: str
    max_sessions: int | None = None


class PeerJoined(Struct, tag="peer_joined", tag_field="type"):
    """The other side's keys. Empty strings pass through: the Mac picks its key derivation by them."""

    public_key: str
    session_nonce: str = ""
    ephemeral_key: str = ""


class PeerDisconnected(Struct, tag="peer_disconnected", tag_field="type"):
    """The other side left: `client_left`, `timeout` or `server_restart`."""

    reason: str


class HeartbeatAck(Struct, tag="heartbeat_ack", tag_field="type", omit_defaults=True):
    """Reply to `heartbeat`. `mac_connected` is always present: whether the room's Mac slot is held."""

    mac_connected: bool
    account_match: str | None = None
    account_deleted: bool | None = None


class Error(Struct, tag="error", tag_field="type", omit_defaults=True):
    """A request failed; unless stated otherwise the socket stays open."""

    code: str
    message: str
    mac_email: str | None = None
    ios_email: str | None = None


class QuotaExceeded(Struct, tag="quota_exceeded", tag_field="type", omit_defaults=True):
    """The user's credits for this window are spent; the relay closes with 1000 next."""

    usage: int
    limit: int
    period: str
    resets_at: str
    extra_quota_used: int | None = None
    extra_quota_limit: int | None = None
    extra_quota_expires_at: str | None = None


ServerMessage = Union[
    RoomRegistered, PeerJoined, Relay, RelayBatch, PeerDisconnected, HeartbeatAck, Error, QuotaExceeded
]

# Decoders and the encoder are built once: building them per message costs more than decoding.
client_decoder = msgspec.json.Decoder(ClientMessage)
server_decoder = msgspec.json.Decoder(ServerMessage)
encode = msgspec.json.Encoder().encode


class ErrorCode:
    """`error.code` values the relay sends (protocol.md §3.3.7 and §12 item 11)."""

    AUTH_FAILED = "AUTH_FAILED"
    ACCOUNT_MISMATCH = "ACCOUNT_MISMATCH"
    NO_PEER = "NO_PEER"
    HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"
    BAD_MESSAGE = "BAD_MESSAGE"
    BAD_ROLE = "BAD_ROLE"
    NOT_IN_ROOM = "NOT_IN_ROOM"
    ROOM_NOT_FOUND = "ROOM_NOT_FOUND"
    RATE_LIMITED = "RATE_LIMITED"
    ROOM_LIMIT = "ROOM_LIMIT"


class CloseCode:
    """Close codes the relay uses (protocol.md §3.4)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013
    HEARTBEAT_TIMEOUT = 4000
    REPLACED = 4001
    AUTH_FAILED = 4003


class DisconnectReason:
    """`peer_disconnected.reason` values (protocol.md §12 item 13)."""

    CLIENT_LEFT = "client_left"
    TIMEOUT = "timeout"
    SERVER_RESTART = "server_restart"
