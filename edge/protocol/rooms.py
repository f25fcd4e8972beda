"""What a room does with a register, a join, a departure and idleness. No I/O.

Each function takes the room's current record (or None), the request and the time,
and returns an `Outcome`: the record to write (by compare-and-set) and what the edge
must then do. The edge retries the whole function on a lost compare-and-set, so these
functions must depend on nothing but their arguments.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from schemas.client import (
    CloseCode,
    Error,
    ErrorCode,
    JoinRoom,
    PeerJoined,
    RegisterRoom,
    RoomRegistered,
)
from schemas.edge_events import PeerJoinedEvent
from schemas.records import RoomRecord, SlotHolder

#: Whether a slot holder's edge incarnation is alive (its lease has not expired).
IsAlive = Callable[[SlotHolder], bool]


@dataclass(frozen=True)
class Outcome:
    """The result of one room operation, for the edge to carry out in this order:

    write `record` (if not None), send `replies` to the acting socket, send
    `notify_peer` to `peer`, send a replacement notice to `evict`, then close the
    acting socket with `close` (if not None).
    """

    record: RoomRecord | None = None
    replies: tuple[msgspec.Struct, ...] = ()
    accepted: bool = False  # the acting socket now holds its role's slot
    peer: SlotHolder | None = None  # live holder of the other role (frames go there)
    notify_peer: PeerJoinedEvent | None = None
    evict: SlotHolder | None = None  # previous holder of the acting role's slot: close it 4001
    close: tuple[int, str] | None = None
    notice: str | None = None  # something an operator should see in the log (never key material)
    owner_user_id: str | None = None  # the room's owner, on an accepted request (the edge adds it to one refused for a wrong credential)


def _same(a: str, b: str) -> bool:
    # Hashes are credentials: compare them in constant time.
    return hmac.compare_digest(a.encode(), b.encode())


def _live(holder: SlotHolder | None, is_alive: IsAlive) -> SlotHolder | None:
    return holder if holder is not None and is_alive(holder) else None


def _fail(code: str, message: str, close: tuple[int, str] | None = None) -> Outcome:
    return Outcome(replies=(Error(code=code, message=message),), close=close)


# The Mac's tokens live 300 s (protocol.md §9). Far beyond that is a client bug, and a
# deadline in milliseconds (or 2**63-1) would be a token that never expires.
MAX_PAIRING_TOKEN_AHEAD_S = 86_400


def register(
    record: RoomRecord | None,
    msg: RegisterRoom,
    by: SlotHolder,
    now_ms: int,
    is_alive: IsAlive,
    max_sessions: int | None = None,
    registered_before: bool = True,
) -> Outcome:
    """A Mac socket's `register_room` (protocol.md §4.3, §4.5, §12 items 8–10, 12, 14).

    `registered_before`: whether this socket had registered before this request. A record
    that names a socket which had not can only come from this same request, retried after
    its write landed unseen: it is then treated as the first register it is.
    """
    expires = msg.pairing_token_expires_at
    if expires is not None and expires > now_ms // 1000 + MAX_PAIRING_TOKEN_AHEAD_S:
        return _fail(
            ErrorCode.BAD_MESSAGE,
            "pairing_token_expires_at is more than a day ahead: it must be unix seconds, within a day",
        )
    nonce = msg.session_nonce or ""
    ephemeral = msg.ephemeral_key or ""
    registered = RoomRegistered(room_id=msg.room_id, max_sessions=max_sessions)

    if record is None:
        new = RoomRecord(
            room_id=msg.room_id,
            owner_user_id=by.user_id,
            secret_hash=msg.secret_hash,
            mac_public_key=msg.public_key,
            created_at=now_ms,
            last_activity_at=now_ms,
            mac_session_nonce=nonce,
            mac_ephemeral_key=ephemeral,
            mac=by,
        )
        _store_pairing(new, msg, keep_used=False)
        return Outcome(record=new, replies=(registered,), accepted=True, owner_user_id=by.user_id)

    if not _same(record.owner_user_id, by.user_id):
        return _fail(ErrorCode.ACCOUNT_MISMATCH, "This room is owned by a different account")

    new = msgspec.structs.replace(record, last_activity_at=now_ms)
    same_socket = registered_before and record.mac is not None and record.mac.socket_id == by.socket_id

    if same_socket and _same(msg.public_key, record.mac_public_key):
        # Secret rotation (or a legacy pairing refresh) on the registered socket: the
        # Mac proved itself on this connection already. Empty per-connection values
        # keep the stored ones, or a later iOS join would get `ephemeral_key: ""`.
        new.secret_hash = msg.secret_hash
        if nonce:
            new.mac_session_nonce = nonce
        if ephemeral:
            new.mac_ephemeral_key = ephemeral
        if msg.pairing_token_hash:
            _store_pairing(new, msg, keep_used=True)
        peer = _live(record.ios, is_alive)
        return Outcome(record=new, replies=(registered,), accepted=True, peer=peer, owner_user_id=record.owner_user_id)

    if not _same(msg.secret_hash, record.secret_hash):
        return _fail(ErrorCode.AUTH_FAILED, "Room secret mismatch")

    # A register from a new socket (or a same-socket one with another key): the Mac's
    # current connection. A changed identity key with the right secret is accepted.
    notice = None if _same(msg.public_key, record.mac_public_key) else "Mac identity key changed; secret matched"
    new.mac_public_key = msg.public_key
    new.mac_session_nonce = nonce
    new.mac_ephemeral_key = ephemeral
    if msg.pairing_token_hash:
        _store_pairing(new, msg, keep_used=True)
    elif not same_socket:
        _clear_pairing(new)
    new.mac = by

    old = _live(record.mac, is_alive)
    evict = old if old is not None and old.socket_id != by.socket_id else None
    peer = _live(record.ios, is_alive)
    owner = record.owner_user_id
    if same_socket or peer is None:
        return Outcome(
            record=new, replies=(registered,), accepted=True, peer=peer, evict=evict, notice=notice, owner_user_id=owner
        )
    return Outcome(
        record=new,
        replies=(registered, _ios_keys(new)),
        accepted=True,
        peer=peer,
        notify_peer=PeerJoinedEvent(
            peer=by, public_key=new.mac_public_key, session_nonce=nonce, ephemeral_key=ephemeral
        ),
        evict=evict,
        notice=notice,
        owner_user_id=owner,
    )


def join(
    record: RoomRecord | None,
    msg: JoinRoom,
    by: SlotHolder,
    now_ms: int,
    is_alive: IsAlive,
    refuse_cross_account: bool = False,
) -> Outcome:
    """An iOS socket's `join_room` (protocol.md §4.4, §4.5, §12 items 10–12, 14, 15).

    A join by another account than the room's owner is allowed (the room secret is the
    credential) and the outcome names the owner so that the edge can flag it; with
    `refuse_cross_account` it is refused and changes nothing.
    """
    if record is None:
        return _fail(ErrorCode.ROOM_NOT_FOUND, "Room not found")
    if refuse_cross_account and not _same(record.owner_user_id, by.user_id):
        return _fail(
            ErrorCode.ACCOUNT_MISMATCH,
            "This room is owned by a different account",
            close=(CloseCode.AUTH_FAILED, "account mismatch"),
        )

    new = msgspec.structs.replace(record, last_activity_at=now_ms)
    secret_ok = bool(msg.secret_hash) and _same(msg.secret_hash or "", record.secret_hash)
    token_matches = (
        bool(msg.pairing_token_hash)
        and bool(record.pairing_token_hash)
        and _same(msg.pairing_token_hash or "", record.pairing_token_hash)
    )
    if not secret_ok:
        denied = (CloseCode.AUTH_FAILED, "pairing token already used")
        if not token_matches:
            reason = "Invalid pairing token" if msg.pairing_token_hash else "Room secret mismatch"
            return _fail(ErrorCode.AUTH_FAILED, reason, close=(CloseCode.AUTH_FAILED, "auth failed"))
        used_by_us = record.ios is not None and record.ios.socket_id == by.socket_id
        if record.pairing_token_used and not used_by_us:  # (a retried join finds its own use)
            return _fail(ErrorCode.AUTH_FAILED, "Pairing token already used", close=denied)
        expires = record.pairing_token_expires_at
        if expires is not None and now_ms >= expires * 1000:
            return _fail(ErrorCode.AUTH_FAILED, "Pairing token expired", close=(CloseCode.AUTH_FAILED, "pairing token expired"))
        new.pairing_token_used = True

    new.ios_public_key = msg.public_key
    new.ios_session_nonce = msg.session_nonce or ""
    new.ios_ephemeral_key = msg.ephemeral_key or ""
    new.ios = by

    old = _live(record.ios, is_alive)
    evict = old if old is not None and old.socket_id != by.socket_id else None
    peer = _live(record.mac, is_alive)
    owner = record.owner_user_id
    if peer is None:
        # The Mac is away: both sides hear of each other when it registers.
        return Outcome(record=new, accepted=True, evict=evict, owner_user_id=owner)
    return Outcome(
        record=new,
        replies=(_mac_keys(new),),
        accepted=True,
        peer=peer,
        notify_peer=PeerJoinedEvent(
            peer=by,
            public_key=new.ios_public_key,
            session_nonce=new.ios_session_nonce,
            ephemeral_key=new.ios_ephemeral_key,
        ),
        evict=evict,
        owner_user_id=owner,
    )


@dataclass(frozen=True)
class Release:
    """The result of a socket leaving: the record to write, and whom to tell."""

    record: RoomRecord | None  # None: nothing to write (the slot is free already, or another's)
    peer: SlotHolder | None  # live holder of the other role, to receive `peer_disconnected`


def release(record: RoomRecord | None, holder: SlotHolder, role: str, now_ms: int, is_alive: IsAlive) -> Release:
    """A socket that held `role`'s slot left. Only the current holder clears the slot.

    A slot found free already was most likely freed by an earlier attempt of this same
    release whose answer was lost: the peer is still named, so that it hears of it. (A
    peer that does not know the leaving socket ignores the news.)
    """
    if record is None:
        return Release(record=None, peer=None)
    current, other = (record.mac, record.ios) if role == "mac" else (record.ios, record.mac)
    if current is not None and current.socket_id != holder.socket_id:
        return Release(record=None, peer=None)  # replaced: the newer socket's peer_joined tells the peer
    peer = _live(other, is_alive)
    if current is None:
        return Release(record=None, peer=peer)
    new = msgspec.structs.replace(record, last_activity_at=now_ms)
    if role == "mac":
        new.mac = None
    else:
        new.ios = None
    return Release(record=new, peer=peer)


def last_activity(record: RoomRecord, last_seen: tuple[int | None, ...] = ()) -> int:
    """Epoch ms of the room's latest activity: its last change or a socket's lastSeen."""
    return max([record.last_activity_at, *(t for t in last_seen if t is not None)])


def expire_idle(
    record: RoomRecord, now_ms: int, idle_timeout_ms: int, is_alive: IsAlive, last_seen: tuple[int | None, ...] = ()
) -> RoomRecord:
    """The record as idle cleanup leaves it (protocol.md §12 item 17).

    A room with no live socket and no activity for `idle_timeout_ms` drops its
    per-connection state and keeps its identity, so nobody else can claim the id.
    Applied whenever a record is read, so the cleanup needs no timer that could die
    with an edge. Returns `record` itself when nothing changes.
    """
    if _live(record.mac, is_alive) or _live(record.ios, is_alive):
        return record
    if now_ms - last_activity(record, last_seen) < idle_timeout_ms:
        return record
    cleaned = msgspec.structs.replace(
        record,
        mac_session_nonce="",
        mac_ephemeral_key="",
        ios_session_nonce="",
        ios_ephemeral_key="",
        mac=None,
        ios=None,
    )
    _clear_pairing(cleaned)
    return cleaned if cleaned != record else record


def _store_pairing(record: RoomRecord, msg: RegisterRoom, *, keep_used: bool) -> None:
    token = msg.pairing_token_hash or ""
    if not token:
        return
    same = bool(record.pairing_token_hash) and _same(token, record.pairing_token_hash)
    if not (same and keep_used):
        record.pairing_token_used = False
    record.pairing_token_hash = token
    record.pairing_token_expires_at = msg.pairing_token_expires_at


def _clear_pairing(record: RoomRecord) -> None:
    record.pairing_token_hash = ""
    record.pairing_token_used = False
    record.pairing_token_expires_at = None


def _ios_keys(record: RoomRecord) -> PeerJoined:
    return PeerJoined(
        public_key=record.ios_public_key,
        session_nonce=record.ios_session_nonce,
        ephemeral_key=record.ios_ephemeral_key,
    )


def _mac_keys(record: RoomRecord) -> PeerJoined:
    return PeerJoined(
        public_key=record.mac_public_key,
        session_nonce=record.mac_session_nonce,
        ephemeral_key=record.mac_ephemeral_key,
    )
