"""Accounts in JetStream KV: users, API keys, refresh tokens, room registrations.

Buckets:
- `relay_accounts`: `user.<id>` (no TTL; a deleted account is flagged, not removed),
  `apikey.<sha256>` and `refresh.<sha256>` (per-message TTL = their lifetime, slid
  forward on use). Keys and tokens are looked up by hash; the plain text is never stored.
- `relay_registrations`: `<user>.<room>` with a per-message TTL of `ROOM_REG_TTL`,
  refreshed while the room's Mac is connected (protocol.md §7). An expired
  registration simply disappears: no markers, no cleanup job.

Every write and removal goes through `runtime.kv.write` and `runtime.kv.remove`, in
buckets made with `runtime.kv.durable_bucket`: a revoked key, a used refresh token or a
deleted registration stays gone across crashes of the NATS servers (see `runtime.kv`).
A record past its own `expires_at` reads as absent, whatever the server still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from accounts import claims, tokens
from runtime import kv
from runtime import clock
from runtime.connection import STORAGE_ERRORS
from runtime.kv import CompareAndSetLost, compare_and_set, get_entry, get_present, open_bucket, present_values
from runtime.metrics import timed_storage
from schemas.records import (
    ApiKeyRecord,
    RefreshTokenRecord,
    Registration,
    RoomClaims,
    User,
    api_key_record_decoder,
    refresh_token_record_decoder,
    registration_decoder,
    room_claims_decoder,
    user_decoder,
)
from schemas.subjects import (
    ACCOUNTS_BUCKET,
    REGISTRATIONS_BUCKET,
    USER_FILTER,
    api_key_key,
    kv_stream,
    kv_subject,
    refresh_token_key,
    registration_key,
    registrations_filter,
    room_claims_key,
    user_key,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_CAS_ATTEMPTS = 20
# A key's expiry slides forward at most this often: a KV write per connection would be waste.
KEY_TOUCH_INTERVAL_MS = 24 * 3600 * 1000


class UnknownUser(LookupError):
    """No account with this id."""


class UserExists(Exception):
    """An account with this id exists already."""


async def open_account_buckets(js: JetStreamContext, replicas: int) -> tuple[KeyValue, KeyValue]:
    """Create (or open) the accounts and registrations buckets."""
    accounts = await open_bucket(js, kv.durable_bucket(ACCOUNTS_BUCKET, replicas))
    registrations = await open_bucket(js, kv.durable_bucket(REGISTRATIONS_BUCKET, replicas))
    return accounts, registrations


class AccountStore:
    """Users, keys and registrations. Every method is one or a few KV operations."""

    def __init__(self, js: JetStreamContext, accounts: KeyValue, registrations: KeyValue) -> None:
        self._js = js
        self._accounts = accounts
        self._registrations = registrations

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> "AccountStore":
        accounts, registrations = await open_account_buckets(js, replicas)
        return cls(js, accounts, registrations)

    # --- users ---------------------------------------------------------------------

    @timed_storage("accounts.get_user")
    async def get_user(self, user_id: str) -> User | None:
        entry = await get_present(self._accounts, user_key(user_id))
        return None if entry is None else user_decoder.decode(entry.value)

    @timed_storage("accounts.create_user")
    async def create_user(self, user: User) -> None:
        """Store a new account; raises UserExists if the id is taken (also by a deleted account)."""
        key = user_key(user.user_id)
        try:
            await kv.write(self._js, ACCOUNTS_BUCKET, key, msgspec.json.encode(user), last=0)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise UserExists(user.user_id) from exc

    @timed_storage("accounts.update_user")
    async def update_user(self, user_id: str, change: Callable[[User], User]) -> User:
        """Apply `change` to the account by compare-and-set; returns the stored result."""
        key = user_key(user_id)

        async def attempt() -> User:
            entry = await get_present(self._accounts, key)
            if entry is None:
                raise UnknownUser(user_id)
            new = change(user_decoder.decode(entry.value))
            await kv.write(self._js, ACCOUNTS_BUCKET, key, msgspec.json.encode(new), last=entry.revision)
            return new

        return await compare_and_set(attempt, _MAX_CAS_ATTEMPTS, f"account {user_id}")

    async def list_users(self) -> list[User]:
        """Every account, deleted ones included, ordered by id."""
        users = [user_decoder.decode(value) for value in (await present_values(self._accounts, USER_FILTER)).values()]
        return sorted(users, key=lambda u: u.user_id)

    # --- API keys and refresh tokens -------------------------------------------------

    @timed_storage("accounts.issue_key")
    async def issue_key(self, user_id: str, now_ms: int, key_ttl_s: float, refresh_ttl_s: float) -> tuple[str, str]:
        """A new API key and its refresh token for `user_id`. Returns both in plain text, once."""
        api_key, refresh = tokens.new_api_key(), tokens.new_refresh_token()
        key_hash, refresh_hash = tokens.token_hash(api_key), tokens.token_hash(refresh)
        key_record = ApiKeyRecord(
            user_id=user_id,
            key_hash=key_hash,
            created_at=now_ms,
            expires_at=now_ms + int(key_ttl_s * 1000),
            refresh_hash=refresh_hash,
        )
        refresh_record = RefreshTokenRecord(
            user_id=user_id,
            token_hash=refresh_hash,
            api_key_hash=key_hash,
            created_at=now_ms,
            expires_at=now_ms + int(refresh_ttl_s * 1000),
        )
        await kv.write(self._js, ACCOUNTS_BUCKET, refresh_token_key(refresh_hash), msgspec.json.encode(refresh_record), ttl_s=refresh_ttl_s)
        await kv.write(self._js, ACCOUNTS_BUCKET, api_key_key(key_hash), msgspec.json.encode(key_record), ttl_s=key_ttl_s)
        return api_key, refresh

    @timed_storage("accounts.find_key")
    async def find_key(self, api_key: str, now_ms: int, key_ttl_s: float) -> ApiKeyRecord | None:
        """The record of a live API key (its expiry slid forward if due), or None."""
        if not tokens.is_api_key(api_key):
            return None
        key_hash = tokens.token_hash(api_key)
        entry = await get_present(self._accounts, api_key_key(key_hash))
        if entry is None:
            return None
        record = api_key_record_decoder.decode(entry.value)
        # The lookup was by hash already; comparing again costs nothing and stays constant-time.
        if not tokens.same_secret(record.key_hash, key_hash) or record.expires_at <= now_ms:
            return None
        ttl_ms = int(key_ttl_s * 1000)
        if record.expires_at - now_ms < ttl_ms - KEY_TOUCH_INTERVAL_MS:
            slid = msgspec.structs.replace(record, expires_at=now_ms + ttl_ms)
            try:
                await kv.write(
                    self._js, ACCOUNTS_BUCKET, api_key_key(key_hash), msgspec.json.encode(slid), ttl_s=key_ttl_s, last=entry.revision
                )
                record = slid
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # someone else slid it (or revoked it) meanwhile
        return record

    async def revoke_key(self, api_key: str) -> bool:
        """Revoke an API key and the refresh token issued with it. False if the key is unknown."""
        if not tokens.is_api_key(api_key):
            return False
        return await self.revoke_key_hash(tokens.token_hash(api_key))

    @timed_storage("accounts.revoke_key")
    async def revoke_key_hash(self, key_hash: str) -> bool:
        entry = await get_present(self._accounts, api_key_key(key_hash))
        if entry is None:
            return False
        record = api_key_record_decoder.decode(entry.value)
        await kv.remove(self._js, ACCOUNTS_BUCKET, api_key_key(key_hash))
        if record.refresh_hash:
            await kv.remove(self._js, ACCOUNTS_BUCKET, refresh_token_key(record.refresh_hash))
        return True

    @timed_storage("accounts.find_refresh")
    async def find_refresh(self, refresh_token: str, now_ms: int) -> RefreshTokenRecord | None:
        """The record of a refresh token that may still be used (see `rotate`), or None."""
        if not tokens.is_refresh_token(refresh_token):
            return None
        token_hash = tokens.token_hash(refresh_token)
        entry = await get_present(self._accounts, refresh_token_key(token_hash))
        if entry is None:
            return None
        record = refresh_token_record_decoder.decode(entry.value)
        if not tokens.same_secret(record.token_hash, token_hash) or record.expires_at <= now_ms:
            return None
        return record

    @timed_storage("accounts.rotate")
    async def rotate(
        self, refresh_token: str, now_ms: int, key_ttl_s: float, refresh_ttl_s: float, grace_s: float
    ) -> tuple[str, str, str] | None:
        """Use a refresh token: returns (user_id, new API key, new refresh token), or None if the
        token is unknown, expired, or used more than `grace_s` seconds ago.

        The old API key stops working at once. The old refresh token works once more within
        the grace (REFRESH_TOKEN_TTL_SECONDS' "5 min grace"), for a client whose answer was
        lost: that retry revokes the pair the first use issued, so a token never has two
        live successors. With `grace_s` 0 it stops at once.
        """
        if not tokens.is_refresh_token(refresh_token):
            return None
        old_hash = tokens.token_hash(refresh_token)
        key = refresh_token_key(old_hash)
        entry = await get_present(self._accounts, key)
        if entry is None:
            return None
        record = refresh_token_record_decoder.decode(entry.value)
        if not tokens.same_secret(record.token_hash, old_hash) or record.expires_at <= now_ms:
            return None
        if record.rotated_at is not None and now_ms - record.rotated_at >= grace_s * 1000:
            return None
        # New tokens first, then the old one is updated by compare-and-set: two concurrent
        # uses cannot both win, and a failure before that point loses nothing usable.
        api_key, refresh = await self.issue_key(record.user_id, now_ms, key_ttl_s, refresh_ttl_s)
        new_key_hash = tokens.token_hash(api_key)
        rotated_at = record.rotated_at if record.rotated_at is not None else now_ms
        grace_left_s = grace_s - (now_ms - rotated_at) / 1000
        try:
            if grace_left_s >= 1:
                used = msgspec.structs.replace(
                    record, rotated_at=rotated_at, successor_key_hash=new_key_hash
                )
                await kv.write(self._js, ACCOUNTS_BUCKET, key, msgspec.json.encode(used), ttl_s=grace_left_s, last=entry.revision)
            else:
                await kv.remove(self._js, ACCOUNTS_BUCKET, key, last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self.revoke_key(api_key)
            return None
        # The rest only tidies up: the new pair is valid whatever happens from here.
        try:
            await kv.remove(self._js, ACCOUNTS_BUCKET, api_key_key(record.api_key_hash))
            if record.successor_key_hash:  # a retry: the pair of the lost answer goes
                await self.revoke_key_hash(record.successor_key_hash)
        except STORAGE_ERRORS:
            log.warning("refresh for %s: an old key could not be revoked now; it expires by itself", record.user_id)
        return record.user_id, api_key, refresh

    # --- room registrations ------------------------------------------------------------

    @timed_storage("accounts.put_registration")
    async def put_registration(self, user_id: str, room_id: str, now_ms: int, ttl_s: float, created_at: int | None = None) -> None:
        """Register (or refresh) a user's room for `ttl_s` seconds."""
        record = Registration(
            user_id=user_id,
            room_id=room_id,
            created_at=created_at or now_ms,
            last_seen=now_ms,
            expires_at=now_ms + int(ttl_s * 1000),
        )
        await kv.write(self._js, REGISTRATIONS_BUCKET, registration_key(user_id, room_id), msgspec.json.encode(record), ttl_s=ttl_s)

    @timed_storage("accounts.get_registration")
    async def get_registration(self, user_id: str, room_id: str) -> Registration | None:
        entry = await get_present(self._registrations, registration_key(user_id, room_id))
        if entry is None:
            return None
        registration = registration_decoder.decode(entry.value)
        return registration if _lives(registration) else None

    @timed_storage("accounts.delete_registration")
    async def delete_registration(self, user_id: str, room_id: str) -> None:
        """Remove the registration and free the room's claim on the room limit."""
        await kv.remove(self._js, REGISTRATIONS_BUCKET, registration_key(user_id, room_id))
        await self.release_room(user_id, room_id)

    @timed_storage("accounts.registrations")
    async def registrations(self, user_id: str) -> list[Registration]:
        """A user's live registrations, ordered by room id."""
        values = await present_values(self._registrations, registrations_filter(user_id))
        live = (r for r in map(registration_decoder.decode, values.values()) if _lives(r))
        return sorted(live, key=lambda r: r.room_id)

    async def count_registrations(self, user_id: str) -> int:
        """How many rooms a user has registered: one stream-info request, exact listing only
        near the limit's edge is the caller's business (a just-removed registration's
        purge marker counts for a second)."""
        info = await self._js.stream_info(
            kv_stream(REGISTRATIONS_BUCKET), subjects_filter=kv_subject(REGISTRATIONS_BUCKET, registrations_filter(user_id))
        )
        return len(info.state.subjects or {})

    # --- room claims: the room limit under concurrency (accounts.claims) ----------------

    async def room_claims(self, user_id: str, ttl_s: float) -> tuple[dict[str, int], int]:
        """The user's live room claims (room id → expiry, epoch ms) and the revision to
        compare-and-set them on (0: no record). Without a record (none yet, all lapsed, or
        written before claims existed) they are the live registrations', so that rooms
        registered before count too (one written without an expiry: for `ttl_s` from now)."""
        now = clock.now_ms()
        entry, revision = await self._claims_entry(room_claims_key(user_id))
        if entry is not None:
            return claims.live_claims(room_claims_decoder.decode(entry.value).rooms, now), revision
        seeded = {r.room_id: r.expires_at or now + int(ttl_s * 1000) for r in await self.registrations(user_id)}
        return claims.live_claims(seeded, now), revision

    async def _claims_entry(self, key: str) -> tuple[KeyValue.Entry | None, int]:
        """The claims record (None if absent) and the revision a compare-and-set on it must
        name: a removal's marker has one too (0 only for a key with no message at all)."""
        try:
            entry = await get_entry(self._registrations, key)
        except kv.NOT_FOUND as exc:
            marker = getattr(exc, "entry", None)
            return None, marker.revision if marker is not None and marker.revision else 0
        return (entry, entry.revision) if kv.present(entry) else (None, entry.revision or 0)

    @timed_storage("accounts.claim_room")
    async def claim_room(self, user_id: str, room_id: str, ttl_s: float, max_rooms: int, force: bool = False) -> str:
        """Claim `room_id` for the user until ROOM_REG_TTL (`ttl_s`) from now, by
        compare-and-set. Returns `claims.NEW` (claimed now), `claims.HELD` (claimed already:
        its expiry slides) or `claims.REFUSED` (`max_rooms` other rooms are claimed; never
        with `force`: a room registered already, or a refresh)."""
        key = room_claims_key(user_id)

        async def attempt() -> str:
            rooms, revision = await self.room_claims(user_id, ttl_s)
            now = clock.now_ms()
            claimed = claims.claim(rooms, room_id, now, now + int(ttl_s * 1000), max_rooms, force)
            if claimed is None:
                return claims.REFUSED
            await self._write_claims(key, user_id, claimed, now, revision)
            return claims.HELD if room_id in rooms else claims.NEW

        return await self._claims_compare_and_set(attempt, user_id)

    async def forget_room_claims(self, user_id: str) -> None:
        """Drop the user's claims record: the next count is its live registrations' (a tier
        change: claims are not written for a tier without a room limit)."""
        await kv.remove(self._js, REGISTRATIONS_BUCKET, room_claims_key(user_id))

    @timed_storage("accounts.release_room")
    async def release_room(self, user_id: str, room_id: str) -> None:
        """Free the room's claim (a deleted room, a refused register)."""
        key = room_claims_key(user_id)

        async def attempt() -> None:
            entry, revision = await self._claims_entry(key)
            if entry is None:
                return  # no record: the claims are the registrations' (see room_claims)
            now = clock.now_ms()
            rooms = room_claims_decoder.decode(entry.value).rooms
            if room_id in rooms:
                await self._write_claims(key, user_id, claims.release(rooms, room_id, now), now, revision)

        await self._claims_compare_and_set(attempt, user_id)

    async def _claims_compare_and_set(self, attempt: Callable[[], Awaitable[T]], user_id: str) -> T:
        try:
            return await compare_and_set(attempt, _MAX_CAS_ATTEMPTS, f"room claims of {user_id}")
        except CompareAndSetLost as exc:
            raise nats.errors.TimeoutError from exc  # as a storage that does not answer: the client retries

    async def _write_claims(self, key: str, user_id: str, rooms: dict[str, int], now: int, revision: int) -> None:
        if not rooms:
            if revision:
                await kv.remove(self._js, REGISTRATIONS_BUCKET, key, last=revision)
            return
        # The record lives as long as its last claim: nothing of a user stays behind.
        ttl_s = max(1.0, (max(rooms.values()) - now) / 1000)
        value = msgspec.json.encode(RoomClaims(user_id=user_id, rooms=rooms))
        await kv.write(self._js, REGISTRATIONS_BUCKET, key, value, ttl_s=ttl_s, last=revision)


def _lives(registration: Registration) -> bool:
    """Whether a registration is within its lifetime (one written before `expires_at` existed
    has 0 there, and lives as long as its TTL keeps it)."""
    return registration.expires_at == 0 or registration.expires_at > clock.now_ms()
