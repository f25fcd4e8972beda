"""Bodies of the HTTP API (protocol.md §8), as the edge sends and accepts them.

The TermOnMac Mac CLI reads these; JSON Schema for them is generated into `schemas/json/`.
"""

from __future__ import annotations

from msgspec import Struct


class RoomSummary(Struct, kw_only=True):
    """One of the user's registered rooms (`GET /api/rooms`)."""

    room_id: str
    mac_connected: bool
    ios_connected: bool
    last_seen: int  # epoch ms of the room's latest sign of life


class RoomsListing(Struct, kw_only=True):
    """`GET /api/rooms`: the rooms, the tier's room limit (-1: unlimited) and the tier."""

    rooms: list[RoomSummary]
    limit: int
    tier: str


class RoomDeleted(Struct, kw_only=True):
    """`DELETE /api/rooms/{id}`."""

    deleted: str


class RoomStatus(Struct, kw_only=True):
    """`GET /status?room_id=R` for an existing room (§8.1); an unknown room is `{"exists": false}`."""

    exists: bool
    mac_connected: bool
    ios_connected: bool
    mac_last_seen: int | None
    ios_last_seen: int | None
    idle_seconds: int


class Profile(Struct, kw_only=True, omit_defaults=True):
    """`GET /profile`."""

    user_id: str
    email: str
    tier: str
    name: str | None = None


class RefreshRequest(Struct, kw_only=True):
    """`POST /auth/refresh` body."""

    refresh_token: str


class TokenPair(Struct, kw_only=True):
    """`POST /auth/refresh` answer: both new; the old pair no longer works."""

    api_key: str
    refresh_token: str


class Revoked(Struct, kw_only=True):
    """`POST /auth/revoke` answer."""

    revoked: bool


class ExtraQuota(Struct, kw_only=True):
    """The welcome bonus in `GET /usage` (§6.5)."""

    active: bool
    remaining: int
    limit: int
    expires_at: str  # ISO-8601 with milliseconds and Z


class Usage(Struct, kw_only=True, omit_defaults=True):
    """`GET /usage` (§8.2): the current window. `limit` 0 means unlimited."""

    user_id: str
    tier: str
    period: str
    period_label: str
    message_tokens: int
    duration_tokens: int
    total_tokens: int
    limit: int
    remaining: int
    last_updated: int  # epoch ms; 0 before any usage
    resets_at: str
    extra_quota: ExtraQuota | None = None


class HistoryEntry(Struct, kw_only=True):
    """One window in `GET /usage/history`."""

    period: str
    period_label: str
    message_tokens: int
    duration_tokens: int
    total_tokens: int


class UsageHistory(Struct, kw_only=True):
    """`GET /usage/history`: newest first, the current window included."""

    history: list[HistoryEntry]


#: Every JSON body the API answers with (each route answers one of them).
API_BODIES = (RoomsListing, RoomDeleted, RoomStatus, Profile, TokenPair, Revoked, Usage, UsageHistory)
