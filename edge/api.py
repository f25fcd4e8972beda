"""The HTTP API on the edge's port (protocol.md §8): rooms, profile, tokens, usage, status.

Every route takes the request's method, query and body and returns an `HttpReply`;
the edge turns it into the handshake's HTTP response. Bearer keys are checked by
`edge.access`; a refusal is answered with its status and a plain-text message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.js.errors
from websockets.datastructures import Headers

from edge.access import Access, Principal, Refusal
from edge.protocol import rooms
from edge.store import Presence, RoomStore
from metering.usage import UsageReader, history_report, usage_report
from metering.windows import period_of
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS
from schemas.http_api import (
    Profile,
    RefreshRequest,
    Revoked,
    RoomDeleted,
    RoomsListing,
    RoomStatus,
    RoomSummary,
    TokenPair,
)
from schemas.records import RoomRecord, SlotHolder
from schemas.subjects import is_valid_room_id

log = logging.getLogger("edge.api")

BAD_ROOM_ID = "room_id must match ^[A-Za-z0-9_-]{1,128}$"


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, body: Any, status: int = 200) -> "HttpReply":
        return cls(status, msgspec.json.encode(body))

    @classmethod
    def text(cls, status: int, message: str, headers: Mapping[str, str] | None = None) -> "HttpReply":
        return cls(status, (message.rstrip("\n") + "\n").encode(), "text/plain; charset=utf-8", headers or {})


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Headers
    body: bytes
    address: str


Route = Callable[["HttpApi", ApiRequest], Awaitable[HttpReply]]


class HttpApi:
    """The routes of protocol.md §8 for one edge."""

    def __init__(
        self,
        access: Access,
        room_store: RoomStore,
        presence: Presence,
        usage: UsageReader,
        is_alive: Callable[[SlotHolder], bool],
        live_last_seen: Callable[[RoomRecord], Awaitable[tuple[int | None, int | None]]],
    ) -> None:
        self.access = access
        self.rooms = room_store
        self.presence = presence
        self.usage = usage
        self.is_alive = is_alive
        self.live_last_seen = live_last_seen
        self.settings = access.settings

    def route(self, method: str, path: str) -> Route | HttpReply | None:
        """The handler for `method path`; a 405 reply for a known path and another method; None if unknown."""
        if path.startswith("/api/rooms/"):
            return HttpApi.delete_room if method == "DELETE" else HttpReply.text(405, "use DELETE")
        allowed = _ROUTES.get(path)
        if allowed is None:
            return None
        handler = allowed.get(method)
        if handler is None:
            return HttpReply.text(405, f"use {' or '.join(allowed)}", {"Allow": ", ".join(allowed)})
        return handler

    async def handle(self, handler: Route, request: ApiRequest) -> HttpReply:
        try:
            return await handler(self, request)
        except Refusal as refusal:
            return HttpReply.text(refusal.status, refusal.message, refusal.headers)
        except STORAGE_ERRORS:
            log.exception("%s %s: storage unavailable", request.method, request.path)
            return HttpReply.text(503, "storage unavailable; try again")

    async def _principal(self, request: ApiRequest) -> Principal:
        return await self.access.authenticate(request.headers, request.query.get("user_id"), request.address)

    # --- rooms ------------------------------------------------------------------------

    async def list_rooms(self, request: ApiRequest) -> HttpReply:
        """GET /api/rooms: the user's registered rooms, their tier's room limit, the tier."""
        principal = await self._principal(request)
        user_id = principal.user_id
        registrations = await self.access.store.registrations(user_id)
        states = await asyncio.gather(*(self._room_state(r.room_id) for r in registrations))
        listed = []
        for registration, (record, seen) in zip(registrations, states, strict=True):
            mac = record is not None and record.mac is not None and self.is_alive(record.mac)
            ios = record is not None and record.ios is not None and self.is_alive(record.ios)
            last = max([registration.last_seen, *(t for t in seen if t is not None)])
            if record is not None:
                last = max(last, rooms.last_activity(record, seen))
            listed.append(RoomSummary(room_id=registration.room_id, mac_connected=mac, ios_connected=ios, last_seen=last))
        return HttpReply.json(RoomsListing(rooms=listed, limit=principal.tier.max_rooms, tier=principal.tier.name))

    async def _room_state(self, room_id: str) -> tuple[RoomRecord | None, tuple[int | None, int | None]]:
        (record, _), stored = await asyncio.gather(self.rooms.get(room_id), self.presence.get_room_last_seen(room_id))
        return record, await self._last_seen(record, stored)

    async def _last_seen(
        self, record: RoomRecord | None, stored: tuple[int | None, int | None]
    ) -> tuple[int | None, int | None]:
        """The Mac's and the iPhone's lastSeen: what KV has (written when a socket leaves, and
        every RELAY_LAST_SEEN_INTERVAL_MS while connected), or, for a connected socket, what
        its edge knows, to the millisecond."""
        if record is None:
            return stored
        live = await self.live_last_seen(record)
        return tuple(  # type: ignore[return-value]
            max((t for t in (kv, now) if t is not None), default=None) for kv, now in zip(stored, live, strict=True)
        )

    async def delete_room(self, request: ApiRequest) -> HttpReply:
        """DELETE /api/rooms/{id}: free the registration and the room; 409 while its Mac is connected."""
        principal = await self._principal(request)
        user_id = principal.user_id
        room_id = request.path.removeprefix("/api/rooms/")
        if not is_valid_room_id(room_id):
            return HttpReply.text(400, BAD_ROOM_ID)
        registration = await self.access.store.get_registration(user_id, room_id)
        record, revision = await self.rooms.get(room_id)
        if record is not None and record.owner_user_id != user_id:
            if registration is None:
                # As if there were none: another account's room ids are not to be probed.
                return HttpReply.text(404, "no such room")
            record = None  # a stale registration of a room now owned by someone else: free only ours
        if record is None and registration is None:
            return HttpReply.text(404, "no such room")
        if record is not None:
            if record.mac is not None and self.is_alive(record.mac):
                return HttpReply.text(409, "the room's Mac is connected; stop it first")
            try:
                await self.rooms.delete(room_id, revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return HttpReply.text(409, "the room changed meanwhile (its Mac may have connected); try again")
        await self.access.store.delete_registration(user_id, room_id)
        log.info("room %s deleted by its owner", room_id)
        return HttpReply.json(RoomDeleted(deleted=room_id))

    async def status(self, request: ApiRequest) -> HttpReply:
        """GET /status?room_id=R (§8.1, §12 item 23): the owner's key or the operator token."""
        principal = await self._principal(request)
        room_id = request.query.get("room_id", "")
        if not is_valid_room_id(room_id):
            return HttpReply.text(400, BAD_ROOM_ID)
        record, _ = await self.rooms.get(room_id)
        if record is None or (not principal.operator and record.owner_user_id != principal.user_id):
            # Another account's room answers as an unknown one: room ids cannot be probed.
            return HttpReply.json({"exists": False})
        seen = await self._last_seen(record, await self.presence.get_room_last_seen(room_id))
        now = now_ms()
        record = rooms.expire_idle(record, now, self.settings.room_idle_timeout_ms, self.is_alive, seen)
        return HttpReply.json(
            RoomStatus(
                exists=True,
                mac_connected=record.mac is not None and self.is_alive(record.mac),
                ios_connected=record.ios is not None and self.is_alive(record.ios),
                mac_last_seen=seen[0],
                ios_last_seen=seen[1],
                idle_seconds=max(0, (now - rooms.last_activity(record, seen)) // 1000),
            )
        )

    # --- account ------------------------------------------------------------------------

    async def profile(self, request: ApiRequest) -> HttpReply:
        """GET /profile."""
        principal = await self._principal(request)
        user = principal.user
        if user is None:
            raise Refusal(400, "the operator token acts for a user: add ?user_id=USER")
        return HttpReply.json(Profile(user_id=user.user_id, email=user.email, tier=user.tier, name=user.name or None))

    async def refresh(self, request: ApiRequest) -> HttpReply:
        """POST /auth/refresh {"refresh_token"}: a new API key and refresh token; the old ones stop working."""
        try:
            body = msgspec.json.decode(request.body, type=RefreshRequest)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return HttpReply.text(400, 'expected a JSON body {"refresh_token": "rdrt_..."}')
        now = time.monotonic()
        self.access.refuse_if_blocked(request.address, body.refresh_token, now)
        s, store = self.settings, self.access.store
        record = await store.find_refresh(body.refresh_token, now_ms())
        user = await store.get_user(record.user_id) if record is not None else None
        if user is not None and user.deleted:
            return HttpReply.text(410, "account deleted")
        rotated = None
        if user is not None:
            rotated = await store.rotate(
                body.refresh_token, now_ms(), s.api_key_ttl_s, s.refresh_token_ttl_s, s.refresh_grace_s
            )
        if rotated is None:
            self.access.login_failed(request.address, body.refresh_token, now)
            return HttpReply.text(401, "unknown, expired or already used refresh token")
        _, api_key, refresh_token = rotated
        return HttpReply.json(TokenPair(api_key=api_key, refresh_token=refresh_token))

    async def revoke(self, request: ApiRequest) -> HttpReply:
        """POST /auth/revoke: the calling API key (and its refresh token) stop working."""
        principal = await self._principal(request)
        if principal.via != "key":
            return HttpReply.text(400, "only an API key can revoke itself")
        await self.access.store.revoke_key_hash(principal.key_hash)
        return HttpReply.json(Revoked(revoked=True))

    # --- usage --------------------------------------------------------------------------

    async def usage_now(self, request: ApiRequest) -> HttpReply:
        """GET /usage (§8.2): the current window's credits, the limit, the welcome bonus."""
        principal = await self._principal(request)
        user_id, now = principal.user_id, now_ms()
        window, bonus = await asyncio.gather(
            self.usage.window(user_id, period_of(now)), self.usage.bonus_used(user_id)
        )
        assert principal.user is not None
        return HttpReply.json(usage_report(principal.user, principal.tier, window, bonus, now))

    async def usage_history(self, request: ApiRequest) -> HttpReply:
        """GET /usage/history (§8.2): every window on record, the current one included."""
        principal = await self._principal(request)
        user_id = principal.user_id
        return HttpReply.json(history_report(user_id, await self.usage.windows(user_id), now_ms()))


_ROUTES: dict[str, dict[str, Route]] = {
    "/api/rooms": {"GET": HttpApi.list_rooms},
    "/status": {"GET": HttpApi.status},
    "/profile": {"GET": HttpApi.profile},
    "/auth/refresh": {"POST": HttpApi.refresh},
    "/auth/revoke": {"POST": HttpApi.revoke},
    "/usage": {"GET": HttpApi.usage_now},
    "/usage/history": {"GET": HttpApi.usage_history},
}
